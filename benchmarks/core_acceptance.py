"""Acceptance numbers of the core: the digits demo end to end, measured in one run.

Prints (and writes ``--out`` as JSON):
  * wall time of each demo stage and in total, with the CPU time next to it (a busy machine shows as
    CPU time close to wall time or below it);
  * label_top1 (top attributed group == the query's digit, as judged by a classifier fitted on the
    real digits) over the demo's queries;
  * per group, the forget- and retain-set loss change after unlearning;
  * score invariance: the same queries scored with batch sizes 1 and 32 and in shuffled order
    (max absolute difference; the estimator is built to make it exactly 0).

Usage:
    python benchmarks/core_acceptance.py --out-dir /tmp/guda-acceptance [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="guda-acceptance")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--invariance-queries", type=int, default=20)
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda import GUDADDPMPipeline
    from guda_lab.demo import run_demo
    from guda_lab.queries import load_query_images

    out = Path(args.out_dir)
    load = os.getloadavg()[0]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    report = run_demo(out, num_queries=args.queries, progress=False, log=lambda *_: None)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0

    pipe = GUDADDPMPipeline.from_pretrained(out / "base")
    pipe.load_guda_bundle(out / "bundle")
    files = sorted((out / "queries").glob("*.png"))[: args.invariance_queries]
    images = load_query_images(files)
    # the demo's bundle records its recipe's ELBO settings
    reference = pipe.attribute(images, batch_size=1, progress=False)
    batched = pipe.attribute(images, batch_size=32, progress=False)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    shuffled = pipe.attribute(images[perm], batch_size=7, progress=False)
    inverse = torch.argsort(perm)
    invariance = max(
        (reference.scores - batched.scores).abs().max().item(),
        (reference.scores - shuffled.scores[inverse]).abs().max().item(),
        (reference.stderr - shuffled.stderr[inverse]).abs().max().item(),
    )

    metrics = report["metrics"]
    numbers = {
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "demo_wall_s": round(wall, 1),
        "demo_cpu_s": round(cpu, 1),
        "stage_wall_s": report["wall_s"],
        "num_queries": metrics["num_queries"],
        "label_top1": metrics["label_top1"],
        "resolved_fraction": metrics["resolved_fraction"],
        "min_forget_loss_change": metrics["min_forget_loss_change"],
        "max_retain_loss_change": metrics["max_retain_loss_change"],
        "invariance_max_abs_diff": invariance,
    }
    print(f"demo wall {wall:.0f} s (cpu {cpu:.0f} s, {numbers['threads']} threads, load {load:.2f} at start): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_s"].items()))
    print(f"label_top1 {metrics['label_top1']:.3f} over {metrics['num_queries']} queries (target >= 0.85)")
    print(f"forget-loss change per group: min {100 * metrics['min_forget_loss_change']:+.1f}% (target >= +15%); "
          f"retain-loss change: max {100 * metrics['max_retain_loss_change']:+.1f}% (target <= +5%)")
    print(f"score invariance (batch 1 vs 32 vs shuffled, {len(images)} queries): max |diff| = {invariance:.2e} (target <= 1e-6)")
    if args.out:
        Path(args.out).write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
