"""Cost and fidelity against the number of groups K, from finished ``guda evaluate`` runs.

Give the output directories of one construction at several group counts, e.g. the
``digits-crowd-10``, ``-30`` and ``-120`` benchmarks (docs/evaluation.md#digits-crowd; LOGO for a
random subset of 12 groups where K > 12). Per K it prints, from each run's ``report.json``:

* GUDA's unlearning and scoring cost, in total and **per group** (sample passes and wall time):
  the question is whether the cost per group falls or stays flat as K grows;
* LOGO's cost per model and the LOGO / GUDA unlearning ratio (LOGO scaled to every group);
* top-1 / NDCG@3 / Spearman ± standard error against LOGO seed A for GUDA, the ceiling (when the
  run has one) and each baseline, on the groups LOGO was trained for;
* with ``--main-digit``, for each method and LOGO itself, how often its top group among LOGO's
  groups is a contributor of the query's digit (over the queries whose digit has one there): the
  answer the construction expects, which tells a method that is noisy from a LOGO that is.

Usage:
    python benchmarks/group_scaling.py guda-eval/digits-crowd-10 guda-eval/digits-crowd-30 \
        guda-eval/digits-crowd-120 [--out scaling.json] [--plot scaling.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

METRICS = ("top1", "ndcg@3", "spearman")


def passes(cost: dict) -> int:
    return int(cost["forwards"]) + int(cost["backwards"])


def scaling_row(report: dict) -> dict:
    """One run's K, costs per group and metrics."""
    k, cost = len(report["groups"]), report["cost"]
    unlearn, score, logo = cost["guda_unlearning"], cost["guda"], cost["logo_seed_a"]
    queries = report["num_queries"]
    metrics = {m: {name: (v[name]["mean"], v[name]["std"] / math.sqrt(v[name]["n"]) if v[name]["n"] > 1 else float("nan"))
                   for name in METRICS} for m, v in report["methods"].items()}
    return {
        "k": k,
        "images_per_group": sum(report["group_sizes"]) / k,
        "logo_groups": len(report["logo_groups"]) if report.get("logo_groups") else k,
        "unlearning_passes_per_group": passes(unlearn) / k,
        "unlearning_wall_per_group_s": unlearn["wall_s"] / k,
        "scoring_passes_per_query_and_group": passes(score) / (queries * k),
        "scoring_wall_per_query_and_group_s": score["wall_s"] / (queries * k),
        "logo_passes_per_model": passes(logo) / logo["models"],
        "logo_wall_per_model_s": logo["wall_s"] / logo["models"],
        "logo_over_guda_passes": report["cost_ratio_logo_over_guda_passes"],
        "logo_over_guda_wall": report["cost_ratio_logo_over_guda"],
        "metrics": metrics,
    }


def main_digit_rates(run: Path, report: dict) -> dict[str, float]:
    """Per method of a digits-crowd run's report (LOGO seed A included): the share of queries whose top
    group among LOGO's groups has the query's digit as its main digit, over the queries whose digit has
    such a group."""
    from guda_lab.evaluation.benchmarks import crowd_main_digit, query_digits
    from guda_lab.evaluation.report import REFERENCE
    from guda_lab.evaluation.results_table import logo_columns, method_scores
    from guda_lab.queries import load_query_images

    columns = logo_columns(report)
    main = np.array([crowd_main_digit(report["groups"][c]) for c in columns])
    digit = query_digits(load_query_images(sorted((run / "queries").glob("*.png")))[: report["num_queries"]])
    covered = np.array([(main == d).any() for d in digit])
    rates = {}
    for method in [REFERENCE, *report["methods"]]:  # a scores file of a method the report does not hold may be stale
        scores = method_scores(report, run, method)
        rates[method] = float((main[scores.argmax(1)] == digit)[covered].mean())
    return rates


def print_tables(rows: list[dict]) -> None:
    print("| K | images / group | LOGO groups | unlearning passes / group | unlearning s / group | scoring passes / query / group "
          "| scoring ms / query / group | LOGO passes / model | LOGO / GUDA passes | LOGO / GUDA wall |")
    print("|---" * 10 + "|")
    for r in rows:
        print(f"| {r['k']} | {r['images_per_group']:.0f} | {r['logo_groups']} | {r['unlearning_passes_per_group']:,.0f} | "
              f"{r['unlearning_wall_per_group_s']:.1f} | {r['scoring_passes_per_query_and_group']:.0f} | "
              f"{1000 * r['scoring_wall_per_query_and_group_s']:.1f} | {r['logo_passes_per_model']:,.0f} | "
              f"{r['logo_over_guda_passes']:.0f}× | {r['logo_over_guda_wall']:.0f}× |")
    methods = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
    print("\n| method | " + " | ".join(f"K = {r['k']} {name}" for r in rows for name in METRICS) + " |")
    print("|---" * (1 + len(rows) * len(METRICS)) + "|")
    for m in methods:
        cells = [f"{r['metrics'][m][name][0]:.3f} ± {r['metrics'][m][name][1]:.3f}" if m in r["metrics"] else ""
                 for r in rows for name in METRICS]
        print(f"| {m} | " + " | ".join(cells) + " |")


def plot(rows: list[dict], path: Path) -> None:
    from diffusers_guda.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (cost_ax, fidelity_ax) = plt.subplots(1, 2, figsize=(10, 4))
    ks = [r["k"] for r in rows]
    cost_ax.plot(ks, [r["unlearning_passes_per_group"] for r in rows], "o-", label="unlearning passes / group")
    cost_ax.plot(ks, [r["logo_passes_per_model"] for r in rows], "s--", label="LOGO passes / model")
    cost_ax.set(xscale="log", yscale="log", xlabel="groups K", ylabel="sample passes", title="cost per group")
    cost_ax.legend()
    for m in dict.fromkeys(m for r in rows for m in r["metrics"]):
        points = [(r["k"], *r["metrics"][m]["top1"]) for r in rows if m in r["metrics"]]
        fidelity_ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=m)
    fidelity_ax.set(xscale="log", xlabel="groups K", ylabel="top-1 against LOGO seed A", title="fidelity (LOGO's groups)")
    fidelity_ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="finished `guda evaluate` directories, one per K")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--plot", help="draw cost per group and top-1 against K here (PNG)")
    parser.add_argument("--main-digit", action="store_true", help="digits-crowd runs: how often each method's top group is "
                                                                  "a contributor of the query's digit")
    args = parser.parse_args(argv)

    from guda_lab.evaluation.results_table import load_report

    rows = []
    for d in args.dirs:
        report = load_report(d)
        rows.append(scaling_row(report))
        if args.main_digit:
            rows[-1]["main_digit_top1"] = main_digit_rates(Path(d), report)
    rows.sort(key=lambda r: r["k"])
    print_tables(rows)
    if args.main_digit:
        names = list(dict.fromkeys(m for r in rows for m in r["main_digit_top1"]))
        print("\n| K | " + " | ".join(names) + " |")
        print("|---" * (1 + len(names)) + "|")
        for r in rows:
            print(f"| {r['k']} | " + " | ".join(f"{r['main_digit_top1'][m]:.2f}" if m in r["main_digit_top1"] else "" for m in names) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, Path(args.plot))
    return rows


if __name__ == "__main__":
    main()
