"""``GUDAStableDiffusionPipeline``: Stable Diffusion that can unlearn groups and attribute its images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from ..scoring import AttributionResult
from .components import save_stock_pipeline
from .generation import generate_and_attribute
from .mixin import GUDAPipelineMixin


@dataclass
class GUDAStableDiffusionOutput(StableDiffusionPipelineOutput):
    """``StableDiffusionPipelineOutput`` plus the attribution of the generated images.

    Attributes:
        images: As ``StableDiffusionPipelineOutput``.
        nsfw_content_detected: As ``StableDiffusionPipelineOutput``.
        attribution: Scores of every image against every group of the loaded bundle.
    """

    attribution: AttributionResult | None = None


class GUDAStableDiffusionPipeline(StableDiffusionPipeline, GUDAPipelineMixin):
    """Stable Diffusion (1.x/2.x) with group attribution (GUDA-C).

    Loads like ``StableDiffusionPipeline`` (``from_pretrained`` of any Stable Diffusion directory or
    Hub id, or ``from_pipe(existing_pipe)``, which shares the existing components without copying
    them) and generates identically: ``__call__`` is the parent's unless ``return_attribution=True``.
    A loaded bundle's adapters stay switched off for generation.

    Attribution scores the *conditional* latent ELBO ``log p(z | prompt)`` of each image's
    deterministic VAE latent (posterior mean x scaling factor) under the full model and under each
    group's unlearned adapter, with the same timesteps and noise for every model.

    Example:
        ```py
        >>> from diffusers_guda import GUDAStableDiffusionPipeline
        >>> pipe = GUDAStableDiffusionPipeline.from_pretrained("path/to/fine-tuned-sd15")
        >>> pipe.load_guda_bundle("path/to/styles-bundle")
        >>> out, result = pipe("a lighthouse at dusk", return_attribution=True)
        >>> result.top(3)
        ```
    """

    def __call__(self, *args, return_attribution: bool = False, attribution_kwargs: dict | None = None, **kwargs):
        """Generate as ``StableDiffusionPipeline.__call__``; optionally attribute the images too.

        Args:
            *args: ``StableDiffusionPipeline.__call__``'s arguments.
            return_attribution: Also score the generated images against the loaded bundle's groups.
                Each image is scored with the prompt it was generated from (``prompt`` repeated
                ``num_images_per_prompt`` times, or ``prompt_embeds``), as a conditional ELBO:
                classifier-free guidance and the negative prompt shape the sample, not the score.
                The images scored are the decoded images before quantisation (what
                ``output_type="pt"`` returns), so ``pipe.attribute(out.images, prompts=...)`` on
                float ``np``/``pt`` output gives the same scores.
            attribution_kwargs: Keyword arguments of :meth:`attribute` (``batch_size``,
                ``elbo_config``, ``strategy``...).
            **kwargs: ``StableDiffusionPipeline.__call__``'s keyword arguments.

        Returns:
            The parent's output; with ``return_attribution=True`` a :class:`GUDAStableDiffusionOutput`
            (or ``(images, nsfw_content_detected, attribution)`` with ``return_dict=False``).

        Raises:
            ConfigError: attribution asked for without a loaded bundle (checked before generating),
                or with ``output_type="latent"``.
        """
        if not return_attribution:
            return super().__call__(*args, **kwargs)
        out, images, result, return_dict = generate_and_attribute(self, super().__call__, args, kwargs, attribution_kwargs)
        if not return_dict:
            return images, out.nsfw_content_detected, result
        return GUDAStableDiffusionOutput(images=images, nsfw_content_detected=out.nsfw_content_detected, attribution=result)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the base model as a stock ``StableDiffusionPipeline`` directory (no LoRA wrappers, no adapters).

        Saving a UNet that holds peft wrappers would write ``base_layer`` keys that stock diffusers
        cannot load; save bundles with :meth:`AdapterBundle.save_pretrained` instead.
        """
        config = {k: v for k, v in self.config.items() if k == "requires_safety_checker"}
        save_stock_pipeline(self, StableDiffusionPipeline, save_directory, config, **kwargs)

    @torch.no_grad()
    def encode_latents(self, images) -> torch.Tensor:
        """Deterministic VAE latents (``(posterior mean - shift_factor) * scaling_factor``) of ``images``, as scored."""
        from .conditioning import check_pixel_images, encode_latents
        from .model_inputs import to_model_images

        return encode_latents(self, check_pixel_images(self, to_model_images(images)))
