"""Grouped data on disk: image folders, ``metadata.jsonl`` rows and ``groups.json`` descriptors.

What :class:`~diffusers_guda.data.GroupedDataset` reads from disk, and the rules it reads them by
(see docs/formats.md and the constructors' docstrings).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
METADATA_NAME = "metadata.jsonl"
DESCRIPTORS_NAME = "groups.json"
MODES = {"L": 1, "RGB": 3}


def read_metadata_rows(path: str | os.PathLike, fields: Sequence[str] = ("file_name", "text", "group")) -> list[tuple[str, dict]]:
    """The rows of a ``metadata.jsonl`` file (one JSON object per line; blank lines skipped).

    Args:
        path: The JSONL file.
        fields: Keys every row must hold as non-empty strings.

    Returns:
        ``(where, row)`` pairs; ``where`` (``"<path> line <n>"``) locates the row in error messages.

    Raises:
        DataError: an unreadable file, a line that is not a JSON object, or a row lacking one of ``fields``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is allowed
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read {path}: {exc}. It must be a UTF-8 text file with one JSON object per line.") from exc
    expected = f"{', '.join(fields[:-1])} and {fields[-1]}" if len(fields) > 1 else fields[0]
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg}); each line must be one JSON object.") from exc
        if not isinstance(row, dict):
            raise DataError(f"{where} must be a JSON object with {expected}.")
        missing = [k for k in fields if not isinstance(row.get(k), str) or not row.get(k).strip()]
        if missing:
            raise DataError(f"{where} lacks {', '.join(missing)} (each must be a non-empty string); add it to that row.")
        rows.append((where, row))
    return rows


def group_files(folder: Path) -> list[Path]:
    """The images of one group folder: every file below it, nested folders included, except hidden
    files and anything inside a hidden folder (e.g. ``.ipynb_checkpoints``).

    Raises:
        DataError: a link that points nowhere.
    """
    files = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path} is a link to a file that does not exist. Remove the link or restore its target.")
        if path.is_file():
            files.append(path)
    return files


def read_image(path: Path, mode: str | None) -> np.ndarray:
    """One image as an ``[H, W]`` or ``[H, W, C]`` uint8 array, converted to ``mode`` (or to L/RGB)."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{path} is not an image (extension {path.suffix or 'none'}). Remove it; accepted: {', '.join(sorted(IMAGE_EXTENSIONS))}.")
    try:
        with Image.open(path) as img:
            img.load()
            if mode is not None:
                img = img.convert(mode)
            elif img.mode not in MODES:
                img = img.convert("RGB" if img.mode in ("RGBA", "P", "CMYK", "YCbCr") else "L")
            return np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"Cannot read image {path}: {exc}. Remove or replace the file.") from exc


def stack_images(arrays: list[tuple[np.ndarray, Path]], root: Path) -> np.ndarray:
    """``[N, C, H, W]`` uint8 from images that must share one mode and one size."""
    if len({a.ndim for a, _ in arrays}) > 1:
        raise DataError(f"{root} mixes grayscale and colour images. Pass mode='L' or mode='RGB' (CLI: --mode L|RGB) to convert them all.")
    sizes = Counter(a.shape[:2] for a, _ in arrays)
    if len(sizes) > 1:
        (common, _), *_ = sizes.most_common()
        odd = next(p for a, p in arrays if a.shape[:2] != common)
        raise DataError(
            f"Images in {root} have different sizes ({', '.join(f'{w}x{h}' for h, w in sizes)}); e.g. {odd} "
            f"is not {common[1]}x{common[0]}. Resize them all to one size first."
        )
    return np.stack([a if a.ndim == 3 else a[..., None] for a, _ in arrays]).transpose(0, 3, 1, 2).astype(np.uint8)


def read_descriptors(path: Path, names: list[str]) -> dict[str, list[str]] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"Cannot read {path}: {exc}. It must be a JSON object mapping group names to lists of phrases.") from exc
    return check_descriptors(data, names, str(path))


def check_descriptors(data, names: list[str], where: str) -> dict[str, list[str]] | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise DataError(f"{where} must map group names to lists of phrases, e.g. {{\"{names[0]}\": [\"thick strokes\"]}}.")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise DataError(f"{where} names group(s) {unknown} that the data does not have (groups: {names}); fix or remove them.")
    for name, phrases in data.items():
        if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise DataError(f"{where}: group {name!r} needs a non-empty list of non-empty phrases; got {phrases!r}.")
    return {name: list(data[name]) for name in names if name in data}
