"""The tiny offline pipelines (see :mod:`diffusers_guda.testing`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .tokenizers import DEFAULT_WORDS, tiny_clip_tokenizer, tiny_t5_tokenizer


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


def tiny_stable_diffusion_3(
    words: Sequence[str] = DEFAULT_WORDS,
    *,
    image_size: int = 16,
    seed: int = 0,
    pipeline_class=None,
    text_dim: int = 32,
    t5_dim: int = 96,
    max_length: int = 16,
    num_layers: int = 2,
):
    """Build a tiny, randomly initialised Stable Diffusion 3 pipeline offline.

    Every component of a ``StableDiffusion3Pipeline`` in small: an ``SD3Transformer2DModel`` on 2 x 2
    latent patches, a VAE with 16 latent channels and SD3's shift and scaling factors, two CLIP text
    encoders with projections (their hidden states side by side, ``2 * text_dim``, are zero-padded to
    T5's width as in SD3; their pooled outputs concatenated are the ``pooled_projections``) and a T5
    encoder of width ``t5_dim`` (the transformer's ``joint_attention_dim``), with their tokenizers
    built in code. The scheduler is SD3's ``FlowMatchEulerDiscreteScheduler`` (shift 3). A
    ``16 x 16`` image maps to a ``16 x 8 x 8`` latent.

    Args:
        words: Whole-word tokens of the three tokenizers.
        image_size: Pixel height and width the pipeline generates by default.
        seed: Seed of the random weights.
        pipeline_class: The pipeline class to build (default ``StableDiffusion3Pipeline``; e.g.
            :class:`~diffusers_guda.GUDAStableDiffusion3Pipeline`).
        text_dim: Width of each CLIP text encoder.
        t5_dim: Width of the T5 encoder (at least ``2 * text_dim``, as in SD3).
        max_length: Tokens per prompt of the CLIP tokenizers.
        num_layers: Joint transformer blocks (the last one updates no text tokens, as in SD3).

    Returns:
        The pipeline, on CPU, in float32, with the progress bar disabled.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(words, max_length=max_length), tiny_clip_tokenizer(words, max_length=max_length)
    tokenizer_3 = tiny_t5_tokenizer(words)
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=image_size // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=t5_dim, caption_projection_dim=32,
            pooled_projection_dim=2 * text_dim, pos_embed_max_size=image_size,
        )
        vae = _tiny_flow_vae(image_size)
        text_encoder = _tiny_text_encoder(len(tokenizer.get_vocab()), text_dim, max_length, with_projection=True)
        text_encoder_2 = _tiny_text_encoder(len(tokenizer.get_vocab()), text_dim, max_length, with_projection=True)
        text_encoder_3 = _tiny_t5_encoder(len(tokenizer_3), t5_dim)
    cls = pipeline_class or StableDiffusion3Pipeline
    pipe = cls(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3.eval(), tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(
    words: Sequence[str] = DEFAULT_WORDS,
    *,
    image_size: int = 16,
    seed: int = 0,
    pipeline_class=None,
    guidance_embeds: bool = True,
    text_dim: int = 32,
    t5_dim: int = 64,
    max_length: int = 16,
):
    """Build a tiny, randomly initialised Flux pipeline offline.

    Every component of a ``FluxPipeline`` in small: a ``FluxTransformer2DModel`` (one double-stream
    and one single-stream block) on 2 x 2 patches of 16-channel latents (``in_channels`` 64), a VAE
    with Flux's shift and scaling factors, a CLIP text encoder whose pooled output (``text_dim``) is
    the ``pooled_projections``, and a T5 encoder of width ``t5_dim``, with their tokenizers built
    in code. The scheduler is FLUX.1-dev's (``FlowMatchEulerDiscreteScheduler`` with the
    resolution-dependent shift). ``FluxPipeline`` generates ``256 x 256`` images unless given
    ``height`` and ``width``: pass ``image_size``.

    Args:
        words: Whole-word tokens of both tokenizers.
        image_size: Pixel height and width of the images the VAE is built for.
        seed: Seed of the random weights.
        pipeline_class: The pipeline class to build (default ``FluxPipeline``; e.g.
            :class:`~diffusers_guda.GUDAFluxPipeline`).
        guidance_embeds: A guidance-distilled transformer (FLUX.1-dev), which takes the guidance
            scale as an input; ``False`` for one without (FLUX.1-schnell).
        text_dim: Width of the CLIP text encoder.
        t5_dim: Width of the T5 encoder (the transformer's ``joint_attention_dim``).
        max_length: Tokens per prompt of the CLIP tokenizer.

    Returns:
        The pipeline, on CPU, in float32, with the progress bar disabled.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(words, max_length=max_length), tiny_t5_tokenizer(words)
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=t5_dim, pooled_projection_dim=text_dim, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
        )
        vae = _tiny_flow_vae(image_size)
        text_encoder = _tiny_text_encoder(len(tokenizer.get_vocab()), text_dim, max_length)
        text_encoder_2 = _tiny_t5_encoder(len(tokenizer_2), t5_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    cls = pipeline_class or FluxPipeline
    pipe = cls(
        scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval(),
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


def _tiny_vae(image_size: int, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=latent_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=image_size, **extra,
    )


def _tiny_flow_vae(image_size: int):
    """The VAE of Stable Diffusion 3 and Flux in small: 16 latent channels, no quant convs, a shift and a scaling factor."""
    return _tiny_vae(image_size, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                     shift_factor=0.0609, scaling_factor=1.5035)


def _tiny_text_encoder(vocab_size: int, text_dim: int, max_length: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=text_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def _tiny_t5_encoder(vocab_size: int, text_dim: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
