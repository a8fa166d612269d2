"""Several groups' adapters trained in one loop, the rows of all of them in each forward (see
docs/method.md#adapters-trained-together).

Objectives are written for one group: they call the batch's ``model`` and ``teacher`` themselves.
To batch those calls across groups without changing any objective, each step runs every group's loss
twice. The first pass records the inputs of the group's calls and gets zeros back (no objective
feeds a model output into a later input; the second pass checks that). The calls at the same
position of every group's sequence then run as one forward: the student with one adapter per row,
the teacher with adapters off. The second pass, from the same generator state, gets those outputs
and builds the losses; their sum is differentiated once, and each adapter's gradient is its own
group's (the groups share no trainable weight and no row). Each group keeps its own seed, batches,
optimiser and gradient clipping, so its adapter is the one it gets alone up to float rounding: the
LoRA branch runs on the group's rows of a larger forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager, Iterable, Sequence

import torch

from ..errors import BatchTooLargeError, ConfigError
from ..models import Conditioning, conditioning_dict
from ..objectives import UnlearningBatch, UnlearningObjective
from .config import UnlearningConfig
from .evaluation import EvaluationSets
from .forwards import UNetForwards
from .training import check_finite, out_of_memory_advice

STUDENT, TEACHER = "model", "teacher"


@dataclass
class GroupRun:
    """One group's unlearning run: what its steps draw from and update, and its evaluation.

    Attributes:
        name: The group's name (messages, progress).
        adapter_name: The peft name of its adapter.
        seed: Its seed (batches and the adapter's initialisation).
        generator: Its generator (in a joint loop, its state is replayed between a step's two passes).
        objective: Its objective, set up for the group.
        steps: Its optimiser steps.
        next_batch: Draws its next step's batch from ``generator``.
        evaluation: Its before/after evaluation sets.
        before: Its forget and retain losses before unlearning.
        group: Its id in the dataset.
        params: Its adapter's trainable parameters, once the adapter is added.
    """

    name: str
    adapter_name: str
    seed: int
    generator: torch.Generator
    objective: UnlearningObjective
    steps: int
    next_batch: Callable[[], UnlearningBatch]
    evaluation: EvaluationSets
    before: dict[str, float]
    group: int
    params: list[torch.nn.Parameter] = field(default_factory=list)


@dataclass
class _Call:
    kind: str
    x_t: torch.Tensor
    t: torch.Tensor
    cond: Conditioning | None


class _Recorder:
    """A batch's ``model`` and ``teacher`` on the first pass: keeps each call's inputs, returns zeros."""

    def __init__(self):
        self.calls: list[_Call] = []

    def caller(self, kind: str):
        def call(x_t, t, cond=None):
            self.calls.append(_Call(kind, x_t.detach(), t, cond))
            return torch.zeros_like(x_t, dtype=torch.float32)

        return call


class _Replayer:
    """A batch's ``model`` and ``teacher`` on the second pass: the fused forwards' outputs, in call order."""

    def __init__(self, calls: list[_Call], outputs: list[torch.Tensor], objective: str):
        self.calls, self.outputs, self.objective, self.position = calls, outputs, objective, 0

    def caller(self, kind: str):
        def call(x_t, t, cond=None):
            i = self.position
            if i >= len(self.calls) or not _same_call(self.calls[i], _Call(kind, x_t, t, cond)):
                raise ConfigError(
                    f"The {self.objective} objective's model inputs depend on model outputs, so its groups cannot be "
                    "trained together; use joint_groups=1."
                )
            self.position += 1
            return self.outputs[i]

        return call


def _same_call(a: _Call, b: _Call) -> bool:
    if a.kind != b.kind or not torch.equal(a.x_t, b.x_t.detach()) or not torch.equal(a.t, b.t):
        return False
    if (a.cond is None) != (b.cond is None):
        return False
    if a.cond is None:
        return True
    ca, cb = conditioning_dict(a.cond), conditioning_dict(b.cond)
    return ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


def _concat_conditioning(conds: Sequence[Conditioning | None]) -> Conditioning | None:
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(list(conds))


def _fused_outputs(forwards: UNetForwards, calls: list[list[_Call]], adapter_names: list[str], objective: str) -> list[list[torch.Tensor]]:
    """Run the calls at each position of every group's sequence as one forward; the outputs per group.

    Raises:
        ConfigError: if the groups' objectives made different sequences of calls.
    """
    lengths = {len(c) for c in calls}
    if len(lengths) != 1:
        raise ConfigError(f"The {objective} objective made a different number of model calls per group; use joint_groups=1.")
    teacher = forwards.teacher()
    outputs: list[list[torch.Tensor]] = [[] for _ in calls]
    for position in range(lengths.pop()):
        step_calls = [c[position] for c in calls]
        kinds = {c.kind for c in step_calls}
        if len(kinds) != 1:
            raise ConfigError(f"The {objective} objective called the model and the teacher in another order per group; use joint_groups=1.")
        x_t = torch.cat([c.x_t for c in step_calls])
        t = torch.cat([c.t for c in step_calls])
        cond = _concat_conditioning([c.cond for c in step_calls])
        if kinds.pop() == TEACHER:
            out = teacher(x_t, t, cond)
        else:
            rows = [name for c, name in zip(step_calls, adapter_names) for _ in range(len(c.x_t))]
            with forwards.running(rows):
                out = forwards(x_t, t, cond)
        for g, part in enumerate(out.split([len(c.x_t) for c in step_calls])):
            outputs[g].append(part)
    return outputs


def optimise_jointly(
    groups: list[GroupRun],
    forwards: UNetForwards,
    config: UnlearningConfig,
    autocast: Callable[[], ContextManager],
    steps: Iterable[int],
) -> list[list[dict[str, float]]]:
    """Train every group's adapter with its own AdamW on its objective's loss, all groups' rows in each forward.

    A group whose steps are done drops out of later forwards.

    Args:
        groups: The groups, their adapters loaded, active and trainable.
        forwards: The UNet's forwards.
        config: The unlearning settings (learning rate, gradient clipping).
        autocast: The autocast context of the loss computation.
        steps: The step numbers ``0 .. max steps - 1`` (a progress bar, which then shows the mean losses).

    Returns:
        Each group's loss parts (``forget``, ``preserve``...) of every one of its steps.

    Raises:
        UnlearningDivergedError: if a group's loss becomes NaN or infinite.
        BatchTooLargeError: if a step does not fit in the device's memory.
    """
    optimizers = [torch.optim.AdamW(g.params, lr=config.learning_rate, weight_decay=0.0) for g in groups]
    curves: list[list[dict[str, float]]] = [[] for _ in groups]
    for step in steps:
        live = [i for i, g in enumerate(groups) if step < g.steps]
        try:
            parts = _joint_step([groups[i] for i in live], [optimizers[i] for i in live], forwards, config, autocast, step)
        except torch.cuda.OutOfMemoryError as exc:
            raise BatchTooLargeError(out_of_memory_advice(config, ", ".join(groups[i].name for i in live), step)) from exc
        for i, p in zip(live, parts):
            curves[i].append(p)
        if step % 10 == 0 and hasattr(steps, "set_postfix"):
            mean = {k: sum(p[k] for p in parts) / len(parts) for k in ("forget", "preserve")}
            steps.set_postfix(forget=f"{mean['forget']:.4f}", preserve=f"{mean['preserve']:.4f}")
    return curves


def _joint_step(groups, optimizers, forwards, config, autocast, step: int) -> list[dict[str, float]]:
    batches = [g.next_batch() for g in groups]
    states = [g.generator.get_state() for g in groups]
    recorders = [_Recorder() for _ in groups]
    for g, batch, rec in zip(groups, batches, recorders):
        g.objective.loss(replace(batch, model=rec.caller(STUDENT), teacher=rec.caller(TEACHER)))
    objective = groups[0].objective.name
    with autocast():
        outputs = _fused_outputs(forwards, [r.calls for r in recorders], [g.adapter_name for g in groups], objective)
        losses, parts = [], []
        for g, batch, rec, out, state in zip(groups, batches, recorders, outputs, states):
            g.generator.set_state(state)  # the second pass draws what the first drew
            replayer = _Replayer(rec.calls, out, objective)
            loss, part = g.objective.loss(replace(batch, model=replayer.caller(STUDENT), teacher=replayer.caller(TEACHER)))
            check_finite(loss, config, g.name, step)
            losses.append(loss)
            parts.append(part)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()
    for g, opt in zip(groups, optimizers):
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(g.params, config.max_grad_norm)
        opt.step()
    return parts
