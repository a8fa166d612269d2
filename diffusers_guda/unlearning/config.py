"""The settings of an unlearning run: how each group's adapter is trained (see
docs/method.md#unlearning-one-group)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ConfigError
from ..lora import LoRASettings
from ..objectives import get_objective


@dataclass
class UnlearningConfig:
    """How each group's adapter is trained.

    Args:
        objective: Registered objective name (``retrack``, ``gradient_ascent``...).
        objective_options: Options of that objective's config (e.g. ``{"num_neighbors": 10}``).
        lora: Adapter shape.
        steps: Optimiser steps per group (of the mean group size, when ``size_exponent`` is not 0).
        size_exponent: Scales each group's steps with its size: a group of ``n`` images gets
            ``max(1, round(steps * (n / mean group size) ** size_exponent))`` steps. Retraining
            without a large group moves the model more than without a small one; 0 gives every
            group ``steps``.
        learning_rate: AdamW learning rate (constant).
        forget_batch_size: Forget images per step.
        retain_batch_size: Retain images per step.
        max_grad_norm: Gradient clipping; ``None`` disables it.
        seed: Base seed; each group's seed is derived from it and the group, so a group's adapter
            does not depend on which other groups are trained, in which order or process.
        eval_images: Forget and retain images (each) on which the loss before/after is measured.
        eval_draws: Fixed (t, noise) draws per evaluation image.
        autocast_dtype: Autocast the forwards to ``"bfloat16"`` or ``"float16"`` (CUDA), or ``None``.
    """

    objective: str = field(default="retrack", metadata={"help": "Registered objective name."})
    objective_options: dict = field(default_factory=dict, metadata={"help": "Options of the objective."})
    lora: LoRASettings = field(default_factory=LoRASettings, metadata={"help": "Adapter shape."})
    steps: int = field(default=40, metadata={"help": "Optimiser steps per group."})
    size_exponent: float = field(default=0.0, metadata={"help": "Steps scale as (group size / mean size) ** size_exponent."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate."})
    forget_batch_size: int = field(default=64, metadata={"help": "Forget images per step."})
    retain_batch_size: int = field(default=64, metadata={"help": "Retain images per step."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=0, metadata={"help": "Base seed."})
    eval_images: int = field(default=256, metadata={"help": "Images per evaluation set."})
    eval_draws: int = field(default=4, metadata={"help": "Fixed draws per evaluation image."})
    autocast_dtype: str | None = field(default=None, metadata={"help": "bfloat16/float16 autocast of the forwards (CUDA), or None."})

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRASettings.from_dict(self.lora)
        if self.steps < 1 or self.forget_batch_size < 1 or self.retain_batch_size < 1:
            raise ConfigError("steps and batch sizes must be >= 1.")
        if not self.size_exponent >= 0:
            raise ConfigError(f"size_exponent must be >= 0, got {self.size_exponent}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}.")
        get_objective(self.objective, self.objective_options)  # validate name and options early

    def steps_for(self, group_size: int, mean_group_size: float) -> int:
        """Optimiser steps of a group of ``group_size`` images (see ``size_exponent``)."""
        if self.size_exponent == 0:
            return self.steps
        return max(1, round(self.steps * (group_size / mean_group_size) ** self.size_exponent))

    def describe_steps(self) -> str:
        """The step budget in words, for logs: ``"40 steps each"`` or ``"120 steps at the mean group size, ∝ size^1"``."""
        if self.size_exponent == 0:
            return f"{self.steps} steps each"
        return f"{self.steps} steps at the mean group size, ∝ size^{self.size_exponent:g}"

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (``lora`` as :meth:`LoRASettings.to_dict`)."""
        data = asdict(self)
        data["lora"] = self.lora.to_dict()
        return data
