"""Grouped training data: images in [-1, 1], one group id per image, group names.

Four sources: an image folder with one subfolder per group, a text-image folder with a
``metadata.jsonl`` (diffusers' training convention, plus a ``group`` field), in-memory arrays, and
scikit-learn's handwritten digits (shipped inside scikit-learn, so no download) as the embedded default.
The folders are read by :class:`~diffusers_guda.lazy_data.LazyGroupedDataset`, which also reads
``datasets`` datasets one image at a time; :meth:`GroupedDataset.from_image_folder` is its ``load()``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .data_files import check_descriptors
from .errors import DataError
from .hashing import image_content_digest


class GroupViews:
    """What a grouped dataset answers from its ``group_ids``, ``group_names`` and ``prompts`` alone
    (shared by :class:`GroupedDataset` and :class:`~diffusers_guda.lazy_data.LazyGroupedDataset`)."""

    group_ids: torch.Tensor
    group_names: list[str]
    prompts: list[str] | None

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def group_sizes(self) -> list[int]:
        return torch.bincount(self.group_ids, minlength=self.num_groups).tolist()

    def forget_indices(self, group: int) -> torch.Tensor:
        """Indices of the images in ``group``."""
        return torch.nonzero(self.group_ids == group).flatten()

    def retain_indices(self, group: int) -> torch.Tensor:
        """Indices of the images in every group but ``group``."""
        return torch.nonzero(self.group_ids != group).flatten()

    def group_index(self, name_or_id: int | str) -> int:
        if isinstance(name_or_id, int):
            if not 0 <= name_or_id < self.num_groups:
                raise DataError(f"Group id {name_or_id} out of range 0..{self.num_groups - 1}.")
            return name_or_id
        if name_or_id not in self.group_names:
            raise DataError(f"Unknown group {name_or_id!r}; groups are {self.group_names}.")
        return self.group_names.index(name_or_id)

    def require_prompts(self) -> None:
        """Refuse a dataset without captions for a text-conditioned model.

        Raises:
            DataError: naming how to give every image its caption.
        """
        if self.prompts is None:
            raise DataError(
                "The model is text-conditioned, but the dataset has no prompts. Give every image its caption "
                "(metadata.jsonl with a 'text' field, a caption column (caption_column=, CLI --caption-column), "
                "or GroupedDataset(..., prompts=[...]))."
            )


@dataclass
class GroupedDataset(GroupViews):
    """Images split into named groups.

    Args:
        images: Float tensor ``[N, C, H, W]`` with values in ``[-1, 1]``.
        group_ids: Long tensor ``[N]`` with values in ``0 .. K-1``.
        group_names: ``K`` distinct names; ``group_names[k]`` names group ``k``.
        prompts: Optional caption per image (text-to-image models).
        group_descriptors: Optional phrases describing each group (group name -> list of phrases),
            e.g. a style's characteristics; the ``anchor`` objective builds its group prototypes from
            them (and from the group's prompts where a group has none).
        size_conditions: Optional long tensor ``[N, 6]``: each image's original height and width,
            the top and left of its crop, and its target height and width (SDXL's added time ids,
            docs/formats.md#large-datasets). ``None``: every image was used at its own size, uncropped.
    """

    images: torch.Tensor
    group_ids: torch.Tensor
    group_names: list[str]
    prompts: list[str] | None = None
    group_descriptors: dict[str, list[str]] | None = None
    size_conditions: torch.Tensor | None = None

    def __post_init__(self):
        check_group_inputs(self.group_ids, self.group_names, self.prompts)
        self.group_names = [str(n) for n in self.group_names]
        self.group_ids = torch.as_tensor(self.group_ids, dtype=torch.long)
        if self.prompts is not None:
            self.prompts = list(self.prompts)
        _validate(self.images, self.group_ids, self.group_names, self.prompts)
        if self.size_conditions is not None:
            self.size_conditions = torch.as_tensor(self.size_conditions, dtype=torch.long)
            if self.size_conditions.shape != (len(self.group_ids), 6):
                raise DataError(
                    f"size_conditions must have shape [{len(self.group_ids)}, 6] (original h, w, crop top, left, "
                    f"target h, w per image); got {tuple(self.size_conditions.shape)}."
                )
        self.group_descriptors = check_descriptors(self.group_descriptors, self.group_names, "group_descriptors")

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, images, group_ids, group_names: Sequence[str], prompts: Sequence[str] | None = None) -> "GroupedDataset":
        """Build a dataset from arrays.

        Args:
            images: ``[N, C, H, W]`` or ``[N, H, W]`` (grayscale); ``uint8`` in ``[0, 255]`` or float in
                ``[-1, 1]``.
            group_ids: ``[N]`` integers in ``0 .. K-1``.
            group_names: ``K`` distinct names.
            prompts: Optional caption per image.
        """
        array = torch.as_tensor(np.asarray(images))
        if array.dim() == 3:
            array = array.unsqueeze(1)
        if array.dim() != 4:
            raise DataError(f"images must have shape [N, C, H, W] or [N, H, W]; got {tuple(array.shape)}.")
        if array.dtype == torch.uint8:
            array = array.float() / 127.5 - 1.0
        else:
            array = check_pixel_range(array.float(), "float images")
        return cls(array.contiguous(), torch.as_tensor(np.asarray(group_ids)), list(group_names), list(prompts) if prompts is not None else None)

    @classmethod
    def from_image_folder(cls, root: str | os.PathLike, mode: str | None = None, resolution: int | None = None) -> "GroupedDataset":
        """Load ``root/<group name>/<image files>``; the subfolder name is the group name.

        Every image below a group's subfolder belongs to that group, in nested folders too; hidden
        files and hidden folders (names starting with ``.``) are skipped. Every image is held in memory;
        :class:`~diffusers_guda.lazy_data.LazyGroupedDataset` reads the same folder one image at a time.

        Args:
            root: Folder with one subfolder per group.
            mode: ``"L"`` (grayscale) or ``"RGB"`` to convert every image; by default all images must
                already share one of these modes.
            resolution: Resize each image's shorter side to this and crop the centre square
                (docs/formats.md#large-datasets); by default all images must share one size.
        """
        from .lazy_data import LazyGroupedDataset

        return LazyGroupedDataset.from_image_folder(root, mode=mode, resolution=resolution).load()

    @classmethod
    def from_metadata(cls, root: str | os.PathLike, mode: str | None = None, resolution: int | None = None) -> "GroupedDataset":
        """Load a captioned image folder described by ``root/metadata.jsonl`` (text-to-image training data).

        Each line of ``metadata.jsonl`` is a JSON object with ``file_name`` (a path relative to
        ``root``), ``text`` (the image's caption, its prompt) and ``group`` (the group's name): the
        diffusers training convention plus a group. An optional ``root/groups.json`` maps group names
        to lists of descriptive phrases (``{"impressionism": ["loose brushwork", "soft light"], ...}``),
        used for the ``anchor`` objective's group prototypes. Groups are ordered by name. Every image is
        held in memory; :class:`~diffusers_guda.lazy_data.LazyGroupedDataset` reads one at a time.

        Args:
            root: The folder holding ``metadata.jsonl`` and the images.
            mode: ``"L"`` or ``"RGB"`` to convert every image; by default all must share one of these.
            resolution: Resize each image's shorter side to this and crop the centre square
                (docs/formats.md#large-datasets); by default all images must share one size.

        Raises:
            DataError: a missing ``metadata.jsonl``, a malformed row, a row naming a missing file or a
                file outside ``root``, images of different sizes, or a ``groups.json`` naming unknown groups.
        """
        from .lazy_data import LazyGroupedDataset

        return LazyGroupedDataset.from_metadata(root, mode=mode, resolution=resolution).load()

    # -- views ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def content_digests(self) -> dict[str, str | None]:
        """SHA-256 digests of what the dataset holds, to check that two runs saw the same data.

        Returns:
            ``images`` (their values and shape), ``prompts``, ``members`` (the group id of every image),
            ``group_descriptors`` and ``size_conditions``; ``None`` for what the dataset lacks.
        """
        def of_json(value) -> str | None:
            return None if value is None else hashlib.sha256(json.dumps(value).encode()).hexdigest()

        def of_tensor(value: torch.Tensor | None) -> str | None:
            return None if value is None else image_content_digest(value)

        return {"images": of_tensor(self.images), "prompts": of_json(self.prompts), "members": of_tensor(self.group_ids),
                "group_descriptors": of_json(self.group_descriptors), "size_conditions": of_tensor(self.size_conditions)}

    def with_images(self, images: torch.Tensor) -> "GroupedDataset":
        """The same groups and prompts over other images of the same count (e.g. their VAE latents)."""
        if images.shape[0] != len(self):
            raise DataError(f"with_images needs {len(self)} images, got {images.shape[0]}.")
        return GroupedDataset(images, self.group_ids, list(self.group_names), self.prompts, self.group_descriptors,
                              self.size_conditions)

    def without_group(self, group: int) -> "GroupedDataset":
        """The dataset with one group removed (for leave-one-group-out retraining)."""
        keep = self.retain_indices(group)
        names = [n for k, n in enumerate(self.group_names) if k != group]
        remap = torch.tensor([k - (k > group) for k in range(self.num_groups)])
        prompts = [self.prompts[i] for i in keep.tolist()] if self.prompts is not None else None
        descriptors = None
        if self.group_descriptors is not None:
            descriptors = {n: list(d) for n, d in self.group_descriptors.items() if n != self.group_names[group]}
        sizes = self.size_conditions[keep] if self.size_conditions is not None else None
        return GroupedDataset(self.images[keep], remap[self.group_ids[keep]], names, prompts, descriptors or None, sizes)


def load_digits() -> GroupedDataset:
    """scikit-learn's handwritten digits: 1,797 real 8x8 grayscale images, grouped by digit 0-9."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    return GroupedDataset(images, torch.from_numpy(digits.target), [str(d) for d in range(10)])


def check_pixel_range(images: torch.Tensor, what: str = "Images") -> torch.Tensor:
    """Refuse pixels that are not finite or lie outside [-1, 1] (the range every model here takes); return them.

    Raises:
        DataError: naming the range found and how to rescale.
    """
    finite = bool(torch.isfinite(images).all())
    lo, hi = (float(images.min()), float(images.max())) if images.numel() else (0.0, 0.0)
    if not finite or lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
        found = "NaN or infinite values" if not finite else f"values in [{lo:.3g}, {hi:.3g}]"
        raise DataError(
            f"{what} must be finite and lie in [-1, 1]; got {found}. "
            "Pass uint8 images in [0, 255] or rescale with x * 2 - 1 for [0, 1] data."
        )
    return images


def _validate(images, group_ids, group_names, prompts) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise DataError("images must be a float tensor of shape [N, C, H, W].")
    if images.shape[1] not in (1, 3, 4, 16):  # pixels (L, RGB, RGBA), or VAE latents (4; 16 for Stable Diffusion 3 and Flux)
        raise DataError(f"images must have 1, 3 or 4 channels (or 16: latents); got {images.shape[1]} (shape {tuple(images.shape)}). "
                        "Is it [N, H, W, C]? Permute to [N, C, H, W].")
    if not torch.is_floating_point(images):
        raise DataError("images must be floating point in [-1, 1]; use GroupedDataset.from_arrays for uint8 data.")
    if not torch.isfinite(images).all():
        raise DataError("images contain NaN or infinite values.")
    check_groups(group_ids, group_names, prompts, images.shape[0])


def check_group_inputs(group_ids, group_names, prompts) -> None:
    """Refuse what converting to a list or a long tensor would silently change: a single string of names or
    prompts (read letter by letter), fractional group ids (rounded down).

    Raises:
        DataError: naming the argument.
    """
    for label, value, each in (("group_names", group_names, "group"), ("prompts", prompts, "image")):
        if isinstance(value, str):
            raise DataError(f"{label} must be a list of strings, one per {each}; got the single string {value!r}.")
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids.detach().cpu().double().numpy() if group_ids.is_floating_point() else None
    else:
        ids = np.asarray(group_ids)
    if ids is not None and ids.dtype.kind == "f" and not np.array_equal(ids, np.round(ids)):
        raise DataError("group_ids must be integer group indices (0..K-1); got fractional or NaN values.")


def check_groups(group_ids: torch.Tensor, group_names: list[str], prompts: list[str] | None, n: int) -> None:
    """Refuse group ids, names or prompts that do not describe ``n`` images in at least 2 non-empty, distinct groups.

    Raises:
        DataError: naming what is wrong.
    """
    if group_ids.shape != (n,):
        raise DataError(f"group_ids must have shape [{n}], got {tuple(group_ids.shape)}.")
    if len(set(group_names)) != len(group_names):
        dup = [name for name, c in Counter(group_names).items() if c > 1]
        raise DataError(f"Group names must be distinct; repeated: {dup}.")
    if len(group_names) < 2:
        raise DataError(f"Attribution needs at least 2 groups; got {len(group_names)}.")
    if len(group_ids) and (int(group_ids.min()) < 0 or int(group_ids.max()) >= len(group_names)):
        raise DataError(f"group_ids must lie in 0..{len(group_names) - 1} (one per group name).")
    counts = torch.bincount(group_ids, minlength=len(group_names)).tolist()
    empty = [n for n, c in zip(group_names, counts) if c == 0]
    if empty:
        raise DataError(f"Group(s) {empty} have no images. Remove them from group_names or add images.")
    if prompts is not None and len(prompts) != n:
        raise DataError(f"prompts must have one entry per image ({n}), got {len(prompts)}.")
    if prompts is not None and not all(isinstance(p, str) for p in prompts):
        raise DataError("prompts must be strings, one per image.")
