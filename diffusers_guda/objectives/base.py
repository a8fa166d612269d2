"""Shared machinery of unlearning objectives: config base class, batch, registry.

The noise schedule they read (:class:`~diffusers_guda.diffusion.NoiseSchedule`) lives in
:mod:`diffusers_guda.diffusion` and is re-exported here and by :mod:`diffusers_guda.objectives`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable, ClassVar

import torch

from ..diffusion import NoiseSchedule
from ..errors import ConfigError
from ..models import Conditioning, conditioning_dict, map_conditioning, merge_conditioning
from ..validation import KIND_NAMES, is_kind, kind_of

PRESERVE_MODES = ("mse", "distill")


@dataclass
class UnlearningBatch:
    """One unlearning step's inputs.

    ``model`` runs the UNet with the group's adapter active (with gradients); ``teacher`` runs the
    same UNet with adapters disabled and without gradients. Both take ``(x_t, t)`` and return the raw
    model output; for a text-conditioned UNet they take ``(x_t, t, cond)`` with ``cond`` the
    conditioning: the text embeddings ``[B, L, D]``, or a flat dict of batch-first tensors such as
    SDXL's (see :mod:`diffusers_guda.models`). Objectives call them through :meth:`predict` and
    :meth:`teach`, which pass ``cond`` only when there is one.

    For text-conditioned models, ``forget_cond``/``retain_cond`` hold the conditioning of each image
    (its own prompt, and SDXL's time ids), ``forget_prompts``/``retain_prompts`` the prompts, and
    ``encode_prompts`` maps a list of prompts to their conditioning; objectives that condition on
    other prompts (e.g. ``anchor``) use :meth:`prompt_cond`.
    ``dataset`` is the grouped (latent) training set the batch was drawn from.

    With shared draws (``UnlearningConfig.shared_draws``), ``forget_draw``/``retain_draw`` name
    each row's draw and ``shared_draws`` holds the teacher's outputs on them: objectives ask for the
    teacher at the batch's own rows through :meth:`teacher_output`, which looks them up there.
    """

    forget_x0: torch.Tensor
    forget_index: torch.Tensor
    forget_t: torch.Tensor
    forget_noise: torch.Tensor
    retain_x0: torch.Tensor
    retain_index: torch.Tensor
    retain_t: torch.Tensor
    retain_noise: torch.Tensor
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    schedule: NoiseSchedule
    generator: torch.Generator
    forget_cond: Conditioning | None = None
    retain_cond: Conditioning | None = None
    forget_prompts: list[str] | None = None
    retain_prompts: list[str] | None = None
    encode_prompts: Callable[[list[str]], Conditioning] | None = None
    group: int | None = None
    forget_draw: torch.Tensor | None = None
    retain_draw: torch.Tensor | None = None
    shared_draws: object | None = None  # a diffusers_guda.unlearning.SharedDraws

    def prompt_cond(self, prompts: list[str], images: Conditioning) -> Conditioning:
        """The conditioning of ``images`` (e.g. ``forget_cond``) with other ``prompts``.

        Args:
            prompts: One prompt per image, or one for all.
            images: The images' own conditioning; what does not come from the prompt (SDXL's time
                ids) is kept.
        """
        first = next(iter(conditioning_dict(images).values()))
        n, device = first.shape[0], first.device
        cond = map_conditioning(self.encode_prompts(prompts), lambda v: v.to(device).expand(n, *v.shape[1:]))
        return merge_conditioning(images, cond)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """The student's (adapter on) raw output, conditioned on ``cond`` when given."""
        return self.model(x_t, t) if cond is None else self.model(x_t, t, cond)

    def teach(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """The teacher's (adapters off, no gradients) raw output, conditioned on ``cond`` when given."""
        return self.teacher(x_t, t) if cond is None else self.teacher(x_t, t, cond)

    def noisy(self, part: str) -> torch.Tensor:
        """``x_t`` of the batch's ``"forget"`` or ``"retain"`` rows."""
        x0, noise, t = (getattr(self, f"{part}_{name}") for name in ("x0", "noise", "t"))
        return self.schedule.add_noise(x0, noise, t)

    def teacher_output(self, part: str) -> torch.Tensor:
        """The teacher's raw output at the batch's own ``"forget"`` or ``"retain"`` rows (at :meth:`noisy`).

        With shared draws it is looked up (computed once per row for every group); otherwise the
        teacher runs on the rows.
        """
        if self.shared_draws is not None:
            return self.shared_draws.teacher_outputs(getattr(self, f"{part}_index"), getattr(self, f"{part}_draw"), self.group)
        return self.teach(self.noisy(part), getattr(self, f"{part}_t"), getattr(self, f"{part}_cond"))


@dataclass
class ObjectiveConfig:
    """Fields every objective has: the weights of L = preserve_weight * L_preserve + forget_weight * L_forget.

    Options passed by name are checked against the kind of their field's default; a field's
    ``metadata["words"]`` lists strings it accepts besides (e.g. ``num_neighbors="all"``).
    """

    preserve_modes: ClassVar[tuple[str, ...]] = PRESERVE_MODES  # an objective may add its own

    forget_weight: float = field(default=1.0, metadata={"help": "λ, weight of the forget term."})
    preserve: str = field(default="mse", metadata={"help": "'mse' (ε-MSE on retain images) or 'distill' (match the teacher)."})
    preserve_weight: float = field(default=1.0, metadata={"help": "Weight of the preserve term."})

    def __post_init__(self):
        if self.preserve not in self.preserve_modes:
            raise ConfigError(f"preserve must be one of {self.preserve_modes}, got {self.preserve!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


class UnlearningObjective:
    """Base class: a forget term (subclasses) and a preserve term (shared).

    Subclasses set ``name`` and ``config_class`` and implement :meth:`forget_loss`; they may
    override :meth:`setup` to precompute per-group data (e.g. nearest neighbours). An objective
    that conditions on prompts sets ``needs_text = True``: unlearning refuses it for an
    unconditional UNet before any adapter is trained.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    needs_text: ClassVar[bool] = False

    def __init__(self, config: ObjectiveConfig | None = None, **kwargs):
        if config is None:
            known = {f.name for f in fields(self.config_class)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise ConfigError(f"Objective '{self.name}' has no option(s) {unknown}; options: {sorted(known)}.")
            for f in fields(self.config_class):
                kind, words = kind_of(f.default), f.metadata.get("words", ())
                value = kwargs.get(f.name)
                if f.name in kwargs and kind is not None and not is_kind(value, kind) and value not in words:
                    expected = " or ".join([KIND_NAMES[kind], *map(repr, words)])
                    raise ConfigError(f"Objective '{self.name}' option {f.name} must be {expected}, got {value!r}.")
            config = self.config_class(**kwargs)
        elif kwargs:
            raise ConfigError("Pass either a config object or keyword options, not both.")
        self.config = config

    def setup(self, dataset, group: int, schedule: NoiseSchedule) -> None:
        """Prepare for unlearning ``group`` of ``dataset`` (called once per group)."""

    def forget_loss(self, batch: UnlearningBatch) -> torch.Tensor:
        raise NotImplementedError

    def teacher_passes(self, forget_batch_size: int, retain_batch_size: int) -> int:
        """Teacher forwards per step with fresh draws (counted as sample passes next to the student's)."""
        return self.row_teacher_passes(forget_batch_size, retain_batch_size)

    def row_teacher_passes(self, forget_batch_size: int, retain_batch_size: int) -> int:
        """The part of :meth:`teacher_passes` at the batch's own rows (:meth:`UnlearningBatch.teacher_output`),
        which shared draws compute once per row instead of once per step."""
        return retain_batch_size if self.config.preserve == "distill" else 0

    def preserve_loss(self, batch: UnlearningBatch) -> torch.Tensor:
        x_t = batch.noisy("retain")
        output = batch.predict(x_t, batch.retain_t, batch.retain_cond)
        if self.config.preserve == "distill":
            target = batch.teacher_output("retain")
        else:
            target = batch.schedule.target(batch.retain_x0, batch.retain_noise, batch.retain_t)
        return torch.nn.functional.mse_loss(output.float(), target.float())

    def loss(self, batch: UnlearningBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (for logging)."""
        forget = self.forget_loss(batch)
        preserve = self.preserve_loss(batch)
        total = self.config.preserve_weight * preserve + self.config.forget_weight * forget
        return total, {"forget": forget.item(), "preserve": preserve.item()}

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.to_dict()}


_REGISTRY: dict[str, type[UnlearningObjective]] = {}


def register_objective(cls: type[UnlearningObjective]) -> type[UnlearningObjective]:
    """Class decorator adding an objective to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ConfigError(f"An objective named {cls.name!r} is already registered.")
    _REGISTRY[cls.name] = cls
    return cls


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def get_objective(name: str, config: ObjectiveConfig | dict | None = None) -> UnlearningObjective:
    """Instantiate the objective registered as ``name``.

    Raises:
        ConfigError: for an unknown name or unknown options.
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"Unknown objective {name!r}. Available: {', '.join(available_objectives())}. "
            "Register a new one with @register_objective."
        )
    cls = _REGISTRY[name]
    if isinstance(config, dict):
        return cls(**config)
    return cls(config)
