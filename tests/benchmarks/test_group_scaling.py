"""The group-scaling summary: per-group costs and metrics read from finished evaluations at several K."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark_script, write_group_folder

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_rows_divide_each_runs_costs_by_its_groups(tiny_evaluation, tmp_path, capsys):
    from diffusers_guda.cli import main as guda

    recipe, _, three = tiny_evaluation
    data, four = write_group_folder(tmp_path / "data4", ["a", "b", "c", "d"]), tmp_path / "eval4"
    assert guda(["evaluate", "--data", str(data), "--out", str(four), "--recipe", str(recipe), "--no-ceiling",
                 "--methods", "guda", "similarity", "--logo-groups", "2", "--quiet"]) == 0
    capsys.readouterr()
    module = load_benchmark_script("group_scaling")
    saved, picture = tmp_path / "scaling.json", tmp_path / "scaling.png"
    rows = module.main([str(four), str(three), "--out", str(saved), "--plot", str(picture)])
    assert json.loads(saved.read_text()) == json.loads(json.dumps(rows))
    assert [r["k"] for r in rows] == [3, 4] and [r["logo_groups"] for r in rows] == [3, 2]
    for row, run in zip(rows, (three, four)):
        report = json.loads((run / "report.json").read_text())
        unlearning, logo = report["cost"]["guda_unlearning"], report["cost"]["logo_seed_a"]
        assert row["unlearning_passes_per_group"] == (unlearning["forwards"] + unlearning["backwards"]) / row["k"]
        assert row["logo_passes_per_model"] == (logo["forwards"] + logo["backwards"]) / logo["models"]
        assert row["metrics"]["guda"]["top1"][0] == report["methods"]["guda"]["top1"]["mean"]
    assert set(rows[1]["metrics"]) == {"guda", "similarity"}
    out = capsys.readouterr().out
    assert "| 3 | 8 | 3 |" in out and "| 4 | 8 | 2 |" in out and "| similarity |" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
