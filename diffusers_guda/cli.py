"""The ``guda`` command line: a thin layer over the public API."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .errors import ConfigError, GUDAError

EPILOG = "Documentation: README.md of diffusers-guda. Every command runs offline."


def _threads(args) -> None:
    import torch

    if getattr(args, "threads", None) is not None:
        _at_least_one(threads=args.threads)
        torch.set_num_threads(args.threads)


def _device(spec: str):
    """The torch device named by ``--device``, refused when this machine has none of it."""
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r} is not a torch device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: torch sees no CUDA GPU on this machine; use --device cpu.")
    return device


def _at_least_one(**flags) -> None:
    """Refuse a flag given as 0 or less (0 would otherwise silently mean "the default")."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def _process():
    """This process of a ``torchrun``/``accelerate launch`` run (or the only one), group joined."""
    from diffusers.utils import logging as diffusers_logging

    from .distributed import current_process

    process = current_process()
    if not process.is_main:  # progress is shown by the main process alone (main() restores the setting)
        diffusers_logging.disable_progress_bar()
    return process


def _one_process_only(command: str) -> None:
    """Refuse a multi-process launch of a command that does not split its work."""
    from .distributed import detect_process

    if detect_process().is_distributed:
        raise ConfigError(
            f"guda {command} runs in one process; start it without torchrun or accelerate launch "
            "(unlearn, attribute and logo split their work across processes)."
        )


def _output_dir(path: str) -> None:
    """Refuse an output directory path that is an existing file (it would be replaced by a directory)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"--out {path} is an existing file, not a directory; choose another path or delete the file.")


def _output_file(path: str | None, flag: str) -> None:
    """Refuse an output file path that cannot be written, before any work is done."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; pass a file path (e.g. one inside that directory).")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the folder {path.parent} does not exist; create it first.")


def _plot_format(path: str) -> None:
    """Refuse a --plot path whose extension matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(path).suffix[1:].lower()
    if suffix and suffix not in formats:
        raise ConfigError(f"--plot {path}: unsupported image format .{suffix}; use a .png path (or one of {', '.join(formats)}).")


def _dataset(args):
    """The training set named by ``--benchmark`` or ``--data`` (and ``--mode``)."""
    from .data import GroupedDataset, load_digits
    from .evaluation.benchmarks import load_benchmark

    if getattr(args, "benchmark", None):
        return load_benchmark(args.benchmark)
    if args.data in (None, "digits"):
        return load_digits()
    return GroupedDataset.from_image_folder(args.data, mode=args.mode)


def _load_base(spec: str):
    """The base pipeline, with a one-line error when ``spec`` is neither a pipeline directory nor a cached Hub id."""
    from .pipelines import GUDADDPMPipeline

    try:
        return GUDADDPMPipeline.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GUDAError(
            f"Cannot load the base pipeline {spec!r} ({reason}). Pass a directory written by `guda train` "
            "(or DDPMPipeline.save_pretrained), or a Hub id already in the local cache."
        ) from exc


def _options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise GUDAError(f"--option expects KEY=VALUE, got {pair!r}.")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_train(args) -> None:
    from dataclasses import replace

    from .recipes import Recipe
    from .training import train_base_model

    _one_process_only("train")
    _output_dir(args.out)
    recipe = Recipe.load(args.recipe)
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("learning_rate", args.lr), ("seed", args.seed)) if v is not None}
    config = replace(recipe.train, **overrides)
    device = _device(args.device) if args.device else _process().device
    dataset = _dataset(args)
    train_base_model(dataset, config, output_dir=args.out, progress=not args.quiet, device=device)
    print(f"saved the base pipeline to {args.out} (load it with diffusers.DDPMPipeline.from_pretrained)")


def cmd_unlearn(args) -> None:
    from dataclasses import replace

    from .lora import LoRASettings
    from .recipes import Recipe

    _output_dir(args.out)
    recipe = Recipe.load(args.recipe)
    config = recipe.unlearning
    options = dict(config.objective_options) if args.objective in (None, config.objective) else {}
    options.update(_options(args.option))
    rank = config.lora.rank if args.rank is None else args.rank
    alpha = args.alpha if args.alpha is not None else (config.lora.alpha if args.rank is None else args.rank)
    lora = LoRASettings(rank=rank, alpha=alpha, target_modules=config.lora.target_modules)
    overrides = {k: v for k, v in (("steps", args.steps), ("learning_rate", args.lr), ("seed", args.seed)) if v is not None}
    if args.batch_size is not None:
        overrides.update(forget_batch_size=args.batch_size, retain_batch_size=args.batch_size)
    config = replace(config, objective=args.objective or config.objective, objective_options=options, lora=lora, **overrides)
    dataset = _dataset(args)
    out = Path(args.out)
    partial = out.parent / f".{out.name}-partial"
    process = _process()
    pipe = _load_base(args.base).to(process.device)
    # each process unlearns its share of the groups into the shared checkpoint; all get the whole bundle
    bundle = pipe.unlearn_groups(dataset, config=config, groups=args.groups, checkpoint_dir=partial, progress=not args.quiet, process=process)
    if process.is_main:
        bundle.elbo = recipe.elbo.to_dict()
        bundle.base_model["id"] = args.base_id or args.base
        bundle.save_pretrained(out)
        shutil.rmtree(partial, ignore_errors=True)
        for g in bundle.groups:
            s = g.stats
            print(f"{g.name}: forget loss {s['forget_loss_before']:.4f} -> {s['forget_loss_after']:.4f} ({100 * s['forget_loss_change']:+.1f}%), "
                  f"retain loss {s['retain_loss_before']:.4f} -> {s['retain_loss_after']:.4f} ({100 * s['retain_loss_change']:+.1f}%)")
        shared = f" (groups shared by {process.world_size} processes)" if process.is_distributed else ""
        print(f"saved the adapter bundle to {out}{shared}")
    process.barrier()  # every process ends once the bundle is on disk


def _query_files(spec: list[str]) -> list[Path]:
    from .data import IMAGE_EXTENSIONS

    files = []
    for item in spec:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            files.append(path)
        else:
            raise GUDAError(f"Query image {path} does not exist.")
    if not files:
        raise GUDAError(f"No images found in {spec}.")
    return files


def _open_query(path: Path):
    """A query image, fully read, with a one-line error for a file that is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise GUDAError(f"Cannot read query image {path} ({exc}). Pass PNG/JPEG image files, or remove that file.") from exc
    return image


def cmd_attribute(args) -> None:
    from .elbo import ELBOConfig
    from .pipelines import to_model_images

    _at_least_one(top_k=args.top_k)
    _output_file(args.out, "--out")
    _output_file(args.plot, "--plot")
    if args.plot:
        _plot_format(args.plot)
    files = _query_files(args.images)
    queries = [_open_query(f) for f in files]
    process = _process()
    pipe = _load_base(args.base).to(process.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_guda_bundle(args.bundle, revision=args.revision)
    images = to_model_images(queries)
    elbo = None
    if args.stride is not None or args.draws is not None or args.elbo_seed is not None:
        base = dict(pipe.guda_bundle.elbo or {})
        base.update({k: v for k, v in (("stride", args.stride), ("num_draws", args.draws), ("seed", args.elbo_seed)) if v is not None})
        elbo = ELBOConfig(**base)
    result = pipe.attribute(images, batch_size=args.batch_size, elbo_config=elbo, strategy=args.strategy,
                            adaptive_z=args.adaptive_z, progress=not args.quiet, process=process)
    if not process.is_main:  # every process holds the whole result; the main one reports it
        return
    result.metadata["files"] = [str(f) for f in files]
    if args.out:
        result.to_json(args.out)
    if args.plot:
        result.plot(args.plot, images=images, max_queries=min(len(files), 12))
    width = max(len(f.name) for f in files)
    for f, row, err in zip(files, result.top(args.top_k), result.stderr):
        ranked = ", ".join(f"{name} {score:+.4f}" for name, score in row)
        print(f"{f.name:<{width}}  {ranked}")
    if args.out:
        print(f"wrote {args.out}")


def cmd_logo(args) -> None:
    from dataclasses import replace

    from .evaluation.logo import train_logo_models
    from .recipes import Recipe

    _output_dir(args.out)
    recipe = Recipe.load(args.recipe)
    config = replace(recipe.train, **({"steps": args.steps} if args.steps is not None else {}))
    dataset = _dataset(args)
    process = _process()
    paths = train_logo_models(
        dataset, config, args.out, groups=args.groups, seed=args.seed, progress=not args.quiet, process=process,
        device=_device(args.device) if args.device else None,
    )
    if process.is_main:
        print(f"{len(paths)} leave-one-group-out models under {Path(args.out) / f'seed_{args.seed if args.seed is not None else config.seed}'}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    _one_process_only("demo")
    _output_dir(args.out)
    _at_least_one(queries=args.queries)
    run_demo(args.out, recipe=args.recipe, num_queries=args.queries, progress=not args.quiet)
    print(f"\nartifacts in {args.out}: base/ bundle/ queries/ report.json queries.png attribution_bars.png label_heatmap.png unlearning.png")


def _baseline_config(config_class, pairs, flag):
    """A baseline's settings from ``KEY=VALUE`` pairs (unknown keys named in a one-line error)."""
    from dataclasses import fields

    options = _options(pairs)
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{flag}: unknown setting(s) {unknown}; known: {sorted(known)}.")
    try:
        return config_class(**options)
    except TypeError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc


def cmd_evaluate(args) -> None:
    from .evaluation.runner import METHODS, run_evaluation

    _one_process_only("evaluate")
    _output_dir(args.out)
    _at_least_one(queries=args.queries)
    from .evaluation.baselines import GradientConfig, InstanceUnlearningConfig

    gradient = _baseline_config(GradientConfig, args.gradient_option, "--gradient-option")
    instance = _baseline_config(InstanceUnlearningConfig, args.instance_option, "--instance-option")
    dataset = _dataset(args)
    recipe = args.recipe
    if recipe is None:
        from .evaluation.benchmarks import benchmark_recipe

        recipe = benchmark_recipe(args.benchmark) if args.benchmark else "digits-ddpm"
    run_evaluation(args.out, dataset, recipe, num_queries=args.queries, methods=args.methods or METHODS,
                   seed_b=args.seed_b, ceiling=not args.no_ceiling, gradient_config=gradient,
                   instance_config=instance, progress=not args.quiet)
    print(f"\nartifacts in {args.out}: report.json report.md metrics.png score_heatmaps.png scores/ base/ logo/ bundle/ queries/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guda", description="Group attribution for diffusers models by unlearning (GUDA).", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p):
        p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    def data_args(p, help="'digits' (embedded) or an image folder with one subfolder per group", required=False):
        source = p.add_mutually_exclusive_group(required=required)
        # default None (meaning the digits): argparse only sees a conflict with --benchmark when --data differs from its default
        source.add_argument("--data", help=help + ("" if required else "; default: digits"))
        source.add_argument("--benchmark", help="a named benchmark dataset instead of --data (digits-classes, digits-contributors, digits-styles)")
        p.add_argument("--mode", choices=["L", "RGB"], help="convert --data images to grayscale (L) or RGB")

    def device_arg(p):
        p.add_argument("--device", help="where to train: cpu, cuda or cuda:N (default: the GPU when CUDA is available, "
                                        "each launched process its own; else cpu)")

    def recipe_arg(p, help="recipe name in adapters/ or a JSON path", default="digits-ddpm"):
        p.add_argument("--recipe", default=default, help=help)

    p = common(sub.add_parser("train", help="train the base diffusion model on a grouped dataset"))
    data_args(p)
    p.add_argument("--out", required=True, help="output pipeline directory")
    recipe_arg(p)
    p.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="training seed (recorded in guda_train.json)")
    device_arg(p)
    p.set_defaults(func=cmd_train)

    p = common(sub.add_parser("unlearn", help="train one unlearning LoRA adapter per group into a bundle"))
    p.add_argument("--base", required=True, help="base pipeline directory or Hub id")
    p.add_argument("--base-id", help="name recorded for the base model in the bundle (default: --base)")
    data_args(p, help="the training set of the base model ('digits' or an image folder)")
    p.add_argument("--out", required=True, help="bundle directory to write (a killed run resumes from <out>-partial)")
    recipe_arg(p)
    p.add_argument("--objective", help="objective name (retrack, gradient_ascent)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="objective option, repeatable (e.g. num_neighbors=5)")
    p.add_argument("--groups", nargs="+", help="unlearn only these groups (names)")
    p.add_argument("--steps", type=int, help="optimiser steps per group")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=int, help="forget and retain images per step (each)")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--seed", type=int, help="base seed (each group's seed derives from it)")
    p.set_defaults(func=cmd_unlearn)

    p = common(sub.add_parser("attribute", help="score query images against every group of a bundle"))
    p.add_argument("--base", required=True, help="base pipeline directory or Hub id")
    p.add_argument("--bundle", required=True, help="bundle directory or Hub repo id")
    p.add_argument("--revision", help="Hub revision of the bundle")
    p.add_argument("--images", required=True, nargs="+", help="image files or folders")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.add_argument("--top-k", type=int, default=3, help="groups printed per image")
    p.add_argument("--batch-size", type=int, default=64, help="images whose rows share forwards (speed and memory only)")
    p.add_argument("--stride", type=int, help="ELBO timestep stride (default: the bundle's)")
    p.add_argument("--draws", type=int, help="noise draws per timestep")
    p.add_argument("--elbo-seed", type=int, help="seed of the common random numbers")
    p.add_argument("--strategy", choices=["auto", "merged", "swap", "mixed"], default="auto",
                   help="auto (merged when the adapters are plain LoRA), merged (each adapter merged into the weights in turn), "
                        "swap (each LoRA branch switched on in turn) or mixed (all adapters in one forward, one per row)")
    p.add_argument("--adaptive-z", type=float,
                   help="drop groups that trail the leader by this many standard errors and stop each image when one "
                        "is left (default: the full grid)")
    p.set_defaults(func=cmd_attribute)

    p = common(sub.add_parser("logo", help="retrain the base recipe once without each group (ground truth; resumable)"))
    data_args(p, help="the base model's training set ('digits' or an image folder)")
    p.add_argument("--out", required=True, help="root directory; models go to <out>/seed_<seed>/<group>/")
    recipe_arg(p, help="recipe name in adapters/ or a JSON path (the base model's recipe)")
    p.add_argument("--seed", type=int, help="training seed (default: the recipe's; another seed gives the LOGO noise floor)")
    p.add_argument("--groups", nargs="+", help="leave out only these groups (names)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    device_arg(p)
    p.set_defaults(func=cmd_logo)

    p = common(sub.add_parser("demo", help="train, unlearn, generate and attribute on the embedded digits"))
    p.add_argument("--out", default="guda-demo", help="output directory (default guda-demo)")
    recipe_arg(p)
    p.add_argument("--queries", type=int, help="number of generated query images (default from the recipe: 100)")
    p.set_defaults(func=cmd_demo)

    p = common(sub.add_parser("evaluate", help="GUDA and baselines against LOGO ground truth, with the LOGO ceiling and costs"))
    data_args(p, required=True)
    p.add_argument("--out", required=True, help="output directory (finished stages in it are reused)")
    recipe_arg(p, help="recipe name in adapters/ or a JSON path (default: the benchmark's, e.g. digits-styles; else digits-ddpm)", default=None)
    p.add_argument("--queries", type=int, help="number of generated query images (default from the recipe)")
    p.add_argument("--methods", nargs="+", help="methods to score (default: guda similarity nearest_neighbour gradient instance_unlearning)")
    p.add_argument("--seed-b", type=int, help="training seed of the second LOGO set, the ceiling (default: the recipe's seed + 1)")
    p.add_argument("--gradient-option", action="append", metavar="KEY=VALUE",
                   help="gradient baseline setting, repeatable (e.g. projection_dim=1024, timesteps=[50,200,500])")
    p.add_argument("--instance-option", action="append", metavar="KEY=VALUE",
                   help="instance-unlearning baseline setting, repeatable (e.g. steps=10, learning_rate=0.003)")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip LOGO seed B (half the LOGO cost; the report then has no ceiling and no fractions of it)")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    bars = diffusers_logging.is_progress_bar_enabled()
    if args.quiet:  # also diffusers' own bars ("Loading pipeline components...")
        diffusers_logging.disable_progress_bar()
    try:
        _threads(args)
        args.func(args)
    except GUDAError as exc:
        print(f"guda {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"guda {args.command}: interrupted; finished work is kept (rerun to resume).", file=sys.stderr)
        return 130
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    return 0


if __name__ == "__main__":
    sys.exit(main())
