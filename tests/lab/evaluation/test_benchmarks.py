"""The named benchmarks: deterministic, and built the way their documentation says."""

from __future__ import annotations

import configparser
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_guda.data import load_digits
from diffusers_guda.errors import ConfigError
from guda_lab import emoji
from guda_lab.evaluation import benchmarks

SETUP_CFG = Path(__file__).resolve().parents[3] / "setup.cfg"


def test_digits_classes_is_the_digits():
    data = benchmarks.load_benchmark("digits-classes")
    assert data.group_names == [str(d) for d in range(10)] and len(data) == 1797


def test_contributors_is_deterministic_and_complete():
    a, b = benchmarks.digits_contributors(), benchmarks.digits_contributors()
    assert torch.equal(a.images, b.images) and torch.equal(a.group_ids, b.group_ids)
    assert a.group_names == ["zeros", "ones", "twos", "fours", "threes", "threes-copies", "sevens-large", "sevens-small",
                             "fives", "sixes", "eights", "nines", "thick-strokes"]
    digits = load_digits()
    sizes = dict(zip(a.group_names, a.group_sizes()))
    counts = torch.bincount(digits.group_ids).tolist()
    assert sizes["threes"] == counts[3] and sizes["threes-copies"] == counts[3] // 4
    assert sizes["sevens-small"] == benchmarks.SMALL_SEVENS and sizes["sevens-large"] == counts[7] - benchmarks.SMALL_SEVENS
    assert sizes["thick-strokes"] == sum(counts[d] // 2 for d in (5, 6, 8, 9))
    assert sizes["fives"] == counts[5] - counts[5] // 2
    assert a.images.min() >= -1 and a.images.max() <= 1


@pytest.mark.parametrize("k", benchmarks.CROWD_SIZES)
def test_crowd_holds_every_digit_once_mostly_with_its_own_contributors(k):
    data, again = benchmarks.load_benchmark(f"digits-crowd-{k}"), benchmarks.digits_crowd(k)
    assert torch.equal(data.images, again.images) and torch.equal(data.group_ids, again.group_ids)
    assert data.num_groups == k and len(data) == 1797
    # the same multiset of images as the digits: each image given to exactly one contributor
    digits = load_digits()
    assert torch.equal(data.images.flatten(1).sort(0).values, digits.images.flatten(1).sort(0).values)
    sizes = torch.tensor(data.group_sizes())
    assert sizes.min() >= benchmarks.CROWD_MIN_IMAGES
    # the main digit (contributor c's is c mod 10) holds most of each contributor's images overall
    label = {tuple(img.flatten().tolist()): int(d) for img, d in zip(digits.images, digits.group_ids)}
    main = torch.tensor([label[tuple(img.flatten().tolist())] for img in data.images]) == data.group_ids % 10
    assert 0.75 < main.float().mean() < 0.9


def test_crowd_sizes_are_unequal_and_refuse_other_counts():
    sizes = torch.tensor(benchmarks.digits_crowd(120).group_sizes()).float()
    assert sizes.max() > 3 * sizes.median()  # a few large contributors, many small
    with pytest.raises(ConfigError, match="multiple of 10"):
        benchmarks.digits_crowd(25)


def test_copies_are_light_noise_on_originals():
    data = benchmarks.digits_contributors()
    threes = data.images[data.forget_indices(data.group_index("threes"))].flatten(1)
    copies = data.images[data.forget_indices(data.group_index("threes-copies"))].flatten(1)
    nearest = torch.cdist(copies, threes).min(dim=1).values
    # every copy sits within ~sigma * sqrt(64) of one original (clamping only shrinks the distance)
    assert (nearest < 3 * benchmarks.COPY_NOISE * 8).all() and (nearest > 0).all()


def test_hobbyist_variant_holds_a_disjoint_quarter_of_five_digits():
    data = benchmarks.load_benchmark("digits-contributors-hobbyist")
    assert data.group_names == ["zeros", "ones", "twos", "fours", "sevens", "hobbyist", "threes", "threes-copies",
                                "fives", "sixes", "eights", "nines", "thick-strokes"]
    digits = load_digits()
    counts = torch.bincount(digits.group_ids, minlength=10)
    hobbyist = data.images[data.forget_indices(data.group_index("hobbyist"))].flatten(1)
    label_of = {tuple(image.tolist()): int(label) for image, label in zip(digits.images.flatten(1), digits.group_ids)}
    labels = torch.tensor([label_of[tuple(image.tolist())] for image in hobbyist])
    assert set(labels.tolist()) == set(benchmarks.HOBBYIST_DIGITS)
    for digit, name in benchmarks.HOBBYIST_DIGITS.items():
        quarter = counts[digit] // benchmarks.HOBBYIST_SHARE_INVERSE
        own = data.images[data.forget_indices(data.group_index(name))].flatten(1)
        assert (labels == digit).sum() == quarter and len(own) == counts[digit] - quarter
        # disjoint real images: no hobbyist image reappears in the digit's own contributor
        assert torch.cdist(hobbyist[labels == digit], own).min() > 0
    # the other constructions are those of digits-contributors
    plain = benchmarks.digits_contributors()
    for name in ("threes", "threes-copies", "thick-strokes", "fives"):
        assert len(data.forget_indices(data.group_index(name))) == len(plain.forget_indices(plain.group_index(name)))


def test_thicken_adds_stroke_pixels_only():
    image = torch.full((1, 1, 8, 8), -1.0)
    image[0, 0, 3, 2] = 1.0
    thick = benchmarks.thicken(image)
    assert thick[0, 0, 3, 2] == 1.0 and thick[0, 0, 3, 3] == 1.0 and thick[0, 0, 3, 1] == -1.0
    assert (thick >= image).all()


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(ConfigError, match="digits-contributors"):
        benchmarks.load_benchmark("nope")


def test_group_comparisons_select_queries_by_digit_and_stroke_style():
    data = benchmarks.digits_contributors()
    group = lambda name: data.images[data.forget_indices(data.group_index(name))]
    # queries: two 3s, two 7s, two thick 5/6, two thin 5/9, one 0 (concerns no comparison)
    queries = torch.cat([group("threes")[:2], group("sevens-large")[:2], group("thick-strokes")[[0, -30]],
                         group("fives")[:1], group("nines")[:1], group("zeros")[:1]])
    found = {c.name: c for c in benchmarks.get_benchmark("digits-contributors").group_comparisons(data, queries)}
    assert set(found) == {"copies", "sizes", "style-thick", "style-thin"}
    idx = data.group_index
    assert found["copies"].queries.tolist() == [0, 1]
    assert set(found["copies"].group_a) == {idx("threes")} and set(found["copies"].group_b) == {idx("threes-copies")}
    assert found["sizes"].queries.tolist() == [2, 3] and set(found["sizes"].group_a) == {idx("sevens-large")}
    assert found["style-thick"].queries.tolist() == [4, 5] and set(found["style-thick"].group_a) == {idx("thick-strokes")}
    # thin queries compare their own digit's contributor against thick-strokes
    assert found["style-thin"].queries.tolist() == [6, 7]
    assert found["style-thin"].group_a.tolist() == [idx("fives"), idx("nines")]
    assert set(found["style-thin"].group_b) == {idx("thick-strokes")}
    scores = np.arange(len(queries) * data.num_groups, dtype=float).reshape(len(queries), -1)
    a, b = found["style-thin"].deltas(scores)
    assert a.tolist() == [scores[6, idx("fives")], scores[7, idx("nines")]]
    assert b.tolist() == [scores[6, idx("thick-strokes")], scores[7, idx("thick-strokes")]]


def test_hobbyist_comparison_pits_each_plain_digit_against_the_hobbyist():
    data = benchmarks.load_benchmark("digits-contributors-hobbyist")
    group = lambda name: data.images[data.forget_indices(data.group_index(name))]
    # a 7, a 0 and a 1 from their own contributors, one of the hobbyist's images, and two 3s
    queries = torch.cat([group("sevens")[:1], group("zeros")[:1], group("ones")[:1], group("hobbyist")[:1], group("threes")[:2]])
    found = {c.name: c for c in benchmarks.get_benchmark("digits-contributors-hobbyist").group_comparisons(data, queries)}
    assert set(found) == {"copies", "hobbyist"}
    idx = data.group_index
    assert found["hobbyist"].queries.tolist() == [0, 1, 2, 3]
    # the hobbyist's first image is one of its zeros (the shares are stacked digit by digit)
    assert found["hobbyist"].group_a.tolist() == [idx("sevens"), idx("zeros"), idx("ones"), idx("zeros")]
    assert set(found["hobbyist"].group_b) == {idx("hobbyist")}
    assert found["copies"].queries.tolist() == [4, 5]


def test_group_comparisons_only_for_the_contributors_benchmark():
    data = benchmarks.load_benchmark("digits-classes")
    assert benchmarks.get_benchmark("digits-classes").group_comparisons(data, data.images[:10]) == []
    contributors = benchmarks.digits_contributors()
    # a single 3 is too few for a paired interval: that comparison is left out
    one_three = torch.cat([contributors.images[contributors.forget_indices(contributors.group_index("threes"))][:1],
                           contributors.images[contributors.forget_indices(contributors.group_index("sevens-large"))][:2]])
    assert [c.name for c in benchmarks.get_benchmark("digits-contributors").group_comparisons(contributors, one_three)] == ["sizes"]
    # queries that are not 8x8 grayscale digits concern no comparison
    assert benchmarks.get_benchmark("digits-contributors").group_comparisons(contributors, torch.zeros(4, 3, 8, 8)) == []


def test_each_benchmark_declares_its_recipe_comparisons_and_labels():
    declared = {name: (b.recipe, b.comparisons, b.label_top1) for name, b in benchmarks.BENCHMARKS.items()}
    assert declared == {
        "digits-classes": ("digits-ddpm", None, True),
        "digits-contributors": ("digits-ddpm", benchmarks.contributors_comparisons, False),
        "digits-contributors-flow": ("digits-flow", benchmarks.contributors_comparisons, False),
        "digits-contributors-hobbyist": ("digits-ddpm", benchmarks.hobbyist_comparisons, False),
        "digits-crowd-10": ("digits-ddpm", None, False),
        "digits-crowd-30": ("digits-ddpm", None, False),
        "digits-crowd-50": ("digits-ddpm", None, False),
        "digits-crowd-120": ("digits-ddpm", None, False),
        "digits-styles": ("digits-styles", None, False),
        "digits-styles-flow": ("digits-styles-flow", None, False),
        "digits-styles-flow-uncond": ("digits-styles-flow-uncond", None, False),
        "emoji-styles": ("emoji-styles", None, False),
        "emoji-styles-uncond": ("emoji-styles-uncond", None, False),
        "emoji-contributors": ("emoji-styles-uncond", emoji.contributors_comparisons, False),
    }
    assert all(b.name == name for name, b in benchmarks.BENCHMARKS.items())
    assert benchmarks.available_benchmarks() == {name: b.description for name, b in benchmarks.BENCHMARKS.items()}
    assert all(benchmarks.benchmark_recipe(name) == b.recipe for name, b in benchmarks.BENCHMARKS.items())


def test_a_benchmark_loads_its_dataset_and_asks_its_comparisons():
    contributors = benchmarks.get_benchmark("digits-contributors")
    a, b = contributors.load(), benchmarks.digits_contributors()
    assert a.group_names == b.group_names and torch.equal(a.images, b.images)
    seen = []
    custom = benchmarks.Benchmark("custom", lambda: a, "one comparison", comparisons=lambda ds, q: seen.append((ds, q)) or ["c"])
    queries = a.images[:2]
    assert custom.group_comparisons(a, queries) == ["c"] and seen[0][0] is a and seen[0][1] is queries
    assert benchmarks.Benchmark("none", lambda: a, "no comparisons").group_comparisons(a, queries) == []
    with pytest.raises(ConfigError, match="digits-classes"):
        benchmarks.get_benchmark("nope")


def test_the_dataset_entry_points_name_the_benchmarks_loaders():
    """setup.cfg registers every benchmark under ``diffusers_guda.datasets``, each target its benchmark's loader."""
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    lines = [line.strip() for line in config["options.entry_points"]["diffusers_guda.datasets"].splitlines() if line.strip()]
    targets = dict(tuple(part.strip() for part in line.split("=")) for line in lines)
    assert set(targets) == set(benchmarks.BENCHMARKS)
    for name, target in targets.items():
        module, attribute = target.split(":")
        assert getattr(importlib.import_module(module), attribute) is benchmarks.BENCHMARKS[name].loader, name


@pytest.mark.parametrize("name", ["digits-classes", "digits-contributors"])
def test_the_converged_recipe_plans_logo_at_least_100_times_dearer(name):
    """Its budget, with the teacher at its bound of one forward per shared draw of every image (docs/results.md#shared-draws)."""
    from diffusers_guda.recipes import Recipe

    dataset = benchmarks.get_benchmark(name).load()
    sizes = dataset.group_sizes()
    recipe = Recipe.load("digits-ddpm-converged")
    train, unlearning = recipe.train, recipe.unlearning
    logo = 2 * len(sizes) * train["steps"] * train["batch_size"]
    rows = unlearning.forget_batch_size + unlearning.retain_batch_size
    student = 2 * rows * sum(unlearning.steps_for(n, sum(sizes) / len(sizes)) for n in sizes)
    assert unlearning.shared_draws > 0
    assert logo / (student + unlearning.shared_draws * len(dataset)) >= 100
