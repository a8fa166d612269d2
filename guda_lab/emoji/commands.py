"""``guda prepare emoji-styles``: download (once), verify and cache the emoji-styles data.

Registered through the ``diffusers_guda.commands`` entry point ``emoji`` (see :mod:`diffusers_guda.cli`).
"""

from __future__ import annotations

from diffusers_guda.cli.arguments import add_common

from .prepare import DEFAULT_SIZE
from .sources import DEFAULT_STYLES, SOURCES

#: The datasets ``guda prepare`` knows.
PREPARABLE = ("emoji-styles",)


def register(subparsers) -> None:
    licences = "; ".join(f"{s}: {src.licence}" for s, src in SOURCES.items())
    p = add_common(subparsers.add_parser(
        "prepare", help="download, verify and cache a benchmark's data (emoji-styles)",
        description="Download each style's pinned npm package once, verify its sha512, and write the emoji common to every "
                    "style as a cached grouped dataset (docs/evaluation.md#emoji-styles)."))
    p.add_argument("dataset", choices=PREPARABLE, help="the dataset to prepare")
    p.add_argument("--styles", nargs="+", metavar="STYLE", default=list(DEFAULT_STYLES),
                   help=f"styles, i.e. groups (default: the openly licensed {' '.join(DEFAULT_STYLES)}; image licences: {licences})")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels, 4 to 64 (default {DEFAULT_SIZE})")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the dataset and downloaded tarballs go (default: $GUDA_EMOJI_CACHE, else <HF_HOME>/diffusers_guda/emoji)")
    p.add_argument("--tarball-dir", metavar="DIR",
                   help="read the <package>-<version>.tgz files from DIR instead of downloading them (still checksum-verified)")
    p.set_defaults(func=prepare)


def prepare(args) -> None:
    import json

    from .prepare import METADATA_NAME, prepare_emoji_styles

    folder = prepare_emoji_styles(args.styles, args.size, cache_dir=args.cache_dir, tarball_dir=args.tarball_dir, progress=not args.quiet)
    meta = json.loads((folder / METADATA_NAME).read_text())
    available = ", ".join(f"{s} {n}" for s, n in meta["available"].items())
    print(f"emoji-styles: {meta['common']} emoji in every style ({available}); {len(meta['image_style'])} images of "
          f"{meta['size']} x {meta['size']} px in {folder}")
    for style, pin in meta["sources"].items():
        print(f"  {style}: {pin['package']} {pin['version']}, images {pin['licence']} ({pin['licence_note']})")
