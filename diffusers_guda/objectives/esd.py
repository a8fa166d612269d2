"""ESD: erase a group by negative guidance from the teacher (conditional models, docs/method.md#objectives).

On a noisy forget latent, the student conditioned on the forget prompt is trained toward
``ε_u − w (ε_c − ε_u)``, where ``ε_c`` and ``ε_u`` are the teacher's predictions with the forget
prompt and with the empty prompt: guidance *away* from what the prompt adds. The combination is
taken on the raw model outputs; its weights sum to one, so it is the same target in ε-space for
ε-, v- or sample-prediction models. The preserve term distils the teacher on retain samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..diffusion import NoiseSchedule
from ..errors import ConfigError, DataError
from .base import ObjectiveConfig, UnlearningBatch, UnlearningObjective, register_objective


@dataclass
class ESDConfig(ObjectiveConfig):
    guidance_weight: float = field(default=1.0, metadata={"help": "w, strength of the negative guidance."})
    preserve: str = field(default="distill", metadata={"help": "'distill' (match the teacher, default) or 'mse'."})

    def __post_init__(self):
        super().__post_init__()
        if self.guidance_weight < 0:
            raise ConfigError(f"guidance_weight must be >= 0, got {self.guidance_weight}.")


@register_objective
class ESD(UnlearningObjective):
    """Negative-guidance target ``ε_u − w (ε_c − ε_u)`` from the teacher on forget samples."""

    name = "esd"
    config_class = ESDConfig
    needs_text = True

    def setup(self, dataset, group: int, schedule: NoiseSchedule) -> None:
        if dataset.prompts is None:
            raise DataError("The esd objective is for text-conditioned models: the dataset needs one prompt per image.")

    def teacher_passes(self, forget_batch_size: int, retain_batch_size: int) -> int:
        # the unconditional prediction is at the batch's rows but not with their own prompts
        return forget_batch_size + self.row_teacher_passes(forget_batch_size, retain_batch_size)

    def row_teacher_passes(self, forget_batch_size: int, retain_batch_size: int) -> int:
        return forget_batch_size + super().row_teacher_passes(forget_batch_size, retain_batch_size)

    def forget_loss(self, batch: UnlearningBatch) -> torch.Tensor:
        if batch.encode_prompts is None or batch.forget_cond is None:
            raise ConfigError("The esd objective needs a text-conditioned UNet and prompts (use it through pipe.unlearn_groups).")
        x_t = batch.noisy("forget")
        empty = batch.prompt_cond([""], batch.forget_cond)
        cond = batch.teacher_output("forget").float()
        uncond = batch.teach(x_t, batch.forget_t, empty).float()
        target = uncond - self.config.guidance_weight * (cond - uncond)
        output = batch.predict(x_t, batch.forget_t, batch.forget_cond).float()
        return torch.nn.functional.mse_loss(output, target)
