"""The size-scaled unlearning script: at the recipe's budget it reproduces the evaluation's GUDA scores; shared draws are counted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_benchmark_script

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_same_budget_reproduces_the_evaluation_scores(tiny_evaluation, tmp_path, capsys):
    recipe_path, data, out = tiny_evaluation
    module = load_benchmark_script("size_scaled_unlearning")
    saved = tmp_path / "scaled.json"
    capsys.readouterr()
    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--exponent", "0", "--save", str(saved),
                 "--held-out-from", "2"])
    printed = capsys.readouterr().out
    result = json.loads(saved.read_text())
    assert result["groups"] == ["left", "middle", "right"] and result["steps"] == [2, 2, 2]
    # the same settings give the very adapters, hence the very scores, of the evaluation's bundle
    expected = np.asarray(json.loads((out / "scores" / "guda.json").read_text())["scores"])
    np.testing.assert_allclose(np.asarray(result["scores"]), expected, rtol=0, atol=1e-6)
    assert f"top1 {result['summary']['top1']['mean']:.3f}" in printed
    # the same adapters: no difference from the evaluation's GUDA on either part of the queries
    assert "queries before 2: top1" in printed and "queries from 2: top1" in printed
    assert printed.count("(+0.000 ± 0.000)") == 6
    # the loss changes are the evaluation bundle's (the same adapters), reported as the core's acceptance reads them
    bundle_stats = [g["stats"] for g in json.loads((out / "bundle" / "guda_bundle.json").read_text())["groups"]]
    for key in ("forget_loss_change", "retain_loss_change"):
        np.testing.assert_allclose(result[key], [100 * s[key] for s in bundle_stats], rtol=1e-5)
    assert f"retain-set loss change max {max(result['retain_loss_change']):+.1f} %" in printed

    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--steps", "4", "--option", "preserve=mse",
                 "--option", "num_neighbors=2", "--save", str(saved)])
    assert json.loads(saved.read_text())["steps"] == [4, 4, 4]  # equal groups: size scaling changes nothing

    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--exponent", "0", "--shared-draws", "2",
                 "--option", "num_neighbors=all", "--option", "target=teacher_posterior", "--option", "preserve=teacher_posterior",
                 "--save", str(saved)])
    shared = json.loads(saved.read_text())
    student = sum(shared["steps"]) * 8  # 4 forget + 4 retain rows per step (the evaluation recipe)
    assert shared["shared_draws"] == 2 and shared["sample_passes"]["backwards"] == student
    assert student < shared["sample_passes"]["forwards"] <= student + 2 * 24  # the teacher at most twice per image (3 groups of 8)
