"""``guda attribute``: score query images against every group of a bundle."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError
from ..locks import output_lock
from .arguments import (
    add_base_options,
    add_common,
    add_dtype,
    check_apart,
    check_base_revision,
    check_output_file,
    check_plot_format,
    image_mode,
    launched_process,
    load_base,
    require_positive,
)


def register(subparsers) -> None:
    p = add_common(subparsers.add_parser("attribute", help="score query images against every group of a bundle"))
    p.add_argument("--base", required=True, help="base pipeline directory or Hub id")
    add_base_options(p)
    p.add_argument("--bundle", required=True, help="bundle directory or Hub repo id")
    p.add_argument("--revision", help="Hub revision of the bundle")
    p.add_argument("--images", required=True, nargs="+", help="image files or folders")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="text-conditioned base: the prompt of every query image")
    prompts.add_argument("--prompts", metavar="FILE.jsonl",
                         help="text-conditioned base: one JSON object per line with file_name and text (default: the "
                              "metadata.jsonl beside the images)")
    add_dtype(p)
    p.add_argument("--out", help="write the result as JSON here (<out>.lock keeps a second run off it meanwhile)")
    p.add_argument("--plot", help="write a PNG bar chart here (locked like --out)")
    p.add_argument("--top-k", type=int, default=3, help="groups printed per image")
    p.add_argument("--batch-size", type=int, default=64, help="images whose rows share forwards (speed and memory only)")
    p.add_argument("--stride", type=int, help="DDPM-family base: ELBO timestep stride (default: the bundle's)")
    p.add_argument("--grid-size", type=int, help="flow-matching base (Stable Diffusion 3, Flux): ELBO noise levels (default: the bundle's)")
    p.add_argument("--draws", type=int, help="noise draws per timestep")
    p.add_argument("--elbo-seed", type=int, help="seed of the common random numbers")
    p.add_argument("--strategy", choices=["auto", "merged", "swap", "mixed"], default="auto",
                   help="auto (merged when the adapters are plain LoRA), merged (each adapter merged into the weights in turn), "
                        "swap (each LoRA branch switched on in turn) or mixed (all adapters in one forward, one per row)")
    p.add_argument("--adaptive-z", type=float,
                   help="drop groups that trail the leader by this many standard errors (e.g. 4) and stop each image when "
                        "one is left (default: the full grid)")
    p.set_defaults(func=run)


def run(args) -> None:
    from ..queries import open_query_image, query_files

    require_positive(top_k=args.top_k)
    check_output_file(args.out, "--out")
    check_output_file(args.plot, "--plot")
    if args.plot:
        check_plot_format(args.plot)
    if args.out and args.plot and Path(args.out).resolve() == Path(args.plot).resolve():
        raise ConfigError(f"--out and --plot both name {args.out}; give the result JSON and the chart different paths.")
    if args.adaptive_z is not None and not 0 < args.adaptive_z < math.inf:
        raise ConfigError(f"--adaptive-z must be a finite number of standard errors > 0 (e.g. 4), got {args.adaptive_z}.")
    check_base_revision(args.base, args.base_revision)
    files = query_files(args.images)
    check_apart({"--out": args.out, "--plot": args.plot},
                [("--base", args.base), ("--bundle", args.bundle), *(("--images", f) for f in files)], directory=False)
    queries = [open_query_image(f) for f in files]
    process = launched_process()
    with output_lock(args.out, args.plot, command="guda attribute", process=process):  # one run at a time on each output
        _attribute(args, files, queries, process)


def _attribute(args, files, queries, process) -> None:
    from dataclasses import replace

    from ..elbo import ELBOConfig
    from ..errors import ConfigError
    from ..models import is_conditional
    from ..pipelines import denoiser, to_model_images
    from ..queries import query_prompts

    pipe = load_base(args.base, args.dtype, revision=args.base_revision, allow_pickle_weights=args.allow_pickle_weights).to(process.device)
    if is_conditional(denoiser(pipe)):
        prompts = query_prompts(files, prompt=args.prompt, prompts_file=args.prompts)
    elif args.prompt is not None or args.prompts is not None:
        raise ConfigError(f"The base {args.base!r} is unconditional and scores images without prompts; drop --prompt/--prompts.")
    else:
        prompts = None
    pipe.set_progress_bar_config(disable=True)
    bundle = pipe.load_guda_bundle(args.bundle, revision=args.revision)
    mode = image_mode(type(pipe))
    images = to_model_images([q.convert(mode) for q in queries] if mode else queries)
    elbo = None
    flags = {"stride": args.stride, "grid_size": args.grid_size, "num_draws": args.draws, "seed": args.elbo_seed,
             "autocast_dtype": args.autocast}
    overrides = {k: None if v == "none" else v for k, v in flags.items() if v is not None}  # --autocast none: full precision
    if overrides:
        recorded = ELBOConfig(**bundle.elbo) if bundle.elbo else ELBOConfig()
        elbo = replace(recorded, **overrides)
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
    for f, row in zip(files, result.top(args.top_k)):
        ranked = ", ".join(f"{name} {score:+.4f}" for name, score in row)
        print(f"{f.name:<{width}}  {ranked}")
    if args.out:
        print(f"wrote {args.out}")
