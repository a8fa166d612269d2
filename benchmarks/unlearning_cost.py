"""Unlearning cost against fidelity, measured in one run: how few steps reach LOGO's agreement?

Takes a finished ``guda evaluate`` directory (its base model, queries, LOGO models and LOGO
scores), unlearns every group again with each ``STEPS:LR`` setting, scores the same queries with the
same ELBO draws, and prints, per setting, top-1 / NDCG@3 / Spearman against LOGO seed A, the LOGO
seed-B ceiling, the sample passes and wall time of unlearning, and the LOGO / GUDA cost ratios
(LOGO: the seed-A training loops recorded in the same directory; passes are forwards plus
backwards, teacher forwards included, as ``guda evaluate`` counts them). ``--plot`` draws each
metric against the passes ratio, the fidelity-against-cost curve, with the ceiling beside it.

Usage:
    python benchmarks/unlearning_cost.py --eval-dir guda-eval/digits-classes --benchmark digits-classes \
        --settings 40:2e-3 20:4e-3 10:6e-3 [--threads 2] [--out sweep.json] [--plot sweep.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, help="a finished `guda evaluate` output directory")
    parser.add_argument("--benchmark", help="its benchmark (else --data)")
    parser.add_argument("--data", default="digits", help="its --data (digits or an image folder)")
    parser.add_argument("--recipe", default="digits-ddpm")
    parser.add_argument("--settings", nargs="+", default=["40:2e-3", "20:4e-3", "10:6e-3"], help="STEPS:LR pairs")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--plot", help="draw fidelity against the LOGO/GUDA passes ratio here (PNG)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda import GUDADDPMPipeline
    from diffusers_guda.data import GroupedDataset, load_digits
    from diffusers_guda.recipes import Recipe
    from guda_lab.evaluation.benchmarks import load_benchmark
    from guda_lab.evaluation.metrics import summarize
    from guda_lab.evaluation.runner import training_cost, unlearning_cost
    from guda_lab.queries import load_query_images
    from guda_lab.recipes import training_config
    from guda_lab.training import TRAIN_LOG_NAME

    out = Path(args.eval_dir)
    recipe = Recipe.load(args.recipe)
    if args.benchmark:
        dataset = load_benchmark(args.benchmark)
    else:
        dataset = load_digits() if args.data == "digits" else GroupedDataset.from_image_folder(args.data)
    reference = np.asarray(json.loads((out / "scores" / "logo_seed_a.json").read_text())["scores"])
    ceiling = np.asarray(json.loads((out / "scores" / "logo_seed_b.json").read_text())["scores"])
    queries = load_query_images(sorted((out / "queries").glob("*.png")))
    train = training_config(recipe, "unlearning_cost.py")
    logo_models = [p.parent for p in (out / "logo" / f"seed_{train.seed}").glob(f"*/{TRAIN_LOG_NAME}")]
    if len(logo_models) != dataset.num_groups:
        raise SystemExit(f"expected {dataset.num_groups} LOGO models of seed {train.seed} in {out / 'logo'}, found {len(logo_models)}")
    logo = training_cost(logo_models, train)
    logo_wall, logo_passes = logo["wall_s"], logo["forwards"] + logo["backwards"]
    names = ("top1", "ndcg@3", "spearman")
    ceiling_summary = summarize(ceiling, reference, names=names)

    rows = []
    for setting in args.settings:
        steps, lr = setting.split(":")
        pipe = GUDADDPMPipeline.from_pretrained(out / "base")
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        bundle = pipe.unlearn_groups(dataset, recipe=recipe, steps=int(steps), learning_rate=float(lr), progress=False)
        total_wall = time.perf_counter() - t0
        cost = unlearning_cost(bundle, recipe, dataset.num_groups, total_wall, reused=False)
        scores = pipe.attribute(queries, progress=False).scores.double().numpy()  # the bundle records recipe.elbo
        summary = summarize(scores, reference, names=names)
        loop_wall = sum(float(g.stats["wall_s"]) for g in bundle.groups)
        passes = cost["forwards"] + cost["backwards"]
        forget = [100 * g.stats["forget_loss_change"] for g in bundle.groups]
        retain = [100 * g.stats["retain_loss_change"] for g in bundle.groups]
        rows.append({
            "steps": int(steps), "learning_rate": float(lr), **{n: summary[n]["mean"] for n in names},
            "sample_passes": passes, "loop_wall_s": round(loop_wall, 2), "total_wall_s": round(total_wall, 2),
            "ratio_passes": logo_passes / passes, "ratio_wall": logo_wall / loop_wall,
            "forget_change_pct_min": min(forget), "retain_change_pct_max": max(retain),
        })
        print(f"done {setting}: {rows[-1]}", flush=True)

    print(f"\n{len(queries)} queries x {dataset.num_groups} groups; LOGO seed A: {logo_passes:,} sample passes, "
          f"{logo_wall:.0f} s of training loops")
    print("ceiling (LOGO seed B vs A): " + ", ".join(f"{n} {ceiling_summary[n]['mean']:.3f}" for n in names))
    print("| steps | lr | top1 | ndcg@3 | spearman | passes | loop wall (s) | LOGO/GUDA passes | LOGO/GUDA wall | forget min | retain max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['learning_rate']:g} | {r['top1']:.3f} | {r['ndcg@3']:.3f} | {r['spearman']:.3f} | "
              f"{r['sample_passes']:,} | {r['loop_wall_s']:.1f} | {r['ratio_passes']:.0f}x | {r['ratio_wall']:.0f}x | "
              f"{r['forget_change_pct_min']:+.1f}% | {r['retain_change_pct_max']:+.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps({"ceiling": {n: ceiling_summary[n]["mean"] for n in names}, "rows": rows,
                                              "logo_wall_s": logo_wall, "logo_passes": logo_passes}, indent=2))
    if args.plot:
        plot(rows, {n: ceiling_summary[n]["mean"] for n in names}, Path(args.plot))


def plot(rows: list[dict], ceiling: dict[str, float], path: Path) -> None:
    """Each metric against LOGO/GUDA sample passes, one point per setting, the seed-B ceiling dashed."""
    from diffusers_guda.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = sorted(rows, key=lambda r: r["ratio_passes"])
    for name, colour in zip(ceiling, ("C0", "C1", "C2")):
        ax.plot([r["ratio_passes"] for r in rows], [r[name] for r in rows], "o-", color=colour, label=name)
        ax.axhline(ceiling[name], color=colour, linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("LOGO / GUDA sample passes (higher = cheaper unlearning)")
    ax.set_ylabel("agreement with LOGO seed A")
    ax.set_title("fidelity against unlearning cost (dashed: LOGO seed B)")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
