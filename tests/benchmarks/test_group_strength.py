"""The group-strength diagnostics: own-group ratios, oracle rescaling and the main-digit split of a finished run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_benchmark_script


def write_run(run, reference: np.ndarray, methods: dict[str, np.ndarray]) -> None:
    (run / "scores").mkdir(parents=True)
    groups = [f"g{k}" for k in range(reference.shape[1])]
    (run / "report.json").write_text(json.dumps({"groups": groups, "logo_groups": None, "num_queries": len(reference),
                                                 "methods": list(methods)}))
    for name, scores in {"logo_seed_a": reference, **methods}.items():
        (run / "scores" / f"{name}.json").write_text(json.dumps({"scores": scores.tolist()}))


def test_a_method_off_by_one_scale_per_group_is_recovered_by_the_oracle(tmp_path, capsys):
    rng = np.random.default_rng(0)
    reference = rng.gamma(2.0, size=(60, 4))
    factors = np.array([2.0, 0.5, 1.0, 3.0])
    run = tmp_path / "run"
    write_run(run, reference, {"scaled": reference * factors, "exact": reference.copy()})
    module = load_benchmark_script("group_strength")
    saved = tmp_path / "strength.json"
    results = module.main([str(run), "--held-out-from", "30", "--out", str(saved)])
    assert json.loads(saved.read_text()) == json.loads(json.dumps(results))

    scaled = results["scaled"]
    np.testing.assert_allclose(scaled["own_group_ratios"], factors)
    assert scaled["spread"] == pytest.approx(np.std(factors, ddof=1) / np.mean(factors))
    for fit in ("own-group ratio", "least-squares slope"):
        np.testing.assert_allclose(scaled["oracle"][fit]["factors"], factors)
        top1, gain, _ = scaled["oracle"][fit]["held_out"]["top1"]
        assert top1 == 1.0 and gain > 0  # rescaled, the scores are LOGO's; unscaled, the large factors won some queries
    exact = results["exact"]
    assert exact["spread"] == 0.0
    assert exact["oracle"]["own-group ratio"]["held_out"]["spearman"] == (1.0, 0.0, 0.0)
    assert "| scaled | own-group ratio | 1.000 |" in capsys.readouterr().out


def test_methods_must_be_in_the_report(tmp_path):
    run = tmp_path / "run"
    write_run(run, np.eye(4), {"guda": np.eye(4)})
    with pytest.raises(SystemExit, match="no scores of das"):
        load_benchmark_script("group_strength").main([str(run), "--methods", "das", "--held-out-from", "2"])


def test_main_digit_split_separates_the_expected_answer_from_others(tmp_path):
    """Three digit queries (0, 1, 2) against contributors of main digits 0, 1 and 3: LOGO's top is the main contributor
    for the first two queries and another group for the third."""
    from PIL import Image

    from diffusers_guda.data import load_digits

    digits = load_digits()
    run = tmp_path / "run"
    (run / "queries").mkdir(parents=True)
    for i, d in enumerate((0, 1, 2)):
        index = int((digits.group_ids == d).nonzero()[0])
        pixels = ((digits.images[index, 0].numpy() + 1) * 127.5).round().astype("uint8")
        Image.fromarray(pixels, mode="L").save(run / "queries" / f"{i:04d}.png")
    report = {"groups": ["crowd-000", "crowd-001", "crowd-003"], "num_queries": 3}
    reference = np.array([[4.0, 1, 0], [1, 8, 0], [2, 0, 1]])
    # finds query 0's main contributor at half LOGO's score, misses query 1's (a quarter), finds query 2's answer
    method = np.array([[2.0, 1, 0], [3, 2, 0], [3, 0, 1]])
    split = load_benchmark_script("group_strength").main_digit_agreement(
        run, report, [0, 1, 2], {"guda": method}, reference, split=0)["guda"]
    assert split["LOGO top is the main contributor"] == (2, 0.5)
    assert split["LOGO top is another group"] == (1, 1.0)
    assert split["main contributor's score / LOGO's, found"] == 0.5
    assert split["main contributor's score / LOGO's, missed"] == 0.25
    assert split["LOGO's score, found"] == 4.0 and split["LOGO's score, missed"] == 8.0
