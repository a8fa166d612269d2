"""Is a method's disagreement with LOGO a matter of per-group strength? From a finished ``guda evaluate`` run.

For each method in the run's report, and for the ceiling (LOGO seed B) when the run has one:

* **Own-group ratios.** For each group k, over the queries whose LOGO (seed A) top group is k: the
  method's mean score of k divided by LOGO's. The spread of these ratios (their standard deviation
  over their mean) says how evenly the method's groups reach LOGO's strength.
* **Oracle rescaling.** Every score column divided by a factor fitted against LOGO on the
  development queries ``[0, N)``, then scored on the held-out queries ``[N, end)`` and paired per
  query with the unscaled scores. Two fits: the own-group ratio above, and the least-squares slope
  of the column on LOGO's. The factors come from LOGO, so no method could use them; they only ask
  whether *any* per-group scale would close a gap. Where even they do not, the disagreement lies
  in how a group's scores vary from query to query, not in the group's overall strength.
* With ``--main-digit`` (digits-crowd runs): agreement with LOGO's top group, split by whether that
  group is the contributor whose main digit is the query's (the answer the construction expects)
  or another one.

Usage:
    python benchmarks/group_strength.py guda-eval/digits-crowd-10 [--held-out-from 100] [--main-digit] [--out strength.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from guda_lab.evaluation import own_group_ratios

METRICS = ("top1", "ndcg@3", "spearman")


def least_squares_slopes(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``[K]``: per column, the slope of ``scores`` on ``reference`` through the origin."""
    return (scores * reference).sum(0) / (reference * reference).sum(0)


def paired(ours: np.ndarray, theirs: np.ndarray, reference: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Per metric: (mean of ``ours``, mean difference ours − theirs, its standard error), paired per query."""
    from guda_lab.evaluation.metrics import summarize
    from guda_lab.evaluation.report import REFERENCE, paired_differences

    means = summarize(ours, reference, METRICS)
    diffs = paired_differences({REFERENCE: reference, "ours": ours, "theirs": theirs}, ["theirs"], "ours", METRICS)["versus"]["theirs"]
    return {m: (means[m]["mean"], diffs[m]["mean_diff"], diffs[m]["stderr"]) for m in METRICS}


def oracle_rescaling(scores: np.ndarray, reference: np.ndarray, split: int) -> dict[str, dict]:
    """Both fits of the per-group factor on queries ``[0, split)``, each scored on ``[split, end)`` against the unscaled
    scores (a group whose factor cannot be fitted, or is not positive, keeps its scores)."""
    dev, held = slice(0, split), slice(split, None)
    out = {}
    for name, fit in (("own-group ratio", own_group_ratios), ("least-squares slope", least_squares_slopes)):
        factors = fit(scores[dev], reference[dev])
        factors = np.where(np.isfinite(factors) & (factors > 0), factors, 1.0)
        out[name] = {"factors": factors.tolist(), "held_out": paired(scores[held] / factors, scores[held], reference[held])}
    return out


def main_digit_agreement(run: Path, report: dict, columns: list[int], methods: dict[str, np.ndarray],
                         reference: np.ndarray, split: int) -> dict[str, dict]:
    """On the held-out queries: top-1 agreement with LOGO where LOGO's top group is the query digit's main contributor,
    and where it is another group; and, on the first kind, the medians of the main contributor's score relative to
    LOGO's and of LOGO's score, where the method finds that contributor and where it does not."""
    from guda_lab.evaluation.benchmarks import crowd_main_digit, query_digits
    from guda_lab.queries import load_query_images

    main = np.array([crowd_main_digit(report["groups"][c]) for c in columns])
    digit = query_digits(load_query_images(sorted((run / "queries").glob("*.png")))[: report["num_queries"]])[split:]
    top = reference[split:].argmax(1)
    expected = main[top] == digit
    rows = np.arange(len(top))
    leader = reference[split:][rows, top]  # LOGO's score of its top group
    out = {}
    for name, scores in methods.items():
        agree = scores[split:].argmax(1) == top
        found, missed = expected & agree, expected & ~agree
        ratio = scores[split:][rows, top] / leader
        out[name] = {"LOGO top is the main contributor": (int(expected.sum()), float(agree[expected].mean())),
                     "LOGO top is another group": (int((~expected).sum()), float(agree[~expected].mean())),
                     "main contributor's score / LOGO's, found": float(np.median(ratio[found])),
                     "main contributor's score / LOGO's, missed": float(np.median(ratio[missed])),
                     "LOGO's score, found": float(np.median(leader[found])),
                     "LOGO's score, missed": float(np.median(leader[missed]))}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished `guda evaluate` directory")
    parser.add_argument("--held-out-from", type=int, default=100, metavar="N",
                        help="queries [0, N) fit the oracle factors, [N, end) score them (default 100)")
    parser.add_argument("--methods", nargs="+", help="methods to analyse (default: the report's); the rescaling only means "
                                                     "something for scores that are changes, as GUDA's, DAS's and D-TRAK's are")
    parser.add_argument("--main-digit", action="store_true", help="digits-crowd runs: agreement split by LOGO's top group")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from guda_lab.evaluation.report import CEILING, REFERENCE
    from guda_lab.evaluation.results_table import load_report, logo_columns, method_scores

    run = Path(args.run)
    report = load_report(run)
    columns = logo_columns(report)

    def read(method: str) -> np.ndarray:
        return method_scores(report, run, method)

    reference = read(REFERENCE)
    if not 0 < args.held_out_from < len(reference) - 1:
        raise SystemExit(f"--held-out-from must leave queries on both sides of the {len(reference)} queries")
    unknown = set(args.methods or ()) - set(report["methods"])
    if unknown:
        raise SystemExit(f"{run} has no scores of {', '.join(sorted(unknown))}; its methods: {', '.join(report['methods'])}")
    methods = {m: read(m) for m in args.methods or report["methods"]}  # a scores file the report does not list may be stale
    if (run / "scores" / f"{CEILING}.json").is_file():
        methods = {CEILING: read(CEILING), **methods}
    names = [report["groups"][c] for c in columns]

    results = {}
    print(f"{run}: {len(reference)} queries, {len(columns)} groups; oracle factors fitted on queries < {args.held_out_from}\n")
    print("| method | own-group ratio per group (" + ", ".join(names) + ") | spread (std / mean) |")
    print("|---|---|---|")
    for name, scores in methods.items():
        ratios = own_group_ratios(scores, reference)
        spread = float(np.nanstd(ratios, ddof=1) / np.nanmean(ratios))
        results[name] = {"own_group_ratios": ratios.tolist(), "spread": spread,
                         "oracle": oracle_rescaling(scores, reference, args.held_out_from)}
        print(f"| {name} | " + ", ".join(f"{r:.3g}" for r in ratios) + f" | {spread:.2f} |")
    print("\n| method | rescaled by | held out: top-1 | NDCG@3 | Spearman | − unscaled, paired: top-1 | NDCG@3 | Spearman |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        for fit, oracle in result["oracle"].items():
            held = oracle["held_out"]
            print(f"| {name} | {fit} | " + " | ".join(f"{held[m][0]:.3f}" for m in METRICS) + " | "
                  + " | ".join(f"{held[m][1]:+.3f} ± {held[m][2]:.3f}" for m in METRICS) + " |")
    if args.main_digit:
        split = main_digit_agreement(run, report, columns, methods, reference, args.held_out_from)
        print("\n| method | LOGO top is the main contributor: agreement (n) | LOGO top is another group: agreement (n) "
              "| main contributor's score / LOGO's (median): found | missed | LOGO's score (median): found | missed |")
        print("|---|---|---|---|---|---|---|")
        for name, cases in split.items():
            (n_main, main_rate), (n_other, other_rate), *medians = cases.values()
            print(f"| {name} | {main_rate:.3f} ({n_main}) | {other_rate:.3f} ({n_other}) | " + " | ".join(f"{m:.3g}" for m in medians) + " |")
            results[name]["main_digit_agreement"] = cases
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
