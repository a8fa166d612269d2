"""Memory of large training sets: a lazy dataset and the latent cache against in-memory pixels.

Synthetic smooth 256 px RGB images in 8 groups (captioned, ``metadata.jsonl``) are written to a
temporary folder; a tiny Stable Diffusion (its VAE downsamples by 8, as SD's does) is built from
configs in code. Every case runs in a fresh subprocess and reports its peak RSS minus its baseline
(the RSS peak once the models are built):

* ``unlearn``: ``LazyGroupedDataset.from_metadata`` -> latent cache -> ``unlearn_groups`` of 2 groups,
  then a second ``unlearn_groups`` call (one other group) with a new ``LatentCache`` object;
* ``rerun``: the same in a new process on the warm cache;
* ``attribute``: scoring 4 query images against the bundle (the training set is not touched);
* ``eager`` (smaller size only): ``unlearn`` from ``GroupedDataset.from_metadata`` (every pixel in memory).

VAE encoder forwards are counted, to show that each image is encoded once for all groups and runs.

Usage:
    python benchmarks/lazy_data_memory.py [--sizes 1000 4000] [--threads 2] [--out lazy_data_memory.json]
    python benchmarks/lazy_data_memory.py --small     # a smoke run, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

GROUPS = [f"style{g}" for g in range(8)]
WORDS = ["a", "photo", "in", "style", *[f"style{g}" for g in range(8)]]


def write_images(root: Path, n: int, size: int) -> None:
    """``n`` smooth random RGB images (bicubic-upsampled 8x8 noise) round-robin over the groups, with metadata.jsonl."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / "images" / f"{i:05d}.png"
        if not path.exists():
            coarse = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(path)
        group = GROUPS[i % len(GROUPS)]
        rows.append({"file_name": f"images/{i:05d}.png", "text": f"a photo in {group} style", "group": group})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def subset(full: Path, root: Path, n: int) -> None:
    """``root`` with the first ``n`` images of ``full`` (hard links, else copies) and their metadata rows."""
    import shutil

    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = full.joinpath("metadata.jsonl").read_text().splitlines()[:n]
    for row in rows:
        name = json.loads(row)["file_name"]
        if not (root / name).exists():
            try:
                os.link(full / name, root / name)
            except OSError:
                shutil.copy(full / name, root / name)
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def build_pipeline():
    """The tiny Stable Diffusion with a 4-block VAE (downsampling by 8), seeded, on CPU."""
    import torch
    from diffusers import AutoencoderKL

    from diffusers_guda.pipelines import GUDAStableDiffusionPipeline
    from diffusers_guda.testing import tiny_stable_diffusion

    base = tiny_stable_diffusion(words=WORDS, image_size=64, seed=0)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4)
    pipe = GUDAStableDiffusionPipeline(vae=vae.eval(), text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                                       scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> dict:
    """One case, in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    from diffusers_guda import GroupedDataset, LatentCache, LazyGroupedDataset
    from diffusers_guda.distributed import SINGLE_PROCESS

    pipe = build_pipeline()
    forwards = [0]
    encode = pipe.vae.encode

    def counted(*a, **k):
        forwards[0] += 1
        return encode(*a, **k)

    pipe.vae.encode = counted
    baseline = peak_mib()
    data, cache_dir = Path(args.data), Path(args.cache)
    out = {"case": args.case, "images": sum(1 for _ in open(data / "metadata.jsonl"))}
    settings = dict(steps=2, batch_size=2, lora_rank=2, eval_images=4, eval_draws=1, progress=False, process=SINGLE_PROCESS)
    if args.case == "attribute":
        from diffusers_guda.images import open_image

        pipe.load_guda_bundle(args.bundle)
        queries = [open_image(data / "images" / f"{i:05d}.png", "RGB") for i in range(4)]
        from diffusers_guda import ELBOConfig

        result = pipe.attribute(queries, prompts=[f"a photo in {GROUPS[i]} style" for i in range(4)], progress=False,
                                elbo_config=ELBOConfig(stride=100, t_min=10, seed=0), process=SINGLE_PROCESS)
        out["top_groups"] = [row[0][0] for row in result.top(1)]
    elif args.case == "eager":
        dataset = GroupedDataset.from_metadata(data, mode="RGB")
        out["pixel_bytes_held"] = dataset.images.numel() * dataset.images.element_size()
        pipe.unlearn_groups(dataset, groups=GROUPS[:2], **settings)
        out["vae_forwards"] = forwards[0]
    else:
        dataset = LazyGroupedDataset.from_metadata(data, mode="RGB")
        bundle = pipe.unlearn_groups(dataset, groups=GROUPS[:2], latent_cache=LatentCache(pipe.vae, cache_dir), **settings)
        out["vae_forwards_first_call"] = forwards[0]
        pipe.unlearn_groups(dataset, groups=GROUPS[2:3], latent_cache=LatentCache(pipe.vae, cache_dir), **settings)
        out["vae_forwards_second_call"] = forwards[0] - out["vae_forwards_first_call"]
        if args.bundle:
            bundle.save_pretrained(args.bundle)
    out.update(baseline_mib=round(baseline, 1), peak_mib=round(peak_mib(), 1), delta_mib=round(peak_mib() - baseline, 1))
    return out


def run_case(case: str, data: Path, cache: Path, threads: int, bundle: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", case, "--data", str(data), "--cache", str(cache), "--threads", str(threads)]
    if bundle is not None:
        command += ["--bundle", str(bundle)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if done.returncode:
        raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 4000], help="the two dataset sizes (images)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="smoke run: 32 and 128 images of 64 px")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", help="keep the images and caches here (default: a temporary folder)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.case = args.child
        print(json.dumps(child(args)))
        return {}
    sizes, image_size = ([32, 128], 64) if args.small else (args.sizes, args.image_size)
    with tempfile.TemporaryDirectory(prefix="guda-lazy-bench-") as tmp:
        work = Path(args.workdir or tmp)
        full = work / f"data-{max(sizes)}"
        write_images(full, max(sizes), image_size)
        results = {"image_size": image_size, "groups": len(GROUPS), "threads": args.threads, "cases": []}
        for n in sizes:
            data = full if n == max(sizes) else work / f"data-{n}"
            if data != full:
                subset(full, data, n)
            cache, bundle = work / f"cache-{n}", work / f"bundle-{n}"
            cases = [run_case("unlearn", data, cache, args.threads, bundle), run_case("rerun", data, cache, args.threads),
                     run_case("attribute", data, cache, args.threads, bundle)]
            if n == min(sizes):
                cases.append(run_case("eager", data, cache, args.threads))
            for case in cases:
                case["eager_pixel_mib"] = round(n * 3 * image_size**2 * 4 / 2**20, 1)  # float32 pixels the eager path holds
            results["cases"].extend(cases)
    by = {(c["case"], c["images"]): c for c in results["cases"]}
    small, large = sizes
    for case in ("unlearn", "attribute"):  # no ratio when the small case stayed under the models' own peak
        small_delta = by[case, small]["delta_mib"]
        results[f"ratio_{case}_delta"] = round(by[case, large]["delta_mib"] / small_delta, 2) if small_delta > 0 else None
    print(f"{'case':<10} {'images':>7} {'peak MiB':>9} {'- baseline':>11} {'eager pixels MiB':>17} {'VAE forwards (1st, 2nd call)':>30}")
    for c in results["cases"]:
        fw = c.get("vae_forwards_first_call", c.get("vae_forwards", "")), c.get("vae_forwards_second_call", "")
        print(f"{c['case']:<10} {c['images']:>7} {c['peak_mib']:>9.1f} {c['delta_mib']:>11.1f} {c['eager_pixel_mib']:>17.1f} {str(fw):>30}")
    print(f"unlearn: {large} vs {small} images, peak RSS above baseline x{results['ratio_unlearn_delta']} "
          f"(latents x{large / small:g}); attribute x{results['ratio_attribute_delta']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
