"""Which style group of a fine-tuning set made this Stable Diffusion 1.5 image? (GUDA-C on a GPU)

    python examples/sd15_style_attribution.py \\
        --base you/sd15-finetuned-on-styles \\
        --data styles/ \\
        --prompt "a lighthouse at dusk" --prompt "a cat on a sofa" \\
        --out runs/styles

    python examples/sd15_style_attribution.py --tiny --out runs/tiny   # offline smoke run on CPU

``--base`` is the *fine-tuned* checkpoint (a diffusers directory or Hub id) whose training set is
``--data``: a folder of 512x512 images with ``metadata.jsonl`` (``file_name``, ``text``, ``group``) and
optionally ``groups.json`` (a few descriptive phrases per style, used to pick anchor styles).

1. unlearn each style group into its own LoRA adapter (objective ``anchor``) -> ``OUT/bundle``;
2. generate images for the prompts and attribute them in the same call -> ``OUT/attribution.json``;
3. plot each image's group scores with ±2 standard errors -> ``OUT/attribution.png``.

Precision and memory (SD 1.5, one GPU):

* The UNet is kept in float32 (3.4 GB) and every forward runs under bfloat16 autocast. Adapters train
  in float32. Loading the pipeline in float16/bfloat16 halves the weights but then scoring keeps the
  LoRA branch unmerged (``strategy="swap"``, slower): a short unlearning run's ΔW is below half
  precision's resolution of W. A bundle is tied to the base weights *and dtype* it was made with
  (its fingerprint); score in the dtype you unlearned in.
* Memory is dominated by activations: an unlearning step (batch 4 + 4, LoRA rank 8, anchor
  objective: 2 student forward/backward + 2 teacher forwards) keeps the student's activations for
  backward; ELBO scoring holds ``rows_per_forward`` rows (4x64x64 latents with 77x768 text
  embeddings) per no-grad forward. ``benchmarks/gpu_check.py`` reports the peak of each on your
  card (not measured for this example). Lower ``--rows-per-forward`` / ``--batch`` on smaller cards;
  ``pipe.enable_vae_slicing()`` helps large generation batches.
* Training images are held on the CPU as float32 (3 MB each at 512x512) and encoded to latents one
  at a time (deterministic posterior means).
* ``benchmarks/gpu_check.py`` measures steps/s and ELBO rows/s on your card.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from diffusers_guda import GroupedDataset, Recipe
from diffusers_guda.pipelines import GUDAStableDiffusionPipeline


def write_tiny_example(out: Path) -> tuple[str, str, list[str]]:
    """A tiny offline stand-in: a random tiny Stable Diffusion and a 3-style captioned dataset."""
    import numpy as np
    from PIL import Image

    from diffusers_guda.testing import tiny_stable_diffusion

    styles = {"red": ["red", "warm"], "green": ["green", "leafy"], "blue": ["blue", "cold"]}
    words = ["a", "square", "stripe", "in", "style"] + [w for phrases in styles.values() for w in phrases]
    base = out / "tiny-base"
    tiny_stable_diffusion(words=words).save_pretrained(base)
    data = out / "tiny-data"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for s, (style, _) in enumerate(styles.items()):
        for i in range(6):
            image = np.zeros((16, 16, 3), np.uint8)
            shape = "square" if i % 2 == 0 else "stripe"
            if shape == "square":
                image[4:12, 4:12, s] = 255
            else:
                image[:, 6:10, s] = 255
            Image.fromarray(image).save(data / f"{style}-{i}.png")
            rows.append({"file_name": f"{style}-{i}.png", "text": f"a {shape} in {style} style", "group": style})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "groups.json").write_text(json.dumps(styles))
    return str(base), str(data), ["a square in red style", "a stripe in blue style"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="Fine-tuned Stable Diffusion 1.5 checkpoint (directory or Hub id).")
    parser.add_argument("--data", help="Its training set: images + metadata.jsonl (+ groups.json).")
    parser.add_argument("--prompt", action="append", default=[], help="Prompt to generate and attribute (repeatable).")
    parser.add_argument("--out", default="runs/sd15-styles")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--recipe", default="sd-styles", help="Unlearning and scoring settings (adapters/sd-styles.json).")
    parser.add_argument("--steps", type=int, help="Unlearning steps per group (default: the recipe's).")
    parser.add_argument("--batch", type=int, help="Forget and retain images per step, each (default: the recipe's).")
    parser.add_argument("--rows-per-forward", type=int, help="ELBO rows per UNet forward (memory; default: the recipe's).")
    parser.add_argument("--inference-steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="Offline smoke run on a tiny random SD (CPU).")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch)) if v is not None}
    recipe = Recipe.load(args.recipe)
    elbo = recipe.elbo if args.rows_per_forward is None else replace(recipe.elbo, rows_per_forward=args.rows_per_forward)
    if args.tiny:  # a few steps of a random model: only shows that every stage runs
        args.base, args.data, tiny_prompts = write_tiny_example(out)
        args.prompt = args.prompt or tiny_prompts
        settings.update(steps=min(args.steps or 5, 5), learning_rate=1e-3, batch_size=2, lora_rank=2)
        elbo, args.inference_steps = replace(elbo, stride=100), 4
    if not (args.base and args.data and args.prompt):
        parser.error("--base, --data and at least one --prompt are needed (or --tiny).")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = "bfloat16" if device == "cuda" else None
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    # float32 weights + bf16 autocast: see the precision notes above
    pipe = GUDAStableDiffusionPipeline.from_pretrained(args.base, torch_dtype=torch.float32, safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    dataset = GroupedDataset.from_metadata(args.data, mode="RGB")
    print(f"{len(dataset)} images in {dataset.num_groups} groups: {dict(zip(dataset.group_names, dataset.group_sizes()))}")

    # 1. one adapter per group with the recipe's settings (resumable: finished groups in OUT/checkpoints
    #    are skipped); the bundle records the ELBO settings it is scored with
    bundle = pipe.unlearn_groups(dataset, recipe=recipe, elbo_config=elbo, checkpoint_dir=str(out / "checkpoints"),
                                 autocast_dtype=autocast, seed=args.seed, **settings)
    bundle.save_pretrained(out / "bundle")
    scoring = {"elbo_config": replace(elbo, autocast_dtype=autocast), "batch_size": 4}  # the bundle's grid, on this device

    # 2. generate with classifier-free guidance and attribute each image given its prompt
    images, results = [], []
    for i, prompt in enumerate(args.prompt):
        generated = pipe(
            prompt, num_images_per_prompt=args.images_per_prompt, num_inference_steps=args.inference_steps,
            guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed + i),
            output_type="pt", return_attribution=True, attribution_kwargs=scoring,
        )
        images.append(generated.images.cpu())
        results.append(generated.attribution)
        for ranking in generated.attribution.top(3):
            print(f"{prompt!r}: " + ", ".join(f"{group} ({score:+.1f} nats)" for group, score in ranking))

    # 3. one report over all images
    report = {
        "base": args.base,
        "prompts": [p for p in args.prompt for _ in range(args.images_per_prompt)],
        "groups": bundle.group_names,
        "scores": torch.cat([r.scores for r in results]).tolist(),
        "stderr": torch.cat([r.stderr for r in results]).tolist(),
        "top_group": [g for r in results for g in r.top_groups()],
        "elbo": results[0].metadata["elbo"],
        "strategy": results[0].metadata["strategy"],
    }
    (out / "attribution.json").write_text(json.dumps(report, indent=2) + "\n")
    merged = type(results[0])(
        scores=torch.cat([r.scores for r in results]), stderr=torch.cat([r.stderr for r in results]),
        groups=results[0].groups, neg_elbo=torch.cat([r.neg_elbo for r in results]),
    )
    merged.plot(out / "attribution.png", images=torch.cat(images) * 2 - 1, max_queries=8)
    print(f"bundle: {out / 'bundle'}; report: {out / 'attribution.json'}; plot: {out / 'attribution.png'}")
    return report


if __name__ == "__main__":
    main()
