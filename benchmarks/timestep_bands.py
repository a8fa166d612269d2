"""Where along t the attribution signal lives: per-band agreement and strength, measured in one run.

Every score is a sum of ELBO terms over the timestep grid. This splits the scores of a finished
``guda evaluate`` directory (LOGO seeds A and B, and GUDA: the evaluation's bundle and any other
``--bundle`` trained on the same base) into timestep bands and prints, per band:

  * top-1 / NDCG@3 / Spearman of the band's part of each method's scores against LOGO seed A's
    full scores (where a method's ranking comes from, and where LOGO's own seed-to-seed noise sits);
  * ``--strength``: for each group, the mean of its own score's band part over the queries whose
    LOGO-A top group it is (how hard each adapter moves its own queries there, next to LOGO).

The bands add up to the full scores, in nats, exactly as the evaluation computed them.

Usage:
    python benchmarks/timestep_bands.py --eval-dir guda-eval/digits-contributors-hobbyist \
        --benchmark digits-contributors-hobbyist [--bundle other/bundle] [--bands 0 30 100 300 1000] [--strength]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def band_terms(estimator, unet, queries, noise) -> torch.Tensor:
    """``[N, R]`` ELBO terms of every query's rows under ``unet`` (packed, so batch-independent)."""
    n, r = len(queries), estimator.num_rows
    index, rows = torch.arange(n).repeat_interleave(r), torch.arange(r).repeat(n)
    return estimator.packed_terms(unet, queries, index, rows, noise).view(n, r).double()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, help="a finished `guda evaluate` output directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", help="its benchmark")
    source.add_argument("--data", help="its image folder (one subfolder per group)")
    parser.add_argument("--recipe", default="digits-ddpm")
    parser.add_argument("--bundle", action="append", default=[], help="another adapter bundle on the same base, repeatable")
    parser.add_argument("--bands", type=int, nargs="+", default=[0, 30, 100, 300, 1000], help="band edges in timesteps")
    parser.add_argument("--strength", action="store_true", help="also print each group's own score per band")
    parser.add_argument("--save", help="write the per-band scores and metrics to this JSON file")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DModel

    from diffusers_guda import GroupedDataset, GUDADDPMPipeline
    from diffusers_guda.bundle import unique_slugs
    from diffusers_guda.elbo import ELBOEstimator
    from diffusers_guda.recipes import Recipe
    from guda_lab.evaluation.benchmarks import load_benchmark
    from guda_lab.evaluation.logo import logo_model_dir
    from guda_lab.evaluation.metrics import summarize
    from guda_lab.queries import load_query_images

    out = Path(args.eval_dir)
    recipe = Recipe.load(args.recipe)
    dataset = load_benchmark(args.benchmark) if args.benchmark else GroupedDataset.from_image_folder(args.data)
    seeds = json.loads((out / "report.json").read_text())["seeds"]
    queries = load_query_images(sorted((out / "queries").glob("*.png")))
    pipe = GUDADDPMPipeline.from_pretrained(out / "base")
    estimator = ELBOEstimator(pipe.scheduler, recipe.elbo)
    hashes = estimator.image_hashes(queries)
    noise = torch.cat([estimator.noise(q, h) for q, h in zip(queries, hashes)])
    scale = estimator.scale / estimator.num_rows  # a row's share of a score in nats
    base = band_terms(estimator, pipe.unet.eval(), queries, noise)

    deltas = {}  # method -> [N, K, R] per-row score parts
    slugs = unique_slugs(dataset.group_names)
    for method in ("logo_seed_a", "logo_seed_b"):
        if seeds.get(method) is None:
            continue
        parts = [band_terms(estimator, UNet2DModel.from_pretrained(logo_model_dir(out / "logo", seeds[method], slug), subfolder="unet").eval(), queries, noise) for slug in slugs]
        deltas[method] = (torch.stack(parts, 1) - base.unsqueeze(1)) * scale
    for path in [out / "bundle", *map(Path, args.bundle)]:
        pipe.load_guda_bundle(path)
        names = [pipe.guda_bundle.adapter_name(slug) for slug in pipe.guda_bundle.slugs]
        parts = []
        for name in names:
            pipe.unet.enable_adapters()
            pipe.unet.set_adapter(name)
            parts.append(band_terms(estimator, pipe.unet.eval(), queries, noise))
        pipe.unet.delete_adapters(names)
        deltas["guda" if path == out / "bundle" else str(path)] = (torch.stack(parts, 1) - base.unsqueeze(1)) * scale

    edges = list(zip(args.bands, args.bands[1:])) + [(args.bands[0], args.bands[-1])]
    in_band = [(estimator.row_timesteps >= a) & (estimator.row_timesteps < b) for a, b in edges]
    band_scores = {method: [delta[:, :, rows].sum(-1).numpy() for rows in in_band] for method, delta in deltas.items()}  # [N, K] each
    reference = band_scores["logo_seed_a"][-1]
    record = {"bands": edges, "methods": {}}
    print("top-1 / NDCG@3 / Spearman of each band's part against LOGO seed A's full scores")
    print(f"{'method':28s} " + " | ".join(f"t in [{a}, {b})" for a, b in edges))
    for method, bands in band_scores.items():
        summaries = [summarize(scores, reference, names=("top1", "ndcg@3", "spearman")) for scores in bands]
        record["methods"][method] = {"metrics": [{k: v["mean"] for k, v in summary.items()} for summary in summaries],
                                     "band_scores": [scores.tolist() for scores in bands]}
        cells = ["/".join(f"{v['mean']:.2f}" for v in summary.values()) for summary in summaries]
        print(f"{method[-28:]:28s} " + " | ".join(f"{c:>14s}" for c in cells))
    if args.strength:
        top = reference.argmax(1)
        print("\nown-group score per band, mean over the queries whose LOGO-A top group it is (nats): " + ", ".join(deltas))
        for band, (a, b) in enumerate(edges[:-1]):
            print(f"-- t in [{a}, {b})")
            for k, name in enumerate(dataset.group_names):
                rows = top == k
                if rows.any():
                    values = [bands[band][rows, k].mean() for bands in band_scores.values()]
                    print(f"  {name:16s} n={int(rows.sum()):3d} " + " ".join(f"{v:8.3f}" for v in values))
    if args.save:
        Path(args.save).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
