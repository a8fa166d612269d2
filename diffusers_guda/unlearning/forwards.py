"""How the unlearner runs the UNet: inputs in the UNet's dtype, text conditioning, autocast, and as
which model (the base, or base plus one adapter).

Conditioning is a tensor of text embeddings or a flat dict of batch-first tensors (SDXL's text
embeddings, pooled embedding and time ids); see :mod:`diffusers_guda.models`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from ..adapter_state import use_adapters
from ..data import GroupedDataset
from ..errors import ConfigError
from ..diffusion import NoiseSchedule
from ..models import Conditioning, denoise, map_conditioning, merge_conditioning

Forward = Callable[..., torch.Tensor]


class UNetForwards:
    """The forwards of one UNet during unlearning.

    Args:
        unet: The UNet (with adapter support).
        conditional: Whether it is text-conditioned.
        encode_prompts: For a conditional UNet: maps prompts to their conditioning (text embeddings
            ``[B, L, D]``, or a dict such as SDXL's). If it has an ``image_conditions(sample_shape, n,
            size_conditions)`` method, its entries (SDXL's time ids) are added for each image, from the
            dataset's ``size_conditions`` when it has them.
        autocast_dtype: ``"bfloat16"``/``"float16"`` to autocast the training forwards, or ``None``.
        schedule: The noise schedule whose integer steps ``t`` the objectives pass; it gives the model's
            time input (``σ_t * T`` for a flow-matching model). ``None``: ``t`` is passed as it is.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        conditional: bool,
        encode_prompts: Callable[[list[str]], Conditioning] | None = None,
        autocast_dtype: str | None = None,
        schedule: NoiseSchedule | None = None,
    ):
        self.unet, self.conditional = unet, conditional
        self.encode_prompts, self.autocast_dtype = encode_prompts, autocast_dtype
        self.schedule = schedule

    @property
    def device(self) -> torch.device:
        """The device of the UNet's weights."""
        return next(self.unet.parameters()).device

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """The model's prediction for ``x_t`` at steps ``t`` (given the conditioning ``cond``), as it is set up now.

        Raises:
            ConfigError: for a text-conditioned model and no ``cond``.
        """
        if cond is None and self.conditional:
            raise ConfigError("This model is text-conditioned; the objective must pass the text embeddings (cond).")
        timesteps = t if self.schedule is None else self.schedule.model_timesteps(t)
        return denoise(self.unet, x_t, timesteps, cond)

    def check_prompts(self, dataset: GroupedDataset) -> None:
        """Check that a conditional UNet's dataset has prompts.

        Raises:
            DataError: if the UNet is text-conditioned and ``dataset`` has no prompts.
        """
        if self.conditional:
            dataset.require_prompts()

    def cond(self, dataset: GroupedDataset, index: torch.Tensor) -> Conditioning | None:
        """Conditioning of the images ``index`` (their own prompts), or ``None`` for unconditional UNets."""
        if not self.conditional:
            return None
        cond = self.encode_prompts([dataset.prompts[i] for i in index.tolist()])
        image_conditions = getattr(self.encode_prompts, "image_conditions", None)
        if image_conditions is not None:
            sizes = None if dataset.size_conditions is None else dataset.size_conditions[index]
            cond = merge_conditioning(image_conditions(dataset.image_shape, len(index), sizes), cond)
        return map_conditioning(cond, lambda v: v.to(self.device))

    def autocast(self) -> ContextManager:
        """The autocast context of the training forwards (a no-op without ``autocast_dtype``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.autocast_dtype))

    def running(self, adapter: str | None) -> ContextManager:
        """Run the UNet as the base model (``None``) or with one adapter, restoring its adapter state after.

        See :func:`~diffusers_guda.adapter_state.use_adapters`.
        """
        return use_adapters(self.unet, adapter)

    def teacher(self) -> Forward:
        """The objective's ``teacher``: the base model, without gradients. Whatever adapter is active
        (the one being trained) is active again afterwards; the objective's ``model`` is this object."""

        @torch.no_grad()
        def teacher(x_t, t, cond=None):
            with self.running(None):
                return self(x_t, t, cond)

        return teacher
