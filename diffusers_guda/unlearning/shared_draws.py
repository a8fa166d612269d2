"""Fixed ``(t, noise)`` draws per training image, shared by every group's batches, and the teacher's
outputs on them computed once (docs/method.md#shared-draws).

An image is a forget image of its own group and a retain image of every other group, so with fresh
draws each of the K adapters pays the teacher's forward on rows no other adapter can reuse. With
``shared_draws=D`` each image has D rows fixed by the seed, the image's index and the draw; every
group's batches pick among them, and the teacher's output on a row is computed the first time any
group needs it and looked up afterwards. The teacher's cost becomes at most ``D`` forwards per
training image for the whole bundle, whatever the number of groups.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..data import GroupedDataset
from ..diffusion import NoiseSchedule
from ..hashing import derive_seed
from .forwards import UNetForwards


class SharedDraws:
    """The rows of one training set and the teacher's outputs on them, for one unlearning run.

    A row ``(i, d)`` is image ``i`` noised with the timestep and noise drawn from
    ``derive_seed("guda-shared-draw", seed, i, d)``. Teacher outputs are computed in forwards of
    exactly ``rows_per_forward`` rows (the last padded), so a row's output does not depend on which
    group asked for it first or on the rows it was computed with (per-sample layers; as for the ELBO's
    packed rows), and a group's adapter is the same whether it is trained alone or after others.

    Args:
        dataset: The grouped training set.
        draws: Rows per image.
        seed: Seed of the rows.
        schedule: The noise schedule (timesteps and noising).
        forwards: The UNet's forwards (the teacher, the conditioning, autocast).
        rows_per_forward: Rows per teacher forward.
        timestep_sampling: How a row's step is drawn (:meth:`NoiseSchedule.draw_timesteps`).
    """

    def __init__(self, dataset: GroupedDataset, draws: int, seed: int, schedule: NoiseSchedule, forwards: UNetForwards,
                 rows_per_forward: int, timestep_sampling: str = "uniform"):
        self.dataset, self.draws, self.seed, self.timestep_sampling = dataset, draws, seed, timestep_sampling
        self.schedule, self.forwards, self.rows_per_forward = schedule, forwards, rows_per_forward
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.computed_for: Counter[int] = Counter()  # teacher rows computed while serving each group

    def pick(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw per image of ``index``, from the group's ``generator``."""
        return torch.randint(0, self.draws, (len(index),), generator=generator)

    def rows(self, index: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``[B]`` and noise ``[B, *image_shape]`` of the rows ``(index[b], draw[b])``, on the CPU."""
        shape = tuple(self.dataset.image_shape)
        t = torch.empty(len(index), dtype=torch.long)
        noise = torch.empty((len(index), *shape))
        generator = torch.Generator()
        for b, (i, d) in enumerate(zip(index.tolist(), draw.tolist())):
            generator.manual_seed(derive_seed("guda-shared-draw", self.seed, i, d))
            t[b] = self.schedule.draw_timesteps(1, generator, self.timestep_sampling)[0]
            noise[b] = torch.randn(shape, generator=generator)
        return t, noise

    def teacher_outputs(self, index: torch.Tensor, draw: torch.Tensor, group: int) -> torch.Tensor:
        """The teacher's raw outputs ``[B, ...]`` on the rows ``(index[b], draw[b])``, on the UNet's device.

        Rows seen before are looked up; the others are computed and charged to ``group``.
        """
        keys = list(zip(index.tolist(), draw.tolist()))
        missing = list(dict.fromkeys(k for k in keys if k not in self._outputs))
        for start in range(0, len(missing), self.rows_per_forward):
            self._compute(missing[start : start + self.rows_per_forward])
        self.computed_for[group] += len(missing)
        return torch.stack([self._outputs[k] for k in keys]).to(self.forwards.device)

    def _compute(self, keys: list[tuple[int, int]]) -> None:
        padded = keys + [keys[-1]] * (self.rows_per_forward - len(keys))
        index = torch.tensor([i for i, _ in padded])
        t, noise = self.rows(index, torch.tensor([d for _, d in padded]))
        device = self.forwards.device
        x_t = self.schedule.add_noise(self.dataset.images[index].to(device), noise.to(device), t.to(device))
        with self.forwards.autocast():
            out = self.forwards.teacher()(x_t, t.to(device), self.forwards.cond(self.dataset, index))
        for key, row in zip(keys, out.cpu()):
            self._outputs[key] = row.clone()
