"""The scoring-throughput benchmark on a finished evaluation's bundle: every exact strategy gives sequential's scores."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark_script

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_every_strategy_is_measured_and_the_exact_ones_agree(tiny_evaluation, tmp_path, capsys):
    _, _, out = tiny_evaluation
    module = load_benchmark_script("scoring_throughput")
    saved = tmp_path / "throughput.json"
    module.main(["--base", str(out / "base"), "--bundle", str(out / "bundle"), "--queries", str(out / "queries"),
                 "--num-queries", "3", "--repeats", "1", "--ks", "3", "--adaptive-head", "0", "0.05", "--adaptive-block", "8", "4",
                 "--work", str(tmp_path / "work"), "--out", str(saved)])
    report = json.loads(saved.read_text())
    entry = report["k3"]
    adaptive = [f"merged+adaptive(z=3, head={h}, block={b})" for h in ("0", "0.05") for b in (8, 4)]
    assert set(entry) == {"sequential", "reload", "mixed", "merged", *adaptive} and report["num_queries"] == 3
    for name in ("reload", "mixed", "merged"):
        assert entry[name]["top1_agreement"] == 1.0 and entry[name]["max_abs_score_diff_vs_sequential"] < 1e-3, name
        assert entry[name]["forwards"] == entry["sequential"]["forwards"] > 0, name
    for name in adaptive:
        assert entry[name]["forwards"] <= entry["sequential"]["forwards"], name
    assert "| merged |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="the bundle has 3 groups"):
        module.main(["--base", str(out / "base"), "--bundle", str(out / "bundle"), "--queries", str(out / "queries"), "--ks", "7",
                     "--work", str(tmp_path / "work")])
