"""The manifest ``guda_bundle.json``: its group records, what it records about the software, and its
validation (see docs/formats.md#manifest).

Every check raises :class:`~diffusers_guda.errors.BundleError` with a message that names the file,
the problem and the fix.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..elbo import ELBOConfig
from ..errors import BundleError
from ..lora import LoRASettings
from ..validation import is_kind
from .layout import MANIFEST_NAME, adapter_file_for
from .slugs import slugify

if TYPE_CHECKING:
    from .adapter_bundle import AdapterBundle

FORMAT_VERSION = 1
SOFTWARE_PACKAGES = ("diffusers", "peft", "torch", "huggingface_hub")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_GROUP_FIELDS = {"id": int, "name": str, "slug": str, "num_images": int, "adapter_file": str, "stats": dict}


@dataclass
class GroupRecord:
    """One group of the training set and its adapter.

    Args:
        id: Group index, ``0 .. K-1``.
        name: The user's group name (any string).
        slug: Sanitised name used as the adapter's directory (see :func:`~diffusers_guda.bundle.slugify`).
        num_images: Number of training images in the group.
        adapter_file: Bundle-relative path of the adapter; defaults to
            ``adapters/<slug>/pytorch_lora_weights.safetensors``.
        stats: Free-form JSON statistics of the unlearning run. The model card shows
            ``forget_loss_before``/``forget_loss_after`` and ``retain_loss_before``/``retain_loss_after``.
    """

    id: int
    name: str
    slug: str
    num_images: int
    adapter_file: str = ""
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        self.adapter_file = self.adapter_file or adapter_file_for(self.slug)


def version_of(package: str) -> str | None:
    """The installed version of ``package``, or ``None`` if it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_version() -> str | None:
    """The version of diffusers-guda that writes the manifest (also when run from a source tree)."""
    version = version_of("diffusers-guda")
    return version or getattr(sys.modules.get("diffusers_guda"), "__version__", None)


def software_versions() -> dict[str, str | None]:
    """The manifest's ``software`` field: versions of the packages an adapter's meaning depends on."""
    return {package: version_of(package) for package in SOFTWARE_PACKAGES}


def build_manifest(bundle: AdapterBundle) -> dict:
    """The manifest of ``bundle``: its content, and the versions of the software that wrote it.

    Returns:
        A JSON-able dict with the fields of docs/formats.md#manifest, in that order.
    """
    return {
        "format_version": FORMAT_VERSION,
        "library": "diffusers-guda",
        "library_version": library_version(),
        "software": software_versions(),
        "base_model": bundle.base_model,
        "groups": [asdict(g) for g in bundle.groups],
        "lora": bundle.lora,
        "objective": bundle.objective,
        "elbo": bundle.elbo,
        "seeds": bundle.seeds,
        "training": bundle.training,
    }


def check_lora(lora: dict, where: str) -> None:
    """Refuse recorded LoRA settings that :class:`~diffusers_guda.LoRASettings` does not accept, or of the wrong types.

    Raises:
        BundleError: naming the field and what to do.
    """
    try:
        LoRASettings.from_dict(lora)
    except ValueError as exc:  # ConfigError: unknown fields, wrong types or values
        raise BundleError(f"{where} has malformed LoRA settings ('lora': {exc}). Restore the field or re-run `guda unlearn`.") from exc


def check_elbo(elbo: dict, where: str) -> None:
    """Refuse recorded ELBO settings that :class:`~diffusers_guda.elbo.ELBOConfig` does not accept.

    Raises:
        BundleError: naming the field and what to do.
    """
    try:
        ELBOConfig(**elbo)
    except (TypeError, ValueError) as exc:  # unknown or missing fields, wrong types or values
        raise BundleError(
            f"{where} has malformed ELBO settings ('elbo': {exc}). Fix or remove the field (null scores with the "
            "recipe of the model's family), or re-run `guda unlearn`."
        ) from exc


def read_manifest(path: Path) -> dict:
    """Read a manifest file as a JSON object, without validating its fields (see :func:`check_manifest`).

    Raises:
        BundleError: if the file is missing, unreadable or not a JSON object.
    """
    if not path.is_file():
        raise BundleError(
            f"No {MANIFEST_NAME} at {path}: this is not a GUDA adapter bundle, or it is incomplete. "
            "Bundles are written by AdapterBundle.save_pretrained / push_to_hub; re-save or re-download it."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"Cannot read the bundle manifest {path}: {exc}. Re-download or re-save the bundle.") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"The bundle manifest {path} must hold a JSON object, not {type(manifest).__name__}.")
    return manifest


def check_manifest(manifest: dict, path: Path) -> None:
    """Validate a manifest read from ``path``: format version, field types, groups and base model.

    Raises:
        BundleError: naming the first problem found.
    """
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            hint = f"written by a newer diffusers-guda (format {version}); upgrade diffusers-guda to load it"
        else:
            hint = (
                f"written by an older or unknown diffusers-guda (format {version!r}); re-save it with this "
                "version, or load it with the version that wrote it"
            )
        raise BundleError(f"The bundle manifest {path} was {hint}. This version reads format {FORMAT_VERSION}.")
    for key, kind in (("groups", list), ("base_model", dict), ("lora", dict), ("objective", dict)):
        if not isinstance(manifest.get(key), kind):
            raise BundleError(
                f"The bundle manifest {path} needs '{key}' as a JSON {kind.__name__}; got {manifest.get(key)!r}."
            )
    for key in ("elbo", "seeds", "training"):
        if not isinstance(manifest.get(key), (dict, type(None))):
            raise BundleError(f"The bundle manifest {path} has a '{key}' that is not an object or null.")
    if manifest.get("elbo") is not None:
        check_elbo(manifest["elbo"], f"The bundle manifest {path}")
    if not isinstance(manifest["objective"].get("name"), str):
        raise BundleError(f"The bundle manifest {path} has no objective name (objective.name must be a string).")
    if not isinstance(manifest["objective"].get("config", {}), dict):
        raise BundleError(f"The bundle manifest {path} has an objective.config that is not an object; re-run `guda unlearn`.")
    check_lora(manifest["lora"], f"The bundle manifest {path}")
    check_groups(manifest["groups"], f"The bundle manifest {path}")
    check_base_model(manifest["base_model"], f"The bundle manifest {path}")


def check_groups(groups: list, where: str) -> None:
    """Validate the ``groups`` entries: exact fields and types, ids ``0..K-1``, unique names, safe unique slugs.

    Args:
        groups: The entries, as dicts (``dataclasses.asdict`` of :class:`GroupRecord`).
        where: What holds them, for the error message.

    Raises:
        BundleError: naming the first problem found.
    """
    if not groups:
        raise BundleError(f"{where} has no groups.")
    for g in groups:
        _check_group(g, where)
    ids, names, slugs = ([g[k] for g in groups] for k in ("id", "name", "slug"))
    if sorted(ids) != list(range(len(groups))):
        raise BundleError(f"{where}: group ids must be 0..{len(groups) - 1}, each once; got {ids}.")
    for label, values in (("names", names), ("slugs", slugs)):
        if len(set(values)) != len(values):
            raise BundleError(f"{where}: group {label} must be unique; got {values}.")


def _check_group(g, where: str) -> None:
    if not isinstance(g, dict):
        raise BundleError(f"{where} has a group entry that is not an object: {g!r}.")
    bad = [k for k, t in _GROUP_FIELDS.items() if not isinstance(g.get(k), t) or isinstance(g.get(k), bool)]
    if bad or set(g) - set(_GROUP_FIELDS):
        raise BundleError(
            f"{where} has a malformed group entry {g!r}: it needs exactly the fields {sorted(_GROUP_FIELDS)} "
            f"(wrong or missing: {bad or sorted(set(g) - set(_GROUP_FIELDS))})."
        )
    if not g["adapter_file"]:
        raise BundleError(f"{where}: group {g['name']!r} has an empty adapter_file.")
    if g["num_images"] < 0:
        raise BundleError(f"{where}: group {g['name']!r} has a negative image count.")
    if slugify(g["slug"]) != g["slug"]:
        raise BundleError(
            f"{where}: group {g['name']!r} has the unsafe slug {g['slug']!r} (slugs are [a-z0-9_-], "
            "no '/' or '..'; see diffusers_guda.bundle.slugify)."
        )


def check_base_model(base: dict, where: str) -> None:
    """Validate the ``base_model`` entry: a sha256 ``fingerprint`` and a string or null ``id``.

    Raises:
        BundleError: naming the problem.
    """
    fingerprint = base.get("fingerprint")
    if not isinstance(fingerprint, str) or not _HEX64.fullmatch(fingerprint):
        raise BundleError(f"{where}: base_model.fingerprint must be a 64-digit sha256 hex string; got {fingerprint!r}.")
    if not isinstance(base.get("id"), (str, type(None))):
        raise BundleError(f"{where}: base_model.id must be a string or null.")
    guidance, length = base.get("guidance"), base.get("max_sequence_length")
    if guidance is not None and not (is_kind(guidance, float) and math.isfinite(guidance)):
        raise BundleError(f"{where}: base_model.guidance (Flux's embedded guidance) must be a finite number or null; got {guidance!r}.")
    if length is not None and not (is_kind(length, int) and length >= 1):
        raise BundleError(f"{where}: base_model.max_sequence_length (T5 tokens per prompt) must be an integer >= 1; got {length!r}.")


def check_contents(
    groups: list[GroupRecord], adapters: dict[str, dict[str, torch.Tensor]], adapter_configs: dict[str, dict], base_model: dict
) -> None:
    """Validate what a bundle is made of: its groups, base model, and one adapter and config per group.

    Raises:
        BundleError: naming the first problem found.
    """
    check_groups([asdict(g) for g in groups], "the bundle")
    check_base_model(base_model, "the bundle")
    for group in groups:
        if group.adapter_file != adapter_file_for(group.slug):
            raise BundleError(
                f"Group {group.name!r} has adapter_file {group.adapter_file!r}; expected {adapter_file_for(group.slug)!r}."
            )
        if group.slug not in adapters or group.slug not in adapter_configs:
            raise BundleError(f"Group {group.name!r} (slug {group.slug!r}) has no adapter weights or config.")
