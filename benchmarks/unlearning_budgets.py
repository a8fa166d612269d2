"""Unlearning budgets against fidelity and cost, each measured in one run on a finished evaluation.

Takes a finished ``guda evaluate`` directory (its base model, queries, LOGO models and LOGO scores)
and, for each ``--setting``, unlearns every group again in one run (so shared draws serve every
group), scores the same queries with the same ELBO draws and prints:

* top-1 / NDCG@3 / Spearman against LOGO seed A, beside the seed-B ceiling when the run has one;
* the unlearning's sample passes (forwards, teacher included, plus backwards, as ``guda evaluate``
  counts them) and wall time, and the LOGO / GUDA ratios of both (LOGO: the seed-A training loops
  recorded in the same directory);
* the forget- and retain-set loss changes of the adapters, and how much of LOGO's effect each
  adapter reaches on the queries LOGO ranks its group first (its own-group ratio; 1 is LOGO's);
* with ``--held-out-from N``, queries ``[0, N)`` and ``[N, end)`` apart (development and held-out),
  each metric paired per query against the evaluation's own GUDA scores and the ceiling (``N = 0``:
  every query held out, for a setting chosen on another evaluation's queries);
* for a ``--benchmark`` with constructed group comparisons, how well they are ordered.

An evaluation with LOGO on a subset of groups (``guda evaluate --logo-groups N``) is compared on
that subset, with LOGO's cost scaled to every group, as the evaluation does.

``--save-bundles DIR`` keeps each setting's bundle. Adapters depend on the base, the data and the
settings, not on the queries, so a setting chosen on one evaluation's queries is checked on another's
(held out, same base) by copying its bundle into that directory as ``bundle/`` and running ``guda
evaluate`` there with a recipe that has the setting: the evaluation reuses the bundle and scores it.

A setting is ``KEY=VALUE`` pairs joined by commas over ``steps``, ``lr``, ``exponent`` (steps grow as
``(group size / mean size) ** exponent``, ``UnlearningConfig.size_exponent``), ``shared_draws``
(docs/method.md#shared-draws) and ``timesteps`` (``uniform`` or ``log_snr``,
``UnlearningConfig.timestep_sampling``), ``rank`` and ``alpha`` (the LoRA's; alpha follows a new rank
unless given); what a setting leaves out is the recipe's, so ``--setting ""`` is the
recipe itself, which retrains the evaluation's very adapters. ``--option`` overrides an objective
option in every setting. ``--plot`` draws each metric against the LOGO / GUDA passes ratio: the
fidelity-against-cost curve, one line per setting apart from its steps, with the ceiling beside it
(with ``--held-out-from``, on the held-out queries).

Usage:
    python benchmarks/unlearning_budgets.py --eval-dir guda-eval/digits-classes --benchmark digits-classes \
        --setting steps=40,lr=2e-3,exponent=0 steps=20,lr=4e-3,exponent=0 steps=36,exponent=1,shared_draws=4 \
        [--held-out-from 100] [--option KEY=JSON] [--threads 2] [--out sweep.json] [--plot sweep.png] [--save-bundles bundles/]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

METRICS = ("top1", "ndcg@3", "spearman")
SETTING_KEYS = {"steps": ("steps", int), "lr": ("learning_rate", float), "exponent": ("size_exponent", float),
                "shared_draws": ("shared_draws", int), "timesteps": ("timestep_sampling", str), "rank": ("lora_rank", int),
                "alpha": ("lora_alpha", float)}


def parse_setting(text: str) -> dict:
    """``"steps=40,lr=2e-3"`` as unlearning settings (``{"steps": 40, "learning_rate": 0.002}``)."""
    settings = {}
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        if key not in SETTING_KEYS or not value:
            raise SystemExit(f"bad setting {pair!r} in {text!r}: use KEY=VALUE with KEY one of {', '.join(SETTING_KEYS)}")
        field, kind = SETTING_KEYS[key]
        settings[field] = kind(value)
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, help="a finished `guda evaluate` output directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", help="its benchmark")
    source.add_argument("--data", help="its image folder (one subfolder per group)")
    parser.add_argument("--recipe", help="its recipe (default: the benchmark's, as for `guda evaluate`; digits-ddpm for --data)")
    parser.add_argument("--setting", nargs="+", default=[{}], type=parse_setting,
                        help="KEY=VALUE,... over steps, lr, exponent, shared_draws, timesteps, rank, alpha (default: the recipe's own)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON", help="objective option override, repeatable")
    parser.add_argument("--held-out-from", type=int, metavar="N",
                        help="also report queries [0, N) and [N, end) apart, each paired with the evaluation's own GUDA scores")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="also write the rows (scores and steps per group included) as JSON here")
    parser.add_argument("--save-bundles", metavar="DIR",
                        help="also save each setting's adapter bundle as DIR/setting_<i> (i from 0, in --setting order), "
                             "to check a chosen setting on other queries without unlearning again")
    parser.add_argument("--plot", help="draw fidelity against the LOGO/GUDA passes ratio here (PNG)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda import GroupedDataset, GUDADDPMPipeline
    from diffusers_guda.cli.arguments import parse_options
    from diffusers_guda.recipes import Recipe
    from guda_lab.commands import recipe_name
    from guda_lab.evaluation import own_group_ratios, summarize
    from guda_lab.evaluation.benchmarks import get_benchmark
    from guda_lab.evaluation.results_table import load_report, logo_columns
    from guda_lab.evaluation.runner import training_cost, unlearning_cost
    from guda_lab.queries import load_query_images
    from guda_lab.recipes import training_config
    from guda_lab.training import TRAIN_LOG_NAME

    out = Path(args.eval_dir)
    benchmark = get_benchmark(args.benchmark) if args.benchmark else None
    recipe = Recipe.load(recipe_name(args))
    dataset = benchmark.load() if benchmark else GroupedDataset.from_image_folder(args.data)
    # an evaluation with LOGO on a subset of groups (`--logo-groups`) compares every method on the subset's columns
    report_path = out / "report.json"
    columns = logo_columns(load_report(out)) if report_path.is_file() else list(range(dataset.num_groups))
    subset = len(columns) < dataset.num_groups
    reference = read_scores(out / "scores" / "logo_seed_a.json")
    if reference is None or reference.shape[1] != len(columns):
        raise SystemExit(f"{out / 'scores' / 'logo_seed_a.json'}: expected LOGO seed-A scores of the {len(columns)} groups LOGO was trained for")
    ceiling = read_scores(out / "scores" / "logo_seed_b.json")
    evaluated = read_scores(out / "scores" / "guda.json")
    evaluated = None if evaluated is None else evaluated[:, columns]
    if args.held_out_from is not None and evaluated is None:
        raise SystemExit(f"--held-out-from pairs with the evaluation's GUDA scores, and {out / 'scores' / 'guda.json'} does not exist")
    queries = load_query_images(sorted((out / "queries").glob("*.png")))
    train = training_config(recipe, "unlearning_budgets.py")
    logo_models = [p.parent for p in (out / "logo" / f"seed_{train.seed}").glob(f"*/{TRAIN_LOG_NAME}")]
    if len(logo_models) != len(columns):
        raise SystemExit(f"expected {len(columns)} LOGO models of seed {train.seed} in {out / 'logo'}, found {len(logo_models)}")
    logo = training_cost(logo_models, train)
    scale = dataset.num_groups / len(columns)  # LOGO for every group, as `guda evaluate` scales a subset's cost
    logo_passes, logo_wall = scale * (logo["forwards"] + logo["backwards"]), scale * logo["wall_s"]
    options = parse_options(args.option)  # parsed as `guda unlearn --option` is; merged into the recipe's options

    rows = []
    for index, settings in enumerate(args.setting):
        settings = {**settings, "objective_options": options}
        config = recipe.unlearning_with(**settings)
        pipe = GUDADDPMPipeline.from_pretrained(out / "base")
        pipe.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        bundle = pipe.unlearn_groups(dataset, recipe=recipe, progress=False, **settings)
        cost = unlearning_cost(bundle, recipe, dataset.num_groups, time.perf_counter() - start, reused=False)
        if args.save_bundles:
            bundle.save_pretrained(Path(args.save_bundles) / f"setting_{index}")
        scores = pipe.attribute(queries, progress=False).scores.double().numpy()  # the bundle records recipe.elbo
        compared = scores[:, columns]
        passes = cost["forwards"] + cost["backwards"]
        loop_wall = sum(float(g.stats["wall_s"]) for g in bundle.groups)
        row = {
            "steps": config.steps, "learning_rate": config.learning_rate, "exponent": config.size_exponent,
            "shared_draws": config.shared_draws, "timestep_sampling": config.timestep_sampling,
            "lora_rank": config.lora.rank, "lora_alpha": config.lora.alpha,
            "objective_options": dict(config.objective_options),
            **{m: v["mean"] for m, v in summarize(compared, reference, names=METRICS).items()},
            "sample_passes": passes, "loop_wall_s": round(loop_wall, 2), "total_wall_s": round(cost["wall_s"], 2),
            "ratio_passes": logo_passes / passes, "ratio_wall": logo_wall / loop_wall,
            "forget_loss_change_pct": [100 * g.stats["forget_loss_change"] for g in bundle.groups],
            "retain_loss_change_pct": [100 * g.stats["retain_loss_change"] for g in bundle.groups],
            "steps_per_group": dict(zip(dataset.group_names, (g.stats["steps"] for g in bundle.groups))),
            "own_group_ratios": {dataset.group_names[c]: (float(r) if np.isfinite(r) else None)
                                 for c, r in zip(columns, own_group_ratios(compared, reference))},
            "scores": scores.tolist(),
        }
        if args.held_out_from is not None:
            row["parts"] = held_out_parts(compared, evaluated, ceiling, reference, args.held_out_from)
        if benchmark and not subset:  # the constructed comparisons index every group
            row["group_level"] = group_level(benchmark, dataset, queries, scores, reference)
        rows.append(row)
        print(f"done {describe(row)}: " + ", ".join(f"{m} {row[m]:.3f}" for m in METRICS) + f", {passes:,} passes", flush=True)

    print(f"\n{len(queries)} queries x {dataset.num_groups} groups; LOGO seed A: {logo_passes:,.0f} sample passes, "
          f"{logo_wall:.0f} s of training loops" + (f" (its {len(columns)} models scaled to every group)" if subset else ""))
    ceiling_means = {m: v["mean"] for m, v in summarize(ceiling, reference, names=METRICS).items()} if ceiling is not None else None
    if ceiling_means:
        print("ceiling (LOGO seed B vs A): " + ", ".join(f"{m} {ceiling_means[m]:.3f}" for m in METRICS))
    print("| setting | top1 | ndcg@3 | spearman | passes | loop wall (s) | LOGO/GUDA passes | LOGO/GUDA wall | forget min | retain max "
          "| own-group ratio, min-max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {describe(r)} | {r['top1']:.3f} | {r['ndcg@3']:.3f} | {r['spearman']:.3f} | {r['sample_passes']:,} | "
              f"{r['loop_wall_s']:.1f} | {r['ratio_passes']:.0f}x | {r['ratio_wall']:.0f}x | "
              f"{min(r['forget_loss_change_pct']):+.1f}% | {max(r['retain_loss_change_pct']):+.1f}% | {own_range(r)} |")
    for r in rows:
        for name, part in r.get("parts", {}).items():
            print(f"{describe(r)}, {name}: " + ", ".join(
                f"{m} {v['mean']:.3f} ({v['diff']:+.3f} ± {v['diff_se']:.3f}"
                + (f"; vs ceiling {v['ceiling_diff']:+.3f} ± {v['ceiling_diff_se']:.3f}" if "ceiling_diff" in v else "") + ")"
                for m, v in part.items()))
        for name, comparison in r.get("group_level", {}).items():
            print(f"{describe(r)}, {name}: pairwise agreement with LOGO {comparison['pairwise_agreement']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"ceiling": ceiling_means, "logo": logo, "groups": dataset.group_names,
                                              "rows": rows}, indent=1))
    if args.plot:  # the held-out queries when there are some: the settings may have been chosen on the others
        plot(rows, ceiling_means, Path(args.plot), part=next(reversed(rows[0]["parts"])) if args.held_out_from is not None else None)


def read_scores(path: Path) -> np.ndarray | None:
    return np.asarray(json.loads(path.read_text())["scores"]) if path.is_file() else None


def describe(row: dict, steps: bool = True) -> str:
    """A setting as it reads in the tables: steps, learning rate, exponent, shared draws, timestep sampling, LoRA rank and alpha."""
    shared = f", D={row['shared_draws']}" if row["shared_draws"] else ""
    text = (f"lr {row['learning_rate']:g}, exponent {row['exponent']:g}{shared}, {row['timestep_sampling']} timesteps, "
            f"rank {row['lora_rank']} alpha {row['lora_alpha']:g}")
    return f"{row['steps']} steps, {text}" if steps else text


def own_range(row: dict) -> str:
    """The smallest and largest own-group ratio of a row (groups LOGO ranks first on no query left out)."""
    ratios = [r for r in row["own_group_ratios"].values() if r is not None]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"


def held_out_parts(scores: np.ndarray, evaluated: np.ndarray, ceiling: np.ndarray | None, reference: np.ndarray, split: int) -> dict:
    """Per part of the queries, each metric's mean and its differences ± standard error, paired per query, from
    ``evaluated`` (``diff``, ``diff_se``) and, when given, from the ``ceiling`` (``ceiling_diff``, ``ceiling_diff_se``)."""
    from guda_lab.evaluation.metrics import per_query_metrics

    parts = {}
    for name, part in ((f"queries before {split}", slice(0, split)), (f"queries from {split}", slice(split, None))):
        if part.stop == 0:  # --held-out-from 0: every query is held out
            continue
        ours = per_query_metrics(scores[part], reference[part], METRICS)
        others = {"diff": evaluated, "ceiling_diff": ceiling}
        theirs = {key: per_query_metrics(s[part], reference[part], METRICS) for key, s in others.items() if s is not None}
        parts[name] = {}
        for m in METRICS:
            parts[name][m] = {"mean": float(np.mean(ours[m]))}
            for key, metrics in theirs.items():
                diff = np.asarray(ours[m]) - np.asarray(metrics[m])
                parts[name][m][key] = float(diff.mean())
                parts[name][m][f"{key}_se"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return parts


def group_level(benchmark, dataset, queries, scores: np.ndarray, reference: np.ndarray) -> dict:
    """The benchmark's constructed group comparisons: how often the scores order their pairs as LOGO does."""
    from guda_lab.evaluation.metrics import pairwise_agreement

    return {c.name: {"pairwise_agreement": pairwise_agreement(*c.deltas(scores), *c.deltas(reference))}
            for c in benchmark.group_comparisons(dataset, queries)}


def plot(rows: list[dict], ceiling: dict[str, float] | None, path: Path, part: str | None = None) -> None:
    """Each metric against LOGO/GUDA sample passes, one line per setting that differs in more than its steps,
    the seed-B ceiling dashed; ``part`` names the queries of ``row["parts"]`` to plot (default: all of them)."""
    from diffusers_guda.plotting import pyplot, save_figure

    def value(row: dict, name: str) -> float:
        return row["parts"][part][name]["mean"] if part else row[name]

    def ceiling_value(name: str) -> float | None:
        if part:  # the ceiling on the same queries: any row's value minus its difference from the ceiling
            metric = rows[0]["parts"][part][name]
            return metric["mean"] - metric["ceiling_diff"] if "ceiling_diff" in metric else None
        return ceiling[name] if ceiling else None

    series: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["ratio_passes"]):
        series.setdefault(describe(row, steps=False), []).append(row)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4), sharex=True, layout="constrained")
    for ax, name in zip(axes, METRICS):
        for label, members in series.items():
            ax.plot([r["ratio_passes"] for r in members], [value(r, name) for r in members], "o-", label=label)
            for r in members:
                ax.annotate(str(r["steps"]), (r["ratio_passes"], value(r, name)), textcoords="offset points", xytext=(4, -10), fontsize=7)
        level = ceiling_value(name)
        if level is not None:
            ax.axhline(level, color="grey", linestyle="--", linewidth=1, label="LOGO seed B (ceiling)")
        ax.set_xscale("log")
        ax.set_xlabel("LOGO / GUDA sample passes")
        ax.set_title(name)
    axes[0].set_ylabel("agreement with LOGO seed A" + (f" ({part})" if part else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)
    fig.suptitle("fidelity against unlearning cost (points: steps at the mean group size)")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
