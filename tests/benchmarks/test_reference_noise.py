"""The reference-noise comparison of two runs: LOGO with one draw against LOGO with N, and draws 1..N-1 alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_benchmark_script


def write_run(run, logo: np.ndarray, methods: dict[str, np.ndarray], draws: int) -> None:
    (run / "scores").mkdir(parents=True)
    report = {"groups": [f"g{k}" for k in range(logo.shape[1])], "logo_groups": None, "num_queries": len(logo),
              "methods": list(methods), "recipe": {"elbo": {"num_draws": 1}}, "reference_elbo": {"num_draws": draws}}
    (run / "report.json").write_text(json.dumps(report))
    for name, scores in {"logo_seed_a": logo, **methods}.items():
        (run / "scores" / f"{name}.json").write_text(json.dumps({"scores": scores.tolist()}))


def test_draws_after_the_first_are_separated_from_it(tmp_path):
    """Draw 0 puts group 0 first on every query, draws 1-3 put group 1 first: the one-draw reference never agrees with
    the independent estimate, and a method that follows draws 1-3 agrees with it fully."""
    rng = np.random.default_rng(0)
    queries = 20
    draw0 = rng.normal(size=(queries, 3)) + np.array([10.0, 0, 0])
    later = rng.normal(size=(queries, 3)) + np.array([0, 10.0, 0])  # the mean of draws 1-3
    four = (draw0 + 3 * later) / 4
    follower, guda = later + 0.01, draw0.copy()
    one_run, four_run = tmp_path / "one", tmp_path / "four"
    write_run(one_run, draw0, {"guda": guda, "follower": follower}, draws=1)
    write_run(four_run, four, {"guda": guda, "follower": follower}, draws=4)
    module = load_benchmark_script("reference_noise")
    np.testing.assert_allclose(module.independent_estimate(draw0, four, 4), later)
    result = module.main([str(one_run), str(four_run), "--queries", "5:"])
    assert result["queries"] == 15 and result["draws"] == 4
    assert result["self_agreement"]["top1"] == 0.0
    assert result["methods"]["follower"]["draws 1-3"]["top1"] == 1.0
    assert result["methods"]["guda"]["1 draw"]["top1"] == 1.0
    gap, se = result["methods"]["follower"]["guda_minus_against_independent"]["top1"]
    assert gap == -1.0 and se == 0.0


def test_the_runs_must_be_one_evaluation_with_one_and_n_draws(tmp_path):
    logo = np.eye(3)
    module = load_benchmark_script("reference_noise")
    write_run(tmp_path / "a", logo, {"guda": logo}, draws=1)
    write_run(tmp_path / "b", logo, {"guda": logo}, draws=1)
    with pytest.raises(SystemExit, match="1 draw, then with N >= 2"):
        module.main([str(tmp_path / "a"), str(tmp_path / "b")])
    write_run(tmp_path / "c", logo, {"guda": logo + 1}, draws=2)
    with pytest.raises(SystemExit, match="guda's scores differ"):
        module.main([str(tmp_path / "a"), str(tmp_path / "c")])
