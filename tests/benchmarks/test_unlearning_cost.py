"""The unlearning-budget sweep: its passes ratio is the evaluation's, its recipe row reproduces GUDA's scores."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark_script, write_evaluation_recipe, write_group_folder
from diffusers_guda import UnlearningConfig
from diffusers_guda.cli import main as guda

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_the_sweep_counts_passes_as_the_evaluation_does_and_draws_the_curve(tmp_path, capsys):
    recipe_path = write_evaluation_recipe(tmp_path / "recipe.json")
    steps = json.loads(recipe_path.read_text())["unlearning"]["steps"]
    data, out = write_group_folder(tmp_path / "data", ["left", "middle", "right"]), tmp_path / "eval"
    assert guda(["evaluate", "--data", str(data), "--out", str(out), "--recipe", str(recipe_path), "--methods", "guda", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    module = load_benchmark_script("unlearning_cost")
    learning_rate = UnlearningConfig().learning_rate  # the tiny recipe keeps the default
    own, doubled = f"{steps}:{learning_rate}", f"{2 * steps}:{learning_rate}"
    capsys.readouterr()
    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--settings", own, doubled,
                 "--out", str(tmp_path / "sweep.json"), "--plot", str(tmp_path / "sweep.png")])
    printed = capsys.readouterr().out
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    first, second = sweep["rows"]
    # the recipe's own budget retrains the evaluation's adapters: same ratio, same agreement with LOGO
    assert first["ratio_passes"] == pytest.approx(report["cost_ratio_logo_over_guda_passes"], rel=1e-12)
    for name in ("top1", "ndcg@3", "spearman"):
        assert first[name] == pytest.approx(report["methods"]["guda"][name]["mean"], abs=1e-9)
        assert sweep["ceiling"][name] == pytest.approx(report["methods"]["logo_seed_b"][name]["mean"], abs=1e-9)
    assert second["sample_passes"] == 2 * first["sample_passes"]  # same batches, twice the steps
    assert f"{first['ratio_passes']:.0f}x" in printed
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
