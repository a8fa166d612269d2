"""Grouped training data from the ``datasets`` library: a ``Dataset``, a ``save_to_disk`` folder, a local
data folder or a Hub dataset id (docs/formats.md#large-datasets).

``datasets`` loads and caches the data (memory-mapped Arrow files); the images are read one row at a
time, as encoded bytes, and decoded by the same reader as image folders
(:func:`~diffusers_guda.data_files.read_image`), so a file gives the same pixels on every path.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError

SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what Dataset(Dict).save_to_disk writes


def open_hf_dataset(source, split: str | None = None, revision: str | None = None, cache_dir: str | os.PathLike | None = None):
    """The ``datasets.Dataset`` named by ``source``, without decoding any image.

    Args:
        source: A ``datasets.Dataset`` or ``DatasetDict``, a ``save_to_disk`` folder, a local data folder
            (anything ``datasets.load_dataset(path)`` reads, e.g. parquet files) or a Hub dataset id.
        split: The split to use when ``source`` holds several (default ``"train"``); a source of one
            dataset without splits refuses any other split name than its own or "train".
        revision: Hub revision (branch, tag or commit) of a Hub dataset.
        cache_dir: Where ``datasets`` caches what it downloads or converts (default: its own cache).

    Raises:
        DataError: an unknown split, or a dataset that cannot be loaded (one line, with the fix).
    """
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _pick_split(source, split, "the dataset")
    name = str(source)
    path = Path(name)
    try:
        if path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS):
            return _pick_split(datasets.load_from_disk(name), split, name)
        kwargs = {} if path.is_dir() else {"revision": revision}
        return datasets.load_dataset(name, split=split or "train", cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)
    except DataError:
        raise
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"{name} has no split {split or 'train'!r}: {_first_line(exc)} Pass split= (CLI: --split).") from exc
        raise DataError(f"Cannot load the dataset {name}: {_first_line(exc)}") from exc
    except (OSError, datasets.exceptions.DatasetNotFoundError) as exc:
        where = "a local folder" if path.exists() else "a Hub dataset id (and no such local folder exists)"
        raise DataError(
            f"Cannot load the dataset {name} as {where}: {_first_line(exc)} Check the name, your connection, or pass a local "
            "folder (a save_to_disk folder, parquet files, or images with metadata.jsonl)."
        ) from exc


def _pick_split(dataset, split: str | None, name: str):
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        if split not in (None, "train", None if dataset.split is None else str(dataset.split)):
            raise DataError(f"{name} is one dataset without splits, so it has no split {split!r}; drop split= (CLI: --split).")
        return dataset
    split = split or "train"
    if split not in dataset:
        raise DataError(f"{name} has no split {split!r} (splits: {sorted(dataset)}). Pass split= (CLI: --split).")
    return dataset[split]


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    return f"{text}."


def require_column(dataset, column: str, keyword: str, flag: str, name: str) -> None:
    """Refuse a column the dataset does not have, naming the columns it has and how to pick one."""
    if column not in dataset.column_names:
        raise DataError(
            f"{name} has no column {column!r} (columns: {dataset.column_names}); pass {keyword}='<column>' (CLI: --{flag})."
        )


def read_group_column(dataset, column: str, name: str) -> tuple[list[int], list[str]]:
    """Group ids and names from a ``ClassLabel`` column (its names, in label order, unused labels dropped) or
    from string or integer values (in sorted order)."""
    import datasets

    values = list(dataset[column])
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise DataError(f"Row {missing[0]} of {name} has no group in column {column!r}; give every row a group or drop it.")
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        used = sorted(set(values))
        names = [feature.int2str(label) for label in used]
    else:
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise DataError(f"Column {column!r} of {name} holds {feature}; groups must be a ClassLabel, strings or integers.")
        used = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        names = [str(v) for v in used]
    index = {label: k for k, label in enumerate(used)}
    return [index[v] for v in values], names


def read_caption_column(dataset, column: str, name: str) -> list[str]:
    """The caption of every row; each must be a non-empty string."""
    captions = list(dataset[column])
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise DataError(f"Row {bad[0]} of {name} has no caption in column {column!r} (a non-empty string); fix or drop the row.")
    return captions


class DatasetImages:
    """The images of one column of a ``datasets.Dataset``, read one row at a time as encoded bytes or a path.

    Args:
        dataset: The dataset (only ``column`` is kept).
        column: Its image column (an ``Image`` feature, or file paths).
        name: How messages name the dataset.
    """

    def __init__(self, dataset, column: str, name: str):
        import datasets

        feature = dataset.features[column]
        if not isinstance(feature, datasets.Image) and feature != datasets.Value("string"):
            raise DataError(f"Column {column!r} of {name} holds {feature}, not images; pass image_column='<column>' (CLI: --image-column).")
        self.rows = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.column = column
        self.label = name

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        return f"in row {index} of {self.label} (column {self.column!r})"

    def source(self, index: int) -> Path | bytes:
        """The encoded image of row ``index`` (bytes), or its file path."""
        value = self.rows[index][self.column]
        if isinstance(value, dict) and value.get("bytes") is not None:
            return value["bytes"]
        path = value.get("path") if isinstance(value, dict) else value
        if not path:
            raise DataError(f"There is no image {self.describe(index)}; fix or drop the row.")
        return Path(path)
