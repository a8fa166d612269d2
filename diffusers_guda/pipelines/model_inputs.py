"""What a pipeline's denoiser takes: training data and query images in its input space, with their conditioning.

Pixel-space pipelines take the images as they are; latent pipelines take their deterministic VAE
latents (a lazy dataset through a :class:`~diffusers_guda.latent_cache.LatentCache`). A
text-conditioned denoiser (a UNet, or Stable Diffusion 3's or Flux's transformer) takes each image's
prompt conditioning too (docs/method.md#latent-and-text-conditioned-models).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import GroupedDataset, check_pixel_range
from ..distributed import ProcessInfo
from ..errors import ConfigError, DataError
from ..images import standard_image
from ..latent_cache import LatentCache
from ..lazy_data import LazyGroupedDataset
from ..models import conditioning_dict, is_conditional, takes_text_time
from .components import denoiser, latent_channels, latent_multiple
from .conditioning import (
    check_pixel_images,
    check_size_conditions,
    encode_latents,
    is_latent,
    per_image,
    pooled_key,
    prompt_encoder,
    prompt_list,
)


def check_training_set(dataset) -> None:
    """Refuse a training set that is neither a :class:`~diffusers_guda.GroupedDataset` nor a lazy one.

    Raises:
        DataError: naming the type given and how to build a dataset.
    """
    if not isinstance(dataset, (GroupedDataset, LazyGroupedDataset)):
        raise DataError(
            f"The training set must be a GroupedDataset or a LazyGroupedDataset, not {type(dataset).__name__}; build it with "
            "GroupedDataset.from_arrays(images, group_ids, group_names) or LazyGroupedDataset.from_metadata(folder)."
        )


def model_dataset(pipe, dataset, progress: bool = False, latent_cache=None, process: ProcessInfo | None = None) -> GroupedDataset:
    """The dataset in the denoiser's input space: pixels for pixel models, VAE latents for latent models.

    A :class:`~diffusers_guda.lazy_data.LazyGroupedDataset` is loaded whole for a pixel model and encoded
    through a latent cache for a latent one (``latent_cache``: a ``LatentCache`` or its folder, by default
    docs/formats.md#latent-cache's); in-memory pixels go through a cache only when one is given.

    Raises:
        DataError: if the images do not fit the model (size, channels, range).
    """
    check_training_set(dataset)
    lazy = isinstance(dataset, LazyGroupedDataset)
    if not is_latent(pipe):
        dataset = dataset.load() if lazy else dataset
        _check_images(pipe, dataset.images)
        return dataset
    if not lazy:
        check_pixel_images(pipe, dataset.images)
    if lazy or latent_cache is not None:
        cache = latent_cache if isinstance(latent_cache, LatentCache) else LatentCache(pipe.vae, latent_cache)
        return check_latents(pipe, cache.encode(dataset, progress=progress, process=process))
    return dataset.with_images(check_latents(pipe, encode_latents(pipe, dataset.images, progress=progress)))


def check_latents(pipe, latents):
    """``latents`` (a tensor ``[N, C, h, w]`` or a latent dataset) itself, if the pipeline's denoiser takes their shape.

    Raises:
        ConfigError: latents of another channel count (a VAE and a denoiser that do not belong together).
        DataError: latents a transformer cannot cut into its patches.
    """
    model = denoiser(pipe)
    shape = tuple((latents if isinstance(latents, torch.Tensor) else latents.images).shape[1:])
    channels, multiple = latent_channels(model), latent_multiple(model)
    if shape[0] != channels:
        raise ConfigError(
            f"The VAE gives {shape[0]}-channel latents but the {type(model).__name__} takes {channels}; "
            "this pipeline's components do not belong together."
        )
    if shape[-2] % multiple or shape[-1] % multiple:
        raise DataError(
            f"Latents of size {shape[-1]}x{shape[-2]} cannot be cut into the {multiple} x {multiple} patches this "
            f"{type(model).__name__} takes; resize the images to a multiple of {multiple} times the VAE's factor (e.g. --resolution)."
        )
    return latents


def model_inputs(pipe, images, *, prompts=None, prompt_embeds=None, pooled_prompt_embeds=None, size_conditions=None, settings=None):
    """The denoiser's clean inputs and per-image conditioning for query ``images`` (arguments as :func:`attribute`'s).

    Args:
        settings: Stable Diffusion 3 and Flux: the conditioning settings (T5 length, Flux's guidance)
            the loaded bundle records (see :mod:`.flow_conditioning`; default: the pipeline's defaults).

    Returns:
        ``(x0, unet_kwargs, prompts)``: ``x0`` ``[N, C, h, w]`` (pixels, or VAE latents for a latent
        pipeline), ``unet_kwargs`` one conditioning dict of ``[1, ...]`` tensors per image (``None``
        for unconditional denoisers; see :func:`~diffusers_guda.models.unet_call_kwargs`), and the
        prompt list used (``None`` without prompts).

    Raises:
        DataError: images that do not fit, missing/miscounted prompts or embeddings for a
            text-conditioned denoiser, or malformed ``size_conditions``.
        ConfigError: prompts given to an unconditional UNet, or another family's inputs (SDXL's size
            conditions, pooled embeddings to a model that takes none).
    """
    pixels = to_model_images(images)
    n = pixels.shape[0]
    if n == 0:
        raise DataError("No query images were given; pass at least one image.")
    model = denoiser(pipe)
    conditional = is_conditional(model)
    if not conditional and (prompts is not None or prompt_embeds is not None):
        raise ConfigError(f"This {type(pipe).__name__}'s UNet is unconditional; drop prompts/prompt_embeds.")
    text_time, pooled = takes_text_time(model), pooled_key(model)
    if pooled is None and pooled_prompt_embeds is not None:
        raise ConfigError(f"This {type(pipe).__name__}'s {type(model).__name__} takes no pooled text embeddings; "
                          "drop pooled_prompt_embeds.")
    if not text_time and size_conditions is not None:
        raise ConfigError(f"This {type(pipe).__name__}'s {type(model).__name__} takes no size conditions (SDXL's); drop size_conditions.")
    cond = used = None
    if conditional:  # prompts are checked before any image is encoded
        if prompt_embeds is not None:
            cond = {"encoder_hidden_states": per_image(prompt_embeds, n, "prompt_embeds", "[N, L, D]")}
            if pooled is not None:
                if pooled_prompt_embeds is None:
                    raise DataError(f"This {type(model).__name__} also takes pooled text embeddings: pass pooled_prompt_embeds with "
                                    "prompt_embeds (both from pipe.encode_prompt).")
                cond[pooled] = per_image(pooled_prompt_embeds, n, "pooled_prompt_embeds", "[N, P]")
        else:
            used = prompt_list(prompts, n)
        size_conditions = None if size_conditions is None else check_size_conditions(size_conditions, n)
    if is_latent(pipe):
        x0 = check_latents(pipe, encode_latents(pipe, check_pixel_images(pipe, pixels)))
    else:
        x0 = _check_images(pipe, pixels)
    if not conditional:
        return x0, None, None
    encoder = prompt_encoder(pipe, settings) if used is not None or text_time or pooled else None
    cond = conditioning_dict(encoder(used)) if cond is None else cond
    if hasattr(encoder, "image_conditions"):
        cond.update(encoder.image_conditions(x0.shape[1:], n, size_conditions))
    return x0, [{key: value[i : i + 1] for key, value in cond.items()} for i in range(n)], used


def to_model_images(images) -> torch.Tensor:
    """Convert query images to a float tensor ``[N, C, H, W]`` in [-1, 1].

    Args:
        images: A tensor ``[N, C, H, W]`` (or ``[C, H, W]``) in [-1, 1], a numpy array ``[N, H, W, C]``
            (uint8 in 0..255, or float in [0, 1]), or a list of PIL images. PIL images are read by the
            one image reader's rules (:func:`~diffusers_guda.images.standard_image`: EXIF orientation,
            16-bit grayscale scaled, transparency composited on white; docs/formats.md#image-reading), so
            a PIL image gives the same pixels as its file in the training data.

    Raises:
        DataError: images of different sizes, an unsupported type, or a PIL image the reader refuses.
    """
    if isinstance(images, torch.Tensor):
        out = images.detach().to("cpu", torch.float32)
        if out.dim() == 3:
            out = out.unsqueeze(0)
        return out
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise DataError(f"A numpy query batch must be [N, H, W, C]; got shape {images.shape}.")
        if images.dtype == np.uint8:
            array = array / 255.0
        return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        arrays = [np.asarray(standard_image(img, name=f"query image {i}"), dtype=np.uint8) for i, img in enumerate(images)]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        if len({a.shape for a in arrays}) > 1:
            raise DataError("Query images have different sizes; resize them to the model's sample size.")
        return to_model_images(np.stack(arrays))
    raise DataError(f"Unsupported query type {type(images).__name__}; pass a tensor, a numpy array or a list of PIL images.")


def _check_images(pipe, images: torch.Tensor) -> torch.Tensor:
    config = denoiser(pipe).config
    expected = (config.in_channels, config.sample_size, config.sample_size)
    if tuple(images.shape[1:]) != expected:
        raise DataError(
            f"Images of shape {tuple(images.shape[1:])} do not fit this model, which takes {expected} "
            f"(channels, height, width). Resize/convert the images to {config.sample_size}x{config.sample_size} "
            f"with {config.in_channels} channel(s)."
        )
    return check_pixel_range(images)
