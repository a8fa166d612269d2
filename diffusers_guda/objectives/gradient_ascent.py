"""Bounded gradient ascent on the forget set: a simple baseline objective.

It raises the forget images' denoising loss until it reaches ``max_loss`` per sample. It tends to
damage the rest of the model (docs/method.md#objectives); keep it for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import ObjectiveConfig, UnlearningBatch, UnlearningObjective, register_objective


@dataclass
class GradientAscentConfig(ObjectiveConfig):
    max_loss: float = field(default=1.0, metadata={"help": "Per-sample forget loss beyond which ascent stops."})


@register_objective
class GradientAscent(UnlearningObjective):
    name = "gradient_ascent"
    config_class = GradientAscentConfig

    def forget_loss(self, batch: UnlearningBatch) -> torch.Tensor:
        x_t = batch.noisy("forget")
        output = batch.predict(x_t, batch.forget_t, batch.forget_cond).float()
        target = batch.schedule.target(batch.forget_x0, batch.forget_noise, batch.forget_t).float()
        per_sample = (output - target).flatten(1).pow(2).mean(1)
        # not torch.clamp: its gradient still flows at exactly max_loss; ascent stops once reached
        # (written so that a NaN loss stays NaN and divergence is still detected)
        cap = torch.full_like(per_sample, self.config.max_loss)
        return -torch.where(per_sample >= cap, cap, per_sample).mean()
