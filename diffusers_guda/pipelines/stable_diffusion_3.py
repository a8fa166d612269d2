"""``GUDAStableDiffusion3Pipeline``: Stable Diffusion 3 that can unlearn groups and attribute its images."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

from ..scoring import AttributionResult
from .components import save_stock_pipeline
from .generation import generate_and_attribute
from .mixin import GUDAPipelineMixin
from .stable_diffusion import GUDAStableDiffusionPipeline


@dataclass
class GUDAStableDiffusion3Output(StableDiffusion3PipelineOutput):
    """``StableDiffusion3PipelineOutput`` plus the attribution of the generated images.

    Attributes:
        images: As ``StableDiffusion3PipelineOutput``.
        attribution: Scores of every image against every group of the loaded bundle.
    """

    attribution: AttributionResult | None = None


class GUDAStableDiffusion3Pipeline(StableDiffusion3Pipeline, GUDAPipelineMixin):
    """Stable Diffusion 3 (3.5) with group attribution (GUDA-C on a flow-matching transformer).

    Loads like ``StableDiffusion3Pipeline`` (``from_pretrained`` of any SD3 directory or Hub id, or
    ``from_pipe(existing_pipe)``, which shares the existing components without copying them) and
    generates identically: ``__call__`` is the parent's unless ``return_attribution=True``. A loaded
    bundle's adapters (LoRA on the transformer's attention projections, ``sd3-styles``) stay switched
    off for generation.

    Attribution scores the *conditional* flow-matching ELBO of each image's deterministic VAE latent
    (``(mean - shift_factor) * scaling_factor``) under the full model and under each group's
    unlearned adapter, with the same noise levels and noise for every model (docs/method.md#flow-matching-models).
    The condition is SD3's: CLIP-L's and CLIP-G's hidden states and pooled embeddings and T5's
    tokens, from the pipeline's own ``encode_prompt`` with the T5 length the bundle records
    (``max_sequence_length``, by default the pipeline's 256).

    Example:
        ```py
        >>> from diffusers_guda import GUDAStableDiffusion3Pipeline
        >>> pipe = GUDAStableDiffusion3Pipeline.from_pretrained("path/to/fine-tuned-sd3", torch_dtype=torch.bfloat16).to("cuda")
        >>> pipe.load_guda_bundle("path/to/styles-bundle")
        >>> out = pipe("a lighthouse at dusk", return_attribution=True)
        >>> out.attribution.top(3)
        ```
    """

    def __call__(self, *args, return_attribution: bool = False, attribution_kwargs: dict | None = None, **kwargs):
        """Generate as ``StableDiffusion3Pipeline.__call__``; optionally attribute the images too.

        Args:
            *args: ``StableDiffusion3Pipeline.__call__``'s arguments.
            return_attribution: Also score the generated images against the loaded bundle's groups.
                Each image is scored with the prompt it was generated from (``prompt`` repeated
                ``num_images_per_prompt`` times, or ``prompt_embeds`` with ``pooled_prompt_embeds``)
                in all three text encoders, as a conditional ELBO: classifier-free guidance, the
                negative prompt and the sampler shape the sample, not the score. The images scored
                are the decoded images before quantisation (what ``output_type="pt"`` returns), so
                ``pipe.attribute(out.images, prompts=...)`` on float ``np``/``pt`` output gives the same scores.
            attribution_kwargs: Keyword arguments of :meth:`attribute` (``batch_size``,
                ``elbo_config``, ``strategy``...).
            **kwargs: ``StableDiffusion3Pipeline.__call__``'s keyword arguments.

        Returns:
            The parent's output; with ``return_attribution=True`` a :class:`GUDAStableDiffusion3Output`
            (or ``(images, attribution)`` with ``return_dict=False``).

        Raises:
            ConfigError: attribution asked for without a loaded bundle, with ``output_type="latent"``,
                without a prompt, or with a ``prompt_2``/``prompt_3`` (checked before generating).
        """
        if not return_attribution:
            return super().__call__(*args, **kwargs)
        _, images, result, return_dict = generate_and_attribute(
            self, super().__call__, args, kwargs, attribution_kwargs, pooled=True, other_prompts=("prompt_2", "prompt_3"),
        )
        if not return_dict:
            return images, result
        return GUDAStableDiffusion3Output(images=images, attribution=result)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the base model as a stock ``StableDiffusion3Pipeline`` directory (no LoRA wrappers, no adapters).

        Saving a transformer that holds peft wrappers would write ``base_layer`` keys that stock
        diffusers cannot load; save bundles with :meth:`AdapterBundle.save_pretrained` instead.
        """
        save_stock_pipeline(self, StableDiffusion3Pipeline, save_directory, **kwargs)

    encode_latents = GUDAStableDiffusionPipeline.encode_latents
