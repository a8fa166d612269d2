"""Model inputs of latent, text-conditioned pipelines: VAE latents and prompt embeddings (docs/method.md#latent-and-text-conditioned-models).

For a pipeline with a VAE (Stable Diffusion 1.x/2.x) the ELBO is that of the latent
``z0 = (E(x).mean - shift) * scaling_factor``: the VAE posterior *mean*, deterministic (never a
sample), so the same image always gives the same latent. For a text-conditioned UNet every image is
conditioned on its prompt's embeddings (``log p(z0 | c)``), without classifier-free guidance: the
ELBO is the conditional model's, whatever guidance scale generated the image.

Both are computed one image (one prompt) per forward, so a latent or an embedding never depends on
the batch it arrived in, and the common random numbers keyed on the latent's content hash stay
batch-independent.

An SDXL UNet (``addition_embed_type="text_time"``) also takes the pooled embedding of the second text
encoder and each image's time ids (original size, crop, target size): :class:`SDXLPromptEncoder`
(docs/method.md#sdxl). Stable Diffusion 3's and Flux's transformers take their three (two) text
encoders' embeddings, and Flux's guidance: :mod:`.flow_conditioning`. Another pipeline family plugs
in its own text conditioning through a ``guda_prompt_encoder()`` method.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from ..data import check_pixel_range
from ..errors import ConfigError, DataError
from ..models import is_flow_transformer, takes_text_time
from .components import denoiser, latent_multiple
from .flow_conditioning import POOLED, conditioning_settings, flow_prompt_encoder


def is_latent(pipe) -> bool:
    """Whether the pipeline's denoiser works on VAE latents."""
    return getattr(pipe, "vae", None) is not None


def pooled_key(model: torch.nn.Module) -> str | None:
    """The conditioning entry of a pooled text embedding: SDXL's ``"text_embeds"``, Stable Diffusion 3's
    and Flux's ``"pooled_projections"``; ``None`` for a denoiser that takes none."""
    if takes_text_time(model):
        return "text_embeds"
    return POOLED if is_flow_transformer(model) else None


def vae_scale_factor(vae) -> int:
    """How many times the VAE downsamples height and width (8 for Stable Diffusion's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_pixel_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Check that ``images`` ``[N, C, H, W]`` in [-1, 1] can go through the pipeline's VAE and denoiser.

    Raises:
        DataError: wrong channel count, a size the VAE (or a transformer's latent patches) cannot
            take, or values outside [-1, 1].
    """
    channels = pipe.vae.config.in_channels
    factor = vae_scale_factor(pipe.vae)
    patch = latent_multiple(denoiser(pipe))
    if images.dim() != 4 or images.shape[1] != channels:
        raise DataError(
            f"Images of shape {tuple(images.shape[1:])} do not fit this pipeline's VAE, which takes {channels}-channel "
            f"images [N, {channels}, H, W]; convert them to RGB."
        )
    h, w = images.shape[-2:]
    if patch > 1 and (h % (factor * patch) or w % (factor * patch)):
        multiple = factor * patch
        size = max(multiple, h // multiple * multiple)
        raise DataError(
            f"Images of size {w}x{h} cannot go through this pipeline: its VAE downsamples by {factor} and its "
            f"{type(denoiser(pipe)).__name__} takes {patch} x {patch} latent patches, so height and width must be multiples of "
            f"{multiple}. Resize them (e.g. to {size}x{size})."
        )
    if h % factor or w % factor or h < factor or w < factor:
        raise DataError(
            f"Images of size {w}x{h} cannot go through this VAE, which downsamples by {factor}: height and width must be "
            f"multiples of {factor}. Resize them (e.g. to {max(factor, h // factor * factor)}x{max(factor, h // factor * factor)})."
        )
    return check_pixel_range(images)


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Deterministic latents ``(E(x).mean - shift) * scaling_factor``, one image per VAE forward.

    Args:
        pipe: A pipeline with a ``vae`` (``AutoencoderKL``).
        images: ``[N, C, H, W]`` in [-1, 1].

    Returns:
        Float32 CPU tensor ``[N, latent_channels, H / f, W / f]``.
    """
    from tqdm.auto import tqdm

    check_pixel_images(pipe, images)
    with vae_encoding_precision(pipe.vae):
        return torch.cat([encode_latent(pipe.vae, image) for image in tqdm(images, desc="encode latents", disable=not progress, leave=False)])


@contextlib.contextmanager
def vae_encoding_precision(vae) -> Iterator[None]:
    """Within the block, a float16 VAE whose config sets ``force_upcast`` runs in float32.

    SDXL's VAE overflows in float16; diffusers decodes in float32 for the same reason. The weights
    go back to float16 afterwards (exactly: float16 -> float32 -> float16 is lossless).
    """
    if next(vae.parameters()).dtype != torch.float16 or not vae.config.get("force_upcast", False):
        yield
        return
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(torch.float16)


@torch.no_grad()
def encode_latent(vae, image: torch.Tensor) -> torch.Tensor:
    """The deterministic latent ``(E(x).mean - shift) * scaling_factor`` of one image ``[C, H, W]`` in [-1, 1].

    Returns:
        Float32 CPU tensor ``[1, latent_channels, H / f, W / f]``.
    """
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    scaling = float(vae.config.get("scaling_factor") or 1.0)
    shift = vae.config.get("shift_factor")
    mean = vae.encode(image[None].to(device, dtype)).latent_dist.mean
    if shift is not None:
        mean = mean - shift
    return (mean * scaling).to("cpu", torch.float32)


def prompt_list(prompts, n: int) -> list[str]:
    """``n`` prompts from one string (for every image) or a sequence of ``n`` strings.

    Raises:
        DataError: a missing prompt, a wrong count or a non-string entry.
    """
    if prompts is None:
        raise DataError(
            "This pipeline's denoiser is text-conditioned, so attribution needs each image's prompt: pass prompts='...' "
            "(one for all images) or prompts=[...] (one per image)."
        )
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise DataError(f"Got {len(prompts)} prompts for {n} images; pass one prompt per image, or one string for all.")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise DataError(f"Prompts must be strings; got {bad[0]!r}.")
    return prompts


def per_image(embeds: torch.Tensor, n: int, name: str, shape: str) -> torch.Tensor:
    """Given embeddings (``shape``, e.g. ``"[N, L, D]"``, or one for all) as float32 CPU ``[n, ...]``.

    Raises:
        DataError: a wrong number of dimensions or images.
    """
    embeds = embeds.detach().to("cpu", torch.float32)
    if embeds.dim() != shape.count(",") + 1 or embeds.shape[0] not in (1, n):
        raise DataError(f"{name} must be {shape} with N = {n} images (or 1 for all); got {tuple(embeds.shape)}.")
    return embeds.expand(n, *embeds.shape[1:])


def check_size_conditions(size_conditions, n: int) -> torch.Tensor:
    """SDXL's size conditions of ``n`` images (``[n, 6]``, or 6 numbers for all) as a long tensor ``[n, 6]``.

    Raises:
        DataError: another shape, or values that are not whole numbers.
    """
    sizes = torch.as_tensor(size_conditions)
    if sizes.shape not in ((6,), (1, 6), (n, 6)) or sizes.is_floating_point() and not torch.equal(sizes, sizes.round()):
        raise DataError(
            f"size_conditions must be whole numbers [N, 6] with N = {n} images, or 6 for all (original height, width, crop "
            f"top, left, target height, width); got shape {tuple(sizes.shape)}."
        )
    return sizes.to(torch.long).expand(n, 6)


class PromptEncoder:
    """Maps prompts to the text embeddings a pipeline's UNet is conditioned on, with a cache.

    Each distinct prompt is encoded alone (so its embedding never depends on the batch) through the
    pipeline's own ``encode_prompt`` and kept on CPU in float32.

    Args:
        pipe: A text-to-image pipeline (``encode_prompt``, ``tokenizer``, ``text_encoder``).
    """

    def __init__(self, pipe):
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ConfigError(
                f"{type(pipe).__name__} has no text encoder/tokenizer, but its UNet is text-conditioned; load the "
                "pipeline with its text encoder."
            )
        self.pipe = pipe
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode_one(self, prompt: str) -> torch.Tensor:
        """``[1, L, D]`` float32 CPU embedding of one prompt."""
        if prompt not in self._cache:
            device = next(self.pipe.text_encoder.parameters()).device
            embeds, _ = self.pipe.encode_prompt(prompt, device, 1, False)
            self._cache[prompt] = embeds.to("cpu", torch.float32)
        return self._cache[prompt]

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, L, D]`` float32 CPU embeddings of ``prompts``."""
        return torch.cat([self.encode_one(p) for p in prompts])


class SDXLPromptEncoder:
    """:class:`PromptEncoder` for SDXL: its conditioning, through the pipeline's own ``encode_prompt`` (no guidance).

    A prompt's conditioning is ``{"encoder_hidden_states": [1, 77, 2048], "text_embeds": [1, 1280]}``
    for the real SDXL: the penultimate hidden states of both text encoders, concatenated, and the
    pooled, projected embedding of ``text_encoder_2``. Each image's time ids come from
    :meth:`image_conditions`. Everything is float32 on CPU; each prompt is encoded alone.

    Args:
        pipe: A ``StableDiffusionXLPipeline`` (``encode_prompt``, ``text_encoder_2``, ``tokenizer_2``,
            ``_get_add_time_ids``).
    """

    def __init__(self, pipe):
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
            raise ConfigError(
                f"{type(pipe).__name__} has no text_encoder_2/tokenizer_2, which SDXL's UNet is conditioned on; load the "
                "pipeline with both."
            )
        self.pipe = pipe
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def encode_one(self, prompt: str) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": [1, L, D], "text_embeds": [1, P]}`` of one prompt, float32 on CPU."""
        if prompt not in self._cache:
            device = next(self.pipe.text_encoder_2.parameters()).device
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
            self._cache[prompt] = {"encoder_hidden_states": embeds.to("cpu", torch.float32), "text_embeds": pooled.to("cpu", torch.float32)}
        return self._cache[prompt]

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The prompts' conditioning, batch-first (``[B, L, D]`` and ``[B, P]``)."""
        encoded = [self.encode_one(p) for p in prompts]
        return {key: torch.cat([e[key] for e in encoded]) for key in ("encoder_hidden_states", "text_embeds")}

    def image_conditions(self, sample_shape: Sequence[int], n: int, size_conditions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"time_ids": [n, 6]}`` of ``n`` images of the UNet's input shape ``sample_shape`` (latents).

        Args:
            sample_shape: ``(C, h, w)`` of the latents; the pixel size is ``(h, w)`` times the VAE's factor.
            n: Number of images.
            size_conditions: ``[n, 6]`` (or ``[6]`` for all) original height and width, crop top and
                left, target height and width per image; default ``(H, W, 0, 0, H, W)`` of the pixel
                image, as the pipeline generates by default.
        """
        factor = vae_scale_factor(self.pipe.vae)
        height, width = int(sample_shape[-2]) * factor, int(sample_shape[-1]) * factor
        if size_conditions is None:
            size_conditions = torch.tensor([height, width, 0, 0, height, width])
        sizes = check_size_conditions(size_conditions, n).tolist()
        projection = self.pipe.text_encoder_2.config.projection_dim
        rows = [self.pipe._get_add_time_ids(tuple(s[:2]), tuple(s[2:4]), tuple(s[4:]), torch.float32, projection) for s in sizes]
        return {"time_ids": torch.cat(rows) if rows else torch.zeros(0, 6)}


def prompt_encoder(pipe, settings: dict | None = None):
    """A fresh prompt encoder for one operation (its cache lives as long as the operation).

    :class:`SDXLPromptEncoder` for a UNet that takes SDXL's added conditions, Stable Diffusion 3's
    or Flux's encoder (:func:`~.flow_conditioning.flow_prompt_encoder`) for their transformers, else
    :class:`PromptEncoder`. A pipeline family with other conditioning provides its own through a
    ``guda_prompt_encoder()`` method returning a callable ``list[str] ->`` conditioning (a
    ``[B, L, D]`` tensor or a flat dict of batch-first tensors, see :mod:`diffusers_guda.models`),
    optionally with an ``image_conditions`` method like :class:`SDXLPromptEncoder`'s.

    Args:
        pipe: The pipeline.
        settings: Stable Diffusion 3 and Flux: the conditioning settings (T5 length, Flux's guidance)
            a bundle records (default: :func:`~.flow_conditioning.conditioning_settings`'s defaults).
    """
    factory = getattr(pipe, "guda_prompt_encoder", None)
    if callable(factory):
        return factory()
    model = denoiser(pipe)
    if is_flow_transformer(model):
        return flow_prompt_encoder(pipe, settings if settings is not None else conditioning_settings(pipe))
    return SDXLPromptEncoder(pipe) if takes_text_time(model) else PromptEncoder(pipe)
