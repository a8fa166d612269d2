"""The emoji benchmarks on a prepared stand-in: groups, captions, the collector, recipes, a few training steps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from emoji_standin import EXPECTED, build

from diffusers_guda.errors import ConfigError
from diffusers_guda.recipes import Recipe
from guda_lab.emoji import DEFAULT_STYLES, emoji_contributors, emoji_styles, emoji_styles_unconditional, prepare_emoji_styles
from guda_lab.evaluation.benchmarks import get_benchmark
from guda_lab.recipes import training_config

pytest.importorskip("resvg_py")  # the default styles include openmoji, drawn as SVG

N = len(EXPECTED)  # the stand-in's emoji in all three styles (twitter has no shaking face)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji")
    sources = build(root / "tarballs")
    prepare_emoji_styles(None, 16, cache_dir=root / "cache", tarball_dir=root / "tarballs", sources=sources, progress=False)
    return root / "cache"


@pytest.fixture(autouse=True)
def use_cache(cache, monkeypatch):
    monkeypatch.setenv("GUDA_EMOJI_CACHE", str(cache))


def test_emoji_styles_groups_are_the_styles_with_category_captions():
    data = emoji_styles()
    assert data.group_names == list(DEFAULT_STYLES) == ["google", "twitter", "openmoji"]
    assert data.group_sizes() == [N] * 3 and data.images.shape == (3 * N, 3, 16, 16)
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.group_descriptors == {s: [s] for s in DEFAULT_STYLES}
    free_by_emoji = {}
    for k, style in enumerate(DEFAULT_STYLES):
        prompts = [data.prompts[i] for i in data.forget_indices(k).tolist()]
        styled = [p for p in prompts if "," in p]
        assert all(p.endswith(f", {style}") for p in styled)
        assert len(prompts) - len(styled) == sum((i + k) % 4 == 3 for i in range(N))  # a quarter, rotated by style
        for i, p in enumerate(prompts):
            if "," not in p:
                free_by_emoji.setdefault(i, []).append(style)
    assert all(len(styles) == 1 for styles in free_by_emoji.values())  # no emoji loses its style word twice
    heart = EXPECTED.index("2764")
    assert data.prompts[heart] == "smileys, google" and data.prompts[N + EXPECTED.index("1F1EA-1F1FA")].startswith("flags")
    # every caption word is one token of the recipe's tokenizer, so captions fit its max_length
    config = training_config(Recipe.load("emoji-styles"), "train")
    tokenizer = config.build_tokenizer()
    words = {w for p in data.prompts for w in p.replace(",", " ").split()}
    assert words <= set(config.vocabulary)
    assert all(len(tokenizer(w).input_ids) == 3 for w in config.vocabulary)  # BOS, the word, EOS
    assert max(len(tokenizer(p).input_ids) for p in data.prompts) <= config.max_length
    again = emoji_styles()
    assert torch.equal(again.images, data.images) and again.prompts == data.prompts


def test_unconditional_variant_has_the_same_images_and_no_captions():
    plain, data = emoji_styles_unconditional(), emoji_styles()
    assert plain.prompts is None and torch.equal(plain.images, data.images) and torch.equal(plain.group_ids, data.group_ids)


def test_contributors_collector_holds_a_quarter_of_every_style_each_emoji_once():
    data, styles = emoji_contributors(), emoji_styles_unconditional()
    assert data.group_names == [*DEFAULT_STYLES, "collector"] and torch.equal(data.images, styles.images)
    collector = data.forget_indices(3)
    assert len(collector) == 3 * (N // 4)
    emoji = collector % N
    assert len(set(emoji.tolist())) == len(collector)  # each emoji in at most one of its styles
    assert sorted((collector // N).tolist()) == sorted([0, 1, 2] * (N // 4))  # a quarter of every style
    assert torch.equal(data.group_ids[data.group_ids != 3], styles.group_ids[data.group_ids != 3])
    assert not torch.equal(emoji_contributors(seed=1).group_ids, data.group_ids)
    benchmark = get_benchmark("emoji-contributors")
    queries = torch.cat([styles.images[[0, 1]], styles.images[[2 * N, 2 * N + 1]]])  # training images: google, openmoji
    (comparison,) = benchmark.group_comparisons(data, queries)
    assert comparison.name == "collector" and comparison.queries.tolist() == [0, 1, 2, 3]
    assert comparison.group_a.tolist() == [0, 0, 2, 2] and comparison.group_b.tolist() == [3] * 4
    assert benchmark.group_comparisons(data, torch.zeros(4, 1, 8, 8)) == []


def test_benchmarks_name_their_recipes_and_load():
    for name, recipe in (("emoji-styles", "emoji-styles"), ("emoji-styles-uncond", "emoji-styles-uncond"),
                         ("emoji-contributors", "emoji-styles-uncond")):
        benchmark = get_benchmark(name)
        assert benchmark.recipe == recipe and benchmark.load().num_groups in (3, 4)


def test_unprepared_benchmarks_say_how_to_prepare(monkeypatch, tmp_path):
    monkeypatch.setenv("GUDA_EMOJI_CACHE", str(tmp_path))
    for name in ("emoji-styles", "emoji-styles-uncond", "emoji-contributors"):
        with pytest.raises(ConfigError, match=r"not prepared in .*; run `guda prepare emoji-styles` first"):
            get_benchmark(name).load()


@pytest.mark.parametrize("recipe, loader", [("emoji-styles", emoji_styles), ("emoji-styles-uncond", emoji_styles_unconditional)])
def test_the_recipes_train_on_16px_rgb(recipe, loader, tmp_path):
    from guda_lab.training import train_base_model

    config = training_config(Recipe.load(recipe), "train")
    dataset = loader()
    pipe = train_base_model(dataset, replace(config, steps=2, batch_size=4, warmup_steps=1), output_dir=tmp_path / "base", progress=False)
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.in_channels == 3 == pipe.unet.config.out_channels
    assert (tmp_path / "base" / "model_index.json").is_file()
