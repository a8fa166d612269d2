"""Tests of diffusers_guda.scoring.adaptive: stratified blocks, survivors, and the adaptive walk of the scorer."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_guda.errors import ConfigError
from diffusers_guda.hashing import derive_seed
from diffusers_guda.scoring import ADAPTIVE_HEAD, QueryWalk, stratified_walk, survivors

from scoring_helpers import run_adapter_names_as_models, scorer_with_adapters

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


# -- the pieces ---------------------------------------------------------------------------------


def test_stratified_walk_covers_the_grid_once_with_one_row_per_range():
    blocks, weights = stratified_walk(99, 8, seed=3)
    assert sorted(torch.cat(blocks).tolist()) == list(range(99))
    ranges = torch.arange(99).tensor_split(8)
    complete = [(b, w) for b, w in zip(blocks, weights) if w is not None]
    assert len(complete) == 12 and all(w is None for w in weights[12:])  # ranges of 13 and 12 rows
    for block, weight in complete:
        assert [int(torch.isin(block, r).sum()) for r in ranges] == [1] * 8
        assert weight.sum() == pytest.approx(1.0)
    again, _ = stratified_walk(99, 8, seed=3)
    other, _ = stratified_walk(99, 8, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(blocks, again)) and not all(torch.equal(a, b) for a, b in zip(blocks, other))


def test_stratified_walk_takes_the_head_first_and_stratifies_the_rest():
    blocks, weights = stratified_walk(99, 8, seed=3, head=5)
    assert blocks[0].tolist() == [0, 1, 2, 3, 4] and torch.equal(weights[0], torch.full((5,), 1 / 99))
    assert sorted(torch.cat(blocks).tolist()) == list(range(99))
    ranges = torch.arange(5, 99).tensor_split(8)
    complete = [(b, w) for b, w in zip(blocks[1:], weights[1:]) if w is not None]
    assert len(complete) == 11 and all(w is None for w in weights[12:])  # ranges of 12 and 11 rows
    for block, weight in complete:
        assert [int(torch.isin(block, r).sum()) for r in ranges] == [1] * 8
        assert weight.sum() + weights[0].sum() == pytest.approx(1.0)  # the head's share and the rest's


def test_survivors_drop_groups_beyond_z_paired_standard_errors():
    wiggle = torch.tensor([0.3, -0.2, 0.1, -0.4])  # shared by every group: the gaps are constant
    estimates = [wiggle + 1.0, wiggle + 0.99 + torch.tensor([0.05, -0.05, 0.05, -0.05]), wiggle - 2.0]
    assert survivors([4, 7, 9], estimates, z=3.0) == [4, 7]  # 7 is within noise of the leader 4; 9 is far behind
    assert survivors([4, 7, 9], estimates, z=0.1) == [4]  # a small z drops 7 too
    assert survivors([7], estimates[:1], z=3.0) == [7]  # one group is always left


def test_query_walk_of_the_full_grid_takes_plain_means():
    walk = QueryWalk.full_grid(num_rows=4, num_groups=2)
    assert [b.tolist() for b in walk.blocks] == [[0, 1, 2, 3]]
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert walk.record(0, base, {0: base + 1.0, 1: base - torch.tensor([0.0, 1.0, 0.0, 1.0])}) == []
    assert not walk.goes_on(0)
    neg_elbo, scores, rows_used = walk.result(num_rows=4, scale=10.0)
    assert neg_elbo == 25.0 and rows_used == [4, 4]
    assert scores[0][0] == 10.0 and scores[0][1] == 0.0  # a constant difference has no spread
    assert scores[1][0] == -5.0 and scores[1][1] > 0


def test_query_walk_stops_when_one_group_is_left_and_scores_on_its_blocks():
    walk = QueryWalk.stratified(num_rows=8, num_groups=2, strata=2, seed=0, z=3.0)
    assert len(walk.blocks) == 4 and all(w is not None for w in walk.weights)
    step = 0
    while True:
        rows = walk.blocks[step].float()
        assert walk.record(step, rows, {j: rows + 1.0 - 2.0 * j + 0.1 * rows for j in walk.alive}) == []
        if not walk.goes_on(step):
            break
        step += 1
    assert step == 1 and walk.alive == [0]  # g1 trails by 2 on every row: dropped after two blocks, so the query stops
    neg_elbo, scores, rows_used = walk.result(num_rows=8, scale=1.0)
    assert rows_used == [4, 4]
    assert neg_elbo == pytest.approx(torch.cat(walk.blocks[:2]).float().mean().item())  # the blocks walked
    assert scores[0][0] - scores[1][0] == pytest.approx(2.0)


def test_query_walk_adds_the_exact_head_to_every_block_estimate():
    # the groups differ by 10 on the two head rows and by 1 elsewhere: the head is taken exactly, so the
    # dropped group's score is the grid mean although no block saw the head rows
    walk = QueryWalk.stratified(num_rows=10, num_groups=2, strata=2, seed=0, z=3.0, head=2)
    assert walk.blocks[0].tolist() == [0, 1]
    step = 0
    while True:
        rows = walk.blocks[step]
        base = rows.float()
        terms = {j: base + torch.where(rows < 2, 10.0, 1.0) * (1 - j) for j in walk.alive}
        assert walk.record(step, base, terms) == []
        if not walk.goes_on(step):
            break
        step += 1
    assert step == 2 and walk.alive == [0]  # the head round, then two blocks
    _, scores, rows_used = walk.result(num_rows=10, scale=1.0)
    assert rows_used == [6, 6]
    assert scores[0][0] == pytest.approx((2 * 10.0 + 8 * 1.0) / 10) and scores[1][0] == pytest.approx(0.0)
    assert scores[0][1] == pytest.approx(0.0, abs=1e-6)  # the head adds no spread, the blocks none either


# -- the adaptive walk of the scorer ------------------------------------------------------------


def test_adaptive_draws_drop_trailing_groups(tiny_unet, tiny_scheduler, monkeypatch):
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler, stride=2)
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
    run_adapter_names_as_models(monkeypatch)
    monkeypatch.setattr(scorer.estimator, "packed_terms", designed_terms)
    images = torch.stack([torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), -0.5)])
    result = scorer.score(images, progress=False, adaptive_z=3.0, adaptive_block=4)
    # every model walks the head; constant gaps resolve once two blocks give a standard error; a tie never
    # does, so g0 and g1 walk the whole grid
    head = math.ceil(ADAPTIVE_HEAD * rows)
    assert result.metadata["rows_used"] == [[head + 8] * 3, [rows, rows, head + 8]] and result.metadata["adaptive_head"] == ADAPTIVE_HEAD
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
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler, stride=2)
    est = scorer.estimator
    image = torch.full((1, 1, 8, 8), 0.5)
    walk, _ = stratified_walk(est.num_rows, 4, derive_seed("guda-order", est.config.seed, est.image_hashes(image)[0]))
    early = set(torch.cat(walk[:2]).tolist())  # the first two blocks, where the first decision is taken

    def designed_terms(model, images, image_index, row_ids, noise, kwargs, forward_rows):
        # g1 and g2 (tied, so the walk goes on) look best early and fall later; g0 is dropped early at
        # 2 while g1's estimate later falls below that: g0 must come back, not win on a frozen estimate
        is_early = torch.tensor([r in early for r in row_ids.tolist()])
        if model is None:
            return torch.zeros(len(row_ids))
        high, low = (2.0, 0.2) if model == "g0" else (5.0, 0.5)
        return torch.where(is_early, high, low)

    run_adapter_names_as_models(monkeypatch)
    monkeypatch.setattr(est, "packed_terms", designed_terms)
    result = scorer.score(image, progress=False, adaptive_z=3.0, adaptive_block=4, adaptive_head=0.0)  # the blocks above
    assert result.metadata["rows_used"][0][0] > 8  # g0 was dropped after two blocks, then brought back
    # back in contention (its gap to the tied leaders is no longer certain), g0 walks on with them to the end
    assert result.metadata["rows_used"][0] == [est.num_rows] * 3
    assert result.top_groups() == ["g1"]  # the full-grid answer (g1 and g2 tie; the first wins)
    assert result.scores[0, 0] < result.scores[0, 1]


@pytest.mark.parametrize("strategy", ["merged", "swap"])
def test_adaptive_scores_do_not_depend_on_the_batch(tiny_unet, tiny_scheduler, strategy):
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    together = scorer.score(images, progress=False, strategy=strategy, adaptive_z=0.5, adaptive_block=4)
    alone = scorer.score(images[1:2], progress=False, strategy=strategy, adaptive_z=0.5, adaptive_block=4)
    one_by_one = scorer.score(images, batch_size=1, progress=False, strategy=strategy, adaptive_z=0.5, adaptive_block=4)
    assert torch.equal(alone.scores[0], together.scores[1])
    assert alone.metadata["rows_used"] == together.metadata["rows_used"][1:2]
    assert torch.equal(one_by_one.scores, together.scores) and one_by_one.metadata["rows_used"] == together.metadata["rows_used"]
    assert min(min(r) for r in together.metadata["rows_used"]) < scorer.estimator.num_rows  # some group was dropped


def test_adaptive_walk_that_never_stops_covers_the_full_grid(tiny_unet, tiny_scheduler):
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    full = scorer.score(images, progress=False)
    walked = scorer.score(images, progress=False, adaptive_z=1e9, adaptive_block=3)
    assert walked.metadata["rows_used"] == [[scorer.estimator.num_rows] * 3] * 2
    assert torch.allclose(walked.scores, full.scores, atol=1e-4, rtol=1e-5)  # same rows, other summation order
    assert torch.allclose(walked.stderr, full.stderr, atol=1e-4, rtol=1e-4)
    assert "rows_used" not in full.metadata


def test_adaptive_settings_are_validated(tiny_unet, tiny_scheduler):
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1"))
    for z, block in ((0.0, 4), (-1.0, 4), (2.0, 1)):
        with pytest.raises(ConfigError, match="adaptive"):
            scorer.score(torch.zeros(1, 1, 8, 8), progress=False, adaptive_z=z, adaptive_block=block)
    for head in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="adaptive_head is a share of the grid"):
            scorer.score(torch.zeros(1, 1, 8, 8), progress=False, adaptive_z=3.0, adaptive_head=head)
