"""The ``guda`` command line: a thin layer over the public API.

The library's own commands are ``unlearn`` and ``attribute``. Other installed packages add theirs
through the entry-point group ``diffusers_guda.commands`` (a function ``register(subparsers)``);
the evaluation lab adds ``train``, ``logo``, ``demo`` and ``evaluate`` that way, so the library never
imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from ..errors import GUDAError
from . import attribute, unlearn
from .arguments import set_threads

EPILOG = "Documentation: README.md and docs/ of diffusers-guda. Every command runs offline."
COMMANDS_ENTRY_POINTS = "diffusers_guda.commands"


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other ``guda`` error (its subcommands' too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``guda`` parser: the library's commands, then those of installed packages."""
    parser = OneLineErrors(prog="guda", description="Group attribution for diffusers models by unlearning (GUDA).", epilog=EPILOG)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    unlearn.register(subparsers)
    attribute.register(subparsers)
    for entry_point in sorted(entry_points(group=COMMANDS_ENTRY_POINTS), key=lambda ep: ep.name):
        entry_point.load()(subparsers)
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
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # what a command records of its own invocation
    notices = logging.getLogger("transformers.utils.import_utils")  # the logger it is emitted on
    if not any(isinstance(f, _TorchvisionFallbackNotice) for f in notices.filters):
        notices.addFilter(_TorchvisionFallbackNotice())
    switches = _progress_bar_switches()
    enabled = [s for s in switches if s.is_progress_bar_enabled()]
    if args.quiet:  # also the libraries' own bars ("Loading pipeline components...")
        for switch in switches:
            switch.disable_progress_bar()
    try:
        set_threads(args)
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
