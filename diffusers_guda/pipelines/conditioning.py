"""Model inputs of latent, text-conditioned pipelines: VAE latents and prompt embeddings (docs/method.md#latent-and-text-conditioned-models).

For a pipeline with a VAE (Stable Diffusion 1.x/2.x) the ELBO is that of the latent
``z0 = (E(x).mean - shift) * scaling_factor``: the VAE posterior *mean*, deterministic (never a
sample), so the same image always gives the same latent. For a text-conditioned UNet every image is
conditioned on its prompt's embeddings (``log p(z0 | c)``), without classifier-free guidance: the
ELBO is the conditional model's, whatever guidance scale generated the image.

Both are computed one image (one prompt) per forward, so a latent or an embedding never depends on
the batch it arrived in, and the common random numbers keyed on the latent's content hash stay
batch-independent.

A new pipeline family plugs in its own text conditioning through a ``guda_prompt_encoder()`` method
(e.g. SDXL, whose UNet also takes pooled embeddings and time ids).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import check_pixel_range
from ..errors import ConfigError, DataError


def is_latent(pipe) -> bool:
    """Whether the pipeline's UNet works on VAE latents."""
    return getattr(pipe, "vae", None) is not None


def vae_scale_factor(pipe) -> int:
    return int(getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1))


def check_pixel_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Check that ``images`` ``[N, C, H, W]`` in [-1, 1] can go through the pipeline's VAE.

    Raises:
        DataError: wrong channel count, a size the VAE cannot take, or values outside [-1, 1].
    """
    channels = pipe.vae.config.in_channels
    factor = vae_scale_factor(pipe)
    if images.dim() != 4 or images.shape[1] != channels:
        raise DataError(
            f"Images of shape {tuple(images.shape[1:])} do not fit this pipeline's VAE, which takes {channels}-channel "
            f"images [N, {channels}, H, W]; convert them to RGB."
        )
    h, w = images.shape[-2:]
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

    vae = pipe.vae
    check_pixel_images(pipe, images)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    scaling = float(vae.config.get("scaling_factor") or 1.0)
    shift = vae.config.get("shift_factor")
    out = []
    for image in tqdm(images, desc="encode latents", disable=not progress, leave=False):
        mean = vae.encode(image[None].to(device, dtype)).latent_dist.mean
        if shift is not None:
            mean = mean - shift
        out.append((mean * scaling).to("cpu", torch.float32))
    return torch.cat(out)


def prompt_list(prompts, n: int) -> list[str]:
    """``n`` prompts from one string (for every image) or a sequence of ``n`` strings.

    Raises:
        DataError: a missing prompt, a wrong count or a non-string entry.
    """
    if prompts is None:
        raise DataError(
            "This pipeline's UNet is text-conditioned, so attribution needs each image's prompt: pass prompts='...' "
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


def prompt_encoder(pipe):
    """A fresh prompt encoder for one operation (its cache lives as long as the operation).

    A pipeline family with other conditioning provides its own through a ``guda_prompt_encoder()``
    method returning a callable ``list[str] -> [B, L, D]`` tensor.
    """
    factory = getattr(pipe, "guda_prompt_encoder", None)
    return factory() if callable(factory) else PromptEncoder(pipe)
