"""Which base UNet generates a benchmark's images? Train variants of its recipe and look at samples.

Written for the emoji benchmarks (docs/results.md#emoji-styles), whose first recipes sampled coloured
blobs. The cure turned out to be the prediction type, not capacity: with epsilon-prediction the small
UNet's samples were blobs, with v-prediction (the recipe now) they are emoji-like shapes on white at
the same steps. This trains the benchmark's recipe and variants of it, one after the other, and
writes for each, the moment it is done, to ``--out``:

* ``<variant>.png``: a contact sheet of ``--samples`` images (1,000 DDPM steps, seeds 0, 1, ...; for a
  text-conditioned benchmark, image ``i`` from the ``i``-th of the dataset's sorted distinct prompts,
  cycled, as ``guda evaluate`` draws its queries);
* a line in ``capacity.json``: parameters, prediction type, steps, batch, wall time, final training
  loss, and the mean pixel distance from each sample to its nearest training image beside the same
  distance for as many training images to their nearest *other* training image (a model that makes
  emoji should come out near the second; blobs are far from every emoji).

Variants (each the recipe's ``train`` section with these changes):

* ``recipe``: unchanged;
* ``epsilon``: epsilon-prediction (the emoji recipes' first setting);
* ``v-prediction``: v-prediction;
* ``wide``: ``block_out_channels`` (64, 128, 256), two layers per block, attention at the lowest level;
* ``wide-ema``: ``wide`` sampled from an EMA of the weights (decay 0.9995).

The wide variants are sized for one GPU (``--device cuda``: a few minutes each at the defaults; on
one CPU core a step of 64 images takes about 2 s against 0.3 s for the recipe's); ``--tiny`` shrinks
every variant and the sampling for a CPU check. The training loop is the lab's, so a variant's
settings can go into a recipe as they are.

Usage:
    python benchmarks/base_capacity.py --benchmark emoji-styles-uncond --variants recipe epsilon --threads 1 --out capacity/
    python benchmarks/base_capacity.py --benchmark emoji-styles --variants v-prediction --threads 1 --out capacity-text/
    python benchmarks/base_capacity.py --benchmark emoji-styles-uncond --device cuda --steps 8000 --batch-size 256 --out capacity/
    python benchmarks/base_capacity.py --benchmark digits-classes --tiny --threads 2 --out /tmp/capacity
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

VARIANTS = {
    "recipe": {},
    "epsilon": {"prediction_type": "epsilon"},
    "v-prediction": {"prediction_type": "v_prediction"},
    "wide": {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "attention": True},
    "wide-ema": {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "attention": True, "ema_decay": 0.9995},
}
TINY = {"block_out_channels": (32, 32), "layers_per_block": 1, "steps": 3, "batch_size": 8}


def nearest_distances(images: torch.Tensor, reference: torch.Tensor, itself: torch.Tensor | None = None) -> torch.Tensor:
    """Per image, the root-mean-square pixel distance to its nearest ``reference`` image (both in [-1, 1]).

    ``itself[i]``: the index of image ``i`` in ``reference``, which is then not counted (its nearest *other* image).
    """
    flat, ref = images.flatten(1).double(), reference.flatten(1).double()
    squared = torch.cdist(flat, ref).pow(2) / flat.shape[1]
    if itself is not None:
        squared[torch.arange(len(itself)), itself] = float("inf")
    return squared.min(dim=1).values.sqrt()


def contact_sheet(images: torch.Tensor, path: Path, scale: int = 4) -> None:
    """``images`` ([N, C, H, W] in [-1, 1]) tiled eight to a row (white where the last row is short), shown ``scale`` x larger."""
    from diffusers.utils import make_image_grid, numpy_to_pil
    from PIL import Image

    pictures = numpy_to_pil(((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
    cols = min(8, len(pictures))
    rows = -(-len(pictures) // cols)
    pictures += [Image.new(pictures[0].mode, pictures[0].size, "white")] * (rows * cols - len(pictures))
    grid = make_image_grid(pictures, rows, cols)
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def sample(pipe, count: int, steps: int, prompts: list[str] | None = None) -> torch.Tensor:
    """``count`` samples of ``pipe`` in [-1, 1], image ``i`` from seed ``i`` (and ``prompts[i]`` for a text-to-image pipeline)."""
    generators = [torch.Generator(device="cpu").manual_seed(i) for i in range(count)]
    inputs = {"prompt": prompts} if prompts is not None else {"batch_size": count}
    out = pipe(**inputs, generator=generators, num_inference_steps=steps, output_type="np").images
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() * 2 - 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="emoji-styles-uncond", help="a benchmark whose recipe has a train section")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: the recipe's)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--sampling-steps", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny variants, 3 training steps and 10 sampling steps: a CPU check")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True, help="folder for the contact sheets and capacity.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_guda.recipes import Recipe
    from guda_lab.evaluation.benchmarks import get_benchmark
    from guda_lab.queries import query_prompts
    from guda_lab.recipes import training_config
    from guda_lab.training import TRAIN_LOG_NAME, train_base_model

    benchmark = get_benchmark(args.benchmark)
    recipe = Recipe.load(benchmark.recipe)
    dataset = benchmark.load()
    prompts = query_prompts(dataset, args.samples) if (recipe.train or {}).get("conditioning") == "text" else None
    base_config = training_config(recipe, "base_capacity.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "capacity.json"
    record = {"benchmark": args.benchmark, "images": len(dataset.images), "device": args.device, "prompts": prompts, "variants": {}}
    chosen = torch.randperm(len(dataset.images), generator=torch.Generator().manual_seed(0))[: args.samples]
    record["training_nearest_other_rms"] = float(nearest_distances(dataset.images[chosen], dataset.images, itself=chosen).mean())
    sampling_steps = 10 if args.tiny else args.sampling_steps
    for name in args.variants:
        settings = {**VARIANTS[name], **(TINY if args.tiny else {})}
        if args.steps and not args.tiny:
            settings["steps"] = args.steps
        if args.batch_size and not args.tiny:
            settings["batch_size"] = args.batch_size
        config = replace(base_config, **settings)
        with tempfile.TemporaryDirectory() as tmp:  # the training log; the weights are not kept
            pipe = train_base_model(dataset, config, output_dir=Path(tmp) / name, progress=False, description=name, device=args.device)
            log = json.loads((Path(tmp) / name / TRAIN_LOG_NAME).read_text())
        pipe.set_progress_bar_config(disable=True)
        samples = sample(pipe, args.samples, sampling_steps, prompts)
        contact_sheet(samples, out / f"{name}.png")
        record["variants"][name] = {
            "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
            "attention": config.attention, "ema_decay": config.ema_decay, "prediction_type": config.prediction_type,
            "steps": config.steps, "batch_size": config.batch_size,
            "parameters": sum(p.numel() for p in pipe.unet.parameters()), "train_wall_s": round(log["wall_s"], 1),
            "final_loss": log["final_loss"], "sample_nearest_training_rms": float(nearest_distances(samples, dataset.images).mean()),
        }
        record_path.write_text(json.dumps(record, indent=1))
        print(f"{name}: {record['variants'][name]}", flush=True)


if __name__ == "__main__":
    main()
