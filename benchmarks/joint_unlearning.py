"""When training adapters together pays: wall time of unlearning K groups one after the other against
``joint_groups`` of them per loop, measured in one run, and how far the joint adapters are from the
sequential ones.

The model is the recipe's base UNet (``--base``: a trained pipeline directory; else built from the
recipe with its initial weights, which time the same), the data the embedded digits (10 groups) or
a benchmark. Every setting unlearns the same groups for ``--steps`` steps; settings are interleaved
over ``--repeats`` rounds and the median wall time of the training loops (without the before/after
loss evaluation) is reported, with the ratio to sequential and the largest
adapter difference to the sequential adapters (float rounding, see docs/method.md#adapters-trained-together).

Usage:
    python benchmarks/joint_unlearning.py --joint 1 2 5 10 --steps 10 --repeats 3 --threads 2 [--device cuda] [--save joint.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="digits-ddpm")
    parser.add_argument("--base", help="a trained DDPM pipeline directory (default: the recipe's UNet at initialisation)")
    parser.add_argument("--benchmark", help="a named benchmark (default: the digits, one group per class)")
    parser.add_argument("--joint", type=int, nargs="+", default=[1, 2, 5, 10], help="joint_groups settings (1 is the sequential baseline)")
    parser.add_argument("--steps", type=int, default=10, help="unlearning steps per group")
    parser.add_argument("--batch-size", type=int, help="forget and retain batch (default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--save", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if 1 not in args.joint:
        args.joint = [1, *args.joint]

    from diffusers_guda import GroupUnlearner, GUDADDPMPipeline
    from diffusers_guda.data import load_digits
    from diffusers_guda.diffusion import training_scheduler
    from diffusers_guda.recipes import Recipe
    from guda_lab.evaluation.benchmarks import load_benchmark
    from guda_lab.recipes import training_config

    recipe = Recipe.load(args.recipe)
    dataset = load_benchmark(args.benchmark) if args.benchmark else load_digits()
    if args.base:
        pipe = GUDADDPMPipeline.from_pretrained(args.base)
        unet, scheduler = pipe.unet, training_scheduler(pipe.scheduler)
    else:
        train = training_config(recipe, "joint_unlearning")
        torch.manual_seed(train.seed)
        unet, scheduler = train.build_unet(dataset.image_shape), train.build_scheduler()
    unet = unet.to(args.device).eval()
    # a small before/after evaluation: it is not timed, only waited for
    overrides = {"steps": args.steps, "eval_images": 16, "eval_draws": 1} | ({"batch_size": args.batch_size} if args.batch_size else {})
    settings = {g: recipe.unlearning_with(joint_groups=g, **overrides) for g in args.joint}

    walls: dict[int, list[float]] = {g: [] for g in args.joint}
    adapters: dict[int, dict] = {}
    for _ in range(args.repeats):
        for g in args.joint:
            bundle = GroupUnlearner(unet, scheduler, settings[g]).unlearn(dataset, progress=False)
            # the training loops alone (each group's share of its loop), not the before/after loss evaluation
            walls[g].append(sum(group.stats["wall_s"] for group in bundle.groups))
            adapters[g] = bundle.adapters
            group_steps = sum(group.stats["steps"] for group in bundle.groups)  # the recipe may scale steps with group size

    config = settings[1]
    rows = []
    base = statistics.median(walls[1])
    print(f"{dataset.num_groups} groups x {args.steps} steps, batch {config.forget_batch_size}+{config.retain_batch_size}, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'joint_groups':>12s} {'loops (s)':>10s} {'s / group-step':>15s} {'vs sequential':>14s} {'max |Δ adapter|':>16s}")
    for g in args.joint:
        wall = statistics.median(walls[g])
        diff = max((adapters[g][slug][k] - adapters[1][slug][k]).abs().max().item() for slug in adapters[1] for k in adapters[1][slug])
        row = {"joint_groups": g, "wall_s": wall, "walls": walls[g], "per_group_step_s": wall / group_steps,
               "speedup": base / wall, "max_adapter_diff": diff}
        rows.append(row)
        print(f"{g:12d} {wall:10.2f} {row['per_group_step_s']:15.4f} {row['speedup']:13.2f}x {diff:16.2e}")
    result = {"recipe": recipe.name, "groups": dataset.num_groups, "steps": args.steps, "group_steps": group_steps, "device": args.device,
              "threads": torch.get_num_threads(), "batch": [config.forget_batch_size, config.retain_batch_size], "rows": rows}
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
