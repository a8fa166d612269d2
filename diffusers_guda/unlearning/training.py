"""The optimisation loop that trains one group's adapter, and the statistics recorded for the run
(see docs/method.md#one-unlearning-run)."""

from __future__ import annotations

import math
from typing import Callable, ContextManager, Iterable

import torch

from ..errors import BatchTooLargeError, UnlearningDivergedError
from ..objectives import UnlearningBatch, UnlearningObjective
from .config import UnlearningConfig


def optimise(
    objective: UnlearningObjective,
    next_batch: Callable[[], UnlearningBatch],
    params: list[torch.nn.Parameter],
    config: UnlearningConfig,
    autocast: Callable[[], ContextManager],
    steps: Iterable[int],
    group_name: str,
) -> list[dict[str, float]]:
    """Train ``params`` with AdamW on the objective's loss, one batch per step.

    Args:
        objective: The objective, set up for the group.
        next_batch: Draws the next step's batch.
        params: The adapter's trainable parameters.
        config: The unlearning settings (learning rate, gradient clipping).
        autocast: The autocast context of the loss computation.
        steps: The step numbers ``0 .. n-1`` (a progress bar, which then shows the losses).
        group_name: The group's name, for the error message.

    Returns:
        The loss parts (``forget``, ``preserve``...) of every step.

    Raises:
        UnlearningDivergedError: if the loss becomes NaN or infinite.
        BatchTooLargeError: if a step does not fit in the device's memory.
    """
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    curve = []
    for step in steps:
        try:
            parts = _step(objective, next_batch(), params, optimizer, config, autocast, step, group_name)
        except torch.cuda.OutOfMemoryError as exc:
            raise BatchTooLargeError(out_of_memory_advice(config, group_name, step)) from exc
        curve.append(parts)
        if step % 10 == 0 and hasattr(steps, "set_postfix"):
            steps.set_postfix(forget=f"{parts['forget']:.4f}", preserve=f"{parts['preserve']:.4f}")
    return curve


def _step(objective, batch, params, optimizer, config, autocast, step: int, group_name: str) -> dict[str, float]:
    """One optimiser step on ``batch``; returns the loss parts."""
    with autocast():
        loss, parts = objective.loss(batch)
    check_finite(loss, config, group_name, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    return parts


def check_finite(loss: torch.Tensor, config: UnlearningConfig, group_name: str, step: int) -> None:
    """Refuse a NaN or infinite loss.

    Raises:
        UnlearningDivergedError: naming the group, the step and a lower learning rate.
    """
    if not math.isfinite(loss.item()):
        raise UnlearningDivergedError(
            f"Unlearning group '{group_name}' diverged at step {step} (loss {loss.item()}). "
            f"Lower the learning rate (now {config.learning_rate:g}, e.g. --lr {config.learning_rate / 10:g}); "
            "finished groups are kept."
        )


def out_of_memory_advice(config: UnlearningConfig, group_name: str, step: int) -> str:
    """The message of a step that ran out of device memory: what was asked for and what makes it fit."""
    fixes = []
    if config.forget_batch_size + config.retain_batch_size > 2:
        smaller = max(1, min(config.forget_batch_size, config.retain_batch_size) // 2)
        fixes.append(f"a smaller batch (batch_size={smaller}, --batch-size {smaller})")
    if not config.gradient_checkpointing:
        fixes.append("gradient_checkpointing=True (--gradient-checkpointing)")
    if config.autocast_dtype is None:
        fixes.append("autocast_dtype='bfloat16' (--autocast bfloat16)")
    advice = "; ".join(fixes) if fixes else "a GPU with more memory, or a pipeline loaded with torch_dtype=torch.bfloat16"
    return (
        f"Unlearning group '{group_name}' ran out of device memory at step {step} (forget batch {config.forget_batch_size}, "
        f"retain batch {config.retain_batch_size}); use {advice}. Finished groups are kept."
    )


def run_statistics(
    seed: int,
    steps: int,
    wall_s: float,
    sample_passes: int,
    before: dict[str, float],
    after: dict[str, float],
    curve: list[dict[str, float]],
    trained_with: list[str] | None = None,
    shared_teacher_rows: int | None = None,
) -> dict:
    """The ``stats`` of a group's run, as recorded in the bundle (docs/formats.md#manifest).

    Args:
        seed: The group's seed.
        steps: Its optimiser steps.
        wall_s: Seconds the training loop took.
        sample_passes: UNet forwards of one image, teacher included, over the run.
        before: Forget and retain losses before unlearning.
        after: The same after.
        curve: The loss parts of every step.
        trained_with: The other groups of its joint loop (``config.joint_groups`` > 1), whose
            wall time it shares equally; recorded only when given.
        shared_teacher_rows: With shared draws, the teacher rows computed while serving this group
            (included in ``sample_passes``; rows computed for earlier groups are reused free);
            recorded only when given.
    """
    return {
        "seed": seed,
        "steps": steps,
        "wall_s": round(wall_s, 3),
        "sample_passes": sample_passes,
        "forget_loss_before": before["forget"],
        "forget_loss_after": after["forget"],
        "retain_loss_before": before["retain"],
        "retain_loss_after": after["retain"],
        "forget_loss_change": after["forget"] / before["forget"] - 1.0,
        "retain_loss_change": after["retain"] / before["retain"] - 1.0,
        "curve_first": curve[0],
        "curve_last": {k: sum(c[k] for c in curve[-10:]) / len(curve[-10:]) for k in curve[-1]},
    } | ({"trained_with": list(trained_with)} if trained_with else {}) | (
        {"shared_teacher_rows": shared_teacher_rows} if shared_teacher_rows is not None else {})
