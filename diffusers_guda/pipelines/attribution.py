"""GUDA operations on any diffusers pipeline with a denoiser (``unet`` or ``transformer``) and a
DDPM-family or flow-matching ``scheduler``.

These functions take the pipeline as their first argument, so scripts that hold a stock pipeline
can use them without changing its class; :class:`~diffusers_guda.pipelines.GUDAPipelineMixin`
exposes the same operations as methods.

Pixel-space pipelines (``DDPMPipeline``) score images as they are. Latent text-to-image pipelines
(Stable Diffusion 1.x/2.x and SDXL: a ``UNet2DConditionModel``; Stable Diffusion 3 and Flux: a
flow-matching transformer; with a VAE and text encoders) score the conditional ELBO of the image's
deterministic VAE latent given its prompt (see :mod:`.model_inputs`, :mod:`.conditioning` and
:mod:`.flow_conditioning`). The denoiser is found by :func:`~.components.denoiser`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapter_state import switch_adapters
from ..bundle import AdapterBundle
from ..diffusion import training_scheduler
from ..distributed import ProcessInfo
from ..elbo import ELBOConfig, ELBOEstimator
from ..errors import BaseModelMismatchError, ConfigError, ScoringError
from ..models import is_conditional
from ..recipes import Recipe, default_recipe
from ..scoring import AttributionResult, AttributionScorer
from ..unlearning import GroupUnlearner, UnlearningConfig
from ..unlearning.base_model import base_provenance
from .auto import family_pipeline, pipeline_family
from .components import denoiser, ensure_adapter_denoiser
from .conditioning import is_latent, prompt_encoder
from .flow_conditioning import conditioning_settings, recorded_settings
from .model_inputs import check_training_set, model_dataset, model_inputs


def _model_id(pipe) -> str | None:
    name = getattr(pipe.config, "_name_or_path", None) or getattr(pipe, "name_or_path", None)
    return str(name) if name is not None else None  # from_pretrained(Path) records a Path


def load_guda_bundle(
    pipe,
    bundle: AdapterBundle | str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
    token: str | None = None,
) -> AdapterBundle:
    """Load an adapter bundle (object, local directory or Hub repo id) into the pipeline's denoiser
    (``pipe.unet`` or ``pipe.transformer``).

    Raises:
        BaseModelMismatchError: if the bundle was made for another base model, or for a pipeline of
            another family (e.g. an SDXL bundle and a Stable Diffusion 1.5 or Flux pipeline).
        ConfigError: a bundle of an unconditional model in a text-to-image pipeline (or the reverse),
            or a Flux bundle that records no guidance for a guidance-distilled transformer.
    """
    model = ensure_adapter_denoiser(pipe)
    if not isinstance(bundle, AdapterBundle):
        bundle = AdapterBundle.from_pretrained(
            bundle, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
    if bool(bundle.base_model.get("conditional", False)) != is_conditional(model):
        kind = "a text-conditioned" if bundle.base_model.get("conditional") else "an unconditional"
        made_on = "transformer" if "Transformer" in str(bundle.base_model.get("class_name")) else "UNet"
        raise ConfigError(
            f"This bundle was made for {kind} {made_on} ({bundle.base_model.get('id')!r}), but this {type(pipe).__name__}'s "
            f"{type(model).__name__} is not one; load it into the pipeline of the base model it was made for."
        )
    made_for = bundle.base_model.get("family") or pipeline_family(bundle.base_model.get("pipeline_class") or "")
    family = pipeline_family(pipe)
    if made_for is not None and family is not None and made_for != family:
        raise BaseModelMismatchError(
            f"This bundle was made for a {made_for} pipeline ({bundle.base_model.get('id')!r}), but this {type(pipe).__name__} "
            f"is a {family} pipeline; load the bundle into a {family_pipeline(made_for)} of the base model it was made for."
        )
    recorded_settings(pipe, bundle)  # refuses a Flux bundle without the guidance its scores depend on
    unload_guda_bundle(pipe)  # a pipeline holds one bundle: a new one replaces it
    bundle.load_into(model)
    switch_adapters(model, None)  # the pipeline keeps generating with the full model; scoring switches adapters on
    pipe._guda_bundle = bundle
    return bundle


def unload_guda_bundle(pipe) -> None:
    """Remove the loaded bundle's adapters from the pipeline's denoiser; the pipeline is then as before any bundle."""
    bundle = getattr(pipe, "_guda_bundle", None)
    if bundle is None:
        return
    model = denoiser(pipe)
    loaded = set(getattr(model, "peft_config", None) or {})
    names = [bundle.adapter_name(slug) for slug in bundle.slugs if bundle.adapter_name(slug) in loaded]
    if names:
        model.delete_adapters(names)
    pipe._guda_bundle = None


def unlearn_groups(
    pipe,
    dataset,
    *,
    recipe: str | Recipe | None = None,
    config: UnlearningConfig | None = None,
    elbo_config: ELBOConfig | None = None,
    groups: Sequence[int | str] | None = None,
    checkpoint_dir: str | None = None,
    base_model_id: str | None = None,
    progress: bool = True,
    process: ProcessInfo | None = None,
    latent_cache=None,
    guidance: float | None = None,
    max_sequence_length: int | None = None,
    **settings,
) -> AdapterBundle:
    """Train one unlearning adapter per group and load the resulting bundle into the pipeline.

    The settings are the recommended recipe of the pipeline's family (see
    :func:`~diffusers_guda.recipes.default_recipe`: ``sd-styles`` for Stable Diffusion, ``sd3-styles``
    and ``flux-styles`` for Stable Diffusion 3 and Flux, ``digits-ddpm`` for unconditional DDPM...),
    another ``recipe``, or a complete ``config``; keyword ``settings`` override single values of the
    recipe. The bundle records the settings, the base model's identity, the ELBO configuration it is
    to be scored with and, for Stable Diffusion 3 and Flux, the conditioning settings (``guidance``,
    ``max_sequence_length``), which scoring then uses.

    Args:
        pipe: The full model's pipeline.
        dataset: The grouped training set the model was trained on: images in [-1, 1] (pixels; a latent
            pipeline encodes them with its VAE) and, for a text-conditioned denoiser, one prompt per image.
            Or a :class:`~diffusers_guda.lazy_data.LazyGroupedDataset`, read one image at a time.
        recipe: A recipe name, JSON path or :class:`~diffusers_guda.recipes.Recipe` (default: the family's).
        config: A complete :class:`UnlearningConfig` instead of a recipe and settings.
        elbo_config: How the bundle is to be scored (default: the recipe's ELBO settings).
        groups: Subset of groups (ids or names); default all.
        checkpoint_dir: Resume directory (finished groups are kept and skipped).
        base_model_id: Name recorded for the base model (default: the name it was loaded from).
        progress: Show progress bars.
        process: This process of a ``torchrun``/``accelerate launch`` run (default: detected); the
            processes share the groups and all return the same bundle (see :meth:`GroupUnlearner.unlearn`).
        latent_cache: A latent pipeline's :class:`~diffusers_guda.latent_cache.LatentCache` or its folder
            (see :func:`~diffusers_guda.pipelines.model_dataset`): each image is encoded once for every group, run and process.
        guidance: Flux with a guidance-distilled transformer (FLUX.1-dev): the guidance scale every
            forward takes, in unlearning and in scoring (default 3.5, ``FluxPipeline``'s default).
            Refused for other models (a transformer without guidance embedding records ``None``).
        max_sequence_length: Stable Diffusion 3 and Flux: T5 tokens per prompt (default: the
            pipeline's ``encode_prompt`` default, 256 for SD3 and 512 for Flux).
        **settings: Overrides of the recipe's unlearning settings, e.g. ``steps=200``,
            ``learning_rate=5e-5``, ``batch_size=2``, ``lora_rank=4``, ``objective="esd"`` or an
            objective option such as ``num_neighbors=10`` (see :meth:`Recipe.unlearning_with`).

    Raises:
        ConfigError: ``config`` given together with ``recipe`` or keyword settings, or a conditioning
            setting the pipeline's model does not take.
        DataError: a text-conditioned pipeline and a dataset without prompts.
    """
    check_training_set(dataset)
    config, elbo_config = _settings(pipe, recipe, config, elbo_config, settings)
    text_settings = conditioning_settings(pipe, guidance=guidance, max_sequence_length=max_sequence_length)
    model = ensure_adapter_denoiser(pipe)
    conditional = is_conditional(model)
    if conditional:
        dataset.require_prompts()
    unload_guda_bundle(pipe)  # the new bundle replaces the loaded one (their adapters share names)
    unlearner = GroupUnlearner(
        model, training_scheduler(pipe.scheduler), config, base_model_id=base_model_id or _model_id(pipe),
        encode_prompts=prompt_encoder(pipe, text_settings) if conditional else None,
        base_model_extra=_base_model_extra(pipe, text_settings), elbo_config=elbo_config,
    )
    bundle = unlearner.unlearn(
        model_dataset(pipe, dataset, progress=progress, latent_cache=latent_cache, process=process), groups=groups,
        checkpoint_dir=checkpoint_dir, progress=progress, process=process,
    )
    return load_guda_bundle(pipe, bundle)


def _settings(pipe, recipe, config, elbo_config, settings) -> tuple[UnlearningConfig, ELBOConfig]:
    """The unlearning and ELBO settings of :func:`unlearn_groups` (see there)."""
    if config is not None and (recipe is not None or settings):
        given = ["recipe"] * (recipe is not None) + sorted(settings)
        raise ConfigError(
            f"Pass either config= (a complete UnlearningConfig) or a recipe with keyword settings, not both (got config= and {given}); "
            "to change one value of a config, use dataclasses.replace(config, ...)."
        )
    chosen = Recipe.load(recipe) if recipe is not None else default_recipe(pipe)
    return config or chosen.unlearning_with(**settings), elbo_config or chosen.elbo


def _base_model_extra(pipe, text_settings: dict) -> dict:
    extra = {"pipeline_class": type(pipe).__name__, "family": pipeline_family(pipe)}
    if is_latent(pipe):
        extra.update(latent=True, vae_scaling_factor=float(pipe.vae.config.get("scaling_factor") or 1.0))
        if pipe.vae.config.get("shift_factor") is not None:
            extra["vae_shift_factor"] = float(pipe.vae.config.shift_factor)
    return {**extra, **text_settings}


def attribute(
    pipe,
    images,
    *,
    prompts: str | Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    size_conditions=None,
    guidance: float | None = None,
    bundle: AdapterBundle | str | None = None,
    batch_size: int = 64,
    elbo_config: ELBOConfig | None = None,
    strategy: str = "auto",
    adaptive_z: float | None = None,
    progress: bool = True,
    process: ProcessInfo | None = None,
) -> AttributionResult:
    """Score query images against every group of the loaded bundle.

    Args:
        pipe: A pipeline whose denoiser holds the bundle (or pass ``bundle``).
        images: ``[N, C, H, W]`` tensor in [-1, 1], a numpy array ``[N, H, W, C]`` in [0, 1] (what
            ``output_type="np"`` returns), or a list of PIL images. A latent pipeline scores the
            images' deterministic VAE latents.
        prompts: For a text-conditioned model: the prompt of each image (or one string for all); the
            score is the difference of conditional ELBOs ``log p(z | prompt)``, without classifier-free
            guidance. Stable Diffusion 3 and Flux encode it with the T5 length the bundle records.
        prompt_embeds: Instead of ``prompts``: the text embeddings ``[N, L, D]`` (or ``[1, L, D]`` for all).
        pooled_prompt_embeds: With ``prompt_embeds`` for SDXL, Stable Diffusion 3 and Flux: the pooled
            text embeddings ``[N, P]`` (or ``[1, P]`` for all), as the pipeline's ``encode_prompt`` returns them.
        size_conditions: SDXL only: each image's original height and width, crop top and left, and
            target height and width (``[N, 6]``, or 6 numbers for all), as generated; default
            ``(H, W, 0, 0, H, W)`` of the image (docs/method.md#sdxl).
        guidance: Flux only: the guidance scale the bundle was unlearned with, as a check (scores
            always use the bundle's; another value is refused). The guidance an image was generated
            with shapes the sample, not the score.
        bundle: Bundle to load first (object, directory or Hub id).
        batch_size: Images whose rows share forwards (speed and memory only; scores do not depend on it).
        elbo_config: Estimator settings; default: the ones the bundle records (a bundle that records
            none is scored with the recipe of the pipeline's family). The settings used are in
            ``metadata["elbo"]``.
        strategy: ``"auto"`` (default: ``"merged"`` for plain LoRA adapters), ``"merged"`` (each
            adapter merged into the weights in turn), ``"swap"`` (each adapter's LoRA branch switched
            on in turn) or ``"mixed"`` (the base and all adapters in one forward, one adapter per
            row); see :meth:`AttributionScorer.score`. The one used is in ``metadata["strategy"]``.
        adaptive_z: Walk each query's grid in blocks and drop groups that trail the leader by this
            many standard errors; stop when one is left (``None``: the full grid).
        progress: Show a progress bar.
        process: This process of a ``torchrun``/``accelerate launch`` run (default: detected); the
            processes share the images and all return the same, complete result.
    """
    if bundle is not None:
        load_guda_bundle(pipe, bundle)
    loaded = getattr(pipe, "_guda_bundle", None)
    if loaded is None:
        raise ConfigError("No GUDA bundle is loaded; call pipe.load_guda_bundle(path_or_repo_id) or pipe.unlearn_groups(dataset) first.")
    if elbo_config is not None and not isinstance(elbo_config, ELBOConfig):
        raise ConfigError(f"elbo_config must be an ELBOConfig, not {type(elbo_config).__name__}; pass ELBOConfig(**settings).")
    text_settings = recorded_settings(pipe, loaded, guidance=guidance)
    x0, unet_kwargs, used_prompts = model_inputs(
        pipe, images, prompts=prompts, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        size_conditions=size_conditions, settings=text_settings,
    )
    if elbo_config is None:
        elbo_config = ELBOConfig(**loaded.elbo) if loaded.elbo else _family_elbo(pipe)
    estimator = ELBOEstimator(training_scheduler(pipe.scheduler), elbo_config)
    model = denoiser(pipe)
    device = model.device
    scorer = AttributionScorer(model, estimator, [loaded.adapter_name(s) for s in loaded.slugs], loaded.group_names)
    meta = {"bundle": dict(loaded.source or {}), "base_model": loaded.base_model.get("id"), **base_provenance(model, loaded),
            "device": str(device)}
    if used_prompts is not None:
        meta["prompts"] = used_prompts
    if text_settings:
        meta["conditioning"] = text_settings
    result = scorer.score(
        x0, batch_size=batch_size, unet_kwargs=unet_kwargs, progress=progress, metadata=meta, strategy=strategy,
        adaptive_z=adaptive_z, process=process,
    )
    return _check_finite(result)


def _check_finite(result: AttributionResult) -> AttributionResult:
    """Refuse scores that are not finite (they would be written as NaN), naming the groups."""
    bad = [g for j, g in enumerate(result.groups) if not torch.isfinite(result.scores[:, j]).all()]
    if not torch.isfinite(result.neg_elbo).all():
        raise ScoringError("The full model's ELBO is not finite for some images: the base model overflows; score in float32 "
                           "(torch_dtype=torch.float32, no autocast).")
    if bad:
        raise ScoringError(f"Scores of group(s) {bad} are not finite: their adapters make the model overflow. "
                           "Re-run unlearning for them (e.g. with a lower learning rate), or score in float32.")
    return result


def _family_elbo(pipe) -> ELBOConfig:
    """The ELBO settings of the pipeline family's recipe, for a bundle made before bundles recorded theirs."""
    try:
        return default_recipe(pipe).elbo
    except ConfigError:  # a pipeline class without a recipe: the estimator's defaults
        return ELBOConfig()
