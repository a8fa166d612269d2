"""``GUDAStableDiffusionXLPipeline``: Stable Diffusion XL that can unlearn groups and attribute its images."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from ..errors import ConfigError
from ..models import bare_unet
from ..scoring import AttributionResult
from .generation import attribution_call_arguments, convert_images, prompts_per_image
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
        arguments, output_type, return_dict = attribution_call_arguments(self, super().__call__, args, kwargs)
        if arguments.get("prompt_2") is not None:
            raise ConfigError("return_attribution=True scores each image with its prompt in both text encoders; drop prompt_2, "
                              "or pass prompt_embeds and pooled_prompt_embeds from pipe.encode_prompt(prompt, prompt_2).")
        per_prompt = arguments.get("num_images_per_prompt") or 1
        prompts, prompt_embeds, pooled = prompts_per_image(arguments), arguments.get("prompt_embeds"), arguments.get("pooled_prompt_embeds")
        if prompts is not None:
            query = {"prompts": prompts}
        elif prompt_embeds is not None and pooled is not None:
            query = {"prompt_embeds": prompt_embeds.repeat_interleave(per_prompt, dim=0),
                     "pooled_prompt_embeds": pooled.repeat_interleave(per_prompt, dim=0)}
        else:
            raise ConfigError("Pass prompt, or prompt_embeds with pooled_prompt_embeds: attribution conditions each image on its prompt.")

        out = super().__call__(**arguments, output_type="pt", return_dict=True)
        images = out.images  # [B, 3, H, W] in [0, 1], not quantised
        size = tuple(images.shape[-2:])
        sizes = [*(arguments.get("original_size") or size), *(arguments.get("crops_coords_top_left") or (0, 0)),
                 *(arguments.get("target_size") or size)]
        result = self.attribute(images * 2.0 - 1.0, **query, size_conditions=sizes, **(attribution_kwargs or {}))
        images = convert_images(self, images, output_type)
        if not return_dict:
            return images, result
        return GUDAStableDiffusionXLOutput(images=images, attribution=result)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the base model as a stock ``StableDiffusionXLPipeline`` directory (no LoRA wrappers, no adapters).

        Saving a UNet that holds peft wrappers would write ``base_layer`` keys that stock diffusers
        cannot load; save bundles with :meth:`AdapterBundle.save_pretrained` instead.
        """
        components = {name: getattr(self, name) for name in self.components}
        components["unet"] = bare_unet(self.unet)
        config = {k: v for k, v in self.config.items() if k == "force_zeros_for_empty_prompt"}
        stock = StableDiffusionXLPipeline(**components, **config, add_watermarker=False)
        stock.save_pretrained(save_directory, **kwargs)

    encode_latents = GUDAStableDiffusionPipeline.encode_latents
