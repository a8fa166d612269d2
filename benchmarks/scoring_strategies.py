"""Adapter switching ("swap") vs one forward with an adapter per row ("mixed"), measured in one run.

Scores the same queries with both strategies on a trained base + bundle (e.g. the demo's), several
times interleaved, and prints the median wall time of each, their ratio, the CPU time, and the
largest score difference between the two.

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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda import GUDADDPMPipeline
    from diffusers_guda.demo import load_query_images

    pipe = GUDADDPMPipeline.from_pretrained(args.base)
    pipe.load_guda_bundle(args.bundle)
    images = load_query_images(sorted(Path(args.queries).glob("*.png"))[: args.num_queries])
    timings = {"swap": [], "mixed": []}
    cpu = {"swap": [], "mixed": []}
    results = {}
    for _ in range(args.repeats):
        for strategy in timings:
            c0, t0 = time.process_time(), time.perf_counter()
            results[strategy] = pipe.attribute(images, strategy=strategy, progress=False)
            timings[strategy].append(time.perf_counter() - t0)
            cpu[strategy].append(time.process_time() - c0)
    swap, mixed = (statistics.median(timings[s]) for s in ("swap", "mixed"))
    diff = (results["swap"].scores - results["mixed"].scores).abs().max().item()
    same_top = (results["swap"].scores.argmax(1) == results["mixed"].scores.argmax(1)).float().mean().item()
    print(f"{len(images)} queries x {results['swap'].scores.shape[1]} groups, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}, {args.repeats} repeats")
    for s in timings:
        print(f"  {s:>5}: median wall {statistics.median(timings[s]):.2f} s, median cpu {statistics.median(cpu[s]):.2f} s")
    print(f"  speed-up mixed / swap: {swap / mixed:.2f}x; max |score difference| {diff:.2e} nats; same top group {same_top:.0%}")


if __name__ == "__main__":
    main()
