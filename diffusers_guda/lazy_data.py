"""Grouped training data larger than memory: per-image metadata in memory, images read one at a time.

:class:`LazyGroupedDataset` holds what each image is (its group, its caption, where it comes from) and
decodes an image only when asked. Its sources are the image folders of
:class:`~diffusers_guda.data.GroupedDataset` (the same rules, the same reader) and ``datasets``
datasets (a ``Dataset``, a ``save_to_disk`` folder, a local data folder or a Hub id). A latent
pipeline encodes it through a :class:`~diffusers_guda.latent_cache.LatentCache`, so only the latents
are ever held in memory; :meth:`LazyGroupedDataset.load` gives the in-memory pixel dataset.
See docs/formats.md#large-datasets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import GroupedDataset, GroupViews, check_group_inputs, check_groups
from .data_files import check_descriptors, check_mode, read_image, scan_image_folder, scan_metadata, stack_images
from .errors import DataError


class FileImages:
    """Images stored as files, one path per image.

    Args:
        paths: The image files.
        label: How messages name the collection (e.g. its folder).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], label: str):
        self.paths = [Path(p) for p in paths]
        self.label = label

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return f"{self.paths[index]} (index {index})"

    def source(self, index: int) -> Path:
        return self.paths[index]


class LazyGroupedDataset(GroupViews):
    """Images split into named groups, read from their source one at a time.

    Build it with :meth:`from_image_folder`, :meth:`from_metadata` or :meth:`from_hf_dataset`. Pass it
    to :func:`~diffusers_guda.unlearn_groups` (a latent pipeline encodes each image once into a
    :class:`~diffusers_guda.latent_cache.LatentCache`; a pixel pipeline loads it), or call
    :meth:`load` for the in-memory :class:`~diffusers_guda.GroupedDataset`.

    Args:
        images: Where the images come from: a :class:`FileImages` or a
            :class:`~diffusers_guda.hf_data.DatasetImages` (anything with ``__len__``, ``source(i)``
            returning a path or encoded bytes, ``describe(i)`` and ``label``).
        group_ids: ``[N]`` integers in ``0 .. K-1``.
        group_names: ``K`` distinct names.
        prompts: Optional caption per image.
        group_descriptors: Optional phrases per group (see :class:`~diffusers_guda.GroupedDataset`).
        mode: ``"L"`` or ``"RGB"`` to convert every image; by default L and RGB images stay as they are.
        resolution: Resize each image's shorter side to this (bicubic) and crop the centre square;
            ``None`` keeps each image's size (then all must share one).
    """

    def __init__(self, images, group_ids, group_names: Sequence[str], prompts: Sequence[str] | None = None,
                 group_descriptors: dict[str, list[str]] | None = None, mode: str | None = None, resolution: int | None = None):
        check_mode(mode)
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
            raise DataError(f"resolution must be a positive integer (the side of the square training crop), got {resolution!r}.")
        check_group_inputs(group_ids, group_names, prompts)
        self.images = images
        self.group_ids = torch.as_tensor(np.asarray(group_ids), dtype=torch.long)
        self.group_names = [str(n) for n in group_names]
        self.prompts = list(prompts) if prompts is not None else None
        check_groups(self.group_ids, self.group_names, self.prompts, len(images))
        self.group_descriptors = check_descriptors(group_descriptors, self.group_names, "group_descriptors")
        self.mode = mode
        self.resolution = resolution

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_image_folder(cls, root: str | os.PathLike, mode: str | None = None, resolution: int | None = None) -> "LazyGroupedDataset":
        """``root/<group name>/<image files>``; the subfolder name is the group name (no image is decoded).

        Every image below a group's subfolder belongs to that group, in nested folders too; hidden
        files and hidden folders (names starting with ``.``) are skipped.

        Args:
            root: Folder with one subfolder per group.
            mode: ``"L"`` or ``"RGB"`` to convert every image.
            resolution: Side of the square training crop (see the class); ``None`` keeps the sizes.

        Raises:
            DataError: a missing folder, fewer than 2 groups, an empty group, a file outside the group
                subfolders, a file that is not an image, or a dangling link.
        """
        check_mode(mode)
        files, ids, names = scan_image_folder(root)
        return cls(FileImages(files, str(root)), ids, names, mode=mode, resolution=resolution)

    @classmethod
    def from_metadata(cls, root: str | os.PathLike, mode: str | None = None, resolution: int | None = None) -> "LazyGroupedDataset":
        """A captioned image folder described by ``root/metadata.jsonl`` (no image is decoded).

        The rules are :meth:`GroupedDataset.from_metadata`'s: one JSON object per line with ``file_name``,
        ``text`` and ``group``, one row per image, an optional ``groups.json`` of group descriptors;
        groups are ordered by name.

        Args:
            root: The folder holding ``metadata.jsonl`` and the images.
            mode: ``"L"`` or ``"RGB"`` to convert every image.
            resolution: Side of the square training crop (see the class); ``None`` keeps the sizes.

        Raises:
            DataError: a missing ``metadata.jsonl``, a malformed or repeated row, a row naming a missing
                file or one outside ``root``, or a ``groups.json`` naming unknown groups.
        """
        check_mode(mode)
        files, prompts, ids, names, descriptors = scan_metadata(root)
        return cls(FileImages(files, str(root)), ids, names, prompts, descriptors, mode=mode, resolution=resolution)

    @classmethod
    def from_hf_dataset(
        cls,
        dataset,
        image_column: str = "image",
        group_column: str = "group",
        caption_column: str | None = "text",
        split: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        mode: str | None = None,
        resolution: int | None = None,
        group_descriptors: dict[str, list[str]] | None = None,
        name: str | None = None,
    ) -> "LazyGroupedDataset":
        """A dataset of the ``datasets`` library, read one row at a time (the image column is never decoded whole).

        Args:
            dataset: A ``datasets.Dataset`` (or ``DatasetDict``), a ``save_to_disk`` folder, a local data
                folder (read with ``datasets.load_dataset(path)``, e.g. parquet files) or a Hub dataset id
                (``datasets.load_dataset(repo_id, revision=revision)``, cached by ``datasets``).
            image_column: The column of images (an ``Image`` feature, or file paths).
            group_column: The column of groups: a ``ClassLabel`` (its names, in label order) or strings
                or integers (in sorted order). Groups without rows are left out.
            caption_column: The column of captions (each image's prompt), or ``None`` for none.
            split: The split to use (default ``"train"`` where the dataset has splits; one without splits
                refuses any other name than its own or "train").
            revision: Hub revision (branch, tag or commit) of a Hub dataset.
            cache_dir: ``datasets``' cache folder for what it downloads or converts.
            mode: ``"L"`` or ``"RGB"`` to convert every image.
            resolution: Side of the square training crop (see the class); ``None`` keeps the sizes.
            group_descriptors: Optional phrases per group name (see :class:`~diffusers_guda.GroupedDataset`).
            name: How error messages name the dataset (default: ``dataset`` when it is a path or id).

        Raises:
            DataError: a dataset or split that cannot be loaded, or a missing column (naming the columns
                there are and the keyword that picks another).
        """
        from .hf_data import DatasetImages, open_hf_dataset, read_caption_column, read_group_column, require_column

        check_mode(mode)
        data = open_hf_dataset(dataset, split=split, revision=revision, cache_dir=cache_dir)
        name = name or (repr(str(dataset)) if isinstance(dataset, (str, os.PathLike)) else "the dataset")
        require_column(data, image_column, "image_column", "image-column", name)
        require_column(data, group_column, "group_column", "group-column", name)
        if caption_column is not None:
            require_column(data, caption_column, "caption_column", "caption-column", name)
        ids, names = read_group_column(data, group_column, name)
        prompts = read_caption_column(data, caption_column, name) if caption_column is not None else None
        return cls(DatasetImages(data, image_column, name), ids, names, prompts, group_descriptors, mode=mode, resolution=resolution)

    # -- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        """How messages name image ``index`` (its file, or its row, with the index)."""
        return self.images.describe(index)

    def read_uint8(self, index: int) -> tuple[np.ndarray, tuple[int, ...]]:
        """Image ``index`` decoded and preprocessed: ``[H, W]`` or ``[H, W, C]`` uint8, and its size condition
        ``(original height, original width, crop top, crop left, height, width)``.

        Raises:
            DataError: naming the image and its index, when it cannot be decoded.
        """
        return read_image(self.images.source(index), self.mode, self.resolution, where=self.describe(index))

    def read(self, index: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Image ``index`` as a float tensor ``[C, H, W]`` in ``[-1, 1]``, and its size condition (see :meth:`read_uint8`)."""
        array, size = self.read_uint8(index)
        pixels = torch.from_numpy(np.ascontiguousarray((array if array.ndim == 3 else array[..., None]).transpose(2, 0, 1), np.float32))
        return pixels.div_(127.5).sub_(1.0), size  # in place: the same values as x / 127.5 - 1, one buffer

    def load(self) -> GroupedDataset:
        """Every image decoded into memory, as a :class:`~diffusers_guda.GroupedDataset`.

        With a ``resolution`` the dataset records each image's size condition (``size_conditions``).

        Raises:
            DataError: an image that cannot be decoded, images of different sizes (without a
                ``resolution``) or of mixed grayscale and colour (without a ``mode``).
        """
        arrays, sizes = [], []
        for index in range(len(self)):
            array, size = self.read_uint8(index)
            arrays.append((array, self.describe(index)))
            sizes.append(size)
        dataset = GroupedDataset.from_arrays(stack_images(arrays, self.images.label), self.group_ids, self.group_names, self.prompts)
        dataset.group_descriptors = self.group_descriptors
        if self.resolution is not None:
            dataset.size_conditions = torch.tensor(sizes, dtype=torch.long)
        return dataset
