"""Grouped data on disk: image folders, ``metadata.jsonl`` rows and ``groups.json`` descriptors.

What :class:`~diffusers_guda.lazy_data.LazyGroupedDataset` (and through it
:class:`~diffusers_guda.data.GroupedDataset`) reads from disk, the rules it reads them by, and the one
image reader every source uses (see docs/formats.md#training-data and the constructors' docstrings).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError
from .images import open_image

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
        DataError: a link that points nowhere, or a file that is not an image.
    """
    files = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path} is a link to a file that does not exist. Remove the link or restore its target.")
        if path.is_file():
            files.append(check_image_file(path))
    return files


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise DataError(f"mode must be one of {sorted(MODES)}, got {mode!r}.")


def check_image_file(path: Path) -> Path:
    """``path``, refused unless its extension is an image's."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{path} is not an image (extension {path.suffix or 'none'}). Remove it; accepted: {', '.join(sorted(IMAGE_EXTENSIONS))}.")
    return path


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """The images of ``root/<group name>/...`` (see ``LazyGroupedDataset.from_image_folder``), not decoded.

    Returns:
        ``(files, group_ids, group_names)``: groups in name order, files in path order within a group.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist or is not a directory.")
    group_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise DataError(
            f"{root} holds files outside group subfolders ({', '.join(stray[:3])}). "
            "Put every image in a subfolder named after its group."
        )
    if len(group_dirs) < 2:
        raise DataError(
            f"{root} has {len(group_dirs)} group subfolder(s); attribution needs at least 2. "
            "Make one subfolder per group (its name is the group name)."
        )
    files, ids = [], []
    for gid, folder in enumerate(group_dirs):
        found = group_files(folder)
        if not found:
            raise DataError(f"Group '{folder.name}' ({folder}) has no images. Add images or remove the folder.")
        files.extend(found)
        ids.extend([gid] * len(found))
    return files, ids, [folder.name for folder in group_dirs]


def scan_metadata(root: str | os.PathLike) -> tuple[list[Path], list[str], list[int], list[str], dict | None]:
    """The rows of ``root/metadata.jsonl`` and ``root/groups.json`` (see ``LazyGroupedDataset.from_metadata``), not decoded.

    Returns:
        ``(files, prompts, group_ids, group_names, descriptors)``: groups in name order, rows in file order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset folder {root} does not exist or is not a directory.")
    metadata = root / METADATA_NAME
    if not metadata.is_file():
        raise DataError(
            f"{root} has no {METADATA_NAME}. Write one JSON object per line with file_name, text and group "
            "(e.g. {\"file_name\": \"0001.png\", \"text\": \"a cat, impressionist\", \"group\": \"impressionism\"})."
        )
    rows, seen = [], {}
    resolved_root = root.resolve()
    for where, row in read_metadata_rows(metadata):
        path = root / row["file_name"]
        if Path(row["file_name"]).is_absolute() or not path.resolve().is_relative_to(resolved_root):
            raise DataError(f"{where} names {row['file_name']!r}, which is outside {root}; use paths relative to the folder.")
        if not path.is_file():
            raise DataError(f"{where} names {row['file_name']!r}, but {path} does not exist. Add the file or remove the row.")
        if path.resolve() in seen:
            raise DataError(
                f"{where} lists {row['file_name']!r} again ({seen[path.resolve()]} lists it too); an image belongs to "
                "one group with one caption: keep one row per image."
            )
        seen[path.resolve()] = where
        rows.append((check_image_file(path), row["text"], row["group"]))
    if not rows:
        raise DataError(f"{metadata} has no rows; add one line per image.")
    names = sorted({group for _, _, group in rows})
    if len(names) < 2:
        raise DataError(f"{metadata} names {len(names)} group(s); attribution needs at least 2.")
    descriptors = read_descriptors(root / DESCRIPTORS_NAME, names)
    index = {name: k for k, name in enumerate(names)}
    return [p for p, _, _ in rows], [t for _, t, _ in rows], [index[g] for _, _, g in rows], names, descriptors


def read_image(source: Path | bytes, mode: str | None, resolution: int | None = None, where: str | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Decode one image file (or its bytes) with the one image reader, convert it to ``mode`` and optionally resize and crop it.

    The file is decoded by :func:`~diffusers_guda.images.open_image` (EXIF orientation applied, 16-bit
    grayscale scaled to 8 bits, transparency composited on white, animated images refused; see
    docs/formats.md#image-reading), so it gives the same pixels as the same file passed as a query.

    With ``resolution``, the shorter side is resized to ``resolution`` (bicubic) and the centre
    ``resolution x resolution`` square is cut out, as diffusers' training scripts do
    (docs/formats.md#large-datasets). The same source always gives the same pixels.

    Args:
        source: A file path or the encoded image's bytes.
        mode: ``"L"``/``"RGB"``, or ``None`` to keep the reader's ``L`` or ``RGB`` (grayscale sources give ``L``, others ``RGB``).
        resolution: Side of the square crop, or ``None`` to keep the size.
        where: How error messages name the image (default: the path).

    Returns:
        ``(pixels, size_condition)``: ``[H, W]`` or ``[H, W, C]`` uint8, and ``(original height, original
        width, crop top, crop left, height, width)``.

    Raises:
        DataError: naming the image, when it cannot be decoded or the reader refuses it (animated, float, too many pixels).
    """
    from PIL import Image

    image = open_image(source, mode, name=f"image {where}" if where else None)
    width, height = image.size
    top = left = 0
    if resolution is not None:
        short, long = sorted((width, height))
        scaled = (resolution, int(resolution * long / short))  # torchvision's Resize(int) sizes
        size = scaled if width <= height else scaled[::-1]
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        top, left = round((size[1] - resolution) / 2), round((size[0] - resolution) / 2)
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image)
    return array, (height, width, top, left, *array.shape[:2])


def stack_images(arrays: list[tuple[np.ndarray, Path | str]], root: Path | str) -> np.ndarray:
    """``[N, C, H, W]`` uint8 from images (with their names) that must share one mode and one size."""
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
