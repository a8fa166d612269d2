"""Scoring throughput at K = 10 and K = 50 groups, every method measured in one run.

Methods (the same queries, the same ELBO draws):

* ``sequential``: hot-swap the active LoRA adapter on the one UNet, each image's rows in their own
  forwards (the first implementation; the reference of every speed-up).
* ``reload``: a full UNet per group loaded from disk (adapter merged and saved beforehand), as the
  authors' code scores one checkpoint per group; loading is timed.
* ``mixed``: the base and all K adapters in one forward per row chunk (peft's mixed adapter batches).
* ``merged``: each adapter merged into the weights in turn, rows of many images packed per forward.
* ``merged+adaptive(z=Z, head=H, block=B)``: ``merged`` with adaptive draws (the least-noisy share
  ``H`` of the grid walked exactly, then stratified blocks of ``B`` rows of the rest; groups trailing
  the leader by ``Z`` standard errors are dropped; a query stops when one group is left). ``H = 0``
  is the walk before the exact head.

``--ks`` lists the group counts measured: the ``--bundle``'s own K (10 for the demo's; any
bundle, e.g. an evaluation's ``bundle/`` with its ``base/`` and ``queries/``), and 50, for which the
digits are split into 50 groups (each digit's images dealt into 5 groups) and unlearned with a short
recipe from ``--base``, cached in ``--work``. Wall times are medians over
interleaved repeats; ``forwards`` counts (t, draw) rows through the UNet; ``top1_agreement`` is the
fraction of queries whose top group equals the full-grid answer (``sequential``).

Usage:
    python benchmarks/scoring_throughput.py --base guda-demo/base --bundle guda-demo/bundle \
        --queries guda-demo/queries --num-queries 20 --repeats 3 --threads 1 --out throughput.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusers_guda.scoring import ADAPTIVE_BLOCK, ADAPTIVE_HEAD


def build_k50_bundle(base: str, work: Path, recipe_name: str, steps: int):
    """Unlearn 50 groups (each digit dealt into 5) from ``base``; cached in ``work/k50-bundle``."""
    from diffusers_guda import GUDADDPMPipeline
    from diffusers_guda.bundle import MANIFEST_NAME, AdapterBundle
    from diffusers_guda.data import GroupedDataset, load_digits
    from diffusers_guda.recipes import Recipe

    path = work / "k50-bundle"
    if (path / MANIFEST_NAME).is_file():
        return AdapterBundle.from_pretrained(path)
    digits = load_digits()
    group_ids = torch.empty_like(digits.group_ids)
    for d in range(10):
        idx = torch.nonzero(digits.group_ids == d).flatten()
        group_ids[idx] = d * 5 + torch.arange(len(idx)) % 5
    dataset = GroupedDataset(digits.images, group_ids, [f"{d}-{p}" for d in range(10) for p in range(5)])
    recipe = Recipe.load(recipe_name)
    config = replace(recipe.unlearning, steps=steps, eval_images=16, eval_draws=1)
    pipe = GUDADDPMPipeline.from_pretrained(base)
    print(f"building the K=50 bundle ({steps} unlearning steps per group) -> {path}", flush=True)
    bundle = pipe.unlearn_groups(dataset, config=config, progress=True)
    bundle.elbo = recipe.elbo.to_dict()
    bundle.save_pretrained(path)
    return AdapterBundle.from_pretrained(path)


def save_full_models(pipe, directory: Path) -> list[Path]:
    """One full UNet per loaded adapter (merged weights), as separate checkpoints."""
    from diffusers import UNet2DModel

    from diffusers_guda.merging import MergedAdapterRunner

    bundle = pipe.guda_bundle
    runner = MergedAdapterRunner(pipe.unet)
    paths = []
    for slug in bundle.slugs:
        with runner.merged(bundle.adapter_name(slug)) as merged:
            full = UNet2DModel.from_config(merged.config)
            full.load_state_dict(merged.state_dict())
        paths.append(directory / slug)
        full.save_pretrained(paths[-1])
    return paths


def measure(methods, repeats):
    """Each method's median wall time over ``repeats`` interleaved runs, and its last result."""
    timings = {m: [] for m in methods}
    results = {}
    for _ in range(repeats):
        for name, run in methods.items():
            t0 = time.perf_counter()
            results[name] = run()
            timings[name].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in timings.items()}, results


def scoring_methods(pipe, estimator, images, full_models: list[Path], adaptive_z: list[float], adaptive_heads: list[float],
                    adaptive_blocks: list[int]) -> dict:
    """The methods compared, each a call that scores ``images`` against every group of the loaded bundle."""
    from diffusers import UNet2DModel

    from diffusers_guda.adapter_state import use_adapters
    from diffusers_guda.scoring import AttributionScorer, score_models

    loaded, unet = pipe.guda_bundle, pipe.unet
    adapters = [loaded.adapter_name(s) for s in loaded.slugs]

    def select(adapter):
        return lambda: use_adapters(unet, adapter)

    def load(path):
        return lambda: UNet2DModel.from_pretrained(path).eval()

    methods = {
        "sequential": lambda: score_models(estimator, select(None), [select(a) for a in adapters], loaded.group_names,
                                           images, progress=False),
        "reload": lambda: score_models(estimator, select(None), [load(p) for p in full_models], loaded.group_names,
                                       images, batch_size=len(images), progress=False),
        "mixed": lambda: pipe.attribute(images, strategy="mixed", progress=False),
        "merged": lambda: pipe.attribute(images, strategy="merged", progress=False),
    }
    scorer = AttributionScorer(unet, estimator, adapters, loaded.group_names)
    for z, head, block in itertools.product(adaptive_z, adaptive_heads, adaptive_blocks):
        methods[f"merged+adaptive(z={z:g}, head={head:g}, block={block})"] = lambda z=z, head=head, block=block: scorer.score(
            images, strategy="merged", adaptive_z=z, adaptive_head=head, adaptive_block=block, progress=False)
    return methods


def summarise(walls: dict, results: dict, default_forwards: int) -> dict:
    """Per method: wall time, forwards, agreement with and speed-up over ``sequential`` (the full grid)."""
    reference = results["sequential"].scores
    entry = {}
    for name, result in results.items():
        forwards = result.metadata.get("row_forwards", default_forwards)
        entry[name] = {
            "wall_s": round(walls[name], 3),
            "forwards": int(forwards),
            "top1_agreement": float((result.scores.argmax(1) == reference.argmax(1)).float().mean()),
            "speedup_vs_sequential": walls["sequential"] / walls[name],
            "max_abs_score_diff_vs_sequential": float((result.scores - reference).abs().max()),
        }
    return entry


def print_table(entry: dict, k: int, n: int, rows: int, repeats: int) -> None:
    print(f"\nK = {k}: {n} queries x {k} groups, {rows} rows per query, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}, median of {repeats}")
    print("| method | wall (s) | forwards | speed-up vs sequential | top-1 = full grid | max abs score diff |")
    print("|---|---|---|---|---|---|")
    for name, e in entry.items():
        print(f"| {name} | {e['wall_s']:.2f} | {e['forwards']:,} | {e['speedup_vs_sequential']:.2f}x | "
              f"{e['top1_agreement']:.0%} | {e['max_abs_score_diff_vs_sequential']:.1e} |", flush=True)


def benchmark_k(k: int, args, images, work: Path) -> dict:
    """Every method on the K-group bundle: the summary of :func:`summarise`, also printed as a table."""
    from diffusers_guda import GUDADDPMPipeline
    from diffusers_guda.bundle import AdapterBundle
    from diffusers_guda.elbo import ELBOConfig, ELBOEstimator

    pipe = GUDADDPMPipeline.from_pretrained(args.base)
    pipe.set_progress_bar_config(disable=True)
    given = AdapterBundle.from_pretrained(args.bundle)
    if k != len(given.groups) and k != 50:
        raise SystemExit(f"--ks {k}: the bundle has {len(given.groups)} groups, and only K=50 is built here")
    bundle = given if k == len(given.groups) else build_k50_bundle(args.base, work, args.recipe, args.k50_steps)
    pipe.load_guda_bundle(bundle)
    loaded = pipe.guda_bundle
    estimator = ELBOEstimator(pipe.scheduler, ELBOConfig(**loaded.elbo) if loaded.elbo else ELBOConfig())
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        full_models = save_full_models(pipe, Path(tmp))
        methods = scoring_methods(pipe, estimator, images, full_models, args.adaptive_z, args.adaptive_head, args.adaptive_block)
        skipped = set(args.skip) - {"sequential"}  # the reference of every ratio
        walls, results = measure({m: run for m, run in methods.items() if m not in skipped}, args.repeats)
    n, rows = len(images), estimator.num_rows
    entry = summarise(walls, results, default_forwards=n * rows * (k + 1))
    print_table(entry, k, n, rows, args.repeats)
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="guda-demo/base")
    parser.add_argument("--bundle", default="guda-demo/bundle", help="the K=10 bundle")
    parser.add_argument("--queries", default="guda-demo/queries")
    parser.add_argument("--num-queries", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--adaptive-z", type=float, nargs="+", default=[3.0], help="one merged+adaptive method per value")
    parser.add_argument("--adaptive-head", type=float, nargs="+", default=[ADAPTIVE_HEAD],
                        help="one merged+adaptive method per value and z (0: no exact head)")
    parser.add_argument("--adaptive-block", type=int, nargs="+", default=[ADAPTIVE_BLOCK],
                        help="one merged+adaptive method per value, z and head")
    parser.add_argument("--k50-steps", type=int, default=10, help="unlearning steps per group of the K=50 bundle")
    parser.add_argument("--recipe", default="digits-ddpm")
    parser.add_argument("--work", default="benchmark-work", help="cache of the K=50 bundle")
    parser.add_argument("--ks", nargs="+", type=int, default=[10, 50], help="the --bundle's K and/or 50 (the digits split)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["reload", "mixed", "merged"],
                        help="methods not measured (e.g. mixed at large K: one forward holds K + 1 models' rows)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from guda_lab.queries import load_query_images

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    images = load_query_images(sorted(Path(args.queries).glob("*.png"))[: args.num_queries])
    report = {"num_queries": len(images), "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()[0],
              "repeats": args.repeats, "adaptive_z": args.adaptive_z, "adaptive_head": args.adaptive_head,
              "adaptive_block": args.adaptive_block}
    for k in args.ks:
        report[f"k{k}"] = benchmark_k(k, args, images, work)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
