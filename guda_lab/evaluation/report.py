"""The evaluation's report: its sections computed from the methods' scores (metrics against the
reference, fractions of the ceiling, group level, prompt subsets), and its Markdown, summary and plots.

See docs/evaluation.md#metrics and docs/evaluation.md#running-an-evaluation for the fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from diffusers_guda.data import GroupedDataset

from .metrics import METRIC_NAMES, group_level_agreement, group_level_comparison, pairwise_agreement, per_query_metrics, summarize

#: The reference every method is compared with (LOGO, the recipe's training seed), and the ceiling
#: (LOGO with another training seed: how well retraining agrees with itself).
REFERENCE = "logo_seed_a"
CEILING = "logo_seed_b"
#: The method the ``paired`` section compares with every other one, and on which metrics.
PAIRED_METHOD = "guda"
PAIRED_METRICS = ("top1", "ndcg@3", "spearman")


def metric_sections(scores: dict[str, np.ndarray], compared: Sequence[str], labels: np.ndarray | None, ceiling: bool,
                    names: Sequence[str] = METRIC_NAMES) -> dict:
    """The report's ``metric_names``, ``methods`` (each compared method's ``names`` metrics against the
    reference), ``fraction_of_ceiling`` (``None`` without a ceiling) and ``reference_label_top1``
    (``None`` without labels)."""
    reference = scores[REFERENCE]
    results = {m: summarize(scores[m], reference, names=names, labels=labels) for m in compared}
    metric_names = list(names) + (["label_top1"] if labels is not None else [])
    fractions = None
    if ceiling:
        top = results[CEILING]
        fractions = {
            m: {name: (results[m][name]["mean"] / top[name]["mean"] if top[name]["mean"] > 0 else None) for name in metric_names}
            for m in compared
        }
    reference_label = summarize(reference, reference, names=["top1"], labels=labels).get("label_top1") if labels is not None else None
    return {"metric_names": metric_names, "methods": results, "fraction_of_ceiling": fractions, "reference_label_top1": reference_label}


def paired_differences(scores: dict[str, np.ndarray], others: Sequence[str], method: str = PAIRED_METHOD,
                       names: Sequence[str] = PAIRED_METRICS) -> dict:
    """The report's ``paired``: ``method`` against each of ``others`` on the same queries.

    For each metric, ``d_n`` is ``method``'s value on query n minus the other's (both against the
    reference); the entry holds ``mean_diff``, its standard error ``std(d, ddof=1) / sqrt(N)`` and ``n``.
    Paired differences cancel what the queries share (an easy query is easy for both), so their
    standard error is the one that says whether two methods differ.
    """
    reference = scores[REFERENCE]
    own = per_query_metrics(scores[method], reference, names)
    out = {}
    for other in others:
        theirs = per_query_metrics(scores[other], reference, names)
        entry = {}
        for name in names:
            d = own[name] - theirs[name]
            n = len(d)
            entry[name] = {"mean_diff": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else None, "n": n}
        out[other] = entry
    return {"method": method, "metrics": list(names), "versus": out}


def prompt_subsets(dataset: GroupedDataset, prompts: list[str], scores: dict[str, np.ndarray], methods: Sequence[str]) -> dict:
    """Metrics (top-1, Spearman) of the reference and ``methods`` on the queries whose prompt names a
    group (by a descriptor) and on those whose prompt names none.

    On the first subset ``label_top1`` is agreement with the group the prompt names, for LOGO too: it
    checks that the construction's intended answer is LOGO's.
    """
    import re

    from diffusers_guda.objectives.anchor import group_descriptors

    named = np.full(len(prompts), -1, dtype=np.int64)
    for k in range(dataset.num_groups):
        words = [re.compile(r"(?<!\w)" + re.escape(ph.strip()) + r"(?!\w)", re.IGNORECASE) for ph in group_descriptors(dataset, k)]
        for i, p in enumerate(prompts):
            if any(w.search(p) for w in words):
                named[i] = k if named[i] == -1 else -2  # -2: names several groups
    out = {}
    for name, mask in (("prompt names a group", named >= 0), ("prompt names no group", named == -1)):
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            continue
        labels = named[idx] if name == "prompt names a group" else None
        entry = {"n": int(len(idx)), "methods": {}}
        for m in [REFERENCE, *methods]:
            stats = summarize(scores[m][idx], scores[REFERENCE][idx], names=["top1", "spearman"], labels=labels)
            entry["methods"][m] = {k: v["mean"] for k, v in stats.items()}
        out[name] = entry
    return out


def group_level(comparisons, scores: dict[str, np.ndarray], methods: Sequence[str]) -> dict | None:
    """The report's ``group_level``: each of a benchmark's comparisons (:class:`~.benchmarks.GroupComparison`)
    for every method of ``methods`` (which include the reference), and each method's agreement with the
    reference; ``None`` without comparisons."""
    if not comparisons:
        return None
    results = {}
    others = [m for m in methods if m != REFERENCE]
    for c in comparisons:
        entry = {"description": c.description, "n": len(c.queries)}
        entry.update({m: group_level_comparison(*c.deltas(scores[m])) for m in methods})
        for m in others:
            entry[m]["pairwise_agreement"] = pairwise_agreement(*c.deltas(scores[m]), *c.deltas(scores[REFERENCE]))
        results[c.name] = entry
    agreement = {
        m: group_level_agreement([results[c.name][m] for c in comparisons], [results[c.name][REFERENCE] for c in comparisons])
        for m in others
    }
    pairwise = {m: float(np.mean([results[c.name][m]["pairwise_agreement"] for c in comparisons])) for m in others}
    return {"comparisons": results, "agreement": agreement, "pairwise_agreement": pairwise,
            "note": f"per comparison: paired 95% interval of mean(a) - mean(b) over its queries; agreement: fraction of the "
                    f"comparisons {REFERENCE} resolves on which the method's mean difference has its sign; pairwise_agreement: "
                    f"fraction of a comparison's queries on which the method orders a and b as {REFERENCE} does, "
                    f"averaged over the comparisons"}


# -- formatting ----------------------------------------------------------------------------------


def logo_draws(report: dict) -> int:
    """Noise draws per timestep of the LOGO scores (a report from before ``reference_elbo`` used the recipe's)."""
    return (report.get("reference_elbo") or report["recipe"]["elbo"]).get("num_draws", 1)


def reference_draws(report: dict) -> int | None:
    """:func:`logo_draws` where they differ from the recipe's (``guda evaluate --reference-draws``), else ``None``."""
    draws = logo_draws(report)
    return draws if draws != report["recipe"]["elbo"].get("num_draws", 1) else None


def format_markdown(report: dict) -> str:
    """The report as Markdown: metrics (mean ± std) and fractions of the ceiling, methods × metrics."""
    names = report["metric_names"]
    methods = list(report["methods"])
    lines = [
        f"# GUDA evaluation ({report['recipe']['name']})",
        "",
        f"{report['num_queries']} generated queries, {len(report['groups'])} groups; reference "
        f"`{report['reference']}` (LOGO, seed {report['seeds']['logo_seed_a']}), "
        + (f"ceiling `{report['ceiling']}` (LOGO, seed {report['seeds']['logo_seed_b']})." if report["ceiling"] else "no ceiling (run without LOGO seed B)."),
        "",
        *([f"LOGO's scores use {reference_draws(report)} noise draws per timestep; every other method's the recipe's.", ""]
          if reference_draws(report) else []),
        *([f"LOGO was trained for {len(report['logo_groups'])} of the {len(report['groups'])} groups (a random subset fixed by "
           f"seed A: {', '.join(report['logo_groups'])}); every metric compares the methods' scores on those groups only, "
           f"and LOGO's cost is scaled by {report['logo_cost_scale']:.2f} to all groups.", ""] if report.get("logo_groups") else []),
        "## Agreement with the reference (mean ± std over queries)",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{report['methods'][m][n]['mean']:.3f} ± {report['methods'][m][n]['std']:.3f}" for n in names) + " |")
    if report["fraction_of_ceiling"]:
        lines += ["", "## Fraction of the ceiling (method mean / ceiling mean; n/a where the ceiling mean is <= 0)", "",
                  "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for m in methods:
            cells = [("n/a" if report["fraction_of_ceiling"][m][n] is None else f"{report['fraction_of_ceiling'][m][n]:.2f}") for n in names]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if report.get("paired"):
        lines += _paired_lines(report["paired"])
    if report.get("group_level"):
        lines += _group_level_lines(report)
    if report.get("prompt_subsets"):
        lines += _prompt_subset_lines(report)
    lines += ["", "## Cost", "", "| stage | wall (s) | forwards | backwards | reused |", "|---|---|---|---|---|"]
    for stage, c in report["cost"].items():
        lines.append(f"| {stage} | {c['wall_s']:.2f} | {c['forwards']:,} | {c['backwards']:,} | {'yes' if c.get('reused') else 'no'} |")
    ratio, ratio_p = report["cost_ratio_logo_over_guda"], report["cost_ratio_logo_over_guda_passes"]
    lines += ["", f"LOGO (seed A) / GUDA unlearning: {ratio:.1f}× in wall time, {ratio_p:.1f}× in sample passes." if ratio and ratio_p else "",
              "", report["cost_note"], ""]
    return "\n".join(lines)


def _group_level_lines(report: dict) -> list[str]:
    """The Markdown of the group-level section: the comparisons, then a row per method (the reference first)."""
    gl = report["group_level"]
    comparisons = list(gl["comparisons"])
    lines = ["", "## Group level (mean Δ of group a − group b over the comparison's queries, 95% paired interval)", ""]
    lines += [f"- `{name}` ({gl['comparisons'][name]['n']} queries): {gl['comparisons'][name]['description']}" for name in comparisons]
    lines += ["", "Agreement: the share of the comparisons the reference resolves on which the method's mean difference has "
              "its sign. Pairwise: the share of a comparison's queries on which the method orders a and b as the reference "
              "does (in brackets after each interval), averaged over the comparisons.", ""]
    lines += ["| method | " + " | ".join(comparisons) + " | agreement | pairwise |", "|---|" + "---|" * (len(comparisons) + 2)]
    for m in [report["reference"], *report["methods"]]:
        cells = []
        for name in comparisons:
            r = gl["comparisons"][name][m]
            share = f" ({r['pairwise_agreement']:.2f})" if "pairwise_agreement" in r else ""
            cells.append(f"{r['mean_diff']:+.3g} [{r['ci_low']:+.2g}, {r['ci_high']:+.2g}]{share}")
        if m == report["reference"]:
            lines.append(f"| {m} | " + " | ".join(cells) + " | reference | reference |")
            continue
        agree = gl["agreement"][m]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {'n/a' if agree is None else f'{agree:.2f}'} | "
                     f"{gl['pairwise_agreement'][m]:.3f} |")
    return lines


def _paired_lines(paired: dict) -> list[str]:
    """The Markdown of the paired section: a row per other method, ``mean ± standard error`` of the differences."""
    names, method = paired["metrics"], paired["method"]
    lines = ["", f"## {method} − each method, paired over the queries (mean ± standard error)", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for other, entry in paired["versus"].items():
        cells = [f"{entry[n]['mean_diff']:+.3f}" + ("" if entry[n]["stderr"] is None else f" ± {entry[n]['stderr']:.3f}") for n in names]
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return lines


def _prompt_subset_lines(report: dict) -> list[str]:
    """The Markdown of the prompt-subsets section: a row per subset and method."""
    lines = ["", "## By query prompt (top-1 and Spearman against the reference; label_top1: the group the prompt names)", "",
              "| subset | n | method | top1 | spearman | label_top1 |", "|---|---|---|---|---|---|"]
    for subset, entry in report["prompt_subsets"].items():
        for m, values in entry["methods"].items():
            label = values.get("label_top1")
            lines.append(f"| {subset} | {entry['n']} | {m} | {values['top1']:.3f} | {values['spearman']:.3f} | "
                         f"{'' if label is None else f'{label:.3f}'} |")
    return lines


def format_summary(report: dict) -> str:
    """A few lines for the terminal: the headline metrics per method, group-level agreement, cost ratio."""
    names = [n for n in ("top1", "ndcg@3", "spearman", "label_top1") if n in report["metric_names"]]
    lines = ["", f"{'method':>20} " + " ".join(f"{n:>14}" for n in names)]
    for m, res in report["methods"].items():
        lines.append(f"{m:>20} " + " ".join(f"{res[n]['mean']:>7.3f}±{res[n]['std']:<6.3f}" for n in names))
    if report.get("group_level"):
        agreement, pairwise = report["group_level"]["agreement"], report["group_level"]["pairwise_agreement"]
        lines.append("group level against the reference (agreement / pairwise): " + ", ".join(
            f"{m} {'n/a' if v is None else f'{v:.2f}'} / {pairwise[m]:.2f}" for m, v in agreement.items()))
    ratio = report["cost_ratio_logo_over_guda"]
    if ratio:
        lines.append(f"LOGO/GUDA cost: {ratio:.1f}x wall, {report['cost_ratio_logo_over_guda_passes']:.1f}x sample passes")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------


def plot_metrics(report: dict, path: str | Path):
    """Grouped bars: one group per metric, one bar per method (mean, ± standard error)."""
    from diffusers_guda.plotting import pyplot, save_figure

    plt = pyplot()
    names = report["metric_names"]
    methods = list(report["methods"])
    x = np.arange(len(names))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 3.5))
    for j, m in enumerate(methods):
        res = report["methods"][m]
        means = [res[n]["mean"] for n in names]
        errs = [res[n]["std"] / np.sqrt(max(1, res[n].get("n", 1))) for n in names]
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, means, width, yerr=errs, label=m, capsize=2,
               hatch="//" if m == report["ceiling"] else None)
    ax.set_xticks(x, names)
    ax.set_ylabel(f"agreement with {report['reference']}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1.0), loc="upper left")
    ax.set_title(f"{report['num_queries']} queries, {len(report['groups'])} groups (error bars: ±1 s.e.)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def plot_score_heatmaps(scores: dict[str, np.ndarray], groups: Sequence[str], path: str | Path, max_queries: int = 4):
    """Per query (first ``max_queries``), an image: a row per method, a column per group, z-scored scores."""
    from diffusers_guda.plotting import pyplot, save_figure

    plt = pyplot()
    methods = list(scores)
    n = min(max_queries, next(iter(scores.values())).shape[0])
    fig, axes = plt.subplots(1, n, figsize=(max(3, 0.45 * len(groups) + 1.5) * n, 0.45 * len(methods) + 1.4), squeeze=False)
    for q in range(n):
        rows = np.stack([scores[m][q] for m in methods])
        z = (rows - rows.mean(1, keepdims=True)) / np.where(rows.std(1, keepdims=True) > 0, rows.std(1, keepdims=True), 1.0)
        ax = axes[0, q]
        im = ax.imshow(z, cmap="coolwarm", vmin=-2.5, vmax=2.5, aspect="auto")
        ax.set_xticks(range(len(groups)), groups, fontsize=7, rotation=90 if max(map(len, groups)) > 3 else 0)
        ax.set_yticks(range(len(methods)), methods if q == 0 else [""] * len(methods), fontsize=7)
        ax.set_title(f"query {q}", fontsize=8)
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8, label="z-score per method")
    save_figure(fig, path, bbox_inches="tight")
    plt.close(fig)
    return fig
