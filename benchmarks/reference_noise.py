"""How noisy is the LOGO reference itself? Two finished ``guda evaluate`` runs of the same models and queries.

The first run scores LOGO with the recipe's one noise draw per timestep, the second with
``--reference-draws N`` (docs/evaluation.md#noise-in-the-reference). A score is the mean of its
draws' terms and draw d is the same in both runs (the noise is a function of the seed, the image,
the timestep and d), so ``(N * S_N - S_1) / (N - 1)`` is the estimate from draws 1 to N-1 alone,
independent of draw 0. Printed, on the chosen queries:

* how often LOGO's top group is the same with 1 and with N draws;
* the *self-agreement* of the one-draw reference: its top-1 / NDCG@3 / Spearman against the
  independent estimate. A method scored against the one-draw reference cannot be expected to
  agree with it much more than this;
* every method of the runs (with its own scores, the same in both) against the one-draw, the
  N-draw and the independent reference, and GUDA minus each other method, paired per query,
  against the independent one.

Usage:
    python benchmarks/reference_noise.py guda-eval/digits-crowd-10 guda-eval/digits-crowd-10-ref4 [--queries 100:]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METRICS = ("top1", "ndcg@3", "spearman")


def independent_estimate(one_draw: np.ndarray, n_draws: np.ndarray, n: int) -> np.ndarray:
    """The estimate from draws 1 .. n-1 alone, given the draw-0 estimate and the mean over draws 0 .. n-1."""
    return (n * n_draws - one_draw) / (n - 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("one_draw", help="a finished evaluation whose LOGO scores use one draw per timestep")
    parser.add_argument("n_draws", help="the same evaluation rerun with --reference-draws N (N >= 2)")
    parser.add_argument("--queries", metavar="START:STOP", help="these queries only, e.g. 100: (default: all)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from guda_lab.evaluation.metrics import summarize
    from guda_lab.evaluation.report import PAIRED_METHOD, REFERENCE, logo_draws, paired_differences
    from guda_lab.evaluation.results_table import load_report, method_scores, parse_query_range

    runs = [Path(args.one_draw), Path(args.n_draws)]
    reports = [load_report(r) for r in runs]
    draws = [logo_draws(r) for r in reports]
    if draws[0] != 1 or draws[1] < 2:
        raise SystemExit(f"need LOGO scored with 1 draw, then with N >= 2; these runs used {draws[0]} and {draws[1]}")
    if reports[0]["groups"] != reports[1]["groups"] or reports[0]["num_queries"] != reports[1]["num_queries"]:
        raise SystemExit("the two runs must share their groups and queries (copies of one evaluation)")
    n = draws[1]
    start, stop = parse_query_range(args.queries) if args.queries else (0, None)

    def read(i: int, method: str) -> np.ndarray:
        return method_scores(reports[i], runs[i], method)[start:stop]

    one, many = read(0, REFERENCE), read(1, REFERENCE)
    independent = independent_estimate(one, many, n)
    references = {"1 draw": one, f"{n} draws": many, f"draws 1-{n - 1}": independent}
    methods = {m: read(0, m) for m in reports[0]["methods"] if m in reports[1]["methods"]}
    for m, scores in methods.items():
        if not np.array_equal(scores, read(1, m)):
            raise SystemExit(f"{m}'s scores differ between the two runs: they must be copies of one evaluation")

    def means(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        return {k: v["mean"] for k, v in summarize(scores, reference, METRICS).items()}

    result = {"draws": n, "queries": len(one), "top_group_agreement": float(np.mean(one.argmax(1) == many.argmax(1))),
              "self_agreement": means(one, independent), "methods": {}}
    print(f"{len(one)} queries: LOGO's top group is the same with 1 and {n} draws on {result['top_group_agreement']:.3f} of them")
    print("one-draw LOGO against draws 1-%d alone (its self-agreement): " % (n - 1)
          + ", ".join(f"{m} {v:.3f}" for m, v in result["self_agreement"].items()))
    print("\n| method | " + " | ".join(f"against {ref}: {m}" for ref in references for m in METRICS) + " |")
    print("|---" * (1 + len(references) * len(METRICS)) + "|")
    for m, scores in methods.items():
        result["methods"][m] = {ref: means(scores, r) for ref, r in references.items()}
        print(f"| {m} | " + " | ".join(f"{result['methods'][m][ref][k]:.3f}" for ref in references for k in METRICS) + " |")
    others = [m for m in methods if m != PAIRED_METHOD]
    if PAIRED_METHOD in methods and others:
        print(f"\nGUDA − method against draws 1-{n - 1}, paired per query:")
        versus = paired_differences({REFERENCE: independent, **methods}, others, names=METRICS)["versus"]
        for m, diffs in versus.items():
            result["methods"][m]["guda_minus_against_independent"] = {k: (d["mean_diff"], d["stderr"]) for k, d in diffs.items()}
            print(f"  {m}: " + ", ".join(f"{k} {d['mean_diff']:+.3f} ± {d['stderr']:.3f}" for k, d in diffs.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
