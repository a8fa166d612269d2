"""Named evaluation benchmarks: grouped datasets built deterministically from embedded data.

``digits-styles`` (text-conditioned, groups = styles across all digits) is built in
:mod:`.digits_styles`; ``digits-styles-flow`` and ``digits-styles-flow-uncond`` are the same
construction evaluated with a flow-matching model, text-conditioned and unconditional;
``digits-contributors-flow`` is ``digits-contributors`` with an unconditional flow-matching model.

Each benchmark is declared as a :class:`Benchmark` in :data:`BENCHMARKS`: its loader, description,
default recipe, group-level comparisons and whether ``label_top1`` applies. The evaluation asks the
benchmark; it never recognises one by its group names. See docs/evaluation.md#benchmarks.

``digits-classes``: the 10 digits are the groups. Easy for visual similarity: the nearest pixels
usually name the same group as leave-one-group-out retraining.

``digits-contributors``: groups are *data contributors* whose content overlaps, built so that the
counterfactual answer ("whose removal makes this image less likely?") differs from "which group
looks most similar". Three constructions, each documented with the answer LOGO should give:

* **Re-uploaded near-copies.** ``threes`` holds every 3; ``threes-copies`` holds near-copies (light
  Gaussian noise, σ = 0.05 in [-1, 1] units, no shift) of a random quarter of them. The copies look
  as similar to a generated 3 as the originals do, but removing them changes nothing the model needs
  (the originals stay), while removing ``threes`` leaves only the copied quarter. (With copies of
  *half* the 3s, removing either group barely mattered and LOGO's Δs drowned in noise.)
  Expected: ``threes`` above ``threes-copies`` for 3-queries; mean similarity scores them alike.
* **Very different sizes.** The 7s are split into ``sevens-large`` (~160 images) and
  ``sevens-small`` (20). Mean similarity is the same for both; removing the large share costs far
  more likelihood. Expected: ``sevens-large`` above ``sevens-small`` for 7-queries.
* **A stroke style across digits.** ``thick-strokes`` holds half of the 5s, 6s, 8s and 9s with
  horizontally thickened strokes (each pixel takes the max of itself and its left neighbour); the
  other halves stay in ``fives``, ``sixes``, ``eights``, ``nines``. A thick query is best explained
  by the style contributor even when its shape is closest to one digit group's; a thin query by its
  digit group even though thick images overlap its strokes.

``digits-contributors-hobbyist``: the same, with the 7s split replaced by a construction where pixel
nearest neighbour is wrong by design (the three above mislead mean similarity, not the nearest image):

* **A prolific contributor who holds a minority of everything.** ``hobbyist`` holds a random
  quarter of every 0, 1, 2, 4 and 7 (222 images, the second-largest contributor); the other three
  quarters stay with ``zeros``, ``ones``, ``twos``, ``fours``, ``sevens``. For a query of one of
  these digits the nearest training image is the hobbyist's about a quarter of the time, so nearest
  neighbour names the hobbyist there; but removing the hobbyist leaves three quarters of the digit,
  while removing the digit's own contributor leaves only the hobbyist's quarter. Expected: the
  digit's contributor above ``hobbyist``. The price is smaller effects: with a quarter of a digit
  left, removing its contributor lowers a query's ELBO by ~5-9 nats instead of ~17-32.

``digits-crowd-10``, ``digits-crowd-30``, ``digits-crowd-50``, ``digits-crowd-120``: one construction
at four group counts, for scaling studies (docs/evaluation.md#digits-crowd). K contributors of unequal size
(log-normal weights, σ = 0.8, as real contributions are: a few large, many small), each with a main
digit (K / 10 contributors per digit). An image of digit d goes to one of d's contributors with
probability 0.8 and to any other contributor with probability 0.2, in proportion to their weights;
every contributor first gets 5 images of its main digit. At K = 120 the mean contributor holds 15
images. Expected: for a query of digit d, d's largest contributors above its small ones, and those
above contributors of other digits; the nearest training image belongs to a contributor roughly in
proportion to its share, so nearest neighbour names a small contributor about as often as its share.

Each construction is also scored at group level (:meth:`Benchmark.group_comparisons`): over the queries it
concerns, does group a have the larger mean Δ than group b, with a paired interval? Per-query ranks
of small effects drown in LOGO's own seed-to-seed noise; a mean over the query set does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch

from diffusers_guda.data import GroupedDataset, load_digits
from diffusers_guda.errors import ConfigError

from ..emoji import benchmarks as emoji
from .digits_styles import digits_styles, digits_styles_unconditional

COPY_NOISE = 0.05
COPIED_FRACTION_INVERSE = 4  # copies of a quarter of the 3s
SMALL_SEVENS = 20
HOBBYIST_SHARE_INVERSE = 4  # the hobbyist holds a quarter of each of its digits
HOBBYIST_DIGITS = {0: "zeros", 1: "ones", 2: "twos", 4: "fours", 7: "sevens"}
STYLE_DIGITS = {5: "fives", 6: "sixes", 8: "eights", 9: "nines"}


CROWD_SIZES = (10, 30, 50, 120)
CROWD_MAIN_SHARE = 0.8  # chance that an image goes to one of its digit's own contributors
CROWD_SIZE_SIGMA = 0.8  # log-normal spread of contributor weights
CROWD_MIN_IMAGES = 5  # of its main digit, given to every contributor first


def crowd_main_digit(group_name: str) -> int:
    """The main digit of a ``digits-crowd`` contributor: contributor ``c`` (``crowd-<c>``) mostly holds ``c mod 10``."""
    return int(group_name.removeprefix("crowd-")) % 10


def digits_crowd(num_contributors: int, seed: int = 0) -> GroupedDataset:
    """The ``digits-crowd-K`` benchmark: ``num_contributors`` (a multiple of 10) contributors of unequal
    size, each mostly holding one digit; see the module docstring."""
    if num_contributors % 10 or num_contributors < 10:
        raise ConfigError(f"digits-crowd needs a multiple of 10 contributors, got {num_contributors}.")
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    k, labels = num_contributors, digits.group_ids
    names = [f"crowd-{c:03d}" for c in range(k)]
    main = torch.tensor([crowd_main_digit(name) for name in names])
    weight = torch.exp(CROWD_SIZE_SIGMA * torch.randn(k, generator=generator))
    owner = torch.full_like(labels, -1)

    def pick(candidates: torch.Tensor, n: int) -> torch.Tensor:  # n draws in proportion to the candidates' weights
        return candidates[torch.multinomial(weight[candidates], n, replacement=True, generator=generator)] if n else candidates[:0]

    for digit in range(10):
        idx = torch.nonzero(labels == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        own, other = torch.nonzero(main == digit).flatten(), torch.nonzero(main != digit).flatten()
        seeded = CROWD_MIN_IMAGES * len(own)
        owner[idx[:seeded]] = own.repeat_interleave(CROWD_MIN_IMAGES)
        rest = idx[seeded:]
        home = torch.rand(len(rest), generator=generator) < CROWD_MAIN_SHARE
        owner[rest[home]] = pick(own, int(home.sum()))
        owner[rest[~home]] = pick(other, int((~home).sum()))
    order = torch.argsort(owner, stable=True)
    return GroupedDataset(digits.images[order], owner[order], names)


# named, for the entry points in setup.cfg
digits_crowd_10, digits_crowd_30, digits_crowd_50, digits_crowd_120 = (partial(digits_crowd, k) for k in CROWD_SIZES)
CROWD_LOADERS = dict(zip(CROWD_SIZES, (digits_crowd_10, digits_crowd_30, digits_crowd_50, digits_crowd_120)))


def digits_contributors(seed: int = 0) -> GroupedDataset:
    """The ``digits-contributors`` benchmark (13 contributors); see the module docstring."""
    return _contributors(seed, hobbyist=False)


def digits_contributors_hobbyist(seed: int = 0) -> GroupedDataset:
    """The ``digits-contributors-hobbyist`` benchmark: the 7s split replaced by ``hobbyist``; see the module docstring."""
    return _contributors(seed, hobbyist=True)


def _contributors(seed: int, hobbyist: bool) -> GroupedDataset:
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    images, labels = digits.images, digits.group_ids
    groups: dict[str, list[torch.Tensor]] = {}

    def shuffled(digit: int) -> torch.Tensor:
        idx = torch.nonzero(labels == digit).flatten()
        return idx[torch.randperm(len(idx), generator=generator)]

    if hobbyist:
        shares = []
        for digit, name in HOBBYIST_DIGITS.items():
            idx = shuffled(digit)
            share = len(idx) // HOBBYIST_SHARE_INVERSE
            groups[name] = [images[idx[share:]]]
            shares.append(images[idx[:share]])
        groups["hobbyist"] = shares
    else:
        for digit, name in ((0, "zeros"), (1, "ones"), (2, "twos"), (4, "fours")):
            groups[name] = [images[shuffled(digit)]]
    threes = shuffled(3)
    groups["threes"] = [images[threes]]
    originals = images[threes[: len(threes) // COPIED_FRACTION_INVERSE]]
    groups["threes-copies"] = [(originals + COPY_NOISE * torch.randn(originals.shape, generator=generator)).clamp(-1, 1)]
    if not hobbyist:
        sevens = shuffled(7)
        groups["sevens-large"] = [images[sevens[SMALL_SEVENS:]]]
        groups["sevens-small"] = [images[sevens[:SMALL_SEVENS]]]
    thick = []
    for digit, name in STYLE_DIGITS.items():
        idx = shuffled(digit)
        half = len(idx) // 2
        groups[name] = [images[idx[half:]]]
        thick.append(thicken(images[idx[:half]]))
    groups["thick-strokes"] = thick
    names = list(groups)
    tensors = [torch.cat(parts) for parts in groups.values()]
    ids = torch.cat([torch.full((len(t),), k, dtype=torch.long) for k, t in enumerate(tensors)])
    return GroupedDataset(torch.cat(tensors), ids, names)


@dataclass(frozen=True)
class GroupComparison:
    """A group-level question over a subset of the queries: is group a's mean Δ above group b's?

    Attributes:
        name: Short id (``copies``, ``hobbyist``, ...).
        description: What is compared and why the answer is expected.
        queries: Indices of the queries it concerns.
        group_a: Per selected query, the index of group a (the group expected to matter more).
        group_b: Per selected query, the index of group b.
    """

    name: str
    description: str
    queries: np.ndarray
    group_a: np.ndarray
    group_b: np.ndarray

    def deltas(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Group a's and group b's scores on the selected queries, from an ``[N, K]`` score matrix."""
        scores = np.asarray(scores)
        return scores[self.queries, self.group_a], scores[self.queries, self.group_b]


def _knn(images: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int = 5) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    model = KNeighborsClassifier(n_neighbors=k).fit(images.flatten(1).numpy(), labels.numpy())
    return model.predict(queries.flatten(1).numpy())


def query_digits(queries: torch.Tensor) -> np.ndarray:
    """The digit of each ``[N, 1, 8, 8]`` query by a pixel 5-nearest-neighbour classifier on the real digits
    (it looks at no attribution score)."""
    digits = load_digits()
    return _knn(digits.images, digits.group_ids, queries)


def contributors_comparisons(dataset: GroupedDataset, queries: torch.Tensor) -> list[GroupComparison]:
    """The group-level comparisons of ``digits-contributors`` on a query set: ``copies``, ``sizes``,
    ``style-thick`` and ``style-thin`` (see :func:`_contributor_comparisons`)."""
    return _contributor_comparisons(dataset, queries, hobbyist=False)


def hobbyist_comparisons(dataset: GroupedDataset, queries: torch.Tensor) -> list[GroupComparison]:
    """The group-level comparisons of ``digits-contributors-hobbyist`` on a query set: ``copies``,
    ``hobbyist``, ``style-thick`` and ``style-thin`` (see :func:`_contributor_comparisons`)."""
    return _contributor_comparisons(dataset, queries, hobbyist=True)


def _contributor_comparisons(dataset: GroupedDataset, queries: torch.Tensor, hobbyist: bool) -> list[GroupComparison]:
    """The group-level comparisons of a contributors benchmark (``[]`` for queries that are not 8x8 grayscale).

    The queries are selected by two pixel 5-nearest-neighbour classifiers that look at no
    attribution score: the digit (trained on the real digits) and, for 5/6/8/9, the stroke style
    (trained on ``thick-strokes`` against the thin halves). Comparisons with fewer than two selected
    queries are left out.
    """
    if tuple(queries.shape[1:]) != (1, 8, 8):
        return []
    names = list(dataset.group_names)
    digit = query_digits(queries)
    index = {name: dataset.group_index(name) for name in names}
    style_groups = [index[name] for name in (*STYLE_DIGITS.values(), "thick-strokes")]
    in_style = torch.isin(dataset.group_ids, torch.tensor(style_groups))
    thick = _knn(dataset.images[in_style], (dataset.group_ids[in_style] == index["thick-strokes"]).long(), queries).astype(bool)
    style = np.isin(digit, list(STYLE_DIGITS))
    own = np.array([index[STYLE_DIGITS.get(int(d), "fives")] for d in digit])
    if not hobbyist:
        middle = ("sizes", digit == 7, index["sevens-large"], index["sevens-small"],
                  f"7-queries: sevens-large above sevens-small (only {SMALL_SEVENS} images; the other sevens stay when they go)")
    else:
        own_plain = np.array([index[HOBBYIST_DIGITS.get(int(d), "zeros")] for d in digit])
        middle = ("hobbyist", np.isin(digit, list(HOBBYIST_DIGITS)), own_plain, index["hobbyist"],
                  "0/1/2/4/7-queries: the digit's contributor (three quarters of it) above hobbyist (a quarter of every such digit)")
    specs = [
        ("copies", digit == 3, index["threes"], index["threes-copies"],
         "3-queries: threes (all originals) above threes-copies (near-copies of a quarter of them; the originals stay when they go)"),
        middle,
        ("style-thick", style & thick, index["thick-strokes"], own,
         "thick 5/6/8/9-queries: thick-strokes above the query's digit contributor (its thick twins are all in thick-strokes)"),
        ("style-thin", style & ~thick, own, index["thick-strokes"],
         "thin 5/6/8/9-queries: the query's digit contributor above thick-strokes (it holds every thin image of that digit)"),
    ]
    comparisons = []
    for name, mask, a, b, description in specs:
        selected = np.flatnonzero(mask)
        if len(selected) < 2:
            continue
        pick = lambda g: np.broadcast_to(np.asarray(g), mask.shape)[selected]
        comparisons.append(GroupComparison(name, description, selected, pick(a), pick(b)))
    return comparisons


def thicken(images: torch.Tensor) -> torch.Tensor:
    """Horizontally thickened strokes: each pixel becomes the max of itself and its left neighbour."""
    shifted = torch.full_like(images, -1.0)
    shifted[..., 1:] = images[..., :-1]
    return torch.maximum(images, shifted)


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: how its dataset is built and what the evaluation reads from it.

    Attributes:
        name: Its ``--benchmark`` name (also its ``diffusers_guda.datasets`` entry point).
        loader: Builds the grouped training set, deterministically.
        description: One line for listings.
        recipe: The recipe it is evaluated with by default (``digits-styles`` needs a text-conditioned one).
        comparisons: Its group-level comparisons on a query set, ``(dataset, queries) -> [GroupComparison]``;
            ``None``: it has none.
        label_top1: Its groups are classes a query can be judged by: the evaluation adds ``label_top1``,
            agreement of the top group with a 5-nearest-neighbour pixel classifier fitted on the dataset.
    """

    name: str
    loader: Callable[[], GroupedDataset]
    description: str
    recipe: str = "digits-ddpm"
    comparisons: Callable[[GroupedDataset, torch.Tensor], list[GroupComparison]] | None = None
    label_top1: bool = False

    def load(self) -> GroupedDataset:
        """The benchmark's grouped training set."""
        return self.loader()

    def group_comparisons(self, dataset: GroupedDataset, queries: torch.Tensor) -> list[GroupComparison]:
        """Its group-level comparisons on ``queries`` (``[]`` when it declares none)."""
        return [] if self.comparisons is None else self.comparisons(dataset, queries)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("digits-classes", load_digits, "scikit-learn digits, groups = the 10 digit classes (easy for similarity: "
              "see docs/evaluation.md#benchmarks)", label_top1=True),
    Benchmark("digits-contributors", digits_contributors, "13 overlapping contributors built from the digits: near-copies, "
              "very different sizes, a stroke style across digits", comparisons=contributors_comparisons),
    Benchmark("digits-contributors-flow", digits_contributors, "digits-contributors with an unconditional flow-matching "
              "model (rectified flow, velocity target, Euler sampling)", recipe="digits-flow", comparisons=contributors_comparisons),
    Benchmark("digits-contributors-hobbyist", digits_contributors_hobbyist, "digits-contributors with the 7s split replaced "
              "by a hobbyist holding a quarter of five digits (pixel nearest neighbour is wrong by design)",
              comparisons=hobbyist_comparisons),
    *(Benchmark(f"digits-crowd-{k}", CROWD_LOADERS[k], f"{k} contributors of unequal size, each mostly holding one "
                f"digit (the scaling study's construction at K = {k})") for k in CROWD_SIZES),
    Benchmark("digits-styles", digits_styles, "text-conditioned digits with prompts; groups = 4 styles (plain, thick, "
              "slanted, inverted) applied across all digits", recipe="digits-styles"),
    Benchmark("digits-styles-flow", digits_styles, "digits-styles with a flow-matching model (rectified flow, velocity "
              "target, Euler sampling)", recipe="digits-styles-flow"),
    Benchmark("digits-styles-flow-uncond", digits_styles_unconditional, "the digits-styles images and style groups without "
              "prompts, an unconditional flow-matching model", recipe="digits-styles-flow-uncond"),
    Benchmark("emoji-styles", emoji.emoji_styles, "real colour art: the same emoji drawn by google, twitter and openmoji "
              "(16 px RGB), captioned by category; groups = styles (run `guda prepare emoji-styles` first)", recipe="emoji-styles"),
    Benchmark("emoji-styles-uncond", emoji.emoji_styles_unconditional, "the emoji-styles images and style groups without "
              "captions, an unconditional DDPM model", recipe="emoji-styles-uncond"),
    Benchmark("emoji-contributors", emoji.emoji_contributors, "emoji-styles-uncond with a collector holding a quarter of "
              "every style (pixel nearest neighbour is wrong by design)", recipe="emoji-styles-uncond",
              comparisons=emoji.contributors_comparisons),
)}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark named ``name``.

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    if name not in BENCHMARKS:
        raise ConfigError(f"Unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}. Or pass --data DIR.")
    return BENCHMARKS[name]


def available_benchmarks() -> dict[str, str]:
    """Benchmark name -> one-line description."""
    return {name: b.description for name, b in BENCHMARKS.items()}


def benchmark_recipe(name: str) -> str:
    """The recipe a named benchmark is evaluated with by default (``digits-styles`` needs a text-conditioned one)."""
    return get_benchmark(name).recipe


def load_benchmark(name: str) -> GroupedDataset:
    """The grouped training set of a named benchmark.

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    return get_benchmark(name).load()
