"""Which component of a pipeline is its denoiser, and what that denoiser takes.

A UNet pipeline (DDPM, Stable Diffusion 1.x/2.x, SDXL) denoises with ``pipe.unet``; a flow-matching
pipeline (Stable Diffusion 3, Flux) with ``pipe.transformer``. Every GUDA operation finds the model it
trains adapters on and scores with through :func:`denoiser`.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from ..errors import ConfigError
from ..merging import plain_copy
from ..models import is_flow_transformer, with_adapter_support

DENOISER_NAMES = ("unet", "transformer")


def denoiser_name(pipe) -> str:
    """``"unet"`` or ``"transformer"``: the name under which ``pipe`` holds its denoiser.

    Raises:
        ConfigError: for a pipeline with neither.
    """
    for name in DENOISER_NAMES:
        if getattr(pipe, name, None) is not None:
            return name
    raise ConfigError(f"{type(pipe).__name__} has neither a unet nor a transformer; GUDA needs the pipeline's denoiser.")


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoiser: ``pipe.unet`` or ``pipe.transformer`` (see :func:`denoiser_name`)."""
    return getattr(pipe, denoiser_name(pipe))


def ensure_adapter_denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoiser, able to take LoRA adapters; a ``UNet2DModel`` is replaced by one sharing its tensors.

    Raises:
        TypeError: for a denoiser that can take no adapters (see :func:`~diffusers_guda.models.with_adapter_support`).
    """
    name = denoiser_name(pipe)
    model = getattr(pipe, name)
    adapted = with_adapter_support(model)
    if adapted is not model:
        pipe.register_modules(**{name: adapted})
    return adapted


def latent_channels(model: torch.nn.Module) -> int:
    """Channels of the ``[B, C, H, W]`` samples ``model`` denoises (Flux packs 2 x 2 patches: its ``in_channels`` / 4)."""
    channels = model.config.in_channels
    return channels // 4 if isinstance(model, FluxTransformer2DModel) else channels


def latent_multiple(model: torch.nn.Module) -> int:
    """What the height and width of ``model``'s samples must be multiples of: Flux's 2 x 2 packing, SD3's patch size, else 1."""
    if isinstance(model, FluxTransformer2DModel):
        return 2
    if is_flow_transformer(model):
        return int(model.config.patch_size)
    return 1


def save_stock_pipeline(pipe, stock_class: type, save_directory, init_kwargs: dict | None = None, **kwargs) -> None:
    """Save ``pipe``'s base model as a ``stock_class`` directory: its denoiser without LoRA wrappers or adapters.

    Saving a denoiser that holds peft wrappers would write ``base_layer`` keys that stock diffusers
    cannot load; bundles are saved with :meth:`~diffusers_guda.AdapterBundle.save_pretrained` instead.

    Args:
        pipe: The pipeline.
        stock_class: The diffusers pipeline class it extends (``StableDiffusion3Pipeline``...).
        save_directory: Where to save.
        init_kwargs: Further arguments of ``stock_class`` (its config values, e.g. ``requires_safety_checker``).
        **kwargs: ``save_pretrained`` arguments.
    """
    name = denoiser_name(pipe)
    components = {component: getattr(pipe, component) for component in pipe.components}
    components[name] = plain_copy(components[name])  # built on the meta device: a 12B transformer is not allocated twice
    stock_class(**components, **(init_kwargs or {})).save_pretrained(save_directory, **kwargs)
