"""The training loop's state on disk, so that a killed training continues where it stopped.

A base or LOGO model of the lab trains for minutes to hours; a run that is killed (a closed shell, a
lost machine) would otherwise start that model again from step 0. Every ``every`` steps the loop
writes its whole state beside the output, ``.<output>-partial/``: the weights, the EMA, AdamW's
moments and step counts, the learning-rate schedule, the batch generator's and torch's random
states, and the losses so far. A rerun of the same recipe on the same data continues from there,
and the model it saves is bit-identical to one trained without the interruption
(docs/formats.md#checkpoints-and-resume).

Only safetensors and JSON are written and read; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusers_guda.data import GroupedDataset
from diffusers_guda.io_utils import atomic_directory

logger = logging.getLogger(__name__)

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def partial_dir(output_dir: str | Path) -> Path:
    """Where the training of ``output_dir`` keeps its checkpoint: ``.<name>-partial`` beside it."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}-partial"


def data_identity(dataset: GroupedDataset) -> dict:
    """What a model is trained on: the SHA-256 of its images' content and of their prompts (``None`` without)."""
    digests = dataset.content_digests()
    return {"images": digests["images"], "prompts": digests["prompts"]}


class TrainingCheckpoint:
    """The checkpoint of one training run in ``path``.

    Args:
        path: The checkpoint folder (see :func:`partial_dir`).
        identity: What the run trains (the recipe, :func:`data_identity`, the group left out); a checkpoint of anything else is
            not continued but replaced.
        every: Save every this many steps.
    """

    def __init__(self, path: str | Path, identity: dict, every: int = 100):
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1, got {every}")
        # as it reads back from state.json (tuples become lists), so that the two compare equal
        self.path, self.identity, self.every = Path(path), json.loads(json.dumps(identity)), every

    def restore(self, params: list[torch.Tensor], ema: list[torch.Tensor] | None, optimizer, schedule, generator) -> tuple[int, list[float], float]:
        """Load the saved state into the loop's objects; return ``(next step, losses so far, wall seconds so far)``.

        Without a checkpoint of this run, nothing changes and ``(0, [], 0.0)`` is returned.
        """
        if not (self.path / STATE_JSON).is_file() or not (self.path / STATE_TENSORS).is_file():
            return 0, [], 0.0
        record = json.loads((self.path / STATE_JSON).read_text())
        if record.get("identity") != self.identity:
            logger.warning("Ignoring the training checkpoint %s: it belongs to other settings or data.", self.path)
            return 0, [], 0.0
        tensors = load_file(self.path / STATE_TENSORS)
        device = params[0].device
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])
            for i, e in enumerate(ema or []):
                e.copy_(tensors[f"ema.{i}"])
        state = {i: {k: tensors[f"adam.{i}.{k}"].to(device if k != "step" else "cpu") for k in _ADAM_KEYS}
                 for i in range(len(params)) if f"adam.{i}.step" in tensors}
        optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
        schedule.load_state_dict(record["schedule"])
        generator.set_state(tensors["generator"])
        torch.set_rng_state(tensors["torch_rng"])
        logger.info("Continuing the training from step %d of %s.", record["step"], self.path)
        return int(record["step"]), tensors["losses"].tolist(), float(record["wall_s"])

    def save(self, step: int, params: list[torch.Tensor], ema: list[torch.Tensor] | None, optimizer, schedule, generator,
             losses: list[float], wall_s: float) -> None:
        """Write the state after ``step`` steps (replacing the previous checkpoint atomically)."""
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        tensors |= {f"ema.{i}": e.detach().cpu().contiguous() for i, e in enumerate(ema or [])}
        optimizer_state = optimizer.state_dict()
        for i, moments in optimizer_state["state"].items():
            tensors |= {f"adam.{i}.{k}": moments[k].detach().cpu().contiguous() for k in _ADAM_KEYS}
        tensors |= {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "losses": torch.tensor(losses, dtype=torch.float64)}
        record = {"identity": self.identity, "step": step, "wall_s": wall_s, "param_groups": optimizer_state["param_groups"],
                  "schedule": schedule.state_dict()}  # a LambdaLR's lambdas are code, recorded as null
        with atomic_directory(self.path) as tmp:
            save_file(tensors, tmp / STATE_TENSORS)
            (tmp / STATE_JSON).write_text(json.dumps(record, indent=1) + "\n")

    def remove(self) -> None:
        """Delete the checkpoint (once the model it was for is saved)."""
        shutil.rmtree(self.path, ignore_errors=True)
