"""What every ``guda`` command shares: common flags, checks made before any work, data and device.

Public so that commands added by other packages (see :func:`diffusers_guda.cli.build_parser`) parse
and check their flags the same way.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from ..errors import ConfigError, GUDAError

DATASETS_ENTRY_POINTS = "diffusers_guda.datasets"


def add_common(parser):
    """``--threads`` and ``--quiet``, which every command takes."""
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def add_data(parser, help: str = "'digits' (embedded), an image folder with one subfolder per group, or a folder of captioned images "
             "with metadata.jsonl (file_name, text, group)", required: bool = False) -> None:
    """``--data`` / ``--benchmark`` (a named dataset) and ``--mode``."""
    source = parser.add_mutually_exclusive_group(required=required)
    # default None (meaning the digits): argparse only sees a conflict with --benchmark when --data differs from its default
    source.add_argument("--data", help=help + ("" if required else "; default: digits"))
    named = ", ".join(named_datasets()) or "none installed"
    source.add_argument("--benchmark", help=f"a named benchmark dataset instead of --data ({named})")
    parser.add_argument("--mode", choices=["L", "RGB"], help="convert --data images to grayscale (L) or RGB")


def add_device(parser) -> None:
    parser.add_argument("--device", help="where to train: cpu, cuda or cuda:N (default: the GPU when CUDA is available, "
                                         "each launched process its own; else cpu)")


def add_recipe(parser, help: str = "recipe name in adapters/ or a JSON path", default: str | None = "digits-ddpm") -> None:
    parser.add_argument("--recipe", default=default, help=help)


def set_threads(args) -> None:
    import torch

    if getattr(args, "threads", None) is not None:
        require_positive(threads=args.threads)
        torch.set_num_threads(args.threads)


def torch_device(spec: str):
    """The torch device named by ``--device``, refused when this machine has none of it."""
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r} is not a torch device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: torch sees no CUDA GPU on this machine; use --device cpu.")
    return device


def require_positive(**flags) -> None:
    """Refuse a flag given as 0 or less (0 would otherwise silently mean "the default")."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def launched_process():
    """This process of a ``torchrun``/``accelerate launch`` run (or the only one), group joined."""
    from diffusers.utils import logging as diffusers_logging

    from ..distributed import current_process

    process = current_process()
    if not process.is_main:  # progress is shown by the main process alone (main() restores the setting)
        diffusers_logging.disable_progress_bar()
    return process


def one_process_only(command: str) -> None:
    """Refuse a multi-process launch of a command that does not split its work."""
    from ..distributed import detect_process

    if detect_process().is_distributed:
        raise ConfigError(
            f"guda {command} runs in one process; start it without torchrun or accelerate launch "
            "(unlearn, attribute and logo split their work across processes)."
        )


def check_output_dir(path: str) -> None:
    """Refuse an output directory path that is an existing file (it would be replaced by a directory)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"--out {path} is an existing file, not a directory; choose another path or delete the file.")


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse an output file path that cannot be written, before any work is done."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; pass a file path (e.g. one inside that directory).")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the folder {path.parent} does not exist; create it first.")


def check_plot_format(path: str) -> None:
    """Refuse a --plot path whose extension matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(path).suffix[1:].lower()
    if not suffix:
        raise ConfigError(f"--plot {path} has no extension to tell the image format; use a .png path (or one of {', '.join(formats)}).")
    if suffix not in formats:
        raise ConfigError(f"--plot {path}: unsupported image format .{suffix}; use a .png path (or one of {', '.join(formats)}).")


def check_distinct(names: list[str] | None, flag: str) -> None:
    """Refuse a list flag (``--groups``) that names something twice."""
    twice = sorted({n for n in names or [] if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{flag} names {', '.join(repr(n) for n in twice)} more than once; name each once.")


def check_apart(outputs: dict, inputs: dict | list, directory: bool = True) -> None:
    """Refuse an output path that is an input, or (for a directory output) holds one or lies inside one.

    Writing an output replaces what is at its path: a ``--out`` equal to ``--data``, ``--base`` or a
    query image, or a parent folder of them, would destroy an input.

    Args:
        outputs: ``{flag: path}`` of the outputs (``None`` paths are skipped).
        inputs: ``{flag: path}`` or ``(flag, path)`` pairs of the inputs; names that are not local paths (Hub ids, ``digits``) are skipped.
        directory: Whether the outputs are directories (then an input inside one, or one inside an input
            folder, is refused too); output files are refused only when they are an input or lie inside
            an input folder given as a model (``--base``, ``--bundle``).
    """
    for out_flag, out in outputs.items():
        if out is None:
            continue
        target = Path(out).resolve()
        for in_flag, source in inputs.items() if isinstance(inputs, dict) else inputs:
            if source is None or not Path(source).exists():
                continue
            held = Path(source).resolve()
            if target == held:
                clash = "is"
            elif (directory or in_flag in ("--base", "--bundle")) and target.is_relative_to(held) and held.is_dir():
                clash = "lies inside"
            elif directory and held.is_relative_to(target):
                clash = "holds"
            else:
                continue
            raise ConfigError(f"{out_flag} {out} {clash} {in_flag} {source}, which writing it would overwrite; "
                              f"choose another {out_flag} path, outside the inputs.")


def named_datasets() -> dict:
    """The named datasets installed packages provide (entry points ``diffusers_guda.datasets``), by name."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in sorted(entry_points(group=DATASETS_ENTRY_POINTS), key=lambda ep: ep.name)}


def load_dataset(args, mode: str | None = None):
    """The training set named by ``--benchmark`` or ``--data``: a folder with ``metadata.jsonl``
    (captioned images), a folder of per-group subfolders, or ``digits``.

    Args:
        args: The parsed command line.
        mode: PIL mode the ``--data`` images are converted to when ``--mode`` is not given.
    """
    from ..data import GroupedDataset, load_digits
    from ..data_files import METADATA_NAME

    if getattr(args, "benchmark", None):
        named = named_datasets()
        if args.benchmark not in named:
            raise ConfigError(f"Unknown benchmark {args.benchmark!r}; known: {sorted(named)}.")
        return named[args.benchmark].load()()
    if args.data in (None, "digits"):
        return load_digits()
    mode = args.mode or mode
    if (Path(args.data) / METADATA_NAME).is_file():
        return GroupedDataset.from_metadata(args.data, mode=mode)
    return GroupedDataset.from_image_folder(args.data, mode=mode)


def add_dataset_options(parser) -> None:
    """The flags of large training sets: ``datasets`` columns, split and revision, ``--resolution``, ``--latent-cache``."""
    group = parser.add_argument_group("large datasets (docs/formats.md#large-datasets)")
    group.add_argument("--image-column", default="image", help="a datasets --data: the image column (default: image)")
    group.add_argument("--group-column", default="group", help="a datasets --data: the group column, a ClassLabel or strings (default: group)")
    group.add_argument("--caption-column", help="a datasets --data: the caption column (default: text, when the dataset has it)")
    group.add_argument("--split", help="a datasets --data: the split (default: train, where the dataset has splits)")
    group.add_argument("--data-revision", help="a Hub dataset --data: its revision (branch, tag or commit)")
    group.add_argument("--resolution", type=int, metavar="N", help="resize each image's shorter side to N and crop the centre N x N square "
                                                       "(default: keep the sizes, which must then all be equal)")
    group.add_argument("--latent-cache", metavar="DIR", help="latent bases: where the VAE latents are cached "
                                                            "(default: $GUDA_LATENT_CACHE, else <HF_HOME>/diffusers_guda/latents)")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_FILE_SUFFIXES = {".parquet", ".arrow", ".csv", ".json", ".jsonl"}


def load_training_data(args, mode: str | None = None):
    """The training set of ``--data``/``--benchmark``, read one image at a time where it comes from files.

    A folder with ``metadata.jsonl`` or one subfolder per group, a ``datasets`` folder (``save_to_disk``
    output, or data files such as parquet) or a Hub dataset id (``owner/name``) gives a
    :class:`~diffusers_guda.lazy_data.LazyGroupedDataset`; ``digits`` and ``--benchmark`` an in-memory dataset.

    Args:
        args: The parsed command line (with :func:`add_data` and :func:`add_dataset_options`).
        mode: PIL mode the images are converted to when ``--mode`` is not given.
    """
    from ..data_files import METADATA_NAME
    from ..hf_data import SAVED_MARKERS, open_hf_dataset
    from ..lazy_data import LazyGroupedDataset

    require_positive(resolution=args.resolution)
    if getattr(args, "benchmark", None) or args.data in (None, "digits"):
        if args.resolution is not None:
            raise ConfigError("--resolution applies to image folders and datasets given with --data; drop it.")
        return load_dataset(args, mode)
    mode, path = args.mode or mode, Path(args.data)
    if (path / METADATA_NAME).is_file():
        return LazyGroupedDataset.from_metadata(path, mode=mode, resolution=args.resolution)
    files = [p for folder in (path, path / "data") if folder.is_dir() for p in folder.iterdir() if p.is_file()]
    datasets_folder = any(p.name in SAVED_MARKERS or p.suffix.lower() in DATA_FILE_SUFFIXES for p in files)
    if not datasets_folder and (path.exists() or not HUB_ID.match(args.data)):
        return LazyGroupedDataset.from_image_folder(path, mode=mode, resolution=args.resolution)
    data = open_hf_dataset(args.data, split=args.split, revision=args.data_revision)
    caption = args.caption_column or ("text" if "text" in data.column_names else None)
    return LazyGroupedDataset.from_hf_dataset(data, image_column=args.image_column, group_column=args.group_column, caption_column=caption,
                                              mode=mode, resolution=args.resolution, name=repr(args.data))


def parse_options(pairs: list[str] | None, flag: str = "--option") -> dict:
    """``KEY=VALUE`` pairs as a dict, each value read as JSON when it is JSON (``5``, ``true``, ``[1,2]``), else as text."""
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise GUDAError(f"{flag} expects KEY=VALUE, got {pair!r}.")
        key, value = pair.split("=", 1)
        if key in options:
            raise ConfigError(f"{flag} {key}=... is given twice; keep one.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def add_dtype(parser) -> None:
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype of the base weights (default float32). Adapters train in float32 either way; in half precision "
                             "scoring keeps the LoRA branch unmerged (slower), and a bundle only loads into a base in the dtype "
                             "it was made with")
    parser.add_argument("--autocast", choices=["bfloat16", "float16", "none"],
                        help="run the UNet's forwards under this autocast dtype (faster on a GPU; scoring then keeps the LoRA branch "
                             "unmerged); unlearning on CUDA uses bfloat16 unless the recipe or 'none' says otherwise")


def add_base_options(parser) -> None:
    """``--base-revision`` and ``--allow-pickle-weights``: which version of a ``--base`` Hub id, and how its weights may be read."""
    parser.add_argument("--base-revision", metavar="REV",
                        help="a Hub id --base: its branch, tag or commit (default: main; the commit used is recorded). "
                             "Refused for a local directory, which the bundle identifies by its weights' fingerprint")
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="also read a base's pickle-based .bin weights (they can run code when loaded: only for a "
                             "model you trust); by default only safetensors weights are read")


def load_base(spec: str, dtype: str = "float32", *, revision: str | None = None, allow_pickle_weights: bool = False):
    """The base pipeline ``spec`` as its GUDA pipeline class, its weights in ``dtype``.

    Args:
        spec: A pipeline directory or Hub id (``--base``).
        dtype: The dtype of its weights.
        revision: A Hub id's branch, tag or commit (``--base-revision``); refused for a local directory.
        allow_pickle_weights: Also read pickle-based ``.bin`` weights (``--allow-pickle-weights``).

    Raises:
        ConfigError: a revision for a local directory, or a base with only pickle-based weights.
        GUDAError: the base cannot be found or read (one line, naming the fix).
    """
    import torch

    from ..pipelines import GUDAAutoPipeline

    check_base_revision(spec, revision)
    kwargs = {"revision": revision} if revision is not None else {}
    return GUDAAutoPipeline.from_pretrained(spec, torch_dtype=getattr(torch, dtype), use_safetensors=True if not allow_pickle_weights else None,
                                            **kwargs)


def check_base_revision(spec: str, revision: str | None) -> None:
    """Refuse ``--base-revision`` for a local directory: it has no revisions (its bundle records its weights' fingerprint)."""
    if revision is not None and Path(spec).exists():
        raise ConfigError(
            f"--base-revision {revision} applies to a Hub id, but --base {spec} is a local directory, which has no revisions "
            "(a bundle identifies it by its UNet fingerprint); drop --base-revision, or pass the Hub id as --base."
        )


def image_mode(pipeline_class: type | None) -> str | None:
    """The PIL mode images are converted to for a base of this GUDA pipeline class: RGB for a latent pipeline's VAE, else their own."""
    return "RGB" if pipeline_class is not None and "vae" in inspect.signature(pipeline_class.__init__).parameters else None
