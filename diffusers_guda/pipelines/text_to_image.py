"""A pixel-space text-to-image DDPM pipeline: a ``UNet2DConditionModel`` on pixels, a frozen CLIP text encoder.

:class:`TextToImageDDPMPipeline` is the smallest sound text-conditioned diffusion model: Stable
Diffusion's conditioning (cross-attention on CLIP text embeddings) without its VAE, so the ELBO is
that of the image itself and nothing in the model is untrained. The ``digits-styles`` benchmark
trains one from scratch on 8 x 8 digits in seconds per hundred steps on one CPU core.
:class:`GUDATextToImagePipeline` adds group attribution (``unlearn_groups``, ``load_guda_bundle``,
``attribute``): every image is scored by its conditional ELBO given its prompt.

Sampling is plain ancestral sampling from ``p(x | prompt)`` (no classifier-free guidance: the model
is not trained with empty prompts). Each image's noise comes from its own generator when a list of
generators is given, as in ``DDPMPipeline``.

A saved pipeline is a diffusers pipeline directory (``model_index.json``, safetensors weights, the
tokenizer's ``vocab.json``/``merges.txt``); load it with ``GUDATextToImagePipeline.from_pretrained``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import ConfigError
from ..hashing import base_state_dict
from .mixin import GUDAPipelineMixin


class TextToImageDDPMPipeline(DiffusionPipeline):
    """Text-conditioned pixel-space DDPM: ``unet(x_t, t, encoder_hidden_states=text_encoder(prompt))``.

    Args:
        unet: A ``UNet2DConditionModel`` whose ``in_channels`` are the image channels and whose
            ``cross_attention_dim`` is the text encoder's width.
        scheduler: A DDPM-family scheduler.
        text_encoder: A ``CLIPTextModel`` (its last hidden state conditions the UNet).
        tokenizer: Its ``CLIPTokenizer``; prompts are padded to ``model_max_length``.
    """

    model_cpu_offload_seq = "text_encoder->unet"

    # real (not postponed) annotations: DiffusionPipeline.from_pipe matches components by them
    def __init__(self, unet: UNet2DConditionModel, scheduler: SchedulerMixin, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = False, negative_prompt=None):
        """Text embeddings ``[B * num_images_per_prompt, L, D]`` of ``prompt`` (Stable Diffusion's signature).

        Returns:
            ``(prompt_embeds, None)``: this pipeline has no classifier-free guidance.

        Raises:
            ConfigError: if classifier-free guidance is asked for.
        """
        if do_classifier_free_guidance:
            raise ConfigError(f"{type(self).__name__} samples p(x | prompt) without classifier-free guidance.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device if device is not None else self.text_encoder.device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder(ids.to(device))[0]
        return embeds.repeat_interleave(num_images_per_prompt, dim=0), None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Sample images from ``p(x | prompt)``.

        Args:
            prompt: One prompt or a list of prompts.
            num_images_per_prompt: Images per prompt.
            generator: A generator, or one per image (then each image's noise is its own).
            num_inference_steps: Denoising steps.
            output_type: ``"pil"``, ``"np"`` (``[B, H, W, C]`` in [0, 1]) or ``"pt"`` (``[B, C, H, W]`` in [0, 1]).
            return_dict: Return an ``ImagePipelineOutput`` instead of a tuple.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        device = self.unet.device
        embeds, _ = self.encode_prompt(prompt, device, num_images_per_prompt)
        config = self.unet.config
        shape = (embeds.shape[0], config.in_channels, config.sample_size, config.sample_size)
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ConfigError(f"Got {len(generator)} generators for {shape[0]} images; pass one per image or a single one.")
        sample = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            output = self.unet(sample, t, encoder_hidden_states=embeds.to(self.unet.dtype)).sample
            sample = self.scheduler.step(output, t, sample, generator=generator).prev_sample
        images = (sample / 2 + 0.5).clamp(0, 1).float().cpu()
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class GUDATextToImagePipeline(TextToImageDDPMPipeline, GUDAPipelineMixin):
    """:class:`TextToImageDDPMPipeline` with group attribution (GUDA-C on a pixel-space model).

    Example:
        ```py
        >>> from diffusers_guda.pipelines.text_to_image import GUDATextToImagePipeline
        >>> pipe = GUDATextToImagePipeline.from_pretrained("eval/base")
        >>> pipe.load_guda_bundle("eval/bundle")
        >>> images = pipe("digit 3, thick", output_type="np").images
        >>> pipe.attribute(images, prompts="digit 3, thick").top(2)
        ```
    """

    def save_pretrained(self, save_directory, **kwargs):
        """Save the base model (no LoRA wrappers, no adapters) as a :class:`TextToImageDDPMPipeline` directory."""
        unet = UNet2DConditionModel.from_config({k: v for k, v in self.unet.config.items() if not k.startswith("_")})
        unet.load_state_dict(base_state_dict(self.unet), assign=True)
        TextToImageDDPMPipeline(unet=unet, scheduler=self.scheduler, text_encoder=self.text_encoder,
                                tokenizer=self.tokenizer).save_pretrained(save_directory, **kwargs)
