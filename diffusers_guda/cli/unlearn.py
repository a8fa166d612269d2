"""``guda unlearn``: one unlearning LoRA adapter per group, into a bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..bundle import MANIFEST_NAME
from ..diffusion import TIMESTEP_SAMPLINGS
from ..errors import ConfigError, GUDAError
from ..io_utils import check_replaceable_directory
from ..locks import output_lock
from .arguments import (
    add_base_options,
    add_common,
    add_data,
    add_dataset_options,
    add_dtype,
    add_recipe,
    check_apart,
    check_base_revision,
    check_distinct,
    check_output_dir,
    image_mode,
    launched_process,
    load_base,
    load_training_data,
    parse_options,
)

# flag -> unlearn_groups setting
_SETTINGS = {"steps": "steps", "size_exponent": "size_exponent", "lr": "learning_rate", "seed": "seed", "autocast": "autocast_dtype",
             "batch_size": "batch_size", "gradient_checkpointing": "gradient_checkpointing", "rank": "lora_rank", "alpha": "lora_alpha",
             "objective": "objective", "joint_groups": "joint_groups",
             "shared_draws": "shared_draws", "timestep_sampling": "timestep_sampling"}


def register(subparsers) -> None:
    p = add_common(subparsers.add_parser("unlearn", help="train one unlearning LoRA adapter per group into a bundle"))
    p.add_argument("--base", required=True, help="base pipeline directory or Hub id")
    p.add_argument("--base-id", help="name recorded for the base model in the bundle (default: --base)")
    add_base_options(p)
    add_data(p, help="the training set of the base model ('digits', an image folder with one subfolder per group, a folder "
                     "of captioned images with metadata.jsonl (file_name, text, group) for a text-conditioned base, a datasets "
                     "folder (save_to_disk, parquet) or a Hub dataset id")
    add_dataset_options(p)
    p.add_argument("--out", required=True, help="bundle directory to write (a killed run resumes from .<out>-partial; "
                                                 "<out>.lock keeps a second run off it meanwhile)")
    p.add_argument("--overwrite", action="store_true", help="unlearn again and replace the bundle that --out already holds")
    add_recipe(p, default=None, help="recipe name in adapters/ or a JSON path (default: the recipe of the base's family: sd-styles "
                                     "for Stable Diffusion, sdxl-styles, sd3-styles and flux-styles for SDXL, Stable Diffusion 3 and "
                                     "Flux, digits-styles for a TextToImageDDPMPipeline, else digits-ddpm)")
    add_dtype(p)
    p.add_argument("--objective", help="objective name (retrack, gradient_ascent; anchor, esd for text-conditioned bases)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="objective option, repeatable (e.g. num_neighbors=5)")
    p.add_argument("--groups", nargs="+", help="unlearn only these groups (names)")
    p.add_argument("--steps", type=int, help="optimiser steps per group")
    p.add_argument("--size-exponent", type=float, help="scale each group's steps as (group size / mean size) ** this (0: the same for all)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=int, help="forget and retain images per step (each)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute the UNet's activations in the backward pass instead of keeping them (less memory, more time)")
    p.add_argument("--joint-groups", type=int, metavar="N",
                   help="train N groups' adapters together, the rows of all of them in each forward (default 1: one after the other)")
    p.add_argument("--shared-draws", type=int, metavar="D",
                   help="D fixed (t, noise) draws per training image shared by every group, so that the teacher's outputs on them "
                        "are computed once for all groups (default 0: fresh draws at every step)")
    p.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLINGS,
                   help="how the training rows draw their step: uniform over the steps, or uniform in log-SNR (more low-noise rows, "
                        "where a score's weight is)")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--seed", type=int, help="base seed (each group's seed derives from it)")
    p.add_argument("--guidance", type=float, help="Flux with a guidance-distilled transformer (FLUX.1-dev): the embedded guidance "
                                                  "every forward takes, recorded in the bundle and used in scoring (default 3.5)")
    p.add_argument("--max-sequence-length", type=int, metavar="N",
                   help="Stable Diffusion 3 and Flux: T5 tokens per prompt, recorded in the bundle (default: the pipeline's, 256 or 512)")
    p.set_defaults(func=run)


def run(args) -> None:
    from ..pipelines import pipeline_class_for
    from ..recipes import DEFAULT_RECIPE, Recipe, default_recipe

    check_output_dir(args.out)
    check_apart({"--out": args.out},
                {"--base": args.base, "--data": args.data, "--recipe": args.recipe, "--latent-cache": args.latent_cache})
    if args.latent_cache is not None and Path(args.latent_cache).is_file():
        raise ConfigError(f"--latent-cache {args.latent_cache} is a file; pass a directory (it is created when missing).")
    check_distinct(args.groups, "--groups")
    check_base_revision(args.base, args.base_revision)
    try:
        pipeline_class = pipeline_class_for(args.base, args.base_revision)
    except GUDAError:  # loading the base reports it, after the cheaper checks of the other flags
        pipeline_class = None
    _check_conditioning_flags(args, pipeline_class)
    settings = {setting: getattr(args, flag) for flag, setting in _SETTINGS.items() if getattr(args, flag) is not None}
    if settings.get("autocast_dtype") == "none":  # full precision, also on CUDA
        settings["autocast_dtype"] = None
    settings["objective_options"] = parse_options(args.option)
    recipe = Recipe.load(args.recipe or DEFAULT_RECIPE) if args.recipe or pipeline_class is None else default_recipe(pipeline_class)
    recipe.unlearning_with(**settings)  # refuse bad settings before any data or weights are read
    process = launched_process()
    # one run at a time on --out and its checkpoint; in a launch, process 0 holds the lock for all
    with output_lock(args.out, command="guda unlearn", process=process):
        check_replaceable_directory(args.out, MANIFEST_NAME)
        if (Path(args.out) / MANIFEST_NAME).is_file() and not args.overwrite:
            raise ConfigError(f"--out {args.out} already holds an adapter bundle; pass --overwrite to unlearn again and replace it, "
                              "or choose another --out.")
        _unlearn(args, recipe, settings, pipeline_class, process)
    process.barrier()  # every process ends once the bundle is on disk


def _check_conditioning_flags(args, pipeline_class) -> None:
    """Refuse --guidance for a base that is not Flux, and --max-sequence-length for one that is neither Flux nor SD3."""
    from ..pipelines import pipeline_family

    family = pipeline_family(pipeline_class) if pipeline_class is not None else None
    if family is None:  # loading the base decides
        return
    if args.guidance is not None and family != "flux":
        raise ConfigError(f"--guidance is Flux's embedded guidance, but --base {args.base} is a {family} pipeline; drop --guidance.")
    if args.max_sequence_length is not None and family not in ("flux", "stable-diffusion-3"):
        raise ConfigError(f"--max-sequence-length sets the T5 prompt length of Stable Diffusion 3 and Flux, but --base {args.base} is a "
                          f"{family} pipeline; drop --max-sequence-length.")


def _unlearn(args, recipe, settings, pipeline_class, process) -> None:
    from ..unlearning import UnlearningCheckpoint

    dataset = load_training_data(args, mode=image_mode(pipeline_class))
    out = Path(args.out)
    partial = out.parent / f".{out.name}-partial"
    pipe = load_base(args.base, args.dtype, revision=args.base_revision, allow_pickle_weights=args.allow_pickle_weights).to(process.device)
    resumed = UnlearningCheckpoint(partial).finished_groups(dataset.group_names)
    # each process unlearns its share of the groups into the shared checkpoint; all get the whole bundle
    bundle = pipe.unlearn_groups(dataset, recipe=recipe, groups=args.groups, checkpoint_dir=partial, base_model_id=args.base_id or args.base,
                                 progress=not args.quiet, process=process, latent_cache=args.latent_cache, guidance=args.guidance,
                                 max_sequence_length=args.max_sequence_length, **settings)
    if process.is_main:
        bundle.save_pretrained(out)
        shutil.rmtree(partial, ignore_errors=True)
        for g in bundle.groups:
            s = g.stats
            print(f"{g.name}: forget loss {s['forget_loss_before']:.4f} -> {s['forget_loss_after']:.4f} ({100 * s['forget_loss_change']:+.1f}%), "
                  f"retain loss {s['retain_loss_before']:.4f} -> {s['retain_loss_after']:.4f} ({100 * s['retain_loss_change']:+.1f}%)")
        notes = [f"{len(resumed)} of {len(bundle.groups)} groups resumed from {partial}"] if resumed else []
        if process.is_distributed:
            notes.append(f"groups shared by {process.world_size} processes")
        print(f"saved the adapter bundle to {out}" + (f" ({'; '.join(notes)})" if notes else ""))
