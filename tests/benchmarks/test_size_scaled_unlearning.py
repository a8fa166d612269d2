"""The size-scaled unlearning script: one group at a time, it reproduces the evaluation's GUDA scores."""

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
    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--exponent", "0", "--save", str(saved)])
    printed = capsys.readouterr().out
    result = json.loads(saved.read_text())
    assert result["groups"] == ["left", "middle", "right"] and result["steps"] == [2, 2, 2]
    # each group unlearned alone gives the very adapter, hence the very scores, of the joint bundle
    expected = np.asarray(json.loads((out / "scores" / "guda.json").read_text())["scores"])
    np.testing.assert_allclose(np.asarray(result["scores"]), expected, rtol=0, atol=1e-6)
    assert f"top1 {result['summary']['top1']['mean']:.3f}" in printed
    # the loss changes are the evaluation bundle's (the same adapters), reported as the core's acceptance reads them
    bundle_stats = [g["stats"] for g in json.loads((out / "bundle" / "guda_bundle.json").read_text())["groups"]]
    for key in ("forget_loss_change", "retain_loss_change"):
        np.testing.assert_allclose(result[key], [100 * s[key] for s in bundle_stats], rtol=1e-5)
    assert f"retain-set loss change max {max(result['retain_loss_change']):+.1f} %" in printed

    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--steps", "4", "--option", "preserve=mse",
                 "--option", "num_neighbors=2", "--save", str(saved)])
    assert json.loads(saved.read_text())["steps"] == [4, 4, 4]  # equal groups: size scaling changes nothing
