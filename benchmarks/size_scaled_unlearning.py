"""Unlearning budgets proportional to group size, against LOGO, measured in one run.

Every adapter of the recipe gets the same number of steps whatever the size of its group, while
retraining without a 20-image group changes the model far less than without a 180-image one. This
unlearns each group again with ``steps_k = max(1, round(steps · (n_k / mean n) ** EXPONENT))``
(``UnlearningConfig.size_exponent``) on a
finished ``guda evaluate`` directory (its base model, queries and LOGO seed-A scores), scores the
same queries with the same ELBO draws and prints top-1 / NDCG@3 / Spearman against LOGO seed A.
``--exponent 0`` gives every group the same budget, to try another ``--steps``. It also prints the
unlearning's sample passes; ``--shared-draws D`` trains on shared draws (docs/method.md#shared-draws)
and ``--held-out-from N`` reports development and held-out queries apart, each paired with the
evaluation's own GUDA scores.

Usage:
    python benchmarks/size_scaled_unlearning.py --eval-dir guda-eval/digits-contributors \
        --benchmark digits-contributors --exponent 1.0 [--shared-draws 4] [--held-out-from 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

METRICS = ("top1", "ndcg@3", "spearman")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, help="a finished `guda evaluate` output directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", help="its benchmark")
    source.add_argument("--data", help="its image folder (one subfolder per group)")
    parser.add_argument("--recipe", default="digits-ddpm")
    parser.add_argument("--exponent", type=float, default=1.0, help="steps grow as (group size / mean size) ** exponent")
    parser.add_argument("--steps", type=int, help="steps of a group of mean size (default: the recipe's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON", help="objective option override, repeatable")
    parser.add_argument("--shared-draws", type=int, help="UnlearningConfig.shared_draws (default: the recipe's)")
    parser.add_argument("--held-out-from", type=int, metavar="N",
                        help="also report queries [0, N) and [N, end) apart (e.g. development and held-out queries), each as "
                             "the mean and its difference from the evaluation's own GUDA scores, paired per query")
    parser.add_argument("--save", help="write the score matrix and the steps per group to this JSON file")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda import GroupedDataset, GUDADDPMPipeline
    from diffusers_guda.cli.arguments import parse_options
    from diffusers_guda.recipes import Recipe
    from guda_lab.evaluation.benchmarks import get_benchmark
    from guda_lab.evaluation.metrics import group_level_agreement, group_level_comparison, pairwise_agreement, summarize
    from guda_lab.queries import load_query_images

    out = Path(args.eval_dir)
    recipe = Recipe.load(args.recipe)
    benchmark = get_benchmark(args.benchmark) if args.benchmark else None
    dataset = benchmark.load() if benchmark else GroupedDataset.from_image_folder(args.data)
    reference = np.asarray(json.loads((out / "scores" / "logo_seed_a.json").read_text())["scores"])
    queries = load_query_images(sorted((out / "queries").glob("*.png")))
    base_steps = args.steps or recipe.unlearning.steps
    options = parse_options(args.option)  # parsed as `guda unlearn --option` is; merged into the recipe's options
    settings = dict(objective_options=options, steps=base_steps, size_exponent=args.exponent,
                    learning_rate=args.lr or recipe.unlearning.learning_rate)
    if args.shared_draws is not None:
        settings["shared_draws"] = args.shared_draws
    config = recipe.unlearning_with(**settings)
    sizes = dataset.group_sizes()
    start = time.perf_counter()
    pipe = GUDADDPMPipeline.from_pretrained(out / "base")
    pipe.set_progress_bar_config(disable=True)
    bundle = pipe.unlearn_groups(dataset, recipe=recipe, progress=False, **settings)  # one run: shared draws serve every group
    unlearned = time.perf_counter() - start
    budgets = [g.stats["steps"] for g in bundle.groups]
    loss_changes = [(g.stats["forget_loss_change"], g.stats["retain_loss_change"]) for g in bundle.groups]
    for name, size, steps in zip(dataset.group_names, sizes, budgets):
        print(f"{name}: {size} images, {steps} steps", flush=True)
    forwards = sum(g.stats["sample_passes"] for g in bundle.groups)
    backwards = sum(budgets) * (config.forget_batch_size + config.retain_batch_size)
    print(f"unlearning: {forwards:,} forward + {backwards:,} backward sample passes, {unlearned:.0f} s", flush=True)
    scores = pipe.attribute(queries, progress=False).scores.double().numpy()  # the bundle records recipe.elbo
    summary = summarize(scores, reference, names=METRICS)
    print(f"steps {base_steps}, lr {config.learning_rate:g}, exponent {args.exponent:g}: " + ", ".join(f"{n} {v['mean']:.3f}" for n, v in summary.items()))
    if args.held_out_from is not None:
        evaluated = np.asarray(json.loads((out / "scores" / "guda.json").read_text())["scores"])
        for name, part in (("queries before", slice(0, args.held_out_from)), ("queries from", slice(args.held_out_from, None))):
            print(f"  {name} {args.held_out_from}: " + paired_against(scores[part], evaluated[part], reference[part]))
    forget, retain = (np.array(change) * 100 for change in zip(*loss_changes))
    print(f"  forget-set loss change min {forget.min():+.1f} %, retain-set loss change max {retain.max():+.1f} %")
    group_level = {}
    for c in benchmark.group_comparisons(dataset, queries) if benchmark else []:
        ours, logo = group_level_comparison(*c.deltas(scores)), group_level_comparison(*c.deltas(reference))
        ours["pairwise_agreement"] = pairwise_agreement(*c.deltas(scores), *c.deltas(reference))
        group_level[c.name] = {"guda": ours, "logo_seed_a": logo}
        print(f"  {c.name}: mean(a) - mean(b) {ours['mean_diff']:+.2f} [{ours['ci_low']:+.2f}, {ours['ci_high']:+.2f}]"
              f" (LOGO {logo['mean_diff']:+.2f} [{logo['ci_low']:+.2f}, {logo['ci_high']:+.2f}]), pairwise {ours['pairwise_agreement']:.2f}")
    if group_level:
        agreement = group_level_agreement([g["guda"] for g in group_level.values()], [g["logo_seed_a"] for g in group_level.values()])
        pairwise = np.mean([g["guda"]["pairwise_agreement"] for g in group_level.values()])
        print(f"  group-level agreement {agreement:.2f}, pairwise {pairwise:.3f}")
    if args.save:
        record = {"groups": dataset.group_names, "steps": budgets, "exponent": args.exponent, "shared_draws": config.shared_draws,
                  "sample_passes": {"forwards": forwards, "backwards": backwards}, "scores": scores.tolist(),
                  "summary": summary, "group_level": group_level,
                  "forget_loss_change": forget.tolist(), "retain_loss_change": retain.tolist()}
        Path(args.save).write_text(json.dumps(record, indent=1))


def paired_against(scores: np.ndarray, evaluated: np.ndarray, reference: np.ndarray) -> str:
    """Each metric's mean over these queries, and its difference from ``evaluated``'s ± standard error, paired per query."""
    from guda_lab.evaluation.metrics import per_query_metrics

    ours, theirs = per_query_metrics(scores, reference, METRICS), per_query_metrics(evaluated, reference, METRICS)
    cells = []
    for m in METRICS:
        diff = np.asarray(ours[m]) - np.asarray(theirs[m])
        cells.append(f"{m} {np.mean(ours[m]):.3f} ({diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f})")
    return ", ".join(cells)


if __name__ == "__main__":
    main()
