"""The lab's ``guda`` commands: ``train``, ``logo``, ``demo`` and ``evaluate``.

Registered through the ``diffusers_guda.commands`` entry point (see :mod:`diffusers_guda.cli`).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import fields, replace
from pathlib import Path

from diffusers_guda.cli.arguments import (
    add_common,
    add_data,
    add_device,
    add_recipe,
    check_apart,
    check_distinct,
    check_output_dir,
    launched_process,
    load_dataset,
    one_process_only,
    parse_options,
    require_positive,
    torch_device,
)
from diffusers_guda.errors import ConfigError
from diffusers_guda.io_utils import check_replaceable_directory
from diffusers_guda.locks import output_lock
from diffusers_guda.recipes import DEFAULT_RECIPE, Recipe

from .recipes import training_config

#: The benchmark whose dataset ``--data digits`` loads.
DIGITS_BENCHMARK = "digits-classes"
RECIPE_HELP = f"recipe name in adapters/ or a JSON path (default: the benchmark's, e.g. digits-styles; else {DEFAULT_RECIPE})"


def named_benchmark(args):
    """The benchmark ``--benchmark`` names (the embedded ``--data digits`` are ``digits-classes``'s dataset), or None."""
    from .evaluation.benchmarks import get_benchmark

    name = args.benchmark or (DIGITS_BENCHMARK if args.data == "digits" else None)
    return get_benchmark(name) if name else None


def recipe_name(args) -> str:
    """``--recipe``, else the benchmark's recipe, else the default: what ``train``, ``logo`` and ``evaluate`` all train with."""
    if args.recipe:
        return args.recipe
    benchmark = named_benchmark(args)
    return benchmark.recipe if benchmark else DEFAULT_RECIPE


def register(subparsers) -> None:
    p = add_common(subparsers.add_parser("train", help="train the base diffusion model on a grouped dataset"))
    add_data(p)
    p.add_argument("--out", required=True, help="output pipeline directory")
    add_recipe(p, help=RECIPE_HELP, default=None)
    p.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="training seed (recorded in guda_train.json)")
    add_device(p)
    p.set_defaults(func=train)

    p = add_common(subparsers.add_parser("logo", help="retrain the base recipe once without each group (ground truth; resumable)"))
    add_data(p, help="the base model's training set ('digits' or an image folder)")
    p.add_argument("--out", required=True, help="root directory; models go to <out>/seed_<seed>/<group>/ (each locked while it trains, so runs in "
                   "several shells, or beside `guda evaluate` on its logo/, share one root)")
    add_recipe(p, help=RECIPE_HELP + "; LOGO must use the base model's", default=None)
    p.add_argument("--seed", type=int, help="training seed (default: the recipe's; another seed gives the LOGO noise floor)")
    p.add_argument("--groups", nargs="+", help="leave out only these groups (names)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    add_device(p)
    p.set_defaults(func=logo)

    p = add_common(subparsers.add_parser("demo", help="train, unlearn, generate and attribute on the embedded digits"))
    p.add_argument("--out", default="guda-demo", help="output directory (default guda-demo)")
    add_recipe(p)
    p.add_argument("--queries", type=int, help="number of generated query images (default from the recipe: 100)")
    p.set_defaults(func=demo)

    p = add_common(subparsers.add_parser("evaluate", help="GUDA and baselines against LOGO ground truth, with the LOGO ceiling and costs"))
    add_data(p, required=True)
    p.add_argument("--out", required=True, help="output directory (finished stages in it are reused)")
    add_recipe(p, help=RECIPE_HELP, default=None)
    p.add_argument("--queries", type=int, help="number of generated query images (default from the recipe)")
    p.add_argument("--query-seed", type=int,
                   help="seed of query 0, query i from seed + i (default from the recipe; another seed gives held-out queries)")
    p.add_argument("--methods", nargs="+",
                   help="methods to score (default: guda similarity nearest_neighbour gradient instance_unlearning dtrak das)")
    p.add_argument("--seed-b", type=int, help="training seed of the second LOGO set, the ceiling (default: the recipe's seed + 1)")
    p.add_argument("--gradient-option", action="append", metavar="KEY=VALUE",
                   help="gradient baseline setting, repeatable (e.g. projection_dim=1024, timesteps=[50,200,500])")
    p.add_argument("--instance-option", action="append", metavar="KEY=VALUE",
                   help="instance-unlearning baseline setting, repeatable (e.g. steps=10, learning_rate=0.003)")
    p.add_argument("--dtrak-option", action="append", metavar="KEY=VALUE",
                   help="D-TRAK baseline setting, repeatable (e.g. projection_dim=1024, damping=0.1, output_function=loss)")
    p.add_argument("--das-option", action="append", metavar="KEY=VALUE",
                   help="DAS baseline setting, repeatable (e.g. projection_dim=1024, damping=0.1, leverage=false)")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip LOGO seed B (half the LOGO cost; the report then has no ceiling and no fractions of it)")
    p.add_argument("--logo-groups", type=int, metavar="N",
                   help="train LOGO for N groups only (a random subset fixed by the recipe's seed) and compare every method "
                        "with it on those groups; for many groups, where LOGO for all is too dear")
    p.add_argument("--reference-draws", type=int, metavar="N",
                   help="noise draws per timestep when scoring the LOGO models (default: the recipe's); more make the "
                        "reference less noisy where groups are near-ties (docs/evaluation.md#noise-in-the-reference)")
    p.set_defaults(func=evaluate)

    p = add_common(subparsers.add_parser("results", help="the results tables (docs/results.md) of finished evaluations"))
    p.add_argument("dirs", nargs="+", metavar="DIR", help="finished `guda evaluate` output directories, in table order")
    p.add_argument("--queries", metavar="START:STOP",
                   help="tabulate these queries only, e.g. 100: for the held-out ones from query 100 on (default: all)")
    p.add_argument("--metrics", nargs="+", metavar="NAME",
                   help="the tables' metric columns, e.g. spearman spearman_others (default: top1 ndcg@3 spearman); "
                        "any of top1 top3 mrr ndcg@<k> rbo spearman kendall spearman_others, computed from the runs' scores")
    p.add_argument("--out", help="write the Markdown here (default: print it)")
    p.set_defaults(func=results)


def train(args) -> None:
    from .training import train_base_model

    one_process_only("train")
    check_output_dir(args.out)
    check_apart({"--out": args.out}, {"--data": args.data, "--recipe": args.recipe})
    if args.lr is not None and not math.isfinite(args.lr):  # the training config takes any value > 0
        raise ConfigError(f"--lr must be a finite number > 0, got {args.lr}.")
    config = training_config(Recipe.load(recipe_name(args)), "train")
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("learning_rate", args.lr), ("seed", args.seed)) if v is not None}
    config = replace(config, **overrides)
    device = torch_device(args.device) if args.device else launched_process().device
    with output_lock(args.out, command="guda train"):  # one run at a time on --out
        check_replaceable_directory(args.out, "model_index.json")
        dataset = load_dataset(args)
        train_base_model(dataset, config, output_dir=args.out, progress=not args.quiet, device=device)
    print(f"saved the base pipeline to {args.out} (load it with diffusers.DDPMPipeline.from_pretrained)")


def logo(args) -> None:
    from .evaluation.logo import train_logo_models

    check_output_dir(args.out)
    check_apart({"--out": args.out}, {"--data": args.data, "--recipe": args.recipe})
    check_distinct(args.groups, "--groups")
    config = training_config(Recipe.load(recipe_name(args)), "logo")
    config = replace(config, **({"steps": args.steps} if args.steps is not None else {}))
    process = launched_process()
    # no lock on --out: each model has its own, so runs in several shells share one root
    paths = train_logo_models(
        load_dataset(args), config, args.out, groups=args.groups, seed=args.seed, progress=not args.quiet, process=process,
        device=torch_device(args.device) if args.device else None,
    )
    if process.is_main:
        print(f"{len(paths)} leave-one-group-out models under {Path(args.out) / f'seed_{args.seed if args.seed is not None else config.seed}'}")


def demo(args) -> None:
    from .demo import run_demo

    one_process_only("demo")
    check_output_dir(args.out)
    check_apart({"--out": args.out}, {"--recipe": args.recipe})
    require_positive(queries=args.queries)
    with output_lock(args.out, command="guda demo"):  # one run at a time on --out
        run_demo(args.out, recipe=args.recipe, num_queries=args.queries, progress=not args.quiet)
    print(f"\nartifacts in {args.out}: base/ bundle/ queries/ report.json queries.png attribution_bars.png label_heatmap.png unlearning.png")


def _baseline_config(config_class, pairs, flag):
    """A baseline's settings from ``KEY=VALUE`` pairs (unknown keys named in a one-line error)."""
    options = parse_options(pairs, flag)
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{flag}: unknown setting(s) {unknown}; known: {sorted(known)}.")
    try:
        return config_class(**options)
    except (TypeError, ValueError) as exc:  # also a value its type cannot read (timesteps=abc)
        raise ConfigError(f"{flag}: {exc}") from exc


def evaluate(args) -> None:
    from .evaluation.gradient import GradientConfig
    from .evaluation.instance_unlearning import InstanceUnlearningConfig
    from .evaluation.kernel import DASConfig, DTRAKConfig
    from .evaluation.runner import METHODS, run_evaluation

    one_process_only("evaluate")
    check_output_dir(args.out)
    check_apart({"--out": args.out}, {"--data": args.data, "--recipe": args.recipe})
    require_positive(queries=args.queries, logo_groups=args.logo_groups, reference_draws=args.reference_draws)
    gradient = _baseline_config(GradientConfig, args.gradient_option, "--gradient-option")
    instance = _baseline_config(InstanceUnlearningConfig, args.instance_option, "--instance-option")
    dtrak = _baseline_config(DTRAKConfig, args.dtrak_option, "--dtrak-option")
    das = _baseline_config(DASConfig, args.das_option, "--das-option")
    with output_lock(args.out, command="guda evaluate"):  # one run at a time on --out
        dataset = load_dataset(args)
        run_evaluation(args.out, dataset, recipe_name(args), num_queries=args.queries, query_seed=args.query_seed,
                       methods=args.methods or METHODS, seed_b=args.seed_b, ceiling=not args.no_ceiling, gradient_config=gradient,
                       instance_config=instance, progress=not args.quiet, benchmark=named_benchmark(args), dtrak_config=dtrak,
                       das_config=das, command="guda " + shlex.join(args.argv), logo_groups=args.logo_groups,
                       reference_draws=args.reference_draws)
    print(f"\nartifacts in {args.out}: report.json report.md metrics.png score_heatmaps.png scores/ base/ logo/ bundle/ queries/")


def results(args) -> None:
    from diffusers_guda.io_utils import write_text_atomic

    from .evaluation.results_table import parse_query_range, results_markdown

    markdown = results_markdown(args.dirs, None if args.queries is None else parse_query_range(args.queries), args.metrics)
    if args.out is None:
        print(markdown, end="")
        return
    write_text_atomic(Path(args.out), markdown)
    print(f"tables of {len(args.dirs)} evaluation(s) -> {args.out}")
