"""UNets: a ``UNet2DModel`` that accepts LoRA adapters, and what a UNet is conditioned on.

diffusers' ``UNet2DModel`` lacks ``PeftAdapterMixin`` (``add_adapter``, ``set_adapter``,
``load_lora_adapter``...), which ``UNet2DConditionModel`` has. :class:`GUDAUNet2DModel` adds it and
nothing else, so its weights and config are those of ``UNet2DModel``.

**Conditioning** is what a text-conditioned UNet takes besides ``(x_t, t)``, for a batch of images:
either a tensor of text embeddings ``[B, L, D]`` (``encoder_hidden_states``, Stable Diffusion 1.x/2.x)
or a flat dict of batch-first tensors, e.g. SDXL's ``{"encoder_hidden_states": [B, L, D],
"text_embeds": [B, P], "time_ids": [B, 6]}`` (docs/method.md#sdxl). :func:`unet_call_kwargs` is
the one place that turns it into the UNet's keyword arguments; the other functions here edit it
without caring which form it has.
"""

from __future__ import annotations

from typing import Callable, Dict, Union

import torch
from diffusers import UNet2DModel
from diffusers.loaders import PeftAdapterMixin

from .hashing import base_state_dict

Conditioning = Union[torch.Tensor, Dict[str, torch.Tensor]]

# entries a UNet takes inside ``added_cond_kwargs`` (SDXL's pooled text embedding and size/crop time ids)
ADDED_CONDITIONS = ("text_embeds", "time_ids")


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


def takes_text_time(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` also takes SDXL's added conditions: a pooled text embedding and time ids."""
    config = getattr(unet, "config", None)
    return config is not None and config.get("addition_embed_type") == "text_time"


def bare_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A UNet of ``unet``'s class and config sharing its base tensors, without LoRA wrappers or adapters.

    What a pipeline's ``save_pretrained`` writes: saving a UNet that holds peft wrappers would write
    ``base_layer`` keys that stock diffusers cannot load.
    """
    bare = type(unet).from_config({k: v for k, v in unet.config.items() if not k.startswith("_")})
    bare.load_state_dict(base_state_dict(unet), assign=True)
    return bare


def conditioning_dict(cond: Conditioning) -> dict[str, torch.Tensor]:
    """``cond`` as a flat dict (text embeddings alone become ``{"encoder_hidden_states": cond}``)."""
    return dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def map_conditioning(cond: Conditioning | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning | None:
    """``fn`` applied to every tensor of ``cond`` (e.g. moving it, or selecting rows), keeping its form."""
    if cond is None:
        return None
    return {k: fn(v) for k, v in cond.items()} if isinstance(cond, dict) else fn(cond)


def merge_conditioning(base: Conditioning | None, update: Conditioning) -> Conditioning:
    """``update`` with the entries of ``base`` it does not set.

    E.g. the conditioning of other prompts (``update``) for the same images keeps each image's own
    SDXL time ids (``base``). Plain text embeddings replace plain text embeddings.
    """
    if not isinstance(base, dict) and not isinstance(update, dict):
        return update
    return {**(conditioning_dict(base) if base is not None else {}), **conditioning_dict(update)}


def unet_call_kwargs(cond: Conditioning | None, device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict:
    """The UNet's keyword arguments for ``cond``: SDXL's pooled text embedding and time ids go into ``added_cond_kwargs``.

    Args:
        cond: The conditioning (``None``: no keyword arguments).
        device: Where to move it (default: where it is).
        dtype: The dtype of its floating-point tensors, the UNet's like its input (default: theirs).
    """
    if cond is None:
        return {}
    kwargs = {}
    for key, value in conditioning_dict(cond).items():
        kwargs[key] = value.to(device, dtype if dtype is not None and value.is_floating_point() else value.dtype)
    added = {k: kwargs.pop(k) for k in ADDED_CONDITIONS if k in kwargs}
    if added:
        kwargs["added_cond_kwargs"] = added
    return kwargs
