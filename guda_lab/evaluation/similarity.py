"""Similarity baselines (see docs/evaluation.md#baselines): mean and largest cosine similarity between
a query and the training images of each group, in pixels or any ``feature_fn``'s features.

They return float64 ``[N_queries, K]`` scores in the orientation of GUDA's (higher = group more
important to the query) and ignore prompts.
"""

from __future__ import annotations

from typing import Callable

import torch

from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError

from .aggregation import check_queries, group_reduce

__all__ = ["nearest_neighbour_scores", "similarity_scores"]


def _features(images: torch.Tensor, feature_fn: Callable[[torch.Tensor], torch.Tensor] | None, batch_size: int) -> torch.Tensor:
    """Unit-norm float64 features ``[N, D]`` of ``images``, computed in batches."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if feature_fn is None:
            feats = batch.reshape(len(batch), -1)
        else:
            with torch.no_grad():
                feats = feature_fn(batch)
            if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != len(batch):
                shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
                raise ConfigError(
                    f"feature_fn must return a 2-D tensor [B, D] with one row per image; for a batch of "
                    f"{len(batch)} images it returned {shape}. Flatten or pool its output (e.g. "
                    "lambda x: model(x).flatten(1))."
                )
        feats = feats.detach().to("cpu", torch.float64)
        parts.append(torch.nn.functional.normalize(feats, dim=1, eps=1e-12))
    return torch.cat(parts)


def _cosines(queries, dataset, feature_fn, batch_size) -> torch.Tensor:
    check_queries(queries, dataset)
    query_features = _features(queries, feature_fn, batch_size)
    train_features = _features(dataset.images, feature_fn, batch_size)
    if query_features.shape[1] != train_features.shape[1]:
        raise ConfigError(
            f"feature_fn gave {query_features.shape[1]} features for the queries but "
            f"{train_features.shape[1]} for the training images; it must have a fixed output size."
        )
    return query_features @ train_features.T  # [N, M]


def similarity_scores(
    queries: torch.Tensor,
    dataset: GroupedDataset,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean cosine similarity between each query and each training image of each group.

    ``score[n, k] = mean_{i in group k} cos(f(query_n), f(x_i))``, a mean over per-image cosines
    (not the cosine to a group prototype), as in the reference implementation.

    Args:
        queries: ``[N, C, H, W]`` with the training images' ``[C, H, W]`` (values in ``[-1, 1]``).
        dataset: The training set.
        feature_fn: Maps a batch of images ``[B, C, H, W]`` to features ``[B, D]``, e.g. a CLIP image
            model or a VAE encoder's latent mean (flattened). Default: the flattened pixels. Called
            under ``torch.no_grad()`` on CPU tensors; move them to its device inside if needed.
        batch_size: Images per ``feature_fn`` call (does not change the result).

    Returns:
        Float64 tensor ``[N, K]``.

    Raises:
        DataError: if the queries' shape does not match the training images.
        ConfigError: if ``feature_fn`` does not return ``[B, D]``.
    """
    cos = _cosines(queries, dataset, feature_fn, batch_size)
    return group_reduce(cos, dataset.group_ids, dataset.num_groups, "mean")


def nearest_neighbour_scores(
    queries: torch.Tensor,
    dataset: GroupedDataset,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Largest cosine similarity between each query and the training images of each group.

    Same arguments and errors as :func:`similarity_scores`; returns a float64 tensor ``[N, K]``.
    """
    cos = _cosines(queries, dataset, feature_fn, batch_size)
    return group_reduce(cos, dataset.group_ids, dataset.num_groups, "max")
