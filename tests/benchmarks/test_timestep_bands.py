"""The timestep-bands script: its bands add up to the evaluation's own LOGO and GUDA scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_benchmark_script

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_bands_add_up_to_the_evaluation_scores(tiny_evaluation, tmp_path, capsys):
    recipe_path, data, out = tiny_evaluation
    module = load_benchmark_script("timestep_bands")
    saved = tmp_path / "bands.json"
    capsys.readouterr()
    module.main(["--eval-dir", str(out), "--data", str(data), "--recipe", str(recipe_path), "--bands", "0", "40", "100",
                 "--strength", "--save", str(saved)])
    printed = capsys.readouterr().out
    record = json.loads(saved.read_text())
    assert record["bands"] == [[0, 40], [40, 100], [0, 100]]
    assert set(record["methods"]) == {"logo_seed_a", "guda"}  # no seed B without a ceiling
    for method in ("logo_seed_a", "guda"):
        low, high, full = (np.asarray(s) for s in record["methods"][method]["band_scores"])
        np.testing.assert_allclose(low + high, full, rtol=1e-9, atol=1e-9)
        stored = np.asarray(json.loads((out / "scores" / f"{method}.json").read_text())["scores"])
        np.testing.assert_allclose(full, stored, rtol=1e-4, atol=1e-4)  # the evaluation's scores, in nats
        assert np.abs(low).sum() > 0 and np.abs(high).sum() > 0
    assert record["methods"]["logo_seed_a"]["metrics"][-1] == {"top1": 1.0, "ndcg@3": 1.0, "spearman": 1.0}
    assert "t in [0, 40)" in printed and "own-group score per band" in printed
