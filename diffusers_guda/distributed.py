"""Several processes (``torchrun``, ``accelerate launch``): who am I, my share of the work, gathering.

Both launchers start one Python process per GPU (or CPU worker) and describe it with the environment
variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. :func:`current_process` reads them, joins the
``torch.distributed`` process group (``nccl`` on CUDA, ``gloo`` on CPU) when there is more than one
process, and returns a :class:`ProcessInfo`. Work is split with :meth:`ProcessInfo.shard` (contiguous
slices in rank order) and put back together with :meth:`ProcessInfo.gather`, so every process ends
with the same, complete result, identical to a one-process run's.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import pickle
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping, Sequence, TypeVar

import torch

from .errors import DistributedError

T = TypeVar("T")

# Processes wait for each other at the end of their shares (e.g. the slowest group's unlearning).
COLLECTIVE_TIMEOUT = timedelta(hours=12)
_RANK_NAMES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # torchrun / accelerate, then MPI launchers
_SIZE_NAMES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_LOCAL_RANK_NAMES = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class ProcessInfo:
    """One process of a launch.

    Args:
        rank: This process's index among all processes (0 is the main process).
        world_size: Number of processes.
        local_rank: Index among the processes of this machine (picks its GPU).
        device: Where this process runs its models: ``cuda:<local_rank>`` when CUDA is available,
            else the CPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the process that writes shared outputs and shows progress)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this process's contiguous share of ``n`` items (sizes differ by at most 1)."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous share of ``items``; the shares, in rank order, are ``items``."""
        start, stop = self.shard_bounds(len(items))
        return list(items[start:stop])

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable; tensors best on CPU), in rank order, on every process."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj``, on every process (what the others pass is ignored)."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, value: Any, what: str) -> None:
        """Raise on every process if ``value`` differs between processes.

        Raises:
            DistributedError: naming ``what``, when a process was given other inputs than rank 0.
        """
        if not self.is_distributed:
            return
        digest = hashlib.sha256(pickle.dumps(value, protocol=4)).hexdigest()
        digests = self.gather(digest)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise DistributedError(
                f"Processes {odd} were given other {what} than process 0; every process of a launch must get the same inputs."
            )


SINGLE_PROCESS = ProcessInfo()
"""A one-process run (pass it as ``process=`` to keep a call from sharding under a launcher)."""


def _env_int(environ: Mapping[str, str], names: Sequence[str]) -> int | None:
    for name in names:
        if environ.get(name, "") != "":
            try:
                return int(environ[name])
            except ValueError:
                raise DistributedError(f"Environment variable {name}={environ[name]!r} is not an integer.") from None
    return None


def detect_process(environ: Mapping[str, str] | None = None, cuda_devices: int | None = None) -> ProcessInfo:
    """Describe this process from the launcher's environment variables, without joining any group.

    Args:
        environ: Environment to read (default ``os.environ``).
        cuda_devices: Visible CUDA devices (default ``torch.cuda.device_count()`` when CUDA is available).

    Raises:
        DistributedError: for inconsistent variables, a rank without a GPU of its own, or an
            ``accelerate launch`` that was asked for several processes but started one.
    """
    environ = os.environ if environ is None else environ
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world_size = _env_int(environ, _SIZE_NAMES)
    rank = _env_int(environ, _RANK_NAMES)
    if world_size is None:
        # accelerate's plain launcher (`--cpu`, or no `--multi_gpu` on a machine without GPUs) sets
        # MASTER_PORT for --num_processes > 1 but starts a single process without a rank
        if "ACCELERATE_USE_CPU" in environ and "MASTER_PORT" in environ:
            raise DistributedError(
                "accelerate launch started 1 process although several were asked: without GPUs it needs "
                "`accelerate launch --multi_gpu --num_processes N ...` (not --cpu), or use `torchrun --nproc_per_node N ...`."
            )
        world_size, rank = 1, 0
    if rank is None:
        raise DistributedError(f"WORLD_SIZE={world_size} is set but RANK is not; start the processes with torchrun or accelerate launch.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} does not fit WORLD_SIZE={world_size}.")
    local_rank = _env_int(environ, _LOCAL_RANK_NAMES)
    local_rank = rank if local_rank is None else local_rank
    if cuda_devices:
        if local_rank >= cuda_devices:
            raise DistributedError(
                f"Process with LOCAL_RANK={local_rank} has no GPU of its own ({cuda_devices} visible); "
                "start at most one process per GPU (e.g. --nproc_per_node / --num_processes <= the GPU count)."
            )
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return ProcessInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


_CURRENT: ProcessInfo | None = None


def current_process() -> ProcessInfo:
    """This process, with the ``torch.distributed`` process group joined if there are several.

    The first call reads the environment (see :func:`detect_process`) and, for ``WORLD_SIZE > 1``,
    initialises the default process group (``nccl`` on CUDA, ``gloo`` on CPU) unless the script
    already did (e.g. through ``accelerate.Accelerator``); later calls return the same object.
    Without a launcher it returns :data:`SINGLE_PROCESS`-like information and touches nothing.
    """
    global _CURRENT
    if _CURRENT is None:
        info = detect_process()
        if info.is_distributed:
            _join(info)
        _CURRENT = info
    return _CURRENT


def _join(info: ProcessInfo) -> None:
    import torch.distributed as dist

    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
            raise DistributedError(
                f"The running process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                f"RANK={info.rank}, WORLD_SIZE={info.world_size}."
            )
        return
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size, timeout=COLLECTIVE_TIMEOUT)
    atexit.register(_leave)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
