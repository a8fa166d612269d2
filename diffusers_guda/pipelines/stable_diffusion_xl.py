"""``GUDAStableDiffusionXLPipeline``: Stable Diffusion XL that can unlearn groups and attribute its images."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from ..scoring import AttributionResult
from .components import save_stock_pipeline
from .generation import generate_and_attribute
from .mixin import GUDAPipelineMixin
from .stable_diffusion import GUDAStableDiffusionPipeline


@dataclass
class GUDAStableDiffusionXLOutput(StableDiffusionXLPipelineOutput):
    """``StableDiffusionXLPipelineOutput`` plus the attribution of the generated images.

    Attributes:
        images: As ``StableDiffusionXLPipelineOutput``.
        attribution: Scores of every image against every group of the loaded bundle.
    """

    attribution: AttributionResult | None = None


class GUDAStableDiffusionXLPipeline(StableDiffusionXLPipeline, GUDAPipelineMixin):
    """Stable Diffusion XL with group attribution (GUDA-C).

    Loads like ``StableDiffusionXLPipeline`` (``from_pretrained`` of any SDXL directory or Hub id, or
    ``from_pipe(existing_pipe)``, which shares the existing components without copying them) and
    generates identically: ``__call__`` is the parent's unless ``return_attribution=True``. A loaded
    bundle's adapters stay switched off for generation.

    Attribution scores the *conditional* latent ELBO of each image's deterministic VAE latent under
    the full model and under each group's unlearned adapter, with the same timesteps and noise for
    every model. The condition is SDXL's: both text encoders' penultimate hidden states, the pooled
    embedding of ``text_encoder_2`` and the image's time ids (original size, crop, target size;
    docs/method.md#sdxl).

    Example:
        ```py
        >>> from diffusers_guda import GUDAStableDiffusionXLPipeline
        >>> pipe = GUDAStableDiffusionXLPipeline.from_pretrained("path/to/fine-tuned-sdxl")
        >>> pipe.load_guda_bundle("path/to/styles-bundle")
        >>> out = pipe("a lighthouse at dusk", return_attribution=True)
        >>> out.attribution.top(3)
        ```
    """

    def __call__(self, *args, return_attribution: bool = False, attribution_kwargs: dict | None = None, **kwargs):
        """Generate as ``StableDiffusionXLPipeline.__call__``; optionally attribute the images too.

        Args:
            *args: ``StableDiffusionXLPipeline.__call__``'s arguments.
            return_attribution: Also score the generated images against the loaded bundle's groups.
                Each image is scored with the prompt it was generated from (``prompt`` repeated
                ``num_images_per_prompt`` times, or ``prompt_embeds`` with ``pooled_prompt_embeds``)
                and the size conditions it was generated with (``original_size``,
                ``crops_coords_top_left``, ``target_size``; by default the image's size, uncropped),
                as a conditional ELBO: classifier-free guidance and the negative prompt shape the
                sample, not the score. The images scored are the decoded images before quantisation
                (what ``output_type="pt"`` returns), so ``pipe.attribute(out.images, prompts=...)`` on
                float ``np``/``pt`` output gives the same scores.
            attribution_kwargs: Keyword arguments of :meth:`attribute` (``batch_size``,
                ``elbo_config``, ``strategy``...).
            **kwargs: ``StableDiffusionXLPipeline.__call__``'s keyword arguments.

        Returns:
            The parent's output; with ``return_attribution=True`` a :class:`GUDAStableDiffusionXLOutput`
            (or ``(images, attribution)`` with ``return_dict=False``).

        Raises:
            ConfigError: attribution asked for without a loaded bundle, with ``output_type="latent"``,
                without a prompt, or with a ``prompt_2`` (checked before generating).
        """
        if not return_attribution:
            return super().__call__(*args, **kwargs)
        out, images, result, return_dict = generate_and_attribute(
            self, super().__call__, args, kwargs, attribution_kwargs, pooled=True, other_prompts=("prompt_2",),
            image_query=_size_conditions,
        )
        if not return_dict:
            return images, result
        return GUDAStableDiffusionXLOutput(images=images, attribution=result)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the base model as a stock ``StableDiffusionXLPipeline`` directory (no LoRA wrappers, no adapters).

        Saving a UNet that holds peft wrappers would write ``base_layer`` keys that stock diffusers
        cannot load; save bundles with :meth:`AdapterBundle.save_pretrained` instead.
        """
        config = {k: v for k, v in self.config.items() if k == "force_zeros_for_empty_prompt"}
        save_stock_pipeline(self, StableDiffusionXLPipeline, save_directory, {**config, "add_watermarker": False}, **kwargs)

    encode_latents = GUDAStableDiffusionPipeline.encode_latents


def _size_conditions(arguments: dict, images) -> dict:
    """The size conditions each image was generated with: ``original_size``, ``crops_coords_top_left``
    and ``target_size``, by default the image's size, uncropped."""
    size = tuple(images.shape[-2:])
    return {"size_conditions": [*(arguments.get("original_size") or size), *(arguments.get("crops_coords_top_left") or (0, 0)),
                                *(arguments.get("target_size") or size)]}
