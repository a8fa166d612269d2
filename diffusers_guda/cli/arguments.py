"""What every ``guda`` command shares: common flags, checks made before any work, data and device.

Public so that commands added by other packages (see :func:`diffusers_guda.cli.build_parser`) parse
and check their flags the same way.
"""

from __future__ import annotations

import json
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
    if suffix and suffix not in formats:
        raise ConfigError(f"--plot {path}: unsupported image format .{suffix}; use a .png path (or one of {', '.join(formats)}).")


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


def parse_options(pairs: list[str] | None, flag: str = "--option") -> dict:
    """``KEY=VALUE`` pairs as a dict, each value read as JSON when it is JSON (``5``, ``true``, ``[1,2]``), else as text."""
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise GUDAError(f"{flag} expects KEY=VALUE, got {pair!r}.")
        key, value = pair.split("=", 1)
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
    parser.add_argument("--autocast", choices=["bfloat16", "float16"],
                        help="run the UNet's forwards under this autocast dtype (faster on a GPU; scoring then keeps the LoRA branch unmerged)")


def load_base(spec: str, dtype: str = "float32"):
    """The base pipeline ``spec`` as its GUDA pipeline class, its weights in ``dtype``."""
    import torch

    from ..pipelines import GUDAAutoPipeline

    return GUDAAutoPipeline.from_pretrained(spec, torch_dtype=getattr(torch, dtype))


def image_mode(pipeline_class: type | None) -> str | None:
    """The PIL mode images are converted to for a base of this GUDA pipeline class: RGB for Stable Diffusion's VAE, else their own."""
    return "RGB" if pipeline_class is not None and pipeline_class.__name__ == "GUDAStableDiffusionPipeline" else None
