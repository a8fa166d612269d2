"""A ``UNet2DModel`` that accepts LoRA adapters.

diffusers' ``UNet2DModel`` lacks ``PeftAdapterMixin`` (``add_adapter``, ``set_adapter``,
``load_lora_adapter``...), which ``UNet2DConditionModel`` has. :class:`GUDAUNet2DModel` adds it and
nothing else, so its weights and config are those of ``UNet2DModel``.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.loaders import PeftAdapterMixin


class GUDAUNet2DModel(UNet2DModel, PeftAdapterMixin):
    """``UNet2DModel`` with diffusers' ``PeftAdapterMixin`` for LoRA adapters."""


def with_adapter_support(unet: torch.nn.Module) -> torch.nn.Module:
    """Return ``unet`` itself if it takes adapters, else a :class:`GUDAUNet2DModel` sharing its tensors.

    Raises:
        TypeError: for a model that is neither adapter-capable nor a ``UNet2DModel``.
    """
    if isinstance(unet, PeftAdapterMixin):
        return unet
    if not isinstance(unet, UNet2DModel):
        raise TypeError(
            f"{type(unet).__name__} cannot take LoRA adapters; use a diffusers UNet that inherits "
            "PeftAdapterMixin (UNet2DConditionModel) or a UNet2DModel."
        )
    converted = GUDAUNet2DModel.from_config(unet.config)
    converted.load_state_dict(unet.state_dict(), assign=True)  # shares the tensors: no copy
    converted.train(unet.training)
    return converted


def is_conditional(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` is text-conditioned (a ``UNet2DConditionModel``-like model with cross-attention)."""
    config = getattr(unet, "config", None)
    return config is not None and config.get("cross_attention_dim") is not None
