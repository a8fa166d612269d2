"""A bundle's files: writing them, and reading them safely. Loading refuses, before it reads a tensor,
pickle-based or foreign files in ``adapters/`` and manifest paths that lead outside the bundle (see
docs/formats.md#what-loading-checks).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import torch

from ..errors import BundleError
from ..io_utils import write_json_atomic
from ..lora import load_adapter_file, save_adapter_file
from .layout import ADAPTERS_DIR, CARD_NAME, MANIFEST_NAME, adapter_file_for
from .manifest import GroupRecord, check_manifest, read_manifest

if TYPE_CHECKING:
    from .adapter_bundle import AdapterBundle

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_unsafe_files(root: Path) -> None:
    """Refuse a bundle whose ``adapters/`` folder holds anything but ``.safetensors`` files.

    Args:
        root: The bundle directory.

    Raises:
        BundleError: for a pickle-based file (which could run code when loaded), a symlink to a
            non-file or any other file type.
    """
    adapters = root / ADAPTERS_DIR
    if not adapters.is_dir():
        return
    for path in sorted(adapters.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise BundleError(
                f"Refusing to load the bundle at {root}: {path.relative_to(root)} is a pickle-based file, which can "
                "run arbitrary code when loaded. Bundles hold adapters only as .safetensors; delete that file, or "
                "re-save the bundle with AdapterBundle.save_pretrained."
            )
        if path.suffix != ".safetensors" or not path.is_file():
            raise BundleError(
                f"Refusing to load the bundle at {root}: {path.relative_to(root)} is not a .safetensors file. The "
                f"{ADAPTERS_DIR}/ folder may hold only adapter .safetensors files; remove that entry."
            )


def adapter_member(root: Path, group: GroupRecord, jail: Path, manifest_path: Path) -> Path:
    """The path of a group's adapter file, checked to be a ``.safetensors`` file inside the bundle.

    Args:
        root: The bundle directory.
        group: The group, with the ``adapter_file`` its manifest gives.
        jail: The directory the resolved path must stay in (the bundle, or the Hub cache of its repo,
            whose snapshots link into shared blobs).
        manifest_path: The manifest, for the error message.

    Returns:
        The adapter file's path.

    Raises:
        BundleError: if ``adapter_file`` is absolute, climbs out with ``..``, resolves (through
            symlinks) outside ``jail``, is not a ``.safetensors`` file in ``adapters/``, or is missing.
    """
    rel = group.adapter_file
    parts = PurePosixPath(rel).parts
    unsafe = (
        not rel or "\\" in rel or PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute()
        or PureWindowsPath(rel).drive or ".." in parts or parts[0] != ADAPTERS_DIR or not rel.endswith(".safetensors")
    )
    target = root.joinpath(*parts) if parts else root
    if not unsafe and not target.resolve().is_relative_to(jail):
        unsafe = True
    if unsafe:
        raise BundleError(
            f"The bundle manifest {manifest_path} gives group {group.name!r} the adapter file {rel!r}, which is not "
            f"a .safetensors file inside the bundle's {ADAPTERS_DIR}/ folder. Refusing to load it; the manifest may "
            f"have been tampered with (expected {adapter_file_for(group.slug)!r})."
        )
    if not target.is_file():
        raise BundleError(
            f"The bundle at {root} is incomplete: the adapter of group {group.name!r} ({rel}) is missing. "
            "Re-download or re-save the bundle."
        )
    return target


def write_bundle(bundle: AdapterBundle, directory: Path, repo_id: str | None = None) -> None:
    """Write the adapter files, the manifest and the model card of ``bundle`` into ``directory``.

    Args:
        bundle: The bundle.
        directory: An existing, empty directory (the caller makes the write atomic).
        repo_id: Where the bundle will live, for the model card's usage snippets.
    """
    for group in bundle.groups:
        target = directory.joinpath(*PurePosixPath(group.adapter_file).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_adapter_file(target, bundle.adapters[group.slug], bundle.adapter_configs[group.slug])
    write_json_atomic(directory / MANIFEST_NAME, bundle.to_manifest())
    bundle.model_card(repo_id).save(str(directory / CARD_NAME))


def read_bundle_manifest(root: Path) -> dict:
    """Check a bundle directory's files and read its manifest, validated.

    Raises:
        BundleError: if ``adapters/`` holds anything but ``.safetensors`` files, or the manifest is
            missing or malformed.
    """
    refuse_unsafe_files(root)
    manifest_path = root / MANIFEST_NAME
    manifest = read_manifest(manifest_path)
    check_manifest(manifest, manifest_path)
    return manifest


def read_adapters(root: Path, groups: list[GroupRecord], jail: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """Read the groups' adapter files.

    Args:
        root: The bundle directory.
        groups: The groups of its manifest.
        jail: The directory the adapter files must resolve into (see :func:`adapter_member`).

    Returns:
        ``(adapters, adapter_configs)``: state dicts and config metadata, keyed by slug.

    Raises:
        BundleError: for an adapter path outside the bundle, or a missing or corrupted adapter file.
    """
    paths = [adapter_member(root, group, jail, root / MANIFEST_NAME) for group in groups]
    named = {path.relative_to(root) for path in paths}
    unnamed = sorted(str(p.relative_to(root)) for p in (root / ADAPTERS_DIR).rglob("*.safetensors") if p.relative_to(root) not in named)
    if unnamed:
        raise BundleError(
            f"The bundle at {root} holds adapter file(s) {unnamed} that its manifest gives to no group: the manifest and the "
            f"adapters disagree (a group was dropped from {MANIFEST_NAME}?). Re-save the bundle, or delete those files."
        )
    adapters, configs = {}, {}
    for group, path in zip(groups, paths):
        adapters[group.slug], configs[group.slug] = load_adapter_file(path)
    return adapters, configs
