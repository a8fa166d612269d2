"""Tests of diffusers_guda.scoring.result: AttributionResult helpers, shards joined, score statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusers_guda import AttributionResult
from diffusers_guda.scoring import concatenate_results, mean_and_stderr

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


def _shard(rows: slice, forwards: int, rows_used: bool) -> AttributionResult:
    whole = make_result()
    metadata = {"note": "test", "row_forwards": forwards}
    if rows_used:
        metadata["rows_used"] = [[rows.start, 1, 1]] * (rows.stop - rows.start)
    return AttributionResult(whole.scores[rows], whole.stderr[rows], whole.groups, whole.neg_elbo[rows], whole.image_hashes[rows], metadata)


@pytest.mark.parametrize("rows_used", [False, True])
def test_concatenate_results_joins_consecutive_shards(rows_used):
    whole = make_result()
    parts = [_shard(slice(0, 1), 5, rows_used), _shard(slice(1, 1), 0, rows_used), _shard(slice(1, 3), 7, rows_used)]
    joined = concatenate_results(parts)
    for key in ("scores", "stderr", "neg_elbo"):
        assert torch.equal(getattr(joined, key), getattr(whole, key)), key
    assert joined.groups == whole.groups and joined.image_hashes == whole.image_hashes
    assert joined.metadata["row_forwards"] == 12 and joined.metadata["note"] == "test"
    if rows_used:
        assert joined.metadata["rows_used"] == [[0, 1, 1], [1, 1, 1], [1, 1, 1]]
    else:
        assert "rows_used" not in joined.metadata


def test_mean_and_stderr_of_paired_differences():
    diff = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    score, stderr = mean_and_stderr(diff, scale=10.0)
    assert torch.allclose(score, torch.tensor([30.0, 5.0]))
    assert torch.allclose(stderr, 10.0 * diff.std(dim=1) / 2.0) and stderr[1] == 0
    one_score, one_stderr = mean_and_stderr(torch.tensor([2.5]), scale=4.0)
    assert one_score == 10.0 and math.isnan(one_stderr)  # a single difference has no spread
