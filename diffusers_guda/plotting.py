"""PNG plots of attribution results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .io_utils import atomic_file


def save_figure(fig, path: str | Path, **kwargs) -> None:
    """Write ``fig`` to ``path`` atomically (the format from its suffix)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, **kwargs)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_display(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    array = ((image.detach().cpu().float().clamp(-1, 1) + 1) / 2).numpy()
    if array.shape[0] == 1:
        return array[0], "gray"
    return array[:3].transpose(1, 2, 0), None


def plot_query_grid(images: torch.Tensor, path: str | Path, titles: Sequence[str] | None = None, columns: int = 10):
    """Grid of query images with an optional title each."""
    plt = pyplot()
    n = images.shape[0]
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.0, rows * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            array, cmap = _as_display(images[i])
            ax.imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def plot_attribution_bars(result, path: str | Path, images: torch.Tensor | None = None, max_queries: int = 8, top_k: int | None = None, titles: Sequence[str] | None = None):
    """One row per query: the image (if given) and its group scores with ±2 standard-error bars."""
    plt = pyplot()
    n = min(max_queries, len(result))
    k = min(top_k or len(result.groups), len(result.groups))
    with_images = images is not None
    fig, axes = plt.subplots(n, 2 if with_images else 1, figsize=(8 if with_images else 6.5, 1.7 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 5]} if with_images else None)
    for row in range(n):
        scores, errors = result.scores[row], result.stderr[row]
        order = torch.argsort(scores, descending=True)[:k].tolist()
        ax = axes[row, -1]
        colors = ["tab:red" if j == order[0] else "tab:blue" for j in order]
        ax.bar(range(k), [float(scores[j]) for j in order], yerr=[2 * float(errors[j]) for j in order], color=colors, capsize=2)
        ax.set_xticks(range(k), [result.groups[j] for j in order], fontsize=7, rotation=45 if k > 12 else 0)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel("ΔELBO (nats)", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        label = titles[row] if titles is not None else f"query {row}"
        ax.set_title(f"{label}: top group {result.groups[order[0]]}", fontsize=8)
        if with_images:
            array, cmap = _as_display(images[row])
            axes[row, 0].imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            axes[row, 0].axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def plot_label_heatmap(true_labels: Sequence[int], attributed: Sequence[int], group_names: Sequence[str], path: str | Path, title: str = ""):
    """Counts of (true label, top attributed group), rows normalised, with the counts written in."""
    plt = pyplot()
    k = len(group_names)
    counts = np.zeros((k, k), dtype=int)
    for t, a in zip(true_labels, attributed):
        counts[t, a] += 1
    fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.55 * k + 2, 0.5 * k + 1.5))
    im = ax.imshow(fractions, cmap="viridis", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color="white" if fractions[i, j] < 0.6 else "black")
    ax.set_xticks(range(k), group_names, fontsize=8)
    ax.set_yticks(range(k), group_names, fontsize=8)
    ax.set_xlabel("top attributed group")
    ax.set_ylabel("query's digit (classifier)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of row")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def plot_unlearning_losses(groups: Sequence, path: str | Path):
    """Forget- and retain-set loss change per group (percent), with the 15% / 5% acceptance lines."""
    plt = pyplot()
    names = [g.name for g in groups]
    forget = [100 * g.stats["forget_loss_change"] for g in groups]
    retain = [100 * g.stats["retain_loss_change"] for g in groups]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 3))
    ax.bar(x - 0.2, forget, 0.4, label="forget-set loss change", color="tab:red")
    ax.bar(x + 0.2, retain, 0.4, label="retain-set loss change", color="tab:green")
    ax.axhline(15, color="tab:red", linestyle="--", linewidth=0.8)
    ax.axhline(5, color="tab:green", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, names)
    ax.set_ylabel("% change after unlearning")
    ax.set_xlabel("unlearned group")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig
