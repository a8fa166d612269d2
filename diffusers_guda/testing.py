"""Testing utilities: tiny Stable Diffusion and SDXL pipelines built entirely offline, from configs in code.

The tests, the examples' ``--tiny`` runs and the lab's text model use them: every
component of a real ``StableDiffusionPipeline`` (a ``UNet2DConditionModel``, an ``AutoencoderKL``, a
``CLIPTextModel`` and a ``CLIPTokenizer``), or of a ``StableDiffusionXLPipeline`` (two text encoders,
the second with a projection, and a UNet that takes SDXL's added conditions), at a size that runs in
milliseconds on one CPU core, with nothing downloaded. The tokenizer is a byte-pair encoder whose vocabulary and merges are written
here: every lowercase letter and digit is a token, and each word of ``words`` is one token.

Example:
    ```py
    >>> from diffusers_guda.testing import tiny_stable_diffusion
    >>> pipe = tiny_stable_diffusion(words=["a", "thick", "digit"])
    >>> image = pipe("a thick digit", num_inference_steps=2, output_type="np").images[0]
    >>> image.shape
    (16, 16, 3)
    ```
"""

from __future__ import annotations

import contextlib
import json
import string
import tempfile
from pathlib import Path
from typing import Sequence

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_WORDS = ("a", "photo", "of", "digit", "in", "style", "the", "an", "image")


def write_clip_vocabulary(directory: str | Path, words: Sequence[str] = DEFAULT_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a small CLIP byte-pair tokenizer into ``directory``.

    Every lowercase ASCII letter and digit is a token (alone and as a word end, ``x</w>``), so any
    lowercase alphanumeric prompt tokenizes; each of ``words`` becomes a single token through a chain
    of merges.

    Args:
        directory: Where to write the two files (created if needed).
        words: Whole-word tokens (lowercase letters and digits).

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in string.ascii_lowercase + string.digits:
        add(ch)
        add(ch + "</w>")
    merges: list[str] = []
    for word in words:
        word = word.lower()
        if not word or not all(ch in string.ascii_lowercase + string.digits for ch in word):
            raise ValueError(f"Tiny-tokenizer words must be lowercase letters and digits; got {word!r}.")
        if len(word) == 1:
            continue
        # merge left to right: w0 w1 -> w0w1, w0w1 w2 -> w0w1w2, ..., last symbol carries </w>
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            rule = f"{current} {nxt}"
            if rule not in merges:
                merges.append(rule)
            current += nxt
            add(current)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def tiny_clip_tokenizer(words: Sequence[str] = DEFAULT_WORDS, max_length: int = 16):
    """A ``CLIPTokenizer`` over :func:`write_clip_vocabulary`'s vocabulary (written to a temporary folder)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="guda-tiny-tokenizer-") as tmp:
        write_clip_vocabulary(tmp, words)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def tiny_stable_diffusion(
    words: Sequence[str] = DEFAULT_WORDS,
    *,
    image_size: int = 16,
    seed: int = 0,
    pipeline_class=None,
    unet_channels: tuple[int, int] = (32, 64),
    text_dim: int = 32,
    max_length: int = 16,
):
    """Build a tiny, randomly initialised Stable Diffusion pipeline offline.

    The VAE halves the resolution once (``vae_scale_factor`` 2), so a ``16 x 16`` image maps to a
    ``4 x 8 x 8`` latent; the text encoder is a 2-layer CLIP text transformer of width ``text_dim``;
    the scheduler has Stable Diffusion's scaled-linear noise schedule (1000 steps, ε-prediction).

    Args:
        words: Whole-word tokens of the tokenizer (see :func:`write_clip_vocabulary`).
        image_size: Pixel height and width the pipeline generates by default.
        seed: Seed of the random weights.
        pipeline_class: The pipeline class to build (default ``StableDiffusionPipeline``; e.g.
            :class:`~diffusers_guda.GUDAStableDiffusionPipeline`).
        unet_channels: ``block_out_channels`` of the UNet's two blocks.
        text_dim: Width of the text encoder, and the UNet's ``cross_attention_dim``.
        max_length: Tokens per prompt (the tokenizer's ``model_max_length``).

    Returns:
        The pipeline, on CPU, in float32, with the progress bar disabled.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer(words, max_length=max_length)
    with _seeded(seed):  # one stream for the three models, built in this order
        unet = _tiny_unet(image_size, unet_channels, text_dim)
        vae = _tiny_vae(image_size)
        text_encoder = _tiny_text_encoder(len(tokenizer.get_vocab()), text_dim, max_length)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    cls = pipeline_class or StableDiffusionPipeline
    pipe = cls(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_stable_diffusion_xl(
    words: Sequence[str] = DEFAULT_WORDS,
    *,
    image_size: int = 16,
    seed: int = 0,
    pipeline_class=None,
    unet_channels: tuple[int, int] = (32, 64),
    text_dim: int = 32,
    max_length: int = 16,
    time_embed_dim: int = 8,
):
    """Build a tiny, randomly initialised Stable Diffusion XL pipeline offline.

    As :func:`tiny_stable_diffusion`, with SDXL's conditioning: two CLIP text encoders of width
    ``text_dim`` (the second a ``CLIPTextModelWithProjection``, whose pooled, projected output is the
    UNet's ``text_embeds``) and their two tokenizers; the UNet's cross-attention takes both encoders'
    hidden states concatenated (``2 * text_dim``), and its ``text_time`` embedding takes the pooled
    embedding and the six time ids (``6 * time_embed_dim + text_dim`` inputs). The scheduler is SDXL's
    (``EulerDiscreteScheduler``, scaled-linear, 1000 steps, ε-prediction); no watermarker.

    Args:
        words: Whole-word tokens of both tokenizers (see :func:`write_clip_vocabulary`).
        image_size: Pixel height and width the pipeline generates by default.
        seed: Seed of the random weights.
        pipeline_class: The pipeline class to build (default ``StableDiffusionXLPipeline``; e.g.
            :class:`~diffusers_guda.GUDAStableDiffusionXLPipeline`).
        unet_channels: ``block_out_channels`` of the UNet's two blocks.
        text_dim: Width (and projection size) of each text encoder.
        max_length: Tokens per prompt.
        time_embed_dim: The UNet's ``addition_time_embed_dim`` (per time id).

    Returns:
        The pipeline, on CPU, in float32, with the progress bar disabled.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(words, max_length=max_length), tiny_clip_tokenizer(words, max_length=max_length)
    vocab = len(tokenizer.get_vocab())
    with _seeded(seed):
        unet = _tiny_unet(
            image_size, unet_channels, 2 * text_dim, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_dim, use_linear_projection=True,
        )
        vae = _tiny_vae(image_size)
        text_encoder = _tiny_text_encoder(vocab, text_dim, max_length)
        text_encoder_2 = _tiny_text_encoder(vocab, text_dim, max_length, with_projection=True)
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, timestep_spacing="leading",
    )
    cls = pipeline_class or StableDiffusionXLPipeline
    pipe = cls(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global generator for the block, and restore its state after."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(state)


def _tiny_unet(image_size: int, channels: tuple[int, int], text_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, block_out_channels=tuple(channels), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8, **extra,
    )


def _tiny_vae(image_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=image_size,
    )


def _tiny_text_encoder(vocab_size: int, text_dim: int, max_length: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=text_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
