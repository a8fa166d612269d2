"""Score any models, one whole model after another: the LOGO scores (docs/method.md#leave-one-group-out)."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..elbo import ELBOEstimator
from ..errors import ConfigError
from .result import AttributionResult, mean_and_stderr, scoring_metadata

ModelSource = Callable[[], Union[torch.nn.Module, ContextManager[torch.nn.Module]]]


def _entered(model) -> ContextManager[torch.nn.Module]:
    """A model as a context (a context manager, e.g. ``use_adapters(unet, name)``, is used as it is)."""
    return model if hasattr(model, "__enter__") else contextlib.nullcontext(model)


@torch.no_grad()
def score_models(
    estimator: ELBOEstimator,
    reference: ModelSource,
    counterfactuals: Sequence[ModelSource],
    groups: Sequence[str],
    images: torch.Tensor,
    batch_size: int = 16,
    unet_kwargs: Sequence[dict] | None = None,
    progress: bool = True,
    metadata: dict | None = None,
) -> AttributionResult:
    """``score[n, k] = ELBO(x_n; reference) - ELBO(x_n; counterfactual_k)`` with shared draws.

    Args:
        estimator: The ELBO estimator (grid, common random numbers).
        reference: Returns the full model ready to run, or a context manager yielding it (e.g.
            ``lambda: use_adapters(unet, None)``).
        counterfactuals: One per group; each returns that group's counterfactual model (a separately
            trained leave-one-group-out model), or a context yielding it (e.g.
            ``lambda: use_adapters(unet, name)``).
        groups: Group names, in the order of ``counterfactuals``.
        images: ``[N, C, H, W]`` clean samples in the model's input space.
        batch_size: Images evaluated per model switch. It changes speed only: each image's rows are
            always evaluated alone, so scores do not depend on it.
        unet_kwargs: Optional per-image UNet inputs (e.g. text embeddings ``[1, L, D]``).
        progress: Show a progress bar.
        metadata: Extra fields recorded in the result.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    if len(counterfactuals) != len(groups):
        raise ConfigError("There must be one counterfactual model per group.")
    est = estimator
    n, k = images.shape[0], len(groups)
    hashes = est.image_hashes(images)
    scores, stderr = torch.zeros(n, k), torch.zeros(n, k)
    neg_elbo = torch.zeros(n)
    with tqdm(total=n * (k + 1), desc="attribute", disable=not progress, dynamic_ncols=True, unit="img·model") as bar:
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            noise = {i: est.noise(images[i], hashes[i]) for i in idx}
            kwargs = {i: (unet_kwargs[i] if unet_kwargs is not None else None) for i in idx}
            with _entered(reference()) as model:
                base = {i: est.terms(model, images[i], noise[i], unet_kwargs=kwargs[i]) for i in idx}
            bar.update(len(idx))
            for i in idx:
                neg_elbo[i] = est.scale * base[i].mean()
            for j, select in enumerate(counterfactuals):
                with _entered(select()) as model:
                    for i in idx:
                        diff = est.terms(model, images[i], noise[i], unet_kwargs=kwargs[i]) - base[i]
                        scores[i, j], stderr[i, j] = mean_and_stderr(diff, est.scale)
                bar.update(len(idx))
    return AttributionResult(scores, stderr, list(groups), neg_elbo, hashes, scoring_metadata(est, metadata))
