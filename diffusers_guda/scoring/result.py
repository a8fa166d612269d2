"""What scoring returns: :class:`AttributionResult`, and the statistics it is built from."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..elbo import ELBOEstimator
from ..errors import ConfigError
from ..io_utils import write_text_atomic


@dataclass
class AttributionResult:
    """Scores of N query images against K groups.

    Attributes:
        scores: ``[N, K]`` ELBO differences in nats (higher = the group mattered more).
        stderr: ``[N, K]`` standard errors of the scores (spread of the paired per-(t, draw)
            differences over the grid).
        groups: The K group names.
        neg_elbo: ``[N]`` the full model's -ELBO estimate (without L_T and L_0), in nats.
        image_hashes: Content hash of each query (the key of its common random numbers).
        metadata: ELBO settings, seeds, bundle source and revision.
    """

    scores: torch.Tensor
    stderr: torch.Tensor
    groups: list[str]
    neg_elbo: torch.Tensor
    image_hashes: list[int] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.scores.shape[0]

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        """Per query, the ``k`` highest-scoring groups as ``(name, score)``, best first (all groups when ``k`` exceeds them)."""
        _require_count(k, "k")
        k = min(k, len(self.groups))
        values, idx = torch.topk(self.scores, k, dim=1)
        return [[(self.groups[j], float(v)) for v, j in zip(vs.tolist(), js.tolist())] for vs, js in zip(values, idx)]

    def top_groups(self) -> list[str]:
        """The top group of each query."""
        return [row[0][0] for row in self.top(1)]

    def to_dict(self) -> dict:
        """The result as plain JSON-ready data (image hashes as strings: exact beyond 2^53)."""
        return {
            "groups": self.groups,
            "scores": self.scores.tolist(),
            "stderr": self.stderr.tolist(),
            "neg_elbo": self.neg_elbo.tolist(),
            "top_group": self.top_groups(),
            "image_hashes": [str(h) for h in self.image_hashes],
            "metadata": self.metadata,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            if Path(path).is_dir():
                raise ConfigError(f"to_json: {path} is a directory; pass a file path (e.g. one inside that directory).")
            write_text_atomic(path, text + "\n")
        return text

    def plot(self, path: str | Path, images: torch.Tensor | None = None, max_queries: int = 8, top_k: int | None = None):
        """Bar chart of each query's group scores with ±2 standard errors (and the query image).

        Args:
            path: PNG file to write.
            images: Optional query images ``[N, C, H, W]`` in [-1, 1] to show beside the bars.
            max_queries: How many queries (the first ones) to draw.
            top_k: Show only the k best groups per query (default all).

        Returns:
            The matplotlib figure.
        """
        from matplotlib.backend_bases import FigureCanvasBase

        from ..plotting import plot_attribution_bars

        formats = sorted(FigureCanvasBase.get_supported_filetypes())
        if Path(path).suffix[1:].lower() not in formats:
            raise ConfigError(
                f"plot: {path} needs the extension of an image format matplotlib writes: .png (or one of {', '.join(formats)})."
            )
        if Path(path).is_dir():
            raise ConfigError(f"plot: {path} is a directory; pass a file path such as {Path(path) / 'attribution.png'}.")
        _require_count(max_queries, "max_queries")
        if top_k is not None:
            _require_count(top_k, "top_k")
        return plot_attribution_bars(self, path, images=images, max_queries=max_queries, top_k=top_k)


def _require_count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")


def concatenate_results(parts: Sequence[AttributionResult]) -> AttributionResult:
    """The results of consecutive shards of the queries as one result (counters summed).

    Args:
        parts: Results of the same groups and settings, for consecutive slices of the queries.
    """
    metadata = dict(parts[0].metadata)
    metadata["row_forwards"] = sum(p.metadata["row_forwards"] for p in parts)
    if "rows_used" in metadata:
        metadata["rows_used"] = [row for p in parts for row in p.metadata["rows_used"]]
    return AttributionResult(
        torch.cat([p.scores for p in parts]),
        torch.cat([p.stderr for p in parts]),
        list(parts[0].groups),
        torch.cat([p.neg_elbo for p in parts]),
        [h for p in parts for h in p.image_hashes],
        metadata,
    )


def mean_and_stderr(diff: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and standard error from paired differences over the last dimension (docs/method.md#standard-errors).

    Args:
        diff: Paired per-row (or per-block) differences, adapter minus full model.
        scale: ``T``, turning a mean over rows into an estimate of the sum over all timesteps.

    Returns:
        ``scale * mean`` and ``scale * sd / sqrt(R)`` (NaN for a single difference).
    """
    r = diff.shape[-1]
    stderr = scale * diff.std(dim=-1) / math.sqrt(r) if r > 1 else torch.full(diff.shape[:-1], float("nan"))
    return scale * diff.mean(dim=-1), stderr


def scoring_metadata(estimator: ELBOEstimator, extra: dict | None) -> dict:
    """The ELBO settings and grid of ``estimator``, with ``extra`` fields on top."""
    est = estimator
    meta = {"elbo": est.config.to_dict(), "num_rows": est.num_rows, **est.grid_description()}
    meta.update(extra or {})
    return meta
