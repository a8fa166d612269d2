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


def test_a_query_range_is_tabulated_from_the_runs_scores(tiny_evaluation, capsys):
    import json

    import numpy as np

    from diffusers_guda.cli import main as guda
    from guda_lab.evaluation.metrics import per_query_metrics
    from guda_lab.evaluation.results_table import parse_query_range, restrict_to_queries

    recipe, data, out = tiny_evaluation
    assert guda(["evaluate", "--data", str(data), "--out", str(out), "--recipe", str(recipe), "--no-ceiling",
                 "--methods", "guda", "similarity", "--quiet"]) == 0  # adds a baseline to the finished run
    report = load_report(out)
    capsys.readouterr()

    whole = restrict_to_queries(report, out, 0)
    for method in ("guda", "similarity"):
        for name in TABLE_METRICS:
            assert whole["methods"][method][name]["mean"] == pytest.approx(report["methods"][method][name]["mean"])
    assert whole["paired"] == report["paired"]  # the scores files hold the exact float64 values

    part = restrict_to_queries(report, out, 2)
    scores = {m: np.asarray(json.loads((out / "scores" / f"{m}.json").read_text())["scores"])[2:]
              for m in ("logo_seed_a", "guda", "similarity")}
    own = per_query_metrics(scores["guda"], scores["logo_seed_a"], list(TABLE_METRICS))
    theirs = per_query_metrics(scores["similarity"], scores["logo_seed_a"], list(TABLE_METRICS))
    for name in TABLE_METRICS:
        assert part["methods"]["guda"][name]["n"] == 2
        assert part["methods"]["guda"][name]["mean"] == pytest.approx(own[name].mean())
        assert part["paired"]["versus"]["similarity"][name]["mean_diff"] == pytest.approx((own[name] - theirs[name]).mean())
    assert part["cost"] == report["cost"] and part["query_range"] == [2, 4]
    assert run_table(part).splitlines()[0].startswith(f"**{report['recipe']['name']}** — queries 2–3 of 4 (seeds 2–3; costs are the whole run's)")

    assert guda(["results", str(out), "--queries", "2:"]) == 0
    assert capsys.readouterr().out == results_markdown([out], (2, None))
    assert parse_query_range("100:300") == (100, 300)
    for bad in ("3:2", "2", "a:", "-1:"):
        with pytest.raises(ConfigError, match="START:STOP or START:"):
            parse_query_range(bad)
    with pytest.raises(ConfigError, match="has 4 queries; the range 0:9 is outside 0:4"):
        restrict_to_queries(report, out, 0, 9)

    # other metrics as columns, computed from the same scores files
    names = ["spearman_others", "ndcg@2"]
    own, theirs = (per_query_metrics(scores[m], scores["logo_seed_a"], names) for m in ("guda", "similarity"))
    lines = results_markdown([out], (2, None), names).splitlines()
    assert lines[lines.index("```") + 2] == ("| method | Spearman (others) | NDCG@2 | GUDA − method, Spearman (others) | "
                                             "GUDA − method, NDCG@2 | wall (s) | sample passes |")
    guda_row = next(line for line in lines if line.startswith("| **GUDA**")).split(" | ")
    assert guda_row[1] == f"{own['spearman_others'].mean():.3f} ± {own['spearman_others'].std(ddof=1) / math.sqrt(2):.3f}"
    similarity_row = next(line for line in lines if line.startswith("| similarity")).split(" | ")
    difference = own["ndcg@2"] - theirs["ndcg@2"]
    assert similarity_row[4] == f"{difference.mean():+.3f} ± {difference.std(ddof=1) / math.sqrt(2):.3f}"
    assert guda(["results", str(out), "--metrics", *names]) == 0
    assert capsys.readouterr().out == results_markdown([out], None, names)
    assert guda(["results", str(out), "--metrics", "top1", "recall"]) == 2
    assert "unknown metric 'recall'" in capsys.readouterr().err
    (out / "scores" / "similarity.json").unlink()
    assert guda(["results", str(out), "--queries", "0:"]) == 2
    assert "Cannot read similarity's scores" in capsys.readouterr().err
