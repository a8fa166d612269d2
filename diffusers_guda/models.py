"""Denoisers: a ``UNet2DModel`` that accepts LoRA adapters, what a denoiser is conditioned on, and
the one function that calls any of them (:func:`denoise`).

diffusers' ``UNet2DModel`` lacks ``PeftAdapterMixin`` (``add_adapter``, ``set_adapter``,
``load_lora_adapter``...), which ``UNet2DConditionModel`` has. :class:`GUDAUNet2DModel` adds it and
nothing else, so its weights and config are those of ``UNet2DModel``.

**Conditioning** is what a text-conditioned UNet takes besides ``(x_t, t)``, for a batch of images:
either a tensor of text embeddings ``[B, L, D]`` (``encoder_hidden_states``, Stable Diffusion 1.x/2.x)
or a flat dict of batch-first tensors, e.g. SDXL's ``{"encoder_hidden_states": [B, L, D],
"text_embeds": [B, P], "time_ids": [B, 6]}`` (docs/method.md#sdxl). :func:`unet_call_kwargs` is
the one place that turns it into the UNet's keyword arguments; the other functions here edit it
without caring which form it has. The flow-matching transformers take a dict too: Stable Diffusion 3's
``{"encoder_hidden_states": [B, L, 4096], "pooled_projections": [B, 2048]}``, Flux's
``{"encoder_hidden_states": [B, L, 4096], "pooled_projections": [B, 768]}`` plus ``"guidance"``
``[B]`` for a guidance-distilled checkpoint (docs/method.md#flow-matching-models).
"""

from __future__ import annotations

from typing import Callable, Dict, Union

import torch
from diffusers import FluxTransformer2DModel, UNet2DModel
from diffusers.loaders import PeftAdapterMixin


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
    """Whether ``unet`` is text-conditioned: a ``UNet2DConditionModel``-like model with cross-attention,
    or a flow-matching transformer with joint text-image attention (Stable Diffusion 3, Flux)."""
    config = getattr(unet, "config", None)
    return config is not None and (config.get("cross_attention_dim") is not None or config.get("joint_attention_dim") is not None)


def takes_text_time(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` also takes SDXL's added conditions: a pooled text embedding and time ids."""
    config = getattr(unet, "config", None)
    return config is not None and config.get("addition_embed_type") == "text_time"


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


def denoise(model: torch.nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
    """The raw prediction of a denoiser for a batch ``x_t`` ``[B, C, H, W]`` at the model's time inputs ``timestep``.

    The one place that calls a denoiser: a UNet as ``unet(x_t, t, **unet_call_kwargs(cond)).sample``,
    Stable Diffusion 3's transformer with ``hidden_states=x_t``, and Flux's on ``x_t`` packed into 2×2
    patches with its position ids, at ``timestep / 1000`` as ``FluxPipeline`` passes it (the
    transformer scales it back), unpacked to ``[B, C, H, W]`` again.

    Args:
        model: The denoiser; its inputs are moved to its device and dtype.
        x_t: Noisy samples (latents).
        timestep: ``[B]`` time inputs: the timestep ``t`` of a DDPM-family model, ``σ * T`` of a flow-matching one.
        cond: Its conditioning (see the module docstring), or ``None``.
    """
    param = next(model.parameters())
    kwargs = unet_call_kwargs(cond, param.device, param.dtype)
    x_t = x_t.to(param.device, param.dtype)
    if isinstance(model, FluxTransformer2DModel):
        return _flux_denoise(model, x_t, timestep, kwargs)
    if is_flow_transformer(model):
        return model(hidden_states=x_t, timestep=timestep, **kwargs).sample
    return model(x_t, timestep, **kwargs).sample


def is_flow_transformer(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a flow-matching transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``)."""
    from diffusers import SD3Transformer2DModel

    return isinstance(model, (SD3Transformer2DModel, FluxTransformer2DModel))


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` latents as Flux's sequence of 2×2 patches ``[B, H/2 * W/2, 4C]`` (``FluxPipeline``'s layout)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_flux_latents` for latents of ``height`` × ``width``."""
    b, _, d = packed.shape
    c = d // 4
    return packed.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def flux_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """``[H/2 * W/2, 3]`` position ids of Flux's latent patches: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def _flux_denoise(model, x_t: torch.Tensor, timestep: torch.Tensor, kwargs: dict) -> torch.Tensor:
    b, _, h, w = x_t.shape
    text = kwargs["encoder_hidden_states"]
    guidance = kwargs.pop("guidance", None)
    if model.config.guidance_embeds and guidance is None:
        raise ValueError("This Flux transformer is guidance-distilled: its conditioning needs a 'guidance' value.")
    out = model(
        hidden_states=pack_flux_latents(x_t),
        timestep=timestep.to(x_t.dtype) / 1000,
        guidance=guidance if model.config.guidance_embeds else None,
        img_ids=flux_image_ids(h, w, x_t.device, x_t.dtype),
        txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
        **kwargs,
    ).sample
    return unpack_flux_latents(out, h, w)
