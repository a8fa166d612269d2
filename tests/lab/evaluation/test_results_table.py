"""The results tables: one row per method of a finished evaluation, mean ± standard error, GUDA minus
each method paired, cost, and the command."""

from __future__ import annotations

import math

import pytest

from diffusers_guda.errors import ConfigError
from guda_lab.evaluation.results_table import TABLE_METRICS, load_report, results_markdown, run_table

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_a_finished_evaluation_becomes_a_table(tiny_evaluation, tmp_path):
    from diffusers_guda.cli import main as guda

    _, data, out = tiny_evaluation
    report = load_report(out)
    assert report["benchmark"] is None  # --data, not a named benchmark
    assert report["command"].startswith(f"guda evaluate --data {data} --out {out}") and report["command"].endswith("--quiet")
    table = run_table(report)
    lines = table.splitlines()
    assert lines[0].startswith(f"**{report['recipe']['name']}** — 4 queries from seed 0")
    assert report["command"] in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == ["| **GUDA**"]  # --no-ceiling --methods guda: the reference is not a row
    guda_row = rows[0].split(" | ")
    top1 = report["methods"]["guda"]["top1"]
    assert guda_row[1] == f"{top1['mean']:.3f} ± {top1['std'] / math.sqrt(top1['n']):.3f}"
    assert len(guda_row) == 1 + 2 * len(TABLE_METRICS) + 2
    cost = report["cost"]
    passes = cost["guda_unlearning"]["forwards"] + cost["guda_unlearning"]["backwards"] + cost["guda"]["forwards"]
    assert guda_row[-1].rstrip(" |") == f"~{passes:,}"  # the unlearning's count leaves out its loss checks
    assert guda_row[-2] == f"{cost['guda_unlearning']['wall_s'] + cost['guda']['wall_s']:,.0f}"

    tables = tmp_path / "tables.md"
    assert guda(["results", str(out), str(out), "--out", str(tables)]) == 0
    assert tables.read_text() == results_markdown([out, out]) and tables.read_text().count("**GUDA**") == 2


def test_unfinished_or_broken_runs_are_named(tmp_path, capsys):
    from diffusers_guda.cli import main as guda

    with pytest.raises(ConfigError, match="has no report.json; finish the evaluation"):
        load_report(tmp_path)
    assert guda(["results", str(tmp_path), "--out", str(tmp_path / "tables.md")]) == 2
    assert "has no report.json" in capsys.readouterr().err and not (tmp_path / "tables.md").exists()
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(ConfigError, match="Cannot read"):
        load_report(tmp_path)
    with pytest.raises(ConfigError, match="at least one"):
        results_markdown([])
