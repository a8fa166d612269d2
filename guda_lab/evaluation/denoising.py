"""Denoising losses with common random numbers, shared by the loss-based baselines (gradient and
instance unlearning) and the kernel baselines D-TRAK and DAS, which differentiate other functions of
the same model outputs (:func:`denoising_output`; see docs/evaluation.md#baselines).

The noise of an image's loss is a pure function of (salt, seed, image content hash, t, draw), as in
:mod:`diffusers_guda.elbo`, and every image is evaluated alone, so a score does not depend on the batch
it was computed in. A timestep ``t`` is an integer training step of the scheduler's
:class:`~diffusers_guda.diffusion.NoiseSchedule` (for a flow-matching model: the ``t``-th training σ,
from the least noisy), and the model is called through :func:`~diffusers_guda.models.denoise` at its
time input ``schedule.model_timesteps(t)``; a text-conditioned UNet (``UNet2DConditionModel``) with
the embeddings ``c`` of each image's own prompt (the baselines take them as ``query_conditioning`` /
``train_conditioning``, ``[N, L, D]``). The loss is the MSE of the model's regression target (ε, v,
x0, or the flow velocity ``ε - x0``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from diffusers_guda.errors import ConfigError
from diffusers_guda.diffusion import NoiseSchedule
from diffusers_guda.hashing import derive_seed, image_content_hash
from diffusers_guda.models import denoise

from .aggregation import AGGREGATES

__all__ = [
    "DenoisingLossConfig",
    "GradientsOn",
    "check_conditioning",
    "default_timesteps",
    "denoising_loss",
    "denoising_output",
    "denoising_noise",
    "progress_bar",
    "resolve_timesteps",
    "select_parameters",
]

@dataclass
class DenoisingLossConfig:
    """Fields shared by the loss-based baselines: which denoising losses, over which parameters.

    Args:
        timesteps: Timesteps of the denoising loss; default 10 evenly spaced in ``[T/20, T)``.
        num_draws: Noise draws per timestep.
        seed: Seed of the noise draws (and of the gradient baseline's projection).
        param_filter: Only parameters whose name contains this substring (default: all parameters,
            whatever their ``requires_grad``).
        aggregate: ``"sum"`` (docs/evaluation.md#baselines) or ``"mean"`` of the per-image scores within a group.
    """

    timesteps: tuple[int, ...] | None = field(default=None, metadata={"help": "Loss timesteps (default 10 in [T/20, T))."})
    num_draws: int = field(default=1, metadata={"help": "Noise draws per timestep."})
    seed: int = field(default=0, metadata={"help": "Seed of the noise draws."})
    param_filter: str | None = field(default=None, metadata={"help": "Substring of parameter names to include."})
    aggregate: str = field(default="sum", metadata={"help": "'sum' or 'mean' over a group's images."})

    def __post_init__(self):
        if self.num_draws < 1:
            raise ConfigError("num_draws must be >= 1.")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}.")
        if self.timesteps is not None:
            self.timesteps = tuple(int(t) for t in self.timesteps)

    def to_dict(self) -> dict:
        return asdict(self)


def default_timesteps(num_train_timesteps: int, count: int = 10) -> tuple[int, ...]:
    """``count`` evenly spaced timesteps in ``[T/20, T)`` (duplicates removed)."""
    lo = num_train_timesteps // 20
    grid = torch.linspace(lo, num_train_timesteps - 1, count).round().long().unique()
    return tuple(int(t) for t in grid)


def resolve_timesteps(timesteps: Sequence[int] | None, scheduler) -> torch.Tensor:
    """The loss timesteps as a long tensor: ``timesteps``, or :func:`default_timesteps` of the scheduler's ``T``
    (DDPM-family or flow-matching: see :class:`~diffusers_guda.diffusion.NoiseSchedule`).

    Raises:
        ConfigError: an empty list, or a timestep outside ``[0, T)``.
    """
    T = NoiseSchedule(scheduler).num_train_timesteps
    steps = default_timesteps(T) if timesteps is None else tuple(int(t) for t in timesteps)
    if not steps or any(not 0 <= t < T for t in steps):
        raise ConfigError(f"timesteps must be a non-empty list of integers in [0, {T}); got {steps}.")
    return torch.tensor(steps, dtype=torch.long)


def denoising_noise(image: torch.Tensor, timesteps: torch.Tensor, num_draws: int, seed: int, salt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(t, noise)`` of one image, t-major: the noise is a pure function of (salt, seed, hash, t, draw)."""
    image_hash = image_content_hash(image)
    row_t = timesteps.repeat_interleave(num_draws)
    noise = torch.empty((len(row_t), *image.shape), dtype=torch.float32)
    generator = torch.Generator()
    for i, t in enumerate(row_t.tolist()):
        generator.manual_seed(derive_seed(salt, seed, image_hash, t, i % num_draws))
        noise[i] = torch.randn(image.shape, generator=generator)
    return row_t, noise


def denoising_output(unet, schedule: NoiseSchedule, image: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], with_input: bool = False,
                     cond: torch.Tensor | None = None):
    """The model's output on one image's (t, draw) rows: ``(output, target, x_t)``.

    ``output`` is the prediction on the noisy inputs ``x_t`` (float32 ``[R, C, H, W]``), ``target`` its
    regression target. ``cond`` (``[L, D]``) is the image's text conditioning for a text-conditioned
    UNet. With ``with_input`` the noisy input ``x_t`` requires gradients (see :func:`denoising_loss`).
    """
    param = next(unet.parameters())
    t, noise = rows
    x0 = image.to(torch.float32).unsqueeze(0).expand_as(noise)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    x_in = x_t.to(param.device, param.dtype)
    if with_input:
        x_in.requires_grad_(True)
    cond = None if cond is None else cond.to(param.device, param.dtype).expand(len(t), *cond.shape[-2:])
    output = denoise(unet, x_in, schedule.model_timesteps(t).to(param.device), cond)
    return output.float(), target.to(output.device), x_in


def denoising_loss(unet, schedule: NoiseSchedule, image: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], with_input: bool = False,
                   cond: torch.Tensor | None = None):
    """Mean squared error of the model's regression target over one image's (t, draw) rows.

    ``cond`` (``[L, D]``) is the image's text conditioning for a text-conditioned UNet.

    With ``with_input`` the noisy input is made to require gradients and ``(loss, x_t)`` is returned.
    Differentiating w.r.t. ``x_t`` as well is a workaround: on torch 2.13 CPU, ``autograd.grad`` w.r.t.
    a subset of a UNet's parameters (e.g. ``param_filter="up_blocks"``) was seen to segfault, and
    asking for the input's gradient too (so every node computes all its input gradients) avoids it.
    """
    output, target, x_in = denoising_output(unet, schedule, image, rows, with_input, cond)
    loss = torch.nn.functional.mse_loss(output, target)
    return (loss, x_in) if with_input else loss


def select_parameters(unet: torch.nn.Module, param_filter: str | None) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the UNet's parameters whose name contains ``param_filter`` (all for ``None``).

    Raises:
        ConfigError: if none matches.
    """
    selected = [(n, p) for n, p in unet.named_parameters() if param_filter is None or param_filter in n]
    if not selected:
        raise ConfigError(f"param_filter {param_filter!r} matches no parameter of the UNet; use a substring of its parameter names.")
    return selected


class GradientsOn:
    """Context: ``requires_grad`` True on the selected parameters, False elsewhere; restored on exit."""

    def __init__(self, unet: torch.nn.Module, selected: list[tuple[str, torch.nn.Parameter]]):
        self.unet = unet
        self.selected = {id(p) for _, p in selected}

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.unet.parameters()]
        self.was_training = self.unet.training
        self.unet.eval()
        for p in self.unet.parameters():
            p.requires_grad_(id(p) in self.selected)
        return self

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)
        self.unet.train(self.was_training)
        return False


def check_conditioning(unet, query_conditioning, train_conditioning, num_queries: int, num_train: int):
    """Refuse conditioning missing for a text-conditioned UNet, given to an unconditional one, or miscounted."""
    from diffusers_guda.models import is_conditional

    given = query_conditioning is not None, train_conditioning is not None
    if is_conditional(unet) and not all(given):
        raise ConfigError("This UNet is text-conditioned: pass query_conditioning and train_conditioning, the text embeddings "
                          "[N, L, D] of each query's and each training image's prompt.")
    if not is_conditional(unet) and any(given):
        raise ConfigError("This UNet is unconditional; drop query_conditioning/train_conditioning.")
    for name, cond, n in (("query_conditioning", query_conditioning, num_queries), ("train_conditioning", train_conditioning, num_train)):
        if cond is not None and (cond.dim() != 3 or cond.shape[0] != n):
            raise ConfigError(f"{name} must be [{n}, L, D] (one embedding per image); got {tuple(cond.shape)}.")


def progress_bar(iterable, enabled: bool, desc: str):
    """``iterable`` with a tqdm progress bar when ``enabled``."""
    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True)
