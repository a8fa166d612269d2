"""Query images on disk and their prompts: the files to attribute and the text each was generated from."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .data_files import IMAGE_EXTENSIONS, METADATA_NAME, read_metadata_rows
from .errors import ConfigError, DataError, GUDAError
from .images import open_image


def query_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``paths``: files as given, folders expanded to their images (sorted).

    Raises:
        GUDAError: a path that does not exist, an image named twice (e.g. as a file and through its
            folder), or no image at all.
    """
    files, seen = [], {}
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found = [path]
        else:
            raise GUDAError(f"Query image {path} does not exist.")
        for file in found:
            key = file.resolve()
            if key in seen:
                raise GUDAError(f"Query image {file} is named twice (also as {seen[key]}); name each image once.")
            seen[key] = file
            files.append(file)
    if not files:
        raise GUDAError(f"No images found in {[str(p) for p in paths]}.")
    return files


def open_query_image(path: str | Path):
    """A query image, fully read by the one image reader (:func:`~diffusers_guda.images.open_image`).

    The file gives the same pixels as the same file in the training data: EXIF orientation applied,
    16-bit grayscale scaled to 8 bits, transparency composited on white (docs/formats.md#image-reading).

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``L`` (grayscale files) or ``RGB``.

    Raises:
        DataError: the file is empty, not a readable image, animated, or larger than the decompression-bomb limit.
    """
    return open_image(path, name=f"query image {path}")


def prompt_table(path: str | Path) -> dict[str, str]:
    """The prompts of a JSONL file (rows with ``file_name`` and ``text``), keyed by ``file_name`` as written and by resolved path.

    Raises:
        DataError: a malformed row, or one file given two different texts.
    """
    path = Path(path)
    table: dict[str, str] = {}
    for where, row in read_metadata_rows(path, fields=("file_name", "text")):
        for key in (row["file_name"], str((path.parent / row["file_name"]).resolve())):
            if table.setdefault(key, row["text"]) != row["text"]:
                raise DataError(f"{where} gives {row['file_name']!r} a second, different text; keep one row per image.")
    return table


def query_prompts(files: Sequence[Path], prompt: str | None = None, prompts_file: str | Path | None = None) -> list[str]:
    """Each query image's prompt: ``prompt`` for all, a row of ``prompts_file``, or a row of the ``metadata.jsonl`` beside it.

    A row matches an image when its ``file_name`` is the image's file name or its path relative to
    the JSONL file's folder.

    Raises:
        ConfigError: ``prompts_file`` is not a file.
        DataError: an image without a prompt.
    """
    if prompt is not None:
        return [prompt] * len(files)
    if prompts_file is not None and not Path(prompts_file).is_file():
        raise ConfigError(f"--prompts {prompts_file} is not a file; pass a JSONL file with one {{\"file_name\", \"text\"}} object per line.")
    tables: dict[Path, dict[str, str]] = {}
    prompts = []
    for f in files:
        source = Path(prompts_file) if prompts_file is not None else f.parent / METADATA_NAME
        if source not in tables:
            tables[source] = prompt_table(source) if source.is_file() else {}
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
