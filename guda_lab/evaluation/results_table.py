"""The results page's tables, built from finished evaluations' ``report.json`` files (``guda results``).

Every row of docs/results.md's benchmark tables comes from one evaluation directory: its methods'
top-1, NDCG@3 and Spearman against LOGO seed A (mean ± standard error over the queries), GUDA minus
each method paired over the same queries, each method's wall time and sample passes, and the command
that reproduces the run. Writing the tables from the reports, rather than by hand, keeps the page
and the runs in step. See docs/evaluation.md#the-results-tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from diffusers_guda.errors import ConfigError

from .report import CEILING, PAIRED_METHOD, REFERENCE

#: The metrics of the results tables, in the column order and with the headings of docs/results.md.
TABLE_METRICS = {"top1": "top-1", "ndcg@3": "NDCG@3", "spearman": "Spearman"}

__all__ = ["TABLE_METRICS", "load_report", "results_markdown", "run_table"]


def load_report(run_dir: str | Path) -> dict:
    """The ``report.json`` of a finished evaluation directory.

    Raises:
        ConfigError: if the directory has no readable report (the evaluation has not finished).
    """
    path = Path(run_dir) / "report.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no report.json; finish the evaluation there first (rerun `guda evaluate` to resume).") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}; rerun `guda evaluate` there to rewrite it.") from None


def _mean_se(entry: dict) -> str:
    n = entry["n"]
    se = entry["std"] / math.sqrt(n) if n > 1 else float("nan")
    return f"{entry['mean']:.3f} ± {se:.3f}"


def _paired(entry: dict | None) -> str:
    if entry is None:
        return ""
    se = entry["stderr"]
    return f"{entry['mean_diff']:+.3f}" + ("" if se is None else f" ± {se:.3f}")


def _cost(report: dict, method: str) -> tuple[str, str]:
    """(wall seconds, forward + backward sample passes) of a method in the run, training included for LOGO and GUDA."""
    cost = report["cost"]
    stages = {REFERENCE: [REFERENCE, f"{REFERENCE}_scoring"], CEILING: [CEILING, f"{CEILING}_scoring"],
              PAIRED_METHOD: ["guda_unlearning", PAIRED_METHOD]}.get(method, [method])
    found = [cost[s] for s in stages if s in cost]
    if not found:
        return "", ""
    wall = sum(c.get("wall_s", 0.0) for c in found)
    passes = sum(c.get("forwards", 0) + c.get("backwards", 0) for c in found)
    approximate = any("note" in c for c in found)
    return f"{wall:,.0f}", ("~" if approximate else "") + f"{passes:,}"


def run_table(report: dict) -> str:
    """One evaluation's results table (markdown): a heading line, the command, and one row per method."""
    queries, seed = report["num_queries"], report["seeds"]["queries"]
    title = report.get("benchmark") or report["recipe"]["name"]
    subset = report.get("logo_groups")
    lines = [f"**{title}** — {queries} queries from seed {seed}, recipe `{report['recipe']['name']}`, "
             f"against LOGO seed {report['seeds']['logo_seed_a']}"
             + (f" on {len(subset)} of the {len(report['groups'])} groups (LOGO trained for those only)" if subset else "")]
    if report.get("command"):
        lines += ["", "```bash", report["command"], "```"]
    paired = (report.get("paired") or {}).get("versus", {})
    heads = list(TABLE_METRICS.values())
    lines += ["", "| method | " + " | ".join(heads) + " | " + " | ".join(f"GUDA − method, {h}" for h in heads)
              + " | wall (s) | sample passes |",
              "|---" * (2 + 2 * len(heads) + 1) + "|"]
    for method, summary in report["methods"].items():
        name = {CEILING: "LOGO seed B (ceiling)", PAIRED_METHOD: "**GUDA**"}.get(method, method)
        cells = [_mean_se(summary[m]) for m in TABLE_METRICS]
        diffs = [_paired(paired.get(method, {}).get(m)) for m in TABLE_METRICS]
        lines.append("| " + " | ".join([name, *cells, *diffs, *_cost(report, method)]) + " |")
    return "\n".join(lines)


def results_markdown(run_dirs: Sequence[str | Path]) -> str:
    """The tables of several evaluation directories, in the order given, separated by blank lines."""
    if not run_dirs:
        raise ConfigError("Name at least one finished evaluation directory.")
    return "\n\n".join(run_table(load_report(d)) for d in run_dirs) + "\n"
