"""The ``digits-styles`` benchmark dataset: deterministic, four styles over every digit, prompts, styles applied."""

from __future__ import annotations

import pytest
import torch

from diffusers_guda import load_digits
from diffusers_guda.recipes import Recipe
from guda_lab import training_config
from guda_lab.evaluation.benchmarks import available_benchmarks, benchmark_recipe, load_benchmark
from guda_lab.evaluation.digits_styles import STYLES, apply_style, digits_styles, slant, thicken_2x2
from guda_lab.text_model import TextTrainConfig


@pytest.fixture(scope="module")
def styles():
    return digits_styles()


def test_deterministic_and_seeded(styles):
    again = digits_styles()
    assert torch.equal(styles.images, again.images) and torch.equal(styles.group_ids, again.group_ids)
    assert styles.prompts == again.prompts
    other = digits_styles(seed=1)
    assert not torch.equal(styles.images, other.images)


def test_groups_cover_every_digit_once(styles):
    assert styles.group_names == list(STYLES)
    assert len(styles) == 1797 and all(440 <= n <= 460 for n in styles.group_sizes())
    assert styles.group_descriptors == {s: [s] for s in STYLES}
    for k, style in enumerate(STYLES):
        prompts = [styles.prompts[i] for i in styles.forget_indices(k).tolist()]
        digits = {int(p.split(",")[0].split()[1]) for p in prompts}
        assert digits == set(range(10)), style
        styled = [p for p in prompts if "," in p]
        assert all(p.endswith(f", {style}") for p in styled)
        free = [p for p in prompts if "," not in p]
        assert all(p.startswith("digit ") and len(p.split()) == 2 for p in free)
        assert len(free) == pytest.approx(len(prompts) / 4, abs=1)  # caption dropout of a quarter
    assert len(set(styles.prompts)) == 10 + 10 * len(STYLES)


def test_styles_are_applied(styles):
    digits = load_digits().images
    assert torch.equal(apply_style(digits, "plain"), digits)
    assert torch.equal(apply_style(digits, "inverted"), -digits)
    thick = thicken_2x2(digits)
    assert (thick >= digits).all() and (thick > 0).sum() > 1.3 * (digits > 0).sum()
    slanted = slant(digits)
    assert torch.equal(slanted[..., 0, 2:], digits[..., 0, :-2])  # top row moves right by 2
    assert torch.equal(slanted[..., 7, :-2], digits[..., 7, 2:])  # bottom row moves left by 2
    assert torch.equal(slanted[..., 3, :], digits[..., 3, :])
    # in the dataset: ink (pixels > 0) per image by group
    ink = {s: float((styles.images[styles.group_ids == k] > 0).float().sum((1, 2, 3)).mean()) for k, s in enumerate(STYLES)}
    assert ink["thick"] > 1.3 * ink["plain"]
    assert ink["inverted"] > 2 * ink["plain"]  # dark strokes on a light ground
    with pytest.raises(ValueError, match="Unknown style"):
        apply_style(digits, "bold")


def test_smaller_set_same_construction():
    small = digits_styles(images_per_digit=8)
    assert len(small) == 80 and small.group_sizes() == [20, 20, 20, 20]
    assert small.group_names == list(STYLES)


def test_registered_with_its_recipe():
    assert "digits-styles" in available_benchmarks()
    assert torch.equal(load_benchmark("digits-styles").images, digits_styles().images)
    assert benchmark_recipe("digits-styles") == "digits-styles" and benchmark_recipe("digits-classes") == "digits-ddpm"
    recipe = Recipe.load("digits-styles")
    train = training_config(recipe, "evaluate")
    assert isinstance(train, TextTrainConfig)
    assert set(STYLES) <= set(train.vocabulary)
    assert recipe.unlearning.objective == "anchor"
