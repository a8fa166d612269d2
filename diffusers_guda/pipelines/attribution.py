"""GUDA operations on any diffusers pipeline with a ``unet`` and a DDPM-family ``scheduler``.

These functions take the pipeline as their first argument, so scripts that hold a stock pipeline
can use them without changing its class; :class:`~diffusers_guda.pipelines.GUDAPipelineMixin`
exposes the same operations as methods.

Pixel-space pipelines (``DDPMPipeline``) score images as they are. Latent text-to-image pipelines
(Stable Diffusion: a ``UNet2DConditionModel``, a VAE and a text encoder) score the conditional ELBO
of the image's deterministic VAE latent given its prompt (see :mod:`.conditioning`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..adapter_state import switch_adapters
from ..bundle import AdapterBundle
from ..data import GroupedDataset, check_pixel_range
from ..distributed import ProcessInfo
from ..elbo import ELBOConfig, ELBOEstimator
from ..errors import BaseModelMismatchError, ConfigError, DataError, ScoringError
from ..models import conditioning_dict, is_conditional, takes_text_time, with_adapter_support
from ..recipes import Recipe, default_recipe
from ..scoring import AttributionResult, AttributionScorer
from ..unlearning import GroupUnlearner, UnlearningConfig
from .auto import family_pipeline, pipeline_family
from .conditioning import (
    check_pixel_images, check_size_conditions, encode_latents, is_latent, per_image, prompt_encoder, prompt_list,
)


def _ensure_adapter_unet(pipe) -> None:
    unet = with_adapter_support(pipe.unet)
    if unet is not pipe.unet:
        pipe.register_modules(unet=unet)


def _training_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule (its own scheduler may be DDIM, PNDM...)."""
    config = dict(pipe.scheduler.config)
    if not hasattr(pipe.scheduler, "alphas_cumprod"):
        raise ConfigError(f"{type(pipe.scheduler).__name__} has no alphas_cumprod; GUDA needs a DDPM-family noise schedule.")
    return DDPMScheduler.from_config(config)


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
    """Load an adapter bundle (object, local directory or Hub repo id) into ``pipe.unet``.

    Raises:
        BaseModelMismatchError: if the bundle was made for another base model, or for a pipeline of
            another family (e.g. an SDXL bundle and a Stable Diffusion 1.5 pipeline).
    """
    _ensure_adapter_unet(pipe)
    if not isinstance(bundle, AdapterBundle):
        bundle = AdapterBundle.from_pretrained(
            bundle, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
    if bool(bundle.base_model.get("conditional", False)) != is_conditional(pipe.unet):
        kind = "a text-conditioned" if bundle.base_model.get("conditional") else "an unconditional"
        raise ConfigError(
            f"This bundle was made for {kind} UNet ({bundle.base_model.get('id')!r}), but this {type(pipe).__name__}'s "
            "UNet is not one; load it into the pipeline of the base model it was made for."
        )
    made_for = bundle.base_model.get("family") or pipeline_family(bundle.base_model.get("pipeline_class") or "")
    family = pipeline_family(pipe)
    if made_for is not None and family is not None and made_for != family:
        raise BaseModelMismatchError(
            f"This bundle was made for a {made_for} pipeline ({bundle.base_model.get('id')!r}), but this {type(pipe).__name__} "
            f"is a {family} pipeline; load the bundle into a {family_pipeline(made_for)} of the base model it was made for."
        )
    unload_guda_bundle(pipe)  # a pipeline holds one bundle: a new one replaces it
    bundle.load_into(pipe.unet)
    switch_adapters(pipe.unet, None)  # the pipeline keeps generating with the full model; scoring switches adapters on
    pipe._guda_bundle = bundle
    return bundle


def unload_guda_bundle(pipe) -> None:
    """Remove the loaded bundle's adapters from ``pipe.unet``; the pipeline is then as before any bundle."""
    bundle = getattr(pipe, "_guda_bundle", None)
    if bundle is None:
        return
    loaded = set(getattr(pipe.unet, "peft_config", None) or {})
    names = [bundle.adapter_name(slug) for slug in bundle.slugs if bundle.adapter_name(slug) in loaded]
    if names:
        pipe.unet.delete_adapters(names)
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
    **settings,
) -> AdapterBundle:
    """Train one unlearning adapter per group and load the resulting bundle into the pipeline.

    The settings are the recommended recipe of the pipeline's family (see
    :func:`~diffusers_guda.recipes.default_recipe`: ``sd-styles`` for Stable Diffusion, ``digits-ddpm``
    for unconditional DDPM...), another ``recipe``, or a complete ``config``; keyword ``settings``
    override single values of the recipe. The bundle records the settings, the base model's identity
    and the ELBO configuration it is to be scored with.

    Args:
        pipe: The full model's pipeline.
        dataset: The grouped training set the model was trained on: images in [-1, 1] (pixels; a latent
            pipeline encodes them with its VAE) and, for a text-conditioned UNet, one prompt per image.
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
            (see :func:`model_dataset`): each image is encoded once for every group, run and process.
        **settings: Overrides of the recipe's unlearning settings, e.g. ``steps=200``,
            ``learning_rate=5e-5``, ``batch_size=2``, ``lora_rank=4``, ``objective="esd"`` or an
            objective option such as ``num_neighbors=10`` (see :meth:`Recipe.unlearning_with`).

    Raises:
        ConfigError: ``config`` given together with ``recipe`` or keyword settings.
        DataError: a text-conditioned pipeline and a dataset without prompts.
    """
    config, elbo_config = _settings(pipe, recipe, config, elbo_config, settings)
    _ensure_adapter_unet(pipe)
    conditional = is_conditional(pipe.unet)
    if conditional:
        dataset.require_prompts()
    unload_guda_bundle(pipe)  # the new bundle replaces the loaded one (their adapters share names)
    unlearner = GroupUnlearner(
        pipe.unet, _training_scheduler(pipe), config, base_model_id=base_model_id or _model_id(pipe),
        encode_prompts=prompt_encoder(pipe) if conditional else None, base_model_extra=_base_model_extra(pipe),
        elbo_config=elbo_config,
    )
    bundle = unlearner.unlearn(
        model_dataset(pipe, dataset, progress=progress, latent_cache=latent_cache, process=process), groups=groups, checkpoint_dir=checkpoint_dir, progress=progress,
        process=process,
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


def model_dataset(pipe, dataset, progress: bool = False, latent_cache=None, process: ProcessInfo | None = None) -> GroupedDataset:
    """The dataset in the UNet's input space: pixels for pixel models, VAE latents for latent models.

    A :class:`~diffusers_guda.lazy_data.LazyGroupedDataset` is loaded whole for a pixel model and encoded
    through a latent cache for a latent one (``latent_cache``: a ``LatentCache`` or its folder, by default
    docs/formats.md#latent-cache's); in-memory pixels go through a cache only when one is given.

    Raises:
        DataError: if the images do not fit the model (size, channels, range).
    """
    from ..latent_cache import LatentCache
    from ..lazy_data import LazyGroupedDataset

    lazy = isinstance(dataset, LazyGroupedDataset)
    if not is_latent(pipe):
        dataset = dataset.load() if lazy else dataset
        _check_images(pipe, dataset.images)
        return dataset
    if not lazy:
        check_pixel_images(pipe, dataset.images)
    if lazy or latent_cache is not None:
        cache = latent_cache if isinstance(latent_cache, LatentCache) else LatentCache(pipe.vae, latent_cache)
        return cache.encode(dataset, progress=progress, process=process)
    return dataset.with_images(encode_latents(pipe, dataset.images, progress=progress))


def _base_model_extra(pipe) -> dict:
    extra = {"pipeline_class": type(pipe).__name__, "family": pipeline_family(pipe)}
    if is_latent(pipe):
        extra.update(latent=True, vae_scaling_factor=float(pipe.vae.config.get("scaling_factor") or 1.0))
    return extra


def attribute(
    pipe,
    images,
    *,
    prompts: str | Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    size_conditions=None,
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
        pipe: A pipeline whose UNet holds the bundle (or pass ``bundle``).
        images: ``[N, C, H, W]`` tensor in [-1, 1], a numpy array ``[N, H, W, C]`` in [0, 1] (what
            ``output_type="np"`` returns), or a list of PIL images. A latent pipeline scores the
            images' deterministic VAE latents.
        prompts: For a text-conditioned UNet: the prompt of each image (or one string for all); the
            score is the difference of conditional ELBOs ``log p(z | prompt)``, without guidance.
        prompt_embeds: Instead of ``prompts``: the text embeddings ``[N, L, D]`` (or ``[1, L, D]`` for all).
        pooled_prompt_embeds: With ``prompt_embeds`` for SDXL: the pooled text embeddings ``[N, P]``
            (or ``[1, P]`` for all).
        size_conditions: SDXL only: each image's original height and width, crop top and left, and
            target height and width (``[N, 6]``, or 6 numbers for all), as generated; default
            ``(H, W, 0, 0, H, W)`` of the image (docs/method.md#sdxl).
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
    x0, unet_kwargs, used_prompts = model_inputs(
        pipe, images, prompts=prompts, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        size_conditions=size_conditions,
    )
    if elbo_config is None:
        elbo_config = ELBOConfig(**loaded.elbo) if loaded.elbo else _family_elbo(pipe)
    estimator = ELBOEstimator(_training_scheduler(pipe), elbo_config)
    device = pipe.unet.device
    scorer = AttributionScorer(pipe.unet, estimator, [loaded.adapter_name(s) for s in loaded.slugs], loaded.group_names)
    meta = {"bundle": dict(loaded.source or {}), "base_model": loaded.base_model.get("id"), "device": str(device)}
    if used_prompts is not None:
        meta["prompts"] = used_prompts
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


def model_inputs(pipe, images, *, prompts=None, prompt_embeds=None, pooled_prompt_embeds=None, size_conditions=None):
    """The UNet's clean inputs and per-image conditioning for query ``images`` (arguments as :func:`attribute`'s).

    Returns:
        ``(x0, unet_kwargs, prompts)``: ``x0`` ``[N, C, h, w]`` (pixels, or VAE latents for a latent
        pipeline), ``unet_kwargs`` one conditioning dict of ``[1, ...]`` tensors per image (``None``
        for unconditional UNets; see :func:`~diffusers_guda.models.unet_call_kwargs`), and the
        prompt list used (``None`` without prompts).

    Raises:
        DataError: images that do not fit, missing/miscounted prompts or embeddings for a
            text-conditioned UNet, or malformed ``size_conditions``.
        ConfigError: prompts given to an unconditional UNet, or SDXL inputs to another UNet.
    """
    pixels = to_model_images(images)
    n = pixels.shape[0]
    if n == 0:
        raise DataError("No query images were given; pass at least one image.")
    conditional = is_conditional(pipe.unet)
    if not conditional and (prompts is not None or prompt_embeds is not None):
        raise ConfigError(f"This {type(pipe).__name__}'s UNet is unconditional; drop prompts/prompt_embeds.")
    text_time = takes_text_time(pipe.unet)
    if not text_time and (pooled_prompt_embeds is not None or size_conditions is not None):
        raise ConfigError(f"This {type(pipe).__name__}'s UNet takes no pooled embeddings or size conditions (SDXL's); drop them.")
    cond = used = None
    if conditional:  # prompts are checked before any image is encoded
        if prompt_embeds is not None:
            cond = {"encoder_hidden_states": per_image(prompt_embeds, n, "prompt_embeds", "[N, L, D]")}
            if text_time:
                if pooled_prompt_embeds is None:
                    raise DataError("This SDXL UNet also takes pooled text embeddings: pass pooled_prompt_embeds with prompt_embeds.")
                cond["text_embeds"] = per_image(pooled_prompt_embeds, n, "pooled_prompt_embeds", "[N, P]")
        else:
            used = prompt_list(prompts, n)
        size_conditions = None if size_conditions is None else check_size_conditions(size_conditions, n)
    if is_latent(pipe):
        x0 = encode_latents(pipe, check_pixel_images(pipe, pixels))
        if x0.shape[1] != pipe.unet.config.in_channels:
            raise ConfigError(
                f"The VAE gives {x0.shape[1]}-channel latents but the UNet takes {pipe.unet.config.in_channels}; "
                "this pipeline's components do not belong together."
            )
    else:
        x0 = _check_images(pipe, pixels)
    if not conditional:
        return x0, None, None
    encoder = prompt_encoder(pipe) if used is not None or text_time else None
    cond = conditioning_dict(encoder(used)) if cond is None else cond
    if hasattr(encoder, "image_conditions"):
        cond.update(encoder.image_conditions(x0.shape[1:], n, size_conditions))
    return x0, [{key: value[i : i + 1] for key, value in cond.items()} for i in range(n)], used


def to_model_images(images) -> torch.Tensor:
    """Convert query images to a float tensor ``[N, C, H, W]`` in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        out = images.detach().to("cpu", torch.float32)
        if out.dim() == 3:
            out = out.unsqueeze(0)
        return out
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise DataError(f"A numpy query batch must be [N, H, W, C]; got shape {images.shape}.")
        if images.dtype == np.uint8:
            array = array / 255.0
        return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        arrays = [np.asarray(img, dtype=np.uint8) for img in images]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        if len({a.shape for a in arrays}) > 1:
            raise DataError("Query images have different sizes; resize them to the model's sample size.")
        return to_model_images(np.stack(arrays))
    raise DataError(f"Unsupported query type {type(images).__name__}; pass a tensor, a numpy array or a list of PIL images.")


def _check_images(pipe, images: torch.Tensor) -> torch.Tensor:
    config = pipe.unet.config
    expected = (config.in_channels, config.sample_size, config.sample_size)
    if tuple(images.shape[1:]) != expected:
        raise DataError(
            f"Images of shape {tuple(images.shape[1:])} do not fit this model, which takes {expected} "
            f"(channels, height, width). Resize/convert the images to {config.sample_size}x{config.sample_size} "
            f"with {config.in_channels} channel(s)."
        )
    return check_pixel_range(images)
