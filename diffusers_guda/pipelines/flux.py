"""``GUDAFluxPipeline``: Flux that can unlearn groups and attribute its images."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from ..scoring import AttributionResult
from .components import save_stock_pipeline
from .generation import generate_and_attribute
from .mixin import GUDAPipelineMixin
from .stable_diffusion import GUDAStableDiffusionPipeline


@dataclass
class GUDAFluxOutput(FluxPipelineOutput):
    """``FluxPipelineOutput`` plus the attribution of the generated images.

    Attributes:
        images: As ``FluxPipelineOutput``.
        attribution: Scores of every image against every group of the loaded bundle.
    """

    attribution: AttributionResult | None = None


class GUDAFluxPipeline(FluxPipeline, GUDAPipelineMixin):
    """Flux (FLUX.1-dev, FLUX.1-schnell and their fine-tunes) with group attribution (GUDA-C on a flow-matching transformer).

    Loads like ``FluxPipeline`` (``from_pretrained`` of any Flux directory or Hub id, or
    ``from_pipe(existing_pipe)``, which shares the existing components without copying them) and
    generates identically: ``__call__`` is the parent's unless ``return_attribution=True``. A loaded
    bundle's adapters (LoRA on the transformer's attention projections, ``flux-styles``) stay
    switched off for generation.

    Attribution scores the *conditional* flow-matching ELBO of each image's deterministic VAE latent
    (``(mean - shift_factor) * scaling_factor``, packed into 2 x 2 patches as ``FluxPipeline`` does)
    under the full model and under each group's unlearned adapter, with the same noise levels and
    noise for every model (docs/method.md#flow-matching-models). The condition is Flux's: T5's tokens
    and CLIP's pooled embedding from the pipeline's own ``encode_prompt`` (the T5 length the bundle
    records, by default 512), and, for a guidance-distilled transformer (FLUX.1-dev), the embedded
    guidance the bundle records: ``unlearn_groups(..., guidance=3.5)`` by default, and every score of
    the bundle uses the same value (docs/formats.md#conditioning-settings).

    Example:
        ```py
        >>> from diffusers_guda import GUDAFluxPipeline
        >>> pipe = GUDAFluxPipeline.from_pretrained("path/to/fine-tuned-flux", torch_dtype=torch.bfloat16).to("cuda")
        >>> pipe.load_guda_bundle("path/to/styles-bundle")
        >>> out = pipe("a lighthouse at dusk", return_attribution=True)
        >>> out.attribution.top(3)
        ```
    """

    def __call__(self, *args, return_attribution: bool = False, attribution_kwargs: dict | None = None, **kwargs):
        """Generate as ``FluxPipeline.__call__``; optionally attribute the images too.

        Args:
            *args: ``FluxPipeline.__call__``'s arguments.
            return_attribution: Also score the generated images against the loaded bundle's groups.
                Each image is scored with the prompt it was generated from (``prompt`` repeated
                ``num_images_per_prompt`` times, or ``prompt_embeds`` with ``pooled_prompt_embeds``)
                in both text encoders, as a conditional ELBO with the bundle's guidance: the
                ``guidance_scale`` generated with, ``true_cfg_scale`` and the negative prompt shape
                the sample, not the score. The images scored are the decoded images before
                quantisation (what ``output_type="pt"`` returns), so ``pipe.attribute(out.images,
                prompts=...)`` on float ``np``/``pt`` output gives the same scores.
            attribution_kwargs: Keyword arguments of :meth:`attribute` (``batch_size``,
                ``elbo_config``, ``strategy``...).
            **kwargs: ``FluxPipeline.__call__``'s keyword arguments.

        Returns:
            The parent's output; with ``return_attribution=True`` a :class:`GUDAFluxOutput`
            (or ``(images, attribution)`` with ``return_dict=False``).

        Raises:
            ConfigError: attribution asked for without a loaded bundle, with ``output_type="latent"``,
                without a prompt, or with a ``prompt_2`` (checked before generating).
        """
        if not return_attribution:
            return super().__call__(*args, **kwargs)
        _, images, result, return_dict = generate_and_attribute(
            self, super().__call__, args, kwargs, attribution_kwargs, pooled=True, other_prompts=("prompt_2",),
        )
        if not return_dict:
            return images, result
        return GUDAFluxOutput(images=images, attribution=result)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the base model as a stock ``FluxPipeline`` directory (no LoRA wrappers, no adapters).

        Saving a transformer that holds peft wrappers would write ``base_layer`` keys that stock
        diffusers cannot load; save bundles with :meth:`AdapterBundle.save_pretrained` instead.
        """
        save_stock_pipeline(self, FluxPipeline, save_directory, **kwargs)

    encode_latents = GUDAStableDiffusionPipeline.encode_latents
