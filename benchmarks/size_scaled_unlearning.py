"""Unlearning budgets proportional to group size, against LOGO, measured in one run.

Every adapter of the recipe gets the same number of steps whatever the size of its group, while
retraining without a 20-image group changes the model far less than without a 180-image one. This
unlearns each group again with ``steps_k = max(4, round(steps · (n_k / mean n) ** EXPONENT))`` on a
finished ``guda evaluate`` directory (its base model, queries and LOGO seed-A scores), scores the
same queries with the same ELBO draws and prints top-1 / NDCG@3 / Spearman against LOGO seed A.

Usage:
    python benchmarks/size_scaled_unlearning.py --eval-dir guda-eval/digits-contributors \
        --benchmark digits-contributors --exponent 1.0 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, help="a finished `guda evaluate` output directory")
    parser.add_argument("--benchmark", required=True, help="its benchmark")
    parser.add_argument("--recipe", default="digits-ddpm")
    parser.add_argument("--exponent", type=float, default=1.0, help="steps grow as (group size / mean size) ** exponent")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda import GUDADDPMPipeline
    from diffusers_guda.demo import load_query_images
    from diffusers_guda.evaluation.benchmarks import load_benchmark
    from diffusers_guda.evaluation.metrics import summarize
    from diffusers_guda.recipes import Recipe

    out = Path(args.eval_dir)
    recipe = Recipe.load(args.recipe)
    dataset = load_benchmark(args.benchmark)
    reference = np.asarray(json.loads((out / "scores" / "logo_seed_a.json").read_text())["scores"])
    queries = load_query_images(sorted((out / "queries").glob("*.png")))
    sizes = dataset.group_sizes()
    mean = sum(sizes) / len(sizes)
    columns, start = [], time.perf_counter()
    for k, name in enumerate(dataset.group_names):
        steps = max(4, round(recipe.unlearning.steps * (sizes[k] / mean) ** args.exponent))
        pipe = GUDADDPMPipeline.from_pretrained(out / "base")
        pipe.set_progress_bar_config(disable=True)
        pipe.unlearn_groups(dataset, config=replace(recipe.unlearning, steps=steps), groups=[name], progress=False)
        # a group's scores depend on its adapter alone, so one group at a time gives the joint matrix
        columns.append(pipe.attribute(queries, elbo_config=recipe.elbo, progress=False).scores[:, 0].double().numpy())
        print(f"{name}: {sizes[k]} images, {steps} steps ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = summarize(np.stack(columns, 1), reference, names=("top1", "ndcg@3", "spearman"))
    print(f"exponent {args.exponent:g}: " + ", ".join(f"{n} {v['mean']:.3f}" for n, v in summary.items()))


if __name__ == "__main__":
    main()
