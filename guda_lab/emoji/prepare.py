"""``guda prepare emoji-styles``: the emoji of every chosen style, as one cached grouped dataset.

Steps: fetch and verify each style's pinned tarball (:mod:`.sources`), read the base emoji of each,
keep the emoji present in *every* chosen style (same codepoints, FE0F ignored), composite each image's
alpha on a white background, resize it to ``size`` by area averaging (PIL's ``BOX``), and write the
dataset folder atomically (a temporary folder renamed into place, so a failed prepare leaves nothing):

* ``images.safetensors``: ``images``, uint8 ``[N, 3, size, size]``, style-major (all emoji of the
  first style, then the second's, ...), the emoji in the same (codepoint) order in every style;
* ``metadata.json``: the styles, size, background, each source's package, version, sha512 and
  licence, the per-style counts, the emoji (codepoints, name, category, subcategory) and each
  image's style and emoji index.

The folder is ``<cache>/emoji-styles-<style>-<style>...-<size>px`` (styles in the table order of
:data:`~.sources.SOURCES`); ``<cache>`` is ``--cache-dir``, else ``$GUDA_EMOJI_CACHE``, else
``<HF_HOME>/diffusers_guda/emoji``. A prepared folder whose pins match is reused without reading any tarball.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusers_guda.errors import ConfigError, DataError
from diffusers_guda.io_utils import atomic_directory, cache_dir_from_env

from .sources import SOURCE_SIZE, SOURCES, EmojiSource, check_styles, read_source, tarball

CACHE_ENV = "GUDA_EMOJI_CACHE"
FORMAT = 1
DEFAULT_SIZE = 16
#: The fixed background every image's alpha is composited on (white, as emoji are seen on a page).
BACKGROUND = (255, 255, 255)
METADATA_NAME = "metadata.json"
IMAGES_NAME = "images.safetensors"


def default_cache_dir() -> Path:
    """``$GUDA_EMOJI_CACHE`` if set, else ``<HF_HOME>/diffusers_guda/emoji``."""
    return cache_dir_from_env(CACHE_ENV, "emoji")


def dataset_dir(styles, size: int = DEFAULT_SIZE, cache_dir: str | os.PathLike | None = None,
                sources: dict[str, EmojiSource] | None = None) -> Path:
    """The folder the prepared dataset of ``styles`` at ``size`` lives in."""
    styles = check_styles(styles, sources)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"emoji-styles-{'-'.join(styles)}-{size}px"


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= SOURCE_SIZE:
        raise ConfigError(f"--size must be a whole number of pixels from 4 to {SOURCE_SIZE} (the source images' size); got {size!r}.")


def prepare_emoji_styles(styles=None, size: int = DEFAULT_SIZE, cache_dir: str | os.PathLike | None = None,
                         tarball_dir: str | os.PathLike | None = None, sources: dict[str, EmojiSource] | None = None,
                         progress: bool = True) -> Path:
    """Prepare (or reuse) the emoji-styles dataset; returns its folder. See the module docstring.

    Args:
        styles: Style names (default: the openly licensed ones, :data:`~.sources.DEFAULT_STYLES`).
        size: Side of the square RGB images, 4 to 64 pixels.
        cache_dir: Where the dataset (and downloaded tarballs, under ``tarballs/``) go.
        tarball_dir: Read the ``<package>-<version>.tgz`` files from here instead of downloading (still checksum-verified).
        sources: The pinned sources by style (default :data:`~.sources.SOURCES`).
        progress: Show progress bars.

    Raises:
        ConfigError: an unknown style, a bad size, a missing tarball, a failed download.
        DataError: a checksum mismatch, a corrupt tarball, a package without the style's images, no emoji common to all styles.
    """

    sources = SOURCES if sources is None else sources
    styles = check_styles(styles, sources)
    _check_size(size)
    out = dataset_dir(styles, size, cache_dir, sources)
    pins = {s: sources[s].pin() for s in styles}
    if _reusable(out, styles, size, pins):
        return out
    root = out.parent
    read = {}
    for style in styles:
        path = tarball(sources[style], root, tarball_dir, progress)
        read[style] = read_source(path, sources[style], progress)
    common = sorted(set.intersection(*(set(data) for _, data, _ in read.values())), key=_codepoint_order)
    if not common:
        raise DataError(f"No emoji is drawn in every one of the styles {list(styles)}; choose other styles.")
    described = {}
    for style in styles:  # names and categories from the first style that has them (table order)
        for e in read[style][0]:
            described.setdefault(e.key, e)
    images = np.empty((len(styles) * len(common), 3, size, size), dtype=np.uint8)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(images), desc="composite and resize", unit=" images", disable=not progress)
    for k, style in enumerate(styles):
        _, data, kind = read[style]
        for i, key in enumerate(common):
            images[k * len(common) + i] = render(data[key], kind, size, what=f"{style} {key}")
            bar.update()
    bar.close()
    metadata = {
        "format": FORMAT,
        "styles": list(styles),
        "size": size,
        "background": list(BACKGROUND),
        "resize": "composite alpha on the background at 64 px, then PIL BOX (area) resize",
        "sources": pins,
        "available": {style: len(read[style][1]) for style in styles},
        "common": len(common),
        "emoji": [{"codepoints": key, "name": described[key].name, "category": described[key].category,
                   "subcategory": described[key].subcategory} for key in common],
        "image_style": [k for k in range(len(styles)) for _ in common],
        "image_emoji": [i for _ in styles for i in range(len(common))],
    }
    from safetensors.torch import save_file

    with atomic_directory(out) as tmp:
        save_file({"images": torch.from_numpy(images)}, str(tmp / IMAGES_NAME))
        (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=1))
    return out


def _codepoint_order(key: str) -> list[int]:
    return [int(cp, 16) for cp in key.split("-")]


def _reusable(out: Path, styles, size: int, pins: dict) -> bool:
    try:
        meta = json.loads((out / METADATA_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("format") == FORMAT and meta.get("styles") == list(styles) and meta.get("size") == size
            and meta.get("sources") == pins and meta.get("background") == list(BACKGROUND) and (out / IMAGES_NAME).is_file())


def render(data: bytes, kind: str, size: int, what: str = "image") -> np.ndarray:
    """One source image (PNG or SVG bytes) as uint8 ``[3, size, size]``: rendered at 64 px, alpha composited
    on :data:`BACKGROUND`, area-resized.

    Raises:
        DataError: the image cannot be decoded.
        ConfigError: an SVG and no ``resvg-py`` installed.
    """
    from PIL import Image, UnidentifiedImageError

    if kind == "svg":
        try:
            import resvg_py
        except ImportError as exc:
            raise ConfigError("The openmoji style is drawn as SVG and needs resvg-py to render it: "
                              "pip install 'diffusers-guda[emoji]' (or resvg-py), or leave openmoji out of --styles.") from exc
        try:
            data = bytes(resvg_py.svg_to_bytes(svg_string=data.decode("utf-8"), width=SOURCE_SIZE, height=SOURCE_SIZE))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"Cannot render the SVG of {what} ({exc}); the package is corrupt.") from exc
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"Cannot decode the image of {what} ({exc}); the package is corrupt.") from exc
    image = image.convert("RGBA")
    if image.size != (SOURCE_SIZE, SOURCE_SIZE):
        image = image.resize((SOURCE_SIZE, SOURCE_SIZE), Image.Resampling.BOX)
    flat = Image.alpha_composite(Image.new("RGBA", image.size, (*BACKGROUND, 255)), image).convert("RGB")
    return np.asarray(flat.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).transpose(2, 0, 1)


@dataclass
class PreparedEmoji:
    """A prepared emoji-styles dataset, read back.

    Attributes:
        images: Float ``[N, 3, size, size]`` in [-1, 1], style-major.
        style_ids: Long ``[N]``, the index of each image's style in ``styles``.
        emoji_ids: Long ``[N]``, the index of each image's emoji in ``emoji``.
        styles: Style names.
        emoji: Per emoji: ``codepoints``, ``name``, ``category``, ``subcategory``.
        metadata: The whole ``metadata.json``.
    """

    images: torch.Tensor
    style_ids: torch.Tensor
    emoji_ids: torch.Tensor
    styles: list[str]
    emoji: list[dict]
    metadata: dict


def load_prepared(styles=None, size: int = DEFAULT_SIZE, cache_dir: str | os.PathLike | None = None) -> PreparedEmoji:
    """The prepared dataset of ``styles`` at ``size``.

    Raises:
        ConfigError: it was not prepared ("run `guda prepare emoji-styles` first"), or is unreadable.
    """
    from safetensors.torch import load_file

    styles = check_styles(styles)
    _check_size(size)
    folder = dataset_dir(styles, size, cache_dir)
    flags = "" if list(styles) == list(check_styles(None)) else f" --styles {' '.join(styles)}"
    flags += "" if size == DEFAULT_SIZE else f" --size {size}"
    flags += "" if cache_dir is None else f" --cache-dir {cache_dir}"
    if not (folder / METADATA_NAME).is_file() or not (folder / IMAGES_NAME).is_file():
        raise ConfigError(f"The emoji-styles data are not prepared in {folder}; run `guda prepare emoji-styles{flags}` first "
                          f"(it downloads the styles' npm packages once; set ${CACHE_ENV} to use another cache).")
    try:
        meta = json.loads((folder / METADATA_NAME).read_text())
        raw = load_file(str(folder / IMAGES_NAME))["images"]
    except Exception as exc:  # any unreadable cache gets the same fix
        raise ConfigError(f"The prepared emoji-styles data in {folder} are unreadable ({exc}); delete the folder and "
                          f"run `guda prepare emoji-styles{flags}` again.") from exc
    return PreparedEmoji(raw.float() / 127.5 - 1.0, torch.tensor(meta["image_style"], dtype=torch.long),
                         torch.tensor(meta["image_emoji"], dtype=torch.long), list(meta["styles"]), meta["emoji"], meta)
