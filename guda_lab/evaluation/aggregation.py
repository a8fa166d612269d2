"""Shared by the baselines: the check of the query batch and the reduction of per-image scores to groups."""

from __future__ import annotations

import math

import torch

from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError, DataError

AGGREGATES = ("sum", "mean")


def check_queries(queries: torch.Tensor, dataset: GroupedDataset) -> torch.Tensor:
    """``queries`` if it is a non-empty ``[N, C, H, W]`` batch of the training images' ``[C, H, W]``.

    Raises:
        DataError: otherwise (the message says what to change).
    """
    if not isinstance(queries, torch.Tensor):
        raise DataError(f"queries must be a torch.Tensor [N, C, H, W]; got {type(queries).__name__}.")
    expected = tuple(dataset.images.shape[1:])
    if queries.dim() != 4 or tuple(queries.shape[1:]) != expected:
        raise DataError(
            f"queries must have shape [N, {', '.join(map(str, expected))}] like the training images; "
            f"got {tuple(queries.shape)}. Resize/convert the queries to the dataset's [C, H, W]."
        )
    if queries.shape[0] == 0:
        raise DataError("queries is empty; pass at least one query image.")
    return queries


def group_reduce(values: torch.Tensor, group_ids: torch.Tensor, num_groups: int, how: str) -> torch.Tensor:
    """Reduce ``values [N, M]`` over the training images of each group: ``[N, K]`` float64 on the CPU.

    ``how``: ``"sum"``, ``"mean"`` or ``"max"``.
    """
    values = values.to(torch.float64)
    index = group_ids.to(values.device)
    if how == "max":
        out = torch.full((values.shape[0], num_groups), -math.inf, dtype=torch.float64, device=values.device)
        return out.scatter_reduce(1, index.unsqueeze(0).expand_as(values), values, reduce="amax", include_self=True).cpu()
    out = torch.zeros((values.shape[0], num_groups), dtype=torch.float64, device=values.device)
    out.index_add_(1, index, values)
    if how == "mean":
        counts = torch.bincount(index, minlength=num_groups).to(torch.float64)
        out = out / counts.clamp_min(1)
    elif how != "sum":
        raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {how!r}.")
    return out.cpu()
