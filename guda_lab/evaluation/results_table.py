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

import numpy as np

from diffusers_guda.errors import ConfigError

from .metrics import METRIC_NAMES, metric_function
from .report import CEILING, PAIRED_METHOD, PAIRED_METRICS, REFERENCE, metric_sections, paired_differences, reference_draws

#: Column headings of the metrics a table can show (``guda results --metrics``); ``ndcg@<k>`` reads ``NDCG@<k>``.
METRIC_HEADINGS = {"top1": "top-1", "ndcg@3": "NDCG@3", "spearman": "Spearman", "top3": "top-3", "mrr": "MRR", "rbo": "RBO",
                   "kendall": "Kendall", "spearman_others": "Spearman (others)"}
#: The metrics of the results tables, in the column order and with the headings of docs/results.md: the
#: report's paired metrics.
TABLE_METRICS = {name: METRIC_HEADINGS[name] for name in PAIRED_METRICS}

__all__ = ["METRIC_HEADINGS", "TABLE_METRICS", "load_report", "parse_metrics", "parse_query_range", "restrict_to_queries",
           "results_markdown", "run_table"]


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


def logo_columns(report: dict) -> list[int]:
    """Indices into ``report["groups"]`` of the groups LOGO was trained for: a ``--logo-groups`` subset, else every group."""
    names = report["groups"]
    return [names.index(g) for g in report.get("logo_groups") or names]


def method_scores(report: dict, run_dir: str | Path, method: str) -> np.ndarray:
    """``[N, len(logo_columns(report))]`` float64: a method's scores in a finished run, on the groups LOGO was
    trained for (LOGO's own files hold only those columns).

    Raises:
        ConfigError: if the method's scores file is missing or unreadable.
    """
    path = Path(run_dir) / "scores" / f"{method}.json"
    try:
        values = np.asarray(json.loads(path.read_text())["scores"], dtype=np.float64)
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ConfigError(f"Cannot read {method}'s scores in {path} ({exc}); rerun `guda evaluate` there to rewrite them.") from None
    return values if method in (REFERENCE, CEILING) else values[:, logo_columns(report)]


def parse_query_range(text: str) -> tuple[int, int | None]:
    """``"START:STOP"`` or ``"START:"`` (to the last query) as ``(start, stop)``, e.g. ``"100:"`` for held-out queries 100 on.

    Raises:
        ConfigError: if the text is not of that form.
    """
    head, sep, tail = text.partition(":")
    try:
        start, stop = int(head), (int(tail) if tail.strip() else None)
    except ValueError:
        start = stop = None
    if not sep or start is None or start < 0 or (stop is not None and stop <= start):
        raise ConfigError(f"A query range is START:STOP or START: with 0 <= START < STOP (e.g. 100:300 or 100:), got {text!r}.")
    return start, stop


def parse_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """Metric names for a table's columns, checked: each of :data:`METRIC_HEADINGS` or ``ndcg@<k>``.

    Raises:
        ConfigError: naming an unknown metric and the known ones.
    """
    if not names:
        raise ConfigError(f"Name at least one metric: {', '.join(METRIC_NAMES)} or ndcg@<k>.")
    for name in names:
        metric_function(name)
    return tuple(dict.fromkeys(names))


def _heading(name: str) -> str:
    return METRIC_HEADINGS.get(name) or name.replace("ndcg", "NDCG")


def restrict_to_queries(report: dict, run_dir: str | Path, start: int, stop: int | None = None,
                        metrics: Sequence[str] = PAIRED_METRICS) -> dict:
    """The report with its ``methods`` and ``paired`` sections recomputed on queries ``start`` to ``stop - 1``.

    The scores come from the run's ``scores/<method>.json`` files, so a run whose first queries chose
    a setting can report its held-out ones alone, and GUDA's paired differences can be had on
    ``metrics`` its report did not pair (e.g. ``spearman_others``). Costs stay the whole run's.
    The returned report carries ``query_range: [start, stop]``.

    Raises:
        ConfigError: if the range is outside the run's queries or a method's scores file is missing.
    """
    n = report["num_queries"]
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ConfigError(f"{run_dir} has {n} queries; the range {start}:{stop} is outside 0:{n}.")
    scores = {method: method_scores(report, run_dir, method)[start:stop] for method in [REFERENCE, *report["methods"]]}
    compared = list(report["methods"])
    names = list(dict.fromkeys([*METRIC_NAMES, *metrics]))  # every report metric, and any ndcg@<k> asked for
    sections = metric_sections(scores, compared, labels=None, ceiling=CEILING in compared, names=names)
    others = [m for m in compared if m != PAIRED_METHOD]
    paired = paired_differences(scores, others, names=metrics) if PAIRED_METHOD in compared and others else None
    return report | {"methods": sections["methods"], "paired": paired, "query_range": [start, stop]}


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


def run_table(report: dict, metrics: Sequence[str] = tuple(TABLE_METRICS)) -> str:
    """One evaluation's results table (markdown): a heading line, the command, and one row per method
    with ``metrics`` (each in the report's ``methods`` and ``paired`` sections) as columns."""
    queries, seed = report["num_queries"], report["seeds"]["queries"]
    title = report.get("benchmark") or report["recipe"]["name"]
    subset = report.get("logo_groups")
    if report.get("query_range"):
        start, stop = report["query_range"]
        described = (f"queries {start}–{stop - 1} of {queries} (seeds {seed + start}–{seed + stop - 1}; "
                     f"costs are the whole run's)")
    else:
        described = f"{queries} queries from seed {seed}"
    lines = [f"**{title}** — {described}, recipe `{report['recipe']['name']}`, "
             f"against LOGO seed {report['seeds']['logo_seed_a']}"
             + (f" on {len(subset)} of the {len(report['groups'])} groups (LOGO trained for those only)" if subset else "")
             + (f", LOGO scored with {reference_draws(report)} draws per timestep" if reference_draws(report) else "")]
    if report.get("command"):
        lines += ["", "```bash", report["command"], "```"]
    paired = (report.get("paired") or {}).get("versus", {})
    heads = [_heading(m) for m in metrics]
    lines += ["", "| method | " + " | ".join(heads) + " | " + " | ".join(f"GUDA − method, {h}" for h in heads)
              + " | wall (s) | sample passes |",
              "|---" * (2 + 2 * len(heads) + 1) + "|"]
    for method, summary in report["methods"].items():
        name = {CEILING: "LOGO seed B (ceiling)", PAIRED_METHOD: "**GUDA**"}.get(method, method)
        cells = [_mean_se(summary[m]) for m in metrics]
        diffs = [_paired(paired.get(method, {}).get(m)) for m in metrics]
        lines.append("| " + " | ".join([name, *cells, *diffs, *_cost(report, method)]) + " |")
    return "\n".join(lines)


def results_markdown(run_dirs: Sequence[str | Path], queries: tuple[int, int | None] | None = None,
                     metrics: Sequence[str] | None = None) -> str:
    """The tables of several evaluation directories, in the order given, separated by blank lines.

    Args:
        run_dirs: finished ``guda evaluate`` output directories.
        queries: ``(start, stop)`` to tabulate those queries only (``stop`` ``None``: to the last),
            e.g. the held-out ones (:func:`restrict_to_queries`); ``None``: every query.
        metrics: the columns (:func:`parse_metrics`); ``None``: :data:`TABLE_METRICS`, as in the
            reports. Other metrics are recomputed from the runs' scores files.
    """
    if not run_dirs:
        raise ConfigError("Name at least one finished evaluation directory.")
    columns = tuple(TABLE_METRICS) if metrics is None else parse_metrics(metrics)
    reports = [load_report(d) for d in run_dirs]
    if queries is not None or columns != tuple(TABLE_METRICS):
        start, stop = queries or (0, None)
        reports = [restrict_to_queries(r, d, start, stop, columns) for r, d in zip(reports, run_dirs)]
    return "\n\n".join(run_table(r, columns) for r in reports) + "\n"
