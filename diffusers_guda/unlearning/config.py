"""The settings of an unlearning run: how each group's adapter is trained (see
docs/method.md#unlearning-one-group)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from ..diffusion import TIMESTEP_SAMPLINGS
from ..errors import ConfigError
from ..lora import LoRASettings
from ..objectives import get_objective
from ..validation import check_types

AUTOCAST_DTYPES = ("auto", None, "bfloat16", "float16")
_INTS = ("steps", "forget_batch_size", "retain_batch_size", "seed", "eval_images", "eval_draws", "joint_groups", "shared_draws")
_REALS = ("size_exponent", "learning_rate", "max_grad_norm")


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
        autocast_dtype: Autocast the forwards to ``"bfloat16"`` or ``"float16"``, ``None`` for full
            precision, or ``"auto"`` (default): ``"bfloat16"`` on CUDA, ``None`` elsewhere. The frozen
            base then runs in bfloat16 while the adapter's weights and optimiser stay in float32. A run
            records the resolved value (:meth:`for_device`).
        gradient_checkpointing: Recompute the UNet's activations in the backward pass instead of
            keeping them: fewer activations held, one more forward pass of each block per step. The
            adapter it trains is the same up to float rounding.
        joint_groups: Groups whose adapters train together in one loop: each forward holds the rows
            of all of them, one adapter per row (docs/method.md#adapters-trained-together). Each group
            keeps its own seed, batches and optimiser, so its adapter is the one it gets alone up to
            float rounding. 1 (default) trains the groups one after the other. Not with
            ``gradient_checkpointing``.
        shared_draws: Fixed ``(t, noise)`` draws per training image that every group's batches pick
            from, so that the teacher's output on each is computed once for all groups
            (docs/method.md#shared-draws): the teacher then costs at most ``shared_draws`` forwards
            per image for the whole bundle instead of its rows' share of every step. 0 (default):
            fresh draws at every step.
        timestep_sampling: How the training rows draw their step: ``"uniform"`` (default) or
            ``"log_snr"``, uniform in the log signal-to-noise ratio, which draws more of the
            low-noise steps that carry most of a score's weight (docs/method.md#unlearning-timesteps).
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
    autocast_dtype: str | None = field(default="auto", metadata={"help": "'auto' (bfloat16 on CUDA), bfloat16, float16, or None."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in the backward pass (memory)."})
    joint_groups: int = field(default=1, metadata={"help": "Groups trained together, one adapter per row of each forward."})
    shared_draws: int = field(default=0, metadata={"help": "Fixed draws per image shared by every group, teacher outputs computed once (0: fresh draws)."})
    timestep_sampling: str = field(default="uniform",
                                   metadata={"help": "Steps of the training rows: 'uniform' or 'log_snr' (uniform in log-SNR)."})

    def __post_init__(self):
        check_types(self, ints=_INTS, reals=_REALS)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}.")
        if not isinstance(self.objective_options, dict):
            raise ConfigError(f"objective_options must be a JSON object of option names and values, got {self.objective_options!r}.")
        if isinstance(self.lora, dict):
            self.lora = LoRASettings.from_dict(self.lora)
        elif not isinstance(self.lora, LoRASettings):
            raise ConfigError(f"lora must be a JSON object such as {{\"rank\": 8, \"alpha\": 8}}, got {self.lora!r}.")
        if self.steps < 1 or self.forget_batch_size < 1 or self.retain_batch_size < 1:
            raise ConfigError("steps and batch sizes must be >= 1.")
        if self.joint_groups < 1:
            raise ConfigError(f"joint_groups must be >= 1 (1: one group after the other), got {self.joint_groups}.")
        if self.joint_groups > 1 and self.gradient_checkpointing:
            # the recomputation in the backward pass would run without the rows' adapter assignment
            raise ConfigError("joint_groups > 1 cannot be combined with gradient_checkpointing; train the groups one at a time "
                              "(joint_groups=1) to save memory, or turn gradient checkpointing off to train them together.")
        if self.shared_draws < 0:
            raise ConfigError(f"shared_draws must be >= 0 (0: fresh draws at every step), got {self.shared_draws}.")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}.")
        if self.eval_images < 1 or self.eval_draws < 1:
            raise ConfigError(f"eval_images and eval_draws must be >= 1, got {self.eval_images} and {self.eval_draws}.")
        if not 0 <= self.size_exponent < math.inf:
            raise ConfigError(f"size_exponent must be a finite number >= 0, got {self.size_exponent}.")
        if not 0 < self.learning_rate < math.inf:
            raise ConfigError(f"learning_rate must be > 0 and finite, got {self.learning_rate}.")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise ConfigError(f"max_grad_norm must be a finite number > 0 (or null: no clipping), got {self.max_grad_norm}.")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ConfigError(f"autocast_dtype must be one of {AUTOCAST_DTYPES}, got {self.autocast_dtype!r}.")
        get_objective(self.objective, self.objective_options)  # validate name and options early

    def for_device(self, device: torch.device | str) -> "UnlearningConfig":
        """These settings as run on ``device``: ``autocast_dtype="auto"`` becomes ``"bfloat16"`` on CUDA, else ``None``."""
        if self.autocast_dtype != "auto":
            return self
        return replace(self, autocast_dtype="bfloat16" if torch.device(device).type == "cuda" else None)

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
