"""Is the digits base model trained long enough? Held-out likelihood against training steps.

LOGO retrains with the base recipe, so the LOGO / GUDA cost ratio grows with the base's training
steps; the GUDA paper's CIFAR-10 base trains for 2,400 epochs, ours (4,000 steps of 64 of 1,797
digits) for about 140. This trains the recipe's base on 90 % of the digits (a fixed, per-digit
stratified split) once per ``--steps`` value, each with its own learning-rate schedule as the
recipe would, and prints the final training loss and the negative ELBO (nats per image, the
recipe's ELBO grid and noise) of the held-out 10 % and of as many training images. If the held-out
value still falls between the recipe's steps and longer runs, the base is under-trained and a longer
recipe would make LOGO dearer without making GUDA dearer.

Trained models are kept in ``--work/steps_<N>`` and reused by a rerun.

Usage:
    python benchmarks/base_convergence.py --recipe digits-ddpm --steps 2000 4000 8000 16000 --threads 1
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from diffusers_guda.scoring import mean_and_stderr

HELD_OUT_EVERY = 10  # every 10th image of each digit (in a seeded order) is held out


def split(dataset, seed: int):
    """(training set, held-out images): a per-group stratified split, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(dataset), dtype=torch.bool)
    for g in range(dataset.num_groups):
        idx = torch.nonzero(dataset.group_ids == g).flatten()
        held[idx[torch.randperm(len(idx), generator=generator)][::HELD_OUT_EVERY]] = True
    from diffusers_guda.data import GroupedDataset

    return GroupedDataset(dataset.images[~held], dataset.group_ids[~held], list(dataset.group_names)), dataset.images[held]


def neg_elbo(pipe, images: torch.Tensor, elbo_config) -> torch.Tensor:
    """The negative ELBO of each image, in nats (the same noise for every model: differences are paired)."""
    from diffusers_guda.elbo import ELBOEstimator

    est = ELBOEstimator(pipe.scheduler, elbo_config)
    hashes, rows = est.image_hashes(images), est.num_rows
    index = torch.arange(len(images)).repeat_interleave(rows)
    row_ids = torch.arange(rows).repeat(len(images))
    noise = torch.cat([est.noise(img, h) for img, h in zip(images, hashes)])
    terms = est.packed_terms(pipe.unet.eval(), images, index, row_ids, noise).view(len(images), rows)
    return est.scale * terms.mean(1)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean over the images and its standard error."""
    return tuple(float(v) for v in mean_and_stderr(values, 1.0))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="digits-ddpm")
    parser.add_argument("--steps", nargs="+", type=int, default=[2000, 4000, 8000, 16000])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--work", default="benchmark-work/base-convergence")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDPMPipeline
    from diffusers.utils import logging as diffusers_logging

    from diffusers_guda.data import load_digits
    from diffusers_guda.recipes import Recipe
    from guda_lab.recipes import training_config
    from guda_lab.training import TRAIN_LOG_NAME, train_base_model

    diffusers_logging.disable_progress_bar()
    recipe = Recipe.load(args.recipe)
    base_config = training_config(recipe, "train")
    train_set, held_out = split(load_digits(), args.split_seed)
    train_probe = train_set.images[torch.linspace(0, len(train_set) - 1, len(held_out)).long()]
    print(f"{len(train_set)} training images, {len(held_out)} held out; recipe {recipe.name} "
          f"(batch {base_config.batch_size}, lr {base_config.learning_rate})")
    print("| steps | epochs | final training loss | −ELBO held out (nats) | change from the previous row, paired | "
          "−ELBO training images (nats) | held out − training |\n|---|---|---|---|---|---|---|")
    rows, previous = [], None
    for steps in args.steps:
        config = replace(base_config, steps=steps)
        path = Path(args.work) / f"steps_{steps}"
        log = path / TRAIN_LOG_NAME
        if not (log.is_file() and json.loads(log.read_text())["config"] == config.to_dict()):
            train_base_model(train_set, config, output_dir=path, progress=False)
        pipe = DDPMPipeline.from_pretrained(path)
        held_images, seen_images = neg_elbo(pipe, held_out, recipe.elbo), neg_elbo(pipe, train_probe, recipe.elbo)
        held, seen = mean_se(held_images), mean_se(seen_images)
        change = mean_se(held_images - previous) if previous is not None else None
        previous = held_images
        final = json.loads(log.read_text())["final_loss"]
        row = {"steps": steps, "epochs": steps * config.batch_size / len(train_set), "final_loss": final,
               "held_out": held, "held_out_change": change, "training": seen}
        rows.append(row)
        delta = "" if change is None else f"{change[0]:+.2f} ± {change[1]:.2f}"
        print(f"| {steps} | {row['epochs']:.0f} | {final:.4f} | {held[0]:.2f} ± {held[1]:.2f} | {delta} | "
              f"{seen[0]:.2f} ± {seen[1]:.2f} | {held[0] - seen[0]:+.2f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
