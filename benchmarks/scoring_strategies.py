"""Scoring strategies measured in one run: adapter switching ("swap"), one forward with an adapter
per row ("mixed"), and swap with adaptive draws (stop once the top group leads by z standard errors).

Scores the same queries with each on a trained base + bundle (e.g. the demo's), several times
interleaved, and prints the median wall and CPU time of each, the speed-up over swap, the rows used,
the top-1 agreement with the full-grid answer and the largest score difference (mixed vs swap).

Usage:
    python benchmarks/scoring_strategies.py --base guda-demo/base --bundle guda-demo/bundle \
        --queries guda-demo/queries --num-queries 20 --repeats 3 [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="guda-demo/base")
    parser.add_argument("--bundle", default="guda-demo/bundle")
    parser.add_argument("--queries", default="guda-demo/queries")
    parser.add_argument("--num-queries", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--adaptive-z", type=float, default=3.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda import GUDADDPMPipeline
    from diffusers_guda.demo import load_query_images

    pipe = GUDADDPMPipeline.from_pretrained(args.base)
    pipe.load_guda_bundle(args.bundle)
    images = load_query_images(sorted(Path(args.queries).glob("*.png"))[: args.num_queries])
    methods = {
        "swap": dict(strategy="swap"),
        "mixed": dict(strategy="mixed"),
        f"swap+adaptive(z={args.adaptive_z:g})": dict(strategy="swap", adaptive_z=args.adaptive_z),
    }
    timings = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    results = {}
    for _ in range(args.repeats):
        for name, kwargs in methods.items():
            c0, t0 = time.process_time(), time.perf_counter()
            results[name] = pipe.attribute(images, progress=False, **kwargs)
            timings[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    reference = results["swap"]
    swap_time = statistics.median(timings["swap"])
    rows = reference.metadata["num_rows"]
    print(f"{len(images)} queries x {reference.scores.shape[1]} groups, {rows} rows per query, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}, {args.repeats} repeats")
    for name in methods:
        result = results[name]
        used = result.metadata.get("rows_used", [rows] * len(images))
        agree = (result.scores.argmax(1) == reference.scores.argmax(1)).float().mean().item()
        print(f"  {name:>24}: median wall {statistics.median(timings[name]):6.2f} s (cpu {statistics.median(cpu[name]):6.2f} s), "
              f"speed-up {swap_time / statistics.median(timings[name]):4.2f}x, mean rows {sum(used) / len(used):5.1f}, "
              f"top-1 = full grid {agree:.0%}, max |score - swap| {(result.scores - reference.scores).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
