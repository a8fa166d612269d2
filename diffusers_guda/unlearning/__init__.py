"""Unlearning: one LoRA adapter per group, trained to unlearn that group from the frozen base UNet
(see docs/method.md#unlearning-one-group).

The modules: :mod:`.config` (:class:`UnlearningConfig`), :mod:`.unlearner` (:class:`GroupUnlearner`:
the per-group training loop and the bundle it makes), :mod:`.joint` (several groups' adapters in
one loop), :mod:`.checkpoint` (the resume directory),
:mod:`.forwards` (how the UNet is run: conditioning, autocast, base model or adapter),
:mod:`.batches` (each step's random batch), :mod:`.evaluation` (the loss before and after) and
:mod:`.base_model` (what the bundle records about the base model).
"""

from .checkpoint import RUN_NAME, STATS_NAME, UnlearningCheckpoint
from .config import UnlearningConfig
from .unlearner import GroupUnlearner

__all__ = ["GroupUnlearner", "RUN_NAME", "STATS_NAME", "UnlearningCheckpoint", "UnlearningConfig"]
