"""Named evaluation benchmarks: grouped datasets built deterministically from embedded data.

``digits-classes``: the 10 digits are the groups. Easy for visual similarity (DESIGN §3): the
nearest pixels usually name the same group as leave-one-group-out retraining.

``digits-contributors``: groups are *data contributors* whose content overlaps, built so that the
counterfactual answer ("whose removal makes this image less likely?") differs from "which group
looks most similar". Three constructions, each documented with the answer LOGO should give:

* **Re-uploaded near-copies.** ``threes`` holds every 3; ``threes-copies`` holds near-copies (light
  Gaussian noise, σ = 0.05 in [-1, 1] units, no shift) of a random half of them. The copies look as
  similar to a generated 3 as the originals do, but removing them changes little (the originals
  stay), while removing ``threes`` deletes half of the 3s outright. Expected: ``threes`` above
  ``threes-copies`` for 3-queries; similarity scores the two about equally.
* **Very different sizes.** The 7s are split into ``sevens-large`` (~160 images) and
  ``sevens-small`` (20). Mean similarity is the same for both; removing the large share costs far
  more likelihood. Expected: ``sevens-large`` above ``sevens-small`` for 7-queries.
* **A stroke style across digits.** ``thick-strokes`` holds half of the 5s, 6s, 8s and 9s with
  horizontally thickened strokes (each pixel takes the max of itself and its left neighbour); the
  other halves stay in ``fives``, ``sixes``, ``eights``, ``nines``. A thick query is best explained
  by the style contributor even when its shape is closest to one digit group's; a thin query by its
  digit group even though thick images overlap its strokes.

These are designed effects, not verified ones: check each with ``guda logo`` (two seeds) before
trusting it, as DESIGN §3 asks.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..data import GroupedDataset, load_digits
from ..errors import ConfigError

COPY_NOISE = 0.05
SMALL_SEVENS = 20


def digits_contributors(seed: int = 0) -> GroupedDataset:
    """The ``digits-contributors`` benchmark (13 contributors); see the module docstring."""
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    images, labels = digits.images, digits.group_ids
    groups: dict[str, list[torch.Tensor]] = {}

    def shuffled(digit: int) -> torch.Tensor:
        idx = torch.nonzero(labels == digit).flatten()
        return idx[torch.randperm(len(idx), generator=generator)]

    for digit, name in ((0, "zeros"), (1, "ones"), (2, "twos"), (4, "fours")):
        groups[name] = [images[shuffled(digit)]]
    threes = shuffled(3)
    groups["threes"] = [images[threes]]
    originals = images[threes[: len(threes) // 2]]
    groups["threes-copies"] = [(originals + COPY_NOISE * torch.randn(originals.shape, generator=generator)).clamp(-1, 1)]
    sevens = shuffled(7)
    groups["sevens-large"] = [images[sevens[SMALL_SEVENS:]]]
    groups["sevens-small"] = [images[sevens[:SMALL_SEVENS]]]
    thick = []
    for digit, name in ((5, "fives"), (6, "sixes"), (8, "eights"), (9, "nines")):
        idx = shuffled(digit)
        half = len(idx) // 2
        groups[name] = [images[idx[half:]]]
        thick.append(thicken(images[idx[:half]]))
    groups["thick-strokes"] = thick
    names = list(groups)
    tensors = [torch.cat(parts) for parts in groups.values()]
    ids = torch.cat([torch.full((len(t),), k, dtype=torch.long) for k, t in enumerate(tensors)])
    return GroupedDataset(torch.cat(tensors), ids, names)


def thicken(images: torch.Tensor) -> torch.Tensor:
    """Horizontally thickened strokes: each pixel becomes the max of itself and its left neighbour."""
    shifted = torch.full_like(images, -1.0)
    shifted[..., 1:] = images[..., :-1]
    return torch.maximum(images, shifted)


_BENCHMARKS: dict[str, tuple[Callable[[], GroupedDataset], str]] = {
    "digits-classes": (load_digits, "scikit-learn digits, groups = the 10 digit classes (easy for similarity: see DESIGN §3)"),
    "digits-contributors": (digits_contributors, "13 overlapping contributors built from the digits: near-copies, very different sizes, a stroke style across digits"),
}


def available_benchmarks() -> dict[str, str]:
    """Benchmark name -> one-line description."""
    return {name: description for name, (_, description) in _BENCHMARKS.items()}


def load_benchmark(name: str) -> GroupedDataset:
    """The grouped training set of a named benchmark.

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    if name not in _BENCHMARKS:
        raise ConfigError(f"Unknown benchmark {name!r}; available: {', '.join(sorted(_BENCHMARKS))}. Or pass --data DIR.")
    return _BENCHMARKS[name][0]()
