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


def test_main_digit_rates_count_top_groups_holding_the_querys_digit(tmp_path):
    """Queries of digits 0, 1, 2 against contributors crowd-010 (main digit 0), crowd-001 (1) and crowd-003 (3)."""
    from PIL import Image

    from diffusers_guda.data import load_digits

    digits = load_digits()
    run = tmp_path / "run"
    (run / "queries").mkdir(parents=True)
    (run / "scores").mkdir()
    for i, d in enumerate((0, 1, 2)):
        index = int((digits.group_ids == d).nonzero()[0])
        pixels = ((digits.images[index, 0].numpy() + 1) * 127.5).round().astype("uint8")
        Image.fromarray(pixels, mode="L").save(run / "queries" / f"{i:04d}.png")
    groups = ["crowd-010", "crowd-001", "crowd-003", "crowd-005"]
    report = {"groups": groups, "logo_groups": groups[:3], "num_queries": 3, "methods": ["guda"]}
    # all four groups scored; the digit-2 query has no contributor of its digit among LOGO's three
    right = [[5, 0, 0, 9], [0, 5, 0, 0], [0, 0, 5, 0]]
    wrong = [[0, 5, 0, 0], [0, 5, 0, 0], [5, 0, 0, 0]]
    (run / "scores" / "guda.json").write_text(json.dumps({"scores": right}))
    (run / "scores" / "logo_seed_a.json").write_text(json.dumps({"scores": [row[:3] for row in wrong]}))
    # a method of an earlier run on fewer queries, which this run's report does not hold
    (run / "scores" / "gradient.json").write_text(json.dumps({"scores": right[:1]}))
    rates = load_benchmark_script("group_scaling").main_digit_rates(run, report)
    assert rates == {"guda": 1.0, "logo_seed_a": 0.5}
