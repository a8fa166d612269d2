"""The unlearning-budget sweep: the recipe's own setting reproduces the evaluation; other settings are counted as it counts."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import load_benchmark_script, write_evaluation_recipe, write_group_folder
from diffusers_guda.cli import main as guda
from diffusers_guda.recipes import Recipe
from guda_lab.evaluation import own_group_ratios
from guda_lab.reuse import reusable_bundle

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_budgets_reproduce_the_evaluation_and_count_passes_as_it_does(tmp_path, capsys):
    recipe_path = write_evaluation_recipe(tmp_path / "recipe.json")
    steps = json.loads(recipe_path.read_text())["unlearning"]["steps"]
    data, out = write_group_folder(tmp_path / "data", ["left", "middle", "right"]), tmp_path / "eval"
    assert guda(["evaluate", "--data", str(data), "--out", str(out), "--recipe", str(recipe_path), "--methods", "guda", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    module = load_benchmark_script("unlearning_budgets")
    capsys.readouterr()
    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--held-out-from", "2",
                 "--setting", "", f"steps={2 * steps}", "--out", str(tmp_path / "sweep.json"), "--plot", str(tmp_path / "sweep.png"),
                 "--save-bundles", str(tmp_path / "bundles")])
    printed = capsys.readouterr().out
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    own, doubled = sweep["rows"]

    # the recipe's own setting retrains the evaluation's very adapters: same scores, ratio, agreement, loss changes
    expected = np.asarray(json.loads((out / "scores" / "guda.json").read_text())["scores"])
    np.testing.assert_allclose(np.asarray(own["scores"]), expected, rtol=0, atol=1e-6)
    assert own["ratio_passes"] == pytest.approx(report["cost_ratio_logo_over_guda_passes"], rel=1e-12)
    for name in ("top1", "ndcg@3", "spearman"):
        assert own[name] == pytest.approx(report["methods"]["guda"][name]["mean"], abs=1e-9)
        assert sweep["ceiling"][name] == pytest.approx(report["methods"]["logo_seed_b"][name]["mean"], abs=1e-9)
        for part in own["parts"].values():
            assert part[name]["diff"] == pytest.approx(0, abs=1e-9)
        # against the ceiling, over both parts together: the evaluation's GUDA − seed B, as the report has it
        sizes = (2, 2)  # 4 queries split at 2
        joint = sum(n * part[name]["ceiling_diff"] for n, part in zip(sizes, own["parts"].values())) / sum(sizes)
        assert joint == pytest.approx(report["methods"]["guda"][name]["mean"] - report["methods"]["logo_seed_b"][name]["mean"], abs=1e-9)
    bundle_stats = [g["stats"] for g in json.loads((out / "bundle" / "guda_bundle.json").read_text())["groups"]]
    np.testing.assert_allclose(own["retain_loss_change_pct"], [100 * s["retain_loss_change"] for s in bundle_stats], rtol=1e-5)
    assert f"{own['ratio_passes']:.0f}x" in printed and "queries from 2: top1" in printed
    reference = np.asarray(json.loads((out / "scores" / "logo_seed_a.json").read_text())["scores"])
    ratios = [None if np.isnan(r) else pytest.approx(r, abs=1e-6) for r in own_group_ratios(expected, reference)]
    assert list(own["own_group_ratios"]) == report["groups"] and list(own["own_group_ratios"].values()) == ratios

    recipe_sampling = json.loads(recipe_path.read_text())["unlearning"].get("timestep_sampling", "uniform")
    assert own["timestep_sampling"] == doubled["timestep_sampling"] == recipe_sampling  # recorded: rows differing only in it stay apart
    assert f"{recipe_sampling} timesteps" in printed
    assert doubled["sample_passes"] == 2 * own["sample_passes"]  # fresh draws: the same batches, twice the steps
    assert set(doubled["steps_per_group"].values()) == {2 * steps}
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a saved bundle is what an evaluation with that setting's recipe reuses, and scores as the sweep did
    recipe = Recipe.load(str(recipe_path))
    fingerprint = json.loads((out / "bundle" / "guda_bundle.json").read_text())["base_model"]["fingerprint"]
    assert reusable_bundle(tmp_path / "bundles" / "setting_1", fingerprint, recipe, "cpu") is None
    doubled_recipe = replace(recipe, unlearning=recipe.unlearning_with(steps=2 * steps))
    saved = reusable_bundle(tmp_path / "bundles" / "setting_1", fingerprint, doubled_recipe, "cpu")
    assert saved is not None and [g.stats["steps"] for g in saved.groups] == [2 * steps] * 3
    assert reusable_bundle(tmp_path / "bundles" / "setting_0", fingerprint, recipe, "cpu") is not None

    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path),
                 "--setting", "exponent=0,shared_draws=2,timesteps=log_snr,rank=2",
                 "--option", "num_neighbors=all", "--option", "target=teacher_posterior", "--option", "preserve=teacher_posterior",
                 "--out", str(tmp_path / "shared.json")])
    (shared,) = json.loads((tmp_path / "shared.json").read_text())["rows"]
    assert shared["objective_options"]["target"] == "teacher_posterior" and shared["timestep_sampling"] == "log_snr"
    assert (shared["lora_rank"], shared["lora_alpha"]) == (2, 2.0)  # alpha follows the rank
    # shared draws: the teacher runs at most twice per image (3 groups of 8) on top of the student's rows
    student = sum(shared["steps_per_group"].values()) * 8  # 4 forget + 4 retain rows per step (the evaluation recipe)
    assert shared["shared_draws"] == 2 and student < shared["sample_passes"] - student <= student + 2 * 24


def test_a_bad_setting_names_the_keys():
    module = load_benchmark_script("unlearning_budgets")
    with pytest.raises(SystemExit, match="KEY one of steps, lr, exponent, shared_draws"):
        module.parse_setting("steps=40,rate=1e-3")
    assert module.parse_setting("steps=40,lr=2e-3,exponent=1,shared_draws=4,timesteps=log_snr,rank=16,alpha=8") == {
        "steps": 40, "learning_rate": 2e-3, "size_exponent": 1.0, "shared_draws": 4, "timestep_sampling": "log_snr",
        "lora_rank": 16, "lora_alpha": 8.0}


def test_budgets_on_an_evaluation_with_logo_on_a_subset_of_groups(tmp_path, capsys):
    recipe_path = write_evaluation_recipe(tmp_path / "recipe.json")
    data, out = write_group_folder(tmp_path / "data", ["left", "middle", "right"]), tmp_path / "eval"
    assert guda(["evaluate", "--data", str(data), "--out", str(out), "--recipe", str(recipe_path), "--methods", "guda",
                 "--logo-groups", "2", "--no-ceiling", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    module = load_benchmark_script("unlearning_budgets")
    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--held-out-from", "0",
                 "--out", str(tmp_path / "sweep.json")])
    assert "(its 2 models scaled to every group)" in capsys.readouterr().out
    (own,) = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert list(own["parts"]) == ["queries from 0"]  # every query held out, paired with the evaluation's GUDA
    # every group is unlearned and scored again; the metrics and the ratio are the evaluation's, on LOGO's columns
    expected = np.asarray(json.loads((out / "scores" / "guda.json").read_text())["scores"])
    np.testing.assert_allclose(np.asarray(own["scores"]), expected, rtol=0, atol=1e-6)
    assert np.asarray(own["scores"]).shape[1] == 3 and len(report["logo_groups"]) == 2
    assert own["ratio_passes"] == pytest.approx(report["cost_ratio_logo_over_guda_passes"], rel=1e-12)
    for name in ("top1", "ndcg@3", "spearman"):
        assert own[name] == pytest.approx(report["methods"]["guda"][name]["mean"], abs=1e-9)
        assert all(part[name]["diff"] == pytest.approx(0, abs=1e-9) for part in own["parts"].values())
