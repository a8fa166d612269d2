"""Stopping rules of the adaptive walk, replayed exactly on one full-grid run.

A row's term does not depend on the other rows of its forward, so the terms of every (query, row,
model) computed once on the full grid are exactly what an adaptive walk would compute. This scores
the queries once with the full grid (strategy ``merged``) and then replays the walk of
``diffusers_guda.scoring.QueryWalk`` under several rules, counting the rows each needs (base,
groups still in contention and catch-ups; the engine's forward fills are not counted) and checking
its top group against the full grid's:

* ``library``: the walk as shipped: the least-noisy share ``--heads`` of the grid walked exactly
  first (0: none, the walk before the exact head), then stratified blocks; a group is dropped when
  its gap to the leader exceeds ``z`` standard errors of the paired block estimates;
* ``pooled``: the same gap, its standard error from the rows' within-range variances (more degrees
  of freedom than the block estimates give);
* ``finite-population``: the library's standard error times ``sqrt(1 - rows walked / grid rows)``,
  since the target is the grid's mean, not an expectation over timesteps.

``pooled`` and ``finite-population`` run without a head.

Usage:
    python benchmarks/adaptive_walk_rules.py --base guda-demo/base --bundle guda-demo/bundle \
        --queries guda-demo/queries --blocks 4 8 --z 2 2.5 3 4 --heads 0 0.05 0.1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def full_grid_terms(pipe, images: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Terms ``[N, K + 1, R]`` of every query, row and model (index 0: the base), and the estimator."""
    from diffusers_guda.elbo import ELBOConfig, ELBOEstimator
    from diffusers_guda.scoring.rows import RowTerms
    from diffusers_guda.scoring.strategies import make_strategy

    loaded = pipe.guda_bundle
    est = ELBOEstimator(pipe.scheduler, ELBOConfig(**loaded.elbo))
    n, rows = len(images), est.num_rows
    ids = list(range(n))
    row_terms = RowTerms(est, images, ids, est.image_hashes(images), None, est.config.rows_per_forward)
    models = make_strategy("merged", pipe.unet)
    names = [None, *(loaded.adapter_name(s) for s in loaded.slugs)]
    terms = torch.zeros(n, len(names), rows)
    for m, name in enumerate(names):
        with models.model(name) as unet:
            for i, values in row_terms(name, unet, ids, {i: torch.arange(rows) for i in ids}).items():
                terms[i, m] = values
    return terms, est


def walk_rules():
    """The rules compared: name -> a QueryWalk class."""
    from diffusers_guda.scoring import QueryWalk

    class Pooled(QueryWalk):
        def _compare(self):
            if len(self.alive) < 2:
                return
            blocks = len(self.estimates[self.num_groups])
            weights = self.weights[0]
            d = torch.stack([torch.stack(self.diffs[j][:blocks]) for j in self.alive])  # [groups, blocks, ranges]
            leader = int((d * weights).sum(2).mean(1).argmax())
            gaps = d[leader] - d
            stderr = ((weights**2 * gaps.var(dim=1)).sum(1) / blocks).sqrt()
            mean = (gaps * weights).sum(2).mean(1)
            self.alive = [g for a, g in enumerate(self.alive) if a == leader or not mean[a] > self.z * stderr[a]]

    class FinitePopulation(QueryWalk):
        def _compare(self):
            if len(self.alive) < 2:
                return
            blocks = len(self.estimates[self.num_groups])
            walked = sum(len(b) for b in self.blocks[:blocks]) / sum(len(b) for b in self.blocks)
            d = torch.stack([torch.stack(self.estimates[j]) for j in self.alive])
            leader = int(d.mean(1).argmax())
            gaps = d[leader] - d
            stderr = gaps.std(dim=1) / math.sqrt(blocks) * math.sqrt(max(0.0, 1 - walked))
            self.alive = [g for a, g in enumerate(self.alive) if a == leader or not gaps[a].mean() > self.z * stderr[a]]

    return {"library": QueryWalk, "pooled": Pooled, "finite-population": FinitePopulation}


def replay(walk_class, terms: torch.Tensor, est, hashes: list[int], block: int, z: float, head: int = 0) -> tuple[int, torch.Tensor]:
    """Rows the walk needs over all queries (content ``hashes``), and each query's top group."""
    from diffusers_guda.hashing import derive_seed

    n, models, rows = terms.shape
    used, top = 0, torch.zeros(n, dtype=torch.long)
    for i in range(n):
        walk = walk_class.stratified(rows, models - 1, block, derive_seed("guda-order", est.config.seed, hashes[i]), z, head)
        step = 0
        while True:
            b = walk.blocks[step]
            used += len(b) * (1 + len(walk.alive))
            back = walk.record(step, terms[i, 0, b], {j: terms[i, j + 1, b] for j in walk.alive})
            for j in back:
                missed = walk.missed(j, step)
                catch = torch.cat([walk.blocks[m] for m in missed])
                used += len(catch)
                walk.catch_up(j, missed, terms[i, j + 1, catch])
            if back:
                walk.readmit(back)
            if not walk.goes_on(step):
                break
            step += 1
        _, scores, _ = walk.result(rows, est.scale)
        top[i] = int(torch.stack([s for s, _ in scores]).argmax())
    return used, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="guda-demo/base")
    parser.add_argument("--bundle", default="guda-demo/bundle")
    parser.add_argument("--queries", default="guda-demo/queries")
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--blocks", nargs="+", type=int, default=[4, 8], help="rows per block (adaptive_block)")
    parser.add_argument("--z", nargs="+", type=float, default=[2.0, 2.5, 3.0, 4.0])
    parser.add_argument("--heads", nargs="+", type=float, default=[0.0, 0.05, 0.08],
                        help="shares of the grid walked exactly first (library rule)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda import GUDADDPMPipeline
    from guda_lab.queries import load_query_images

    pipe = GUDADDPMPipeline.from_pretrained(args.base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_guda_bundle(args.bundle)
    images = load_query_images(sorted(Path(args.queries).glob("*.png"))[: args.num_queries])
    terms, est = full_grid_terms(pipe, images)
    hashes = est.image_hashes(images)
    n, models, rows = terms.shape
    full_top = (terms[:, 1:] - terms[:, :1]).mean(2).argmax(1)
    print(f"{n} queries x {models - 1} groups, {rows} rows per query: the full grid is {n * models * rows:,} rows")
    print("| rule | head | block | z | rows | fewer than the full grid | top-1 = full grid |\n|---|---|---|---|---|---|---|")
    results = []
    for name, walk_class in walk_rules().items():
        for share in args.heads if name == "library" else [0.0]:
            head = math.ceil(share * rows)
            for block in args.blocks:
                for z in args.z:
                    used, top = replay(walk_class, terms, est, hashes, block, z, head)
                    agree = int((top == full_top).sum())
                    results.append({"rule": name, "head": share, "block": block, "z": z, "rows": used, "agree": agree, "queries": n})
                    print(f"| {name} | {share:g} | {block} | {z:g} | {used:,} | {n * models * rows / used:.2f}x | {agree}/{n} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"full_grid_rows": n * models * rows, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
