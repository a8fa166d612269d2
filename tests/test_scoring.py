"""Tests of diffusers_guda.scoring: AttributionScorer checks and scores, AttributionResult helpers."""

from __future__ import annotations

import contextlib

import json
import math

import pytest
import torch
from peft import LoraConfig

from diffusers_guda import AttributionResult, AttributionScorer, ELBOConfig, ELBOEstimator
from diffusers_guda.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result() -> AttributionResult:
    scores = torch.tensor([[0.1, 0.5, -0.2], [2.0, -1.0, 1.5], [-0.3, -0.1, -0.2]])
    return AttributionResult(
        scores=scores,
        stderr=torch.full_like(scores, 0.05),
        groups=["a", "b", "c"],
        neg_elbo=torch.tensor([10.0, 11.0, 12.0]),
        image_hashes=[1, 2, 2**62 + 3],
        metadata={"note": "test"},
    )


def add_adapter(unet, name: str, seed: int | None) -> None:
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["conv1", "conv2", "to_q"]), adapter_name=name)
    if seed is not None:  # make it non-identity
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if f"lora_B.{name}." in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator))


# -- AttributionResult --------------------------------------------------------------------------


def test_top_orders_groups_by_score():
    result = make_result()
    assert len(result) == 3
    assert result.top(1) == [[("b", 0.5)], [("a", 2.0)], [("b", pytest.approx(-0.1))]]
    top2 = result.top(2)
    assert [[name for name, _ in row] for row in top2] == [["b", "a"], ["a", "c"], ["b", "c"]]
    full = result.top(3)
    for row in full:
        values = [v for _, v in row]
        assert values == sorted(values, reverse=True)
        assert {n for n, _ in row} == {"a", "b", "c"}
    assert [len(row) for row in result.top(10)] == [3, 3, 3]  # k is capped at the number of groups
    assert result.top_groups() == ["b", "a", "b"]


def test_to_json_round_trip(tmp_path):
    result = make_result()
    path = tmp_path / "r.json"
    text = result.to_json(path)
    for data in (json.loads(text), json.loads(path.read_text())):
        assert data["groups"] == ["a", "b", "c"]
        assert torch.allclose(torch.tensor(data["scores"]), result.scores)
        assert torch.allclose(torch.tensor(data["stderr"]), result.stderr)
        assert data["top_group"] == ["b", "a", "b"]
        assert data["neg_elbo"] == [10.0, 11.0, 12.0]
        assert data["image_hashes"] == ["1", "2", str(2**62 + 3)]  # strings: exact beyond 2^53
        assert data["metadata"] == {"note": "test"}
    assert result.to_json() == text


@pytest.mark.parametrize("with_images", [False, True])
def test_plot_writes_a_png(tmp_path, with_images):
    result = make_result()
    images = torch.rand(3, 1, 8, 8) * 2 - 1 if with_images else None
    path = tmp_path / "bars.png"
    result.plot(path, images=images)
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_with_top_k_and_rgb_images(tmp_path):
    result = make_result()
    path = tmp_path / "bars.png"
    result.plot(path, images=torch.rand(3, 3, 8, 8) * 2 - 1, max_queries=2, top_k=2)
    assert path.read_bytes()[:8] == PNG_MAGIC


# -- AttributionScorer --------------------------------------------------------------------------


def test_scorer_refuses_adapters_that_are_not_loaded(tiny_unet, tiny_scheduler):
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10))
    with pytest.raises(ConfigError, match="not loaded"):
        AttributionScorer(tiny_unet, estimator, ["guda_a"], ["a"])
    add_adapter(tiny_unet, "guda_a", seed=None)
    with pytest.raises(ConfigError, match="guda_b"):
        AttributionScorer(tiny_unet, estimator, ["guda_a", "guda_b"], ["a", "b"])
    with pytest.raises(ConfigError, match="same length"):
        AttributionScorer(tiny_unet, estimator, ["guda_a"], ["a", "b"])
    AttributionScorer(tiny_unet, estimator, ["guda_a"], ["a"])  # fine


def test_scores_of_identity_and_real_adapters(tiny_unet, tiny_scheduler):
    add_adapter(tiny_unet, "identity", seed=None)
    add_adapter(tiny_unet, "real", seed=1)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, num_draws=2))
    scorer = AttributionScorer(tiny_unet, estimator, ["identity", "real"], ["zero", "changed"])
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = scorer.score(images, batch_size=2, progress=False, metadata={"extra": 1})
    assert result.scores.shape == result.stderr.shape == (3, 2)
    assert result.groups == ["zero", "changed"]
    # an identity adapter is the full model: every paired difference is exactly 0
    assert torch.equal(result.scores[:, 0], torch.zeros(3))
    assert torch.equal(result.stderr[:, 0], torch.zeros(3))
    assert (result.scores[:, 1] != 0).all()
    assert torch.isfinite(result.stderr).all() and (result.stderr[:, 1] > 0).all()
    assert torch.isfinite(result.neg_elbo).all() and (result.neg_elbo > 0).all()
    assert result.image_hashes == estimator.image_hashes(images)
    assert result.metadata["extra"] == 1 and result.metadata["num_rows"] == estimator.num_rows
    assert not tiny_unet.training  # the model keeps its mode
    # batch size changes speed only
    again = scorer.score(images, batch_size=1, progress=False)
    assert torch.equal(again.scores, result.scores) and torch.equal(again.stderr, result.stderr)


def test_score_sign_follows_the_elbo_difference(tiny_unet, tiny_scheduler):
    """score = ELBO(full) - ELBO(adapter) = negELBO(adapter) - negELBO(full)."""
    add_adapter(tiny_unet, "real", seed=2)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10))
    scorer = AttributionScorer(tiny_unet, estimator, ["real"], ["g"])
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    result = scorer.score(images, progress=False)
    with torch.no_grad():
        neg_elbo = {}
        for name in (None, "real"):
            if name is None:
                tiny_unet.disable_adapters()
            else:
                tiny_unet.enable_adapters()
                tiny_unet.set_adapter(name)
            neg_elbo[name] = torch.stack([estimator.scale * estimator.terms(tiny_unet, x, estimator.noise(x)).mean() for x in images])
    tiny_unet.enable_adapters()
    assert torch.allclose(result.neg_elbo, neg_elbo[None], rtol=1e-5)
    assert torch.allclose(result.scores[:, 0], neg_elbo["real"] - neg_elbo[None], rtol=0, atol=1e-3)  # float32 cancellation


def test_scorer_restores_the_adapter_state(tiny_unet, tiny_scheduler):
    """Scoring switches adapters on and off; afterwards the UNet computes what it computed before."""
    add_adapter(tiny_unet, "a", seed=1)
    add_adapter(tiny_unet, "b", seed=2)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=25))
    scorer = AttributionScorer(tiny_unet, estimator, ["a", "b"], ["a", "b"])
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([3, 60])
    query = torch.zeros(1, 1, 8, 8)

    def output():
        with torch.no_grad():
            return tiny_unet(x, t).sample

    tiny_unet.disable_adapters()  # e.g. a pipeline that generates with the full model
    full = output()
    scorer.score(query, progress=False)
    assert torch.equal(output(), full)

    tiny_unet.enable_adapters()
    tiny_unet.set_adapter("a")  # a user looking at one counterfactual
    with_a = output()
    assert not torch.equal(with_a, full)
    scorer.score(query, progress=False)
    assert tiny_unet.active_adapters() == ["a"]
    assert torch.equal(output(), with_a)


def test_single_row_estimator_has_nan_stderr(tiny_unet, tiny_scheduler):
    add_adapter(tiny_unet, "real", seed=3)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=50, t_min=50, t_max=51))
    assert estimator.num_rows == 1
    result = AttributionScorer(tiny_unet, estimator, ["real"], ["g"]).score(torch.zeros(1, 1, 8, 8), progress=False)
    assert math.isnan(result.stderr[0, 0]) and math.isfinite(result.scores[0, 0])


def test_batch_size_must_be_positive(tiny_unet, tiny_scheduler):
    add_adapter(tiny_unet, "a", seed=None)
    scorer = AttributionScorer(tiny_unet, ELBOEstimator(tiny_scheduler), ["a"], ["a"])
    with pytest.raises(ConfigError, match="batch_size"):
        scorer.score(torch.zeros(1, 1, 8, 8), batch_size=0, progress=False)


def _scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1", "g2"), stride=7):
    from diffusers_guda import ELBOConfig, ELBOEstimator, LoRASettings
    from diffusers_guda.scoring import AttributionScorer

    for k, name in enumerate(names):
        torch.manual_seed(k)
        tiny_unet.add_adapter(LoRASettings(rank=2, alpha=2).to_peft(tiny_unet), adapter_name=name)
        for param_name, param in tiny_unet.named_parameters():
            if f"lora_B.{name}." in param_name:
                torch.nn.init.normal_(param, std=0.1)
    tiny_unet.disable_adapters()
    return AttributionScorer(tiny_unet, ELBOEstimator(tiny_scheduler, ELBOConfig(stride=stride)), list(names), list(names))


def test_strategies_agree_and_scores_do_not_depend_on_the_batch(tiny_unet, tiny_scheduler):
    scorer = _scorer_with_adapters(tiny_unet, tiny_scheduler)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    results = {s: scorer.score(images, progress=False, strategy=s) for s in ("swap", "merged", "mixed")}
    auto = scorer.score(images, progress=False)
    assert auto.metadata["strategy"] == "merged" and torch.equal(auto.scores, results["merged"].scores)
    swap = results["swap"]
    assert (swap.scores.abs() > 1e-3).all()  # the adapters do something
    for name, result in results.items():
        assert result.metadata["strategy"] == name
        # float32 reordering only: ~1e-7 per KL term, times T (=100) in the score
        assert (result.scores - swap.scores).abs().max() / swap.scores.abs().max() < 1e-5, name
        assert torch.allclose(result.stderr, swap.stderr, atol=1e-3, rtol=1e-5), name
        assert torch.allclose(result.neg_elbo, swap.neg_elbo, atol=1e-3, rtol=1e-5), name
        # within a strategy, a score does not depend on the batch size, the other images or their order
        alone = scorer.score(images[2:3], progress=False, strategy=name)
        assert torch.equal(alone.scores[0], result.scores[2]), name
        reordered = scorer.score(images.flip(0), batch_size=3, progress=False, strategy=name)
        assert torch.equal(reordered.scores.flip(0), result.scores), name
        assert torch.equal(reordered.stderr.flip(0), result.stderr), name
    assert swap.metadata["row_forwards"] == 4 * scorer.estimator.num_rows * 4  # N x rows x (K + 1)
    # merging left the base weights and adapters as they were (disabled)
    base_again = tiny_unet(images, torch.full((4,), 50)).sample
    tiny_unet.disable_adapters()
    assert torch.equal(base_again, tiny_unet(images, torch.full((4,), 50)).sample)


def test_unknown_strategy_is_refused(tiny_unet, tiny_scheduler):
    scorer = _scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1"))
    with pytest.raises(ConfigError, match="strategy"):
        scorer.score(torch.zeros(1, 1, 8, 8), progress=False, strategy="fast")
    with pytest.raises(ConfigError, match="mixed"):
        scorer.score(torch.zeros(1, 1, 8, 8), progress=False, strategy="mixed", adaptive_z=2.0)


def test_adaptive_draws_drop_trailing_groups(tiny_unet, tiny_scheduler, monkeypatch):
    scorer = _scorer_with_adapters(tiny_unet, tiny_scheduler, stride=2)
    rows = scorer.estimator.num_rows
    lead = {0: 1.0, 1: 0.0}  # image 0: g0 leads g1 by 1 on every row; image 1: g0 and g1 tie

    calls = []

    def designed_terms(model, images, image_index, row_ids, noise, kwargs, forward_rows):
        calls.append((model, list(zip(image_index.tolist(), row_ids.tolist()))))
        # base 0; g0 = g1 + lead, g2 = g1 - 1, plus a row-dependent wiggle shared by all adapters
        wiggle = torch.sin(row_ids.float() * 1.7)
        which = (images[image_index].flatten(1).mean(1) < 0).long()  # image 0 is bright, image 1 dark
        offset = {None: None, "g0": torch.tensor([lead[0], lead[1]])[which], "g1": 0.0, "g2": -1.0}[model]
        return torch.zeros(len(row_ids)) if offset is None else offset + wiggle

    # the "UNet" each model runs is its adapter name, which the designed terms read
    monkeypatch.setattr(scorer, "_model", lambda adapter, strategy: contextlib.nullcontext(adapter))
    monkeypatch.setattr(scorer.estimator, "packed_terms", designed_terms)
    images = torch.stack([torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), -0.5)])
    result = scorer.score(images, progress=False, adaptive_z=3.0, adaptive_block=4)
    # constant gaps resolve once two blocks give a standard error; a tie never does, so g0 and g1 walk
    # the whole grid
    assert result.metadata["rows_used"] == [[8, 8, 8], [rows, rows, 8]]
    assert result.scores[0].argmax() == 0
    scale = scorer.estimator.scale
    assert torch.allclose(result.scores[0, 0] - result.scores[0, 1], torch.tensor(scale))
    assert result.scores[1, 0] == result.scores[1, 1]  # the tie, on the same rows
    # each (model, image, row) runs once; the room in a forward is filled with later blocks, so only
    # the last forward of each model that walks image 1 to its end (base, g0, g1) is not full (32 rows)
    items = [(model, item) for model, batch in calls for item in batch]
    assert len(items) == len(set(items)) == result.metadata["row_forwards"]
    assert sum(len(batch) % 32 != 0 for _, batch in calls) == 3


def test_adaptive_walk_brings_back_a_dropped_group_that_the_leader_falls_below(tiny_unet, tiny_scheduler, monkeypatch):
    from diffusers_guda.hashing import derive_seed
    from diffusers_guda.scoring import _stratified_walk

    scorer = _scorer_with_adapters(tiny_unet, tiny_scheduler, stride=2)
    est = scorer.estimator
    image = torch.full((1, 1, 8, 8), 0.5)
    walk, _ = _stratified_walk(est.num_rows, 4, derive_seed("guda-order", est.config.seed, est.image_hashes(image)[0]))
    early = set(torch.cat(walk[:2]).tolist())  # the first two blocks, where the first decision is taken

    def designed_terms(model, images, image_index, row_ids, noise, kwargs, forward_rows):
        # g1 and g2 (tied, so the walk goes on) look best early and fall later; g0 is dropped early at
        # 2 while g1's estimate later falls below that: g0 must come back, not win on a frozen estimate
        is_early = torch.tensor([r in early for r in row_ids.tolist()])
        if model is None:
            return torch.zeros(len(row_ids))
        high, low = (2.0, 0.2) if model == "g0" else (5.0, 0.5)
        return torch.where(is_early, high, low)

    monkeypatch.setattr(scorer, "_model", lambda adapter, strategy: contextlib.nullcontext(adapter))
    monkeypatch.setattr(est, "packed_terms", designed_terms)
    result = scorer.score(image, progress=False, adaptive_z=3.0, adaptive_block=4)
    assert result.metadata["rows_used"][0][0] > 8  # g0 was dropped after two blocks, then brought back
    assert result.top_groups() == ["g1"]  # the full-grid answer (g1 and g2 tie; the first wins)
    assert result.scores[0, 0] < result.scores[0, 1]


@pytest.mark.parametrize("strategy", ["merged", "swap"])
def test_adaptive_scores_do_not_depend_on_the_batch(tiny_unet, tiny_scheduler, strategy):
    scorer = _scorer_with_adapters(tiny_unet, tiny_scheduler)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    together = scorer.score(images, progress=False, strategy=strategy, adaptive_z=0.5, adaptive_block=4)
    alone = scorer.score(images[1:2], progress=False, strategy=strategy, adaptive_z=0.5, adaptive_block=4)
    one_by_one = scorer.score(images, batch_size=1, progress=False, strategy=strategy, adaptive_z=0.5, adaptive_block=4)
    assert torch.equal(alone.scores[0], together.scores[1])
    assert alone.metadata["rows_used"] == together.metadata["rows_used"][1:2]
    assert torch.equal(one_by_one.scores, together.scores) and one_by_one.metadata["rows_used"] == together.metadata["rows_used"]
    assert min(min(r) for r in together.metadata["rows_used"]) < scorer.estimator.num_rows  # some group was dropped


def test_adaptive_walk_that_never_stops_covers_the_full_grid(tiny_unet, tiny_scheduler):
    scorer = _scorer_with_adapters(tiny_unet, tiny_scheduler)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    full = scorer.score(images, progress=False)
    walked = scorer.score(images, progress=False, adaptive_z=1e9, adaptive_block=3)
    assert walked.metadata["rows_used"] == [[scorer.estimator.num_rows] * 3] * 2
    assert torch.allclose(walked.scores, full.scores, atol=1e-4, rtol=1e-5)  # same rows, other summation order
    assert torch.allclose(walked.stderr, full.stderr, atol=1e-4, rtol=1e-4)
    assert "rows_used" not in full.metadata


def test_adaptive_settings_are_validated(tiny_unet, tiny_scheduler):
    scorer = _scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1"))
    for z, block in ((0.0, 4), (-1.0, 4), (2.0, 1)):
        with pytest.raises(ConfigError, match="adaptive"):
            scorer.score(torch.zeros(1, 1, 8, 8), progress=False, adaptive_z=z, adaptive_block=block)


def test_stratified_walk_covers_the_grid_once_with_one_row_per_range():
    from diffusers_guda.scoring import _stratified_walk

    blocks, weights = _stratified_walk(99, 8, seed=3)
    assert sorted(torch.cat(blocks).tolist()) == list(range(99))
    ranges = torch.arange(99).tensor_split(8)
    complete = [(b, w) for b, w in zip(blocks, weights) if w is not None]
    assert len(complete) == 12 and all(w is None for w in weights[12:])  # ranges of 13 and 12 rows
    for block, weight in complete:
        assert [int(torch.isin(block, r).sum()) for r in ranges] == [1] * 8
        assert weight.sum() == pytest.approx(1.0)
    again, _ = _stratified_walk(99, 8, seed=3)
    other, _ = _stratified_walk(99, 8, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(blocks, again)) and not all(torch.equal(a, b) for a, b in zip(blocks, other))


def test_merged_runner_shares_and_never_writes_the_base_weights(tiny_unet, tiny_scheduler):
    from diffusers_guda.hashing import base_state_dict
    from diffusers_guda.merging import MergedAdapterRunner

    scorer = _scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1"))
    before = {k: v.clone() for k, v in base_state_dict(tiny_unet).items()}
    runner = MergedAdapterRunner(tiny_unet)
    shared = base_state_dict(tiny_unet)
    assert all(p.data_ptr() == shared[k].data_ptr() for k, p in runner.plain.state_dict().items())  # no copy
    x, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.full((2,), 30)
    with torch.no_grad():
        for name in ("g0", "g1"):
            tiny_unet.enable_adapters()
            tiny_unet.set_adapter(name)
            unmerged = tiny_unet(x, t).sample
            with runner.merged(name) as merged:
                assert torch.allclose(merged(x, t).sample, unmerged, atol=1e-5)
        tiny_unet.disable_adapters()
        with runner.merged(None) as base:
            assert torch.equal(base(x, t).sample, tiny_unet(x, t).sample)
    assert all(torch.equal(v, before[k]) for k, v in base_state_dict(tiny_unet).items())
    with pytest.raises(ConfigError, match="not loaded"):
        with runner.merged("nope"):
            pass


def test_merged_runner_keeps_merged_weights_within_its_budget(tiny_unet, tiny_scheduler):
    from diffusers_guda.merging import MergedAdapterRunner

    _scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1"))
    keeping, merging = MergedAdapterRunner(tiny_unet), MergedAdapterRunner(tiny_unet, cache_bytes=0)
    x, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.full((2,), 30)
    with torch.no_grad():
        for name in ("g0", "g1", "g0"):  # g0 again: from the kept weights
            with keeping.merged(name) as a:
                kept = a(x, t).sample
            with merging.merged(name) as b:
                assert torch.equal(kept, b(x, t).sample)
    assert sorted(keeping._kept) == ["g0", "g1"] and not merging._kept
