"""The ``guda`` command line: a thin layer over the public API."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

from .errors import ConfigError, DataError, GUDAError

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


def _dataset(args, mode: str | None = None):
    """The training set named by ``--benchmark`` or ``--data``: a folder with ``metadata.jsonl``
    (captioned images), a folder of per-group subfolders, or ``digits``.

    Args:
        args: The parsed command line.
        mode: PIL mode the ``--data`` images are converted to when ``--mode`` is not given.
    """
    from .data import METADATA_NAME, GroupedDataset, load_digits
    from .evaluation.benchmarks import load_benchmark

    if getattr(args, "benchmark", None):
        return load_benchmark(args.benchmark)
    if args.data in (None, "digits"):
        return load_digits()
    mode = args.mode or mode
    if (Path(args.data) / METADATA_NAME).is_file():
        return GroupedDataset.from_metadata(args.data, mode=mode)
    return GroupedDataset.from_image_folder(args.data, mode=mode)


# the GUDA pipeline that loads each pipeline class a model_index.json may name
_PIPELINES = {
    "DDPMPipeline": "GUDADDPMPipeline",
    "DDIMPipeline": "GUDADDPMPipeline",  # the same components: a UNet2DModel and a DDPM-family scheduler
    "GUDADDPMPipeline": "GUDADDPMPipeline",
    "StableDiffusionPipeline": "GUDAStableDiffusionPipeline",
    "GUDAStableDiffusionPipeline": "GUDAStableDiffusionPipeline",
    "TextToImageDDPMPipeline": "GUDATextToImagePipeline",
    "GUDATextToImagePipeline": "GUDATextToImagePipeline",
}
# `guda unlearn`'s recipe for a base of each pipeline when --recipe is not given
_DEFAULT_RECIPES = {"GUDAStableDiffusionPipeline": "sd-styles", "GUDATextToImagePipeline": "digits-styles"}


def _cannot_load(spec: str, reason: str) -> GUDAError:
    return GUDAError(
        f"Cannot load the base pipeline {spec!r} ({reason}). Pass a directory written by `guda train` (or by a "
        "DDPMPipeline's or StableDiffusionPipeline's save_pretrained), or a Hub id (with HF_HUB_OFFLINE=1: one in the local cache)."
    )


def _model_index(spec: str) -> dict:
    """The ``model_index.json`` of the pipeline directory or Hub id ``spec`` (from the local cache first;
    downloaded like any ``from_pretrained`` unless ``HF_HUB_OFFLINE=1``)."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    name = DiffusionPipeline.config_name
    path = None
    if Path(spec).is_dir():
        path = Path(spec) / name
    elif spec.count("/") == 1 and not Path(spec).exists():  # looks like a Hub id "owner/name"
        with contextlib.suppress(OSError, ValueError):  # not a valid Hub id, not on the Hub, or offline and not cached
            cached = try_to_load_from_cache(spec, name)
            path = Path(cached if isinstance(cached, str) else hf_hub_download(spec, name))
    if path is None or not path.is_file():
        where = "no such directory, nor a Hub id this machine can reach or has cached" if not Path(spec).is_dir() else f"no {name} in it"
        raise _cannot_load(spec, where)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _cannot_load(spec, f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise _cannot_load(spec, f"{path} names no pipeline _class_name")
    return index


def _pipeline_name(spec: str) -> str:
    """The name of the GUDA pipeline class that loads the base ``spec`` (read from its model_index.json, no weights)."""
    name = _model_index(spec)["_class_name"]
    if name not in _PIPELINES:
        supported = "DDPMPipeline, DDIMPipeline, StableDiffusionPipeline (Stable Diffusion 1.x/2.x) and TextToImageDDPMPipeline"
        raise ConfigError(f"The base {spec!r} is a {name}, which guda does not support yet; it supports {supported}.")
    return _PIPELINES[name]


def _load_base(spec: str, dtype: str = "float32"):
    """The base pipeline as its GUDA pipeline class, its weights in ``dtype``.

    Raises:
        GUDAError: one line, when ``spec`` is neither a pipeline directory nor a cached Hub id, or
            names a pipeline class guda does not support.
    """
    import torch

    from . import pipelines

    name = _pipeline_name(spec)
    try:
        pipeline_class = getattr(pipelines, name)
    except ImportError as exc:  # the text-conditioned pipelines need transformers
        raise ConfigError(f"The base {spec!r} needs {name}, which needs transformers ({exc}); pip install 'diffusers-guda[sd]'.") from exc
    options = {"torch_dtype": getattr(torch, dtype)}
    if name == "GUDAStableDiffusionPipeline":  # the CLI never generates: no need to load the safety checker
        options.update(safety_checker=None, requires_safety_checker=False)
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.42 renames torch_dtype to dtype (with a FutureWarning); older ones know only torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return pipeline_class.from_pretrained(spec, **options)
    except (OSError, ValueError) as exc:
        raise _cannot_load(spec, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc


def _image_mode(pipeline_name: str | None) -> str | None:
    """The PIL mode images are converted to for a base of this GUDA pipeline: RGB for Stable Diffusion's VAE, else their own."""
    return "RGB" if pipeline_name == "GUDAStableDiffusionPipeline" else None


def _unlearn_defaults(spec: str) -> tuple[str, str | None]:
    """``guda unlearn``'s recipe and training-image mode for the base ``spec`` when the flags do not name them.

    A base that cannot be loaded gets the digits' defaults here: loading it reports the error, after
    the cheaper checks of the other flags.
    """
    from .recipes import DEFAULT_RECIPE

    try:
        name = _pipeline_name(spec)
    except GUDAError:
        name = None
    return _DEFAULT_RECIPES.get(name, DEFAULT_RECIPE), _image_mode(name)


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
    recipe.require_train("train")
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
    default_recipe, default_mode = _unlearn_defaults(args.base)
    recipe = Recipe.load(args.recipe or default_recipe)
    config = recipe.unlearning
    options = dict(config.objective_options) if args.objective in (None, config.objective) else {}
    options.update(_options(args.option))
    rank = config.lora.rank if args.rank is None else args.rank
    alpha = args.alpha if args.alpha is not None else (config.lora.alpha if args.rank is None else args.rank)
    lora = LoRASettings(rank=rank, alpha=alpha, target_modules=config.lora.target_modules)
    overrides = {k: v for k, v in (("steps", args.steps), ("size_exponent", args.size_exponent), ("learning_rate", args.lr),
                                   ("seed", args.seed), ("autocast_dtype", args.autocast)) if v is not None}
    if args.batch_size is not None:
        overrides.update(forget_batch_size=args.batch_size, retain_batch_size=args.batch_size)
    config = replace(config, objective=args.objective or config.objective, objective_options=options, lora=lora, **overrides)
    dataset = _dataset(args, mode=default_mode)
    out = Path(args.out)
    partial = out.parent / f".{out.name}-partial"
    process = _process()
    pipe = _load_base(args.base, args.dtype).to(process.device)
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


def _prompt_table(path: Path) -> dict[str, str]:
    """The prompts a JSONL file (rows with ``file_name`` and ``text``) gives, keyed by ``file_name`` as written and by resolved path."""
    from .data import read_metadata_rows

    table: dict[str, str] = {}
    for where, row in read_metadata_rows(path, fields=("file_name", "text")):
        for key in (row["file_name"], str((path.parent / row["file_name"]).resolve())):
            if table.setdefault(key, row["text"]) != row["text"]:
                raise DataError(f"{where} gives {row['file_name']!r} a second, different text; keep one row per image.")
    return table


def _query_prompts(args, files: list[Path], conditional: bool) -> list[str] | None:
    """Each query image's prompt: ``--prompt``, a row of ``--prompts FILE``, or a row of the ``metadata.jsonl`` beside it.

    A row matches an image when its ``file_name`` is the image's file name or its path relative to
    the JSONL file's folder. An unconditional base takes no prompts (``None``).
    """
    from .data import METADATA_NAME

    if not conditional:
        if args.prompt is not None or args.prompts is not None:
            raise ConfigError(f"The base {args.base!r} is unconditional and scores images without prompts; drop --prompt/--prompts.")
        return None
    if args.prompt is not None:
        return [args.prompt] * len(files)
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise ConfigError(f"--prompts {args.prompts} is not a file; pass a JSONL file with one {{\"file_name\", \"text\"}} object per line.")
    tables: dict[Path, dict[str, str]] = {}
    prompts = []
    for f in files:
        source = Path(args.prompts) if args.prompts is not None else f.parent / METADATA_NAME
        if source not in tables:
            tables[source] = _prompt_table(source) if source.is_file() else {}
        text = tables[source].get(str(f.resolve()), tables[source].get(f.name))
        if text is None:
            where = f"no row for it in {source}" if source.is_file() else f"no --prompt or --prompts, and no {source}"
            raise DataError(
                f"Query image {f} has no prompt ({where}); the base is text-conditioned, so give every image its prompt: "
                f"--prompt TEXT (one for all images), --prompts FILE.jsonl, or a {METADATA_NAME} beside the images "
                "(rows with file_name and text)."
            )
        prompts.append(text)
    return prompts


def cmd_attribute(args) -> None:
    from .elbo import ELBOConfig
    from .models import is_conditional
    from .pipelines import to_model_images

    _at_least_one(top_k=args.top_k)
    _output_file(args.out, "--out")
    _output_file(args.plot, "--plot")
    if args.plot:
        _plot_format(args.plot)
    files = _query_files(args.images)
    queries = [_open_query(f) for f in files]
    process = _process()
    pipe = _load_base(args.base, args.dtype).to(process.device)
    prompts = _query_prompts(args, files, is_conditional(pipe.unet))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_guda_bundle(args.bundle, revision=args.revision)
    mode = _image_mode(type(pipe).__name__)
    images = to_model_images([q.convert(mode) for q in queries] if mode else queries)
    elbo = None
    flags = {"stride": args.stride, "num_draws": args.draws, "seed": args.elbo_seed, "autocast_dtype": args.autocast}
    if any(v is not None for v in flags.values()):
        base = dict(pipe.guda_bundle.elbo or {})
        base.update({k: v for k, v in flags.items() if v is not None})
        elbo = ELBOConfig(**base)
    result = pipe.attribute(images, prompts=prompts, batch_size=args.batch_size, elbo_config=elbo, strategy=args.strategy,
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
    recipe.require_train("logo")
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

    def data_args(p, help="'digits' (embedded), an image folder with one subfolder per group, or a folder of captioned images "
                          "with metadata.jsonl (file_name, text, group)", required=False):
        source = p.add_mutually_exclusive_group(required=required)
        # default None (meaning the digits): argparse only sees a conflict with --benchmark when --data differs from its default
        source.add_argument("--data", help=help + ("" if required else "; default: digits"))
        source.add_argument("--benchmark", help="a named benchmark dataset instead of --data (digits-classes, digits-contributors, digits-contributors-hobbyist, digits-styles)")
        p.add_argument("--mode", choices=["L", "RGB"], help="convert --data images to grayscale (L) or RGB")

    def device_arg(p):
        p.add_argument("--device", help="where to train: cpu, cuda or cuda:N (default: the GPU when CUDA is available, "
                                        "each launched process its own; else cpu)")

    def recipe_arg(p, help="recipe name in adapters/ or a JSON path", default="digits-ddpm"):
        p.add_argument("--recipe", default=default, help=help)

    def dtype_arg(p):
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                       help="dtype of the base weights (default float32). Adapters train in float32 either way; in half precision "
                            "scoring keeps the LoRA branch unmerged (slower), and a bundle only loads into a base in the dtype "
                            "it was made with")
        p.add_argument("--autocast", choices=["bfloat16", "float16"],
                       help="run the UNet's forwards under this autocast dtype (faster on a GPU; scoring then keeps the LoRA branch unmerged)")

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
    data_args(p, help="the training set of the base model ('digits', an image folder with one subfolder per group, or a folder "
                      "of captioned images with metadata.jsonl (file_name, text, group) for a text-conditioned base)")
    p.add_argument("--out", required=True, help="bundle directory to write (a killed run resumes from <out>-partial)")
    recipe_arg(p, default=None, help="recipe name in adapters/ or a JSON path (default: sd-styles for a Stable Diffusion base, "
                                     "digits-styles for a TextToImageDDPMPipeline, else digits-ddpm)")
    dtype_arg(p)
    p.add_argument("--objective", help="objective name (retrack, gradient_ascent; anchor, esd for text-conditioned bases)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="objective option, repeatable (e.g. num_neighbors=5)")
    p.add_argument("--groups", nargs="+", help="unlearn only these groups (names)")
    p.add_argument("--steps", type=int, help="optimiser steps per group")
    p.add_argument("--size-exponent", type=float, help="scale each group's steps as (group size / mean size) ** this (0: the same for all)")
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
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="text-conditioned base: the prompt of every query image")
    prompts.add_argument("--prompts", metavar="FILE.jsonl",
                         help="text-conditioned base: one JSON object per line with file_name and text (default: the "
                              "metadata.jsonl beside the images)")
    dtype_arg(p)
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


def _progress_bar_switches() -> list:
    """The logging modules whose progress bars ``--quiet`` turns off: diffusers', and transformers' when installed."""
    from diffusers.utils import logging as diffusers_logging

    switches = [diffusers_logging]
    try:
        from transformers.utils import logging as transformers_logging  # its "Loading weights" bars (text encoders)
    except ImportError:
        return switches
    return [*switches, transformers_logging]


class _TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that it falls back to its PIL image processors without torchvision.

    Importing a Stable Diffusion pipeline prints it (for the safety checker's feature extractor, which
    guda never runs), and it would turn a one-line error into three lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notices = logging.getLogger("transformers.utils.import_utils")  # the logger it is emitted on
    if not any(isinstance(f, _TorchvisionFallbackNotice) for f in notices.filters):
        notices.addFilter(_TorchvisionFallbackNotice())
    switches = _progress_bar_switches()
    enabled = [s for s in switches if s.is_progress_bar_enabled()]
    if args.quiet:  # also the libraries' own bars ("Loading pipeline components...")
        for switch in switches:
            switch.disable_progress_bar()
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
        for switch in enabled:
            switch.enable_progress_bar()
    return 0


if __name__ == "__main__":
    sys.exit(main())
