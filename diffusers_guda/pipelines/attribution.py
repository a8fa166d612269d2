"""GUDA operations on any diffusers pipeline with a ``unet`` and a DDPM-family ``scheduler``.

These functions take the pipeline as their first argument, so scripts that hold a stock pipeline
can use them without changing its class; :class:`~diffusers_guda.pipelines.GUDAPipelineMixin`
exposes the same operations as methods.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..bundle import AdapterBundle
from ..data import GroupedDataset
from ..distributed import ProcessInfo
from ..elbo import ELBOConfig, ELBOEstimator
from ..errors import ConfigError, DataError
from ..lora import LoRASettings
from ..models import with_adapter_support
from ..scoring import AttributionResult, AttributionScorer
from ..unlearning import GroupUnlearner, UnlearningConfig


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
        BaseModelMismatchError: if the bundle was made for another base model.
    """
    _ensure_adapter_unet(pipe)
    if not isinstance(bundle, AdapterBundle):
        bundle = AdapterBundle.from_pretrained(
            bundle, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
    conditional = hasattr(pipe.unet.config, "cross_attention_dim") and pipe.unet.config.get("cross_attention_dim") is not None
    if bool(bundle.base_model.get("conditional", False)) != conditional:
        kind = "a text-conditioned" if bundle.base_model.get("conditional") else "an unconditional"
        raise ConfigError(f"This bundle was made for {kind} UNet; load it into a pipeline of that kind.")
    bundle.load_into(pipe.unet)
    pipe.unet.disable_adapters()  # the pipeline keeps generating with the full model; scoring switches adapters on
    pipe._guda_bundle = bundle
    return bundle


def unlearn_groups(
    pipe,
    dataset: GroupedDataset,
    *,
    objective: str = "retrack",
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    steps: int = 40,
    learning_rate: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    groups: Sequence[int | str] | None = None,
    checkpoint_dir: str | None = None,
    config: UnlearningConfig | None = None,
    progress: bool = True,
    process: ProcessInfo | None = None,
    **objective_options,
) -> AdapterBundle:
    """Train one unlearning adapter per group and load the resulting bundle into the pipeline.

    Args:
        pipe: The full model's pipeline.
        dataset: The grouped training set the model was trained on.
        objective: Registered objective name.
        lora_rank: LoRA rank (alpha defaults to the rank).
        lora_alpha: LoRA alpha.
        steps: Optimiser steps per group.
        learning_rate: AdamW learning rate.
        batch_size: Forget and retain images per step (each).
        seed: Base seed of the run.
        groups: Subset of groups (ids or names); default all.
        checkpoint_dir: Resume directory (finished groups are kept and skipped).
        config: A full :class:`UnlearningConfig` (overrides the arguments above).
        progress: Show progress bars.
        process: This process of a ``torchrun``/``accelerate launch`` run (default: detected); the
            processes share the groups and all return the same bundle (see :meth:`GroupUnlearner.unlearn`).
        **objective_options: Options of the objective (e.g. ``num_neighbors=10``).
    """
    _ensure_adapter_unet(pipe)
    _check_images(pipe, dataset.images)
    if config is None:
        config = UnlearningConfig(
            objective=objective,
            objective_options=objective_options,
            lora=LoRASettings(rank=lora_rank, alpha=float(lora_alpha or lora_rank)),
            steps=steps,
            learning_rate=learning_rate,
            forget_batch_size=batch_size,
            retain_batch_size=batch_size,
            seed=seed,
        )
    unlearner = GroupUnlearner(pipe.unet, _training_scheduler(pipe), config, base_model_id=_model_id(pipe))
    bundle = unlearner.unlearn(dataset, groups=groups, checkpoint_dir=checkpoint_dir, progress=progress, process=process)
    return load_guda_bundle(pipe, bundle)


def attribute(
    pipe,
    images,
    *,
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
            ``output_type="np"`` returns), or a list of PIL images.
        bundle: Bundle to load first (object, directory or Hub id).
        batch_size: Images whose rows share forwards (speed and memory only; scores do not depend on it).
        elbo_config: Estimator settings; default: the bundle's recorded ELBO settings.
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
    x0 = _check_images(pipe, to_model_images(images))
    if elbo_config is None:
        elbo_config = ELBOConfig(**loaded.elbo) if loaded.elbo else ELBOConfig()
    estimator = ELBOEstimator(_training_scheduler(pipe), elbo_config)
    device = pipe.unet.device
    scorer = AttributionScorer(pipe.unet, estimator, [loaded.adapter_name(s) for s in loaded.slugs], loaded.group_names)
    meta = {"bundle": dict(loaded.source or {}), "base_model": loaded.base_model.get("id"), "device": str(device)}
    return scorer.score(x0, batch_size=batch_size, progress=progress, metadata=meta, strategy=strategy, adaptive_z=adaptive_z, process=process)


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
    if not torch.isfinite(images).all() or images.min() < -1.0 - 1e-4 or images.max() > 1.0 + 1e-4:
        raise DataError("Query images must be finite and lie in [-1, 1].")
    return images
