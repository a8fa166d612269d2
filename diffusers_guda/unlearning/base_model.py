"""What a bundle records about the base model it was made for: its identity (id, revision), the
fingerprint of its weights and the facts that decide whether a UNet can take its adapters (see the
``base_model`` table of docs/formats.md#manifest)."""

from __future__ import annotations

import re
from pathlib import PurePath

import torch

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_CACHE_PREFIX = "models--"


def hub_snapshot_identity(name_or_path: object) -> tuple[str, str] | None:
    """The Hub repo id and commit of a path inside the Hub cache.

    diffusers records where a model was loaded from as its config's ``_name_or_path``; a pipeline
    loaded from the Hub loads its UNet from ``<cache>/models--<org>--<name>/snapshots/<commit>/unet``.

    Args:
        name_or_path: A path, or anything else.

    Returns:
        ``(repo_id, commit)``, or ``None`` if ``name_or_path`` is not a path in a Hub cache snapshot.
    """
    if not isinstance(name_or_path, (str, PurePath)) or not str(name_or_path):
        return None
    parts = PurePath(name_or_path).parts
    for i in range(1, len(parts) - 1):
        repo, snapshots, commit = parts[i - 1], parts[i], parts[i + 1]
        if snapshots == "snapshots" and repo.startswith(_CACHE_PREFIX) and _COMMIT_SHA.fullmatch(commit):
            return repo[len(_CACHE_PREFIX):].replace("--", "/"), commit
    return None


def base_model_identity(unet: torch.nn.Module, model_id: str | None, revision: str | None) -> tuple[str | None, str | None]:
    """The id and revision to record for ``unet``: the given ones, else what its config says it was loaded from.

    A UNet loaded from a Hub cache snapshot gets that repo's id and commit (the commit only if the
    recorded id is that repo); one loaded from a directory gets the directory as its id.

    Args:
        unet: The base UNet.
        model_id: The name given for it (a Hub id or a path), or ``None``.
        revision: The revision given for it, or ``None``.

    Returns:
        ``(id, revision)``.
    """
    config = getattr(unet, "config", None)
    loaded_from = config.get("_name_or_path") if config is not None else None
    snapshot = hub_snapshot_identity(loaded_from)
    if model_id is None:
        model_id = snapshot[0] if snapshot else (str(loaded_from) if loaded_from else None)
    if revision is None and snapshot and snapshot[0] == model_id:
        revision = snapshot[1]
    return model_id, revision


def base_model_record(
    unet: torch.nn.Module, *, model_id: str | None, revision: str | None, fingerprint: str, conditional: bool, extra: dict
) -> dict:
    """The bundle's ``base_model`` entry.

    Args:
        unet: The base UNet.
        model_id: Its id (see :func:`base_model_identity`).
        revision: Its revision.
        fingerprint: :func:`~diffusers_guda.hashing.unet_fingerprint` of its weights.
        conditional: Whether it is text-conditioned.
        extra: Further fields (the pipeline class, a latent model's VAE scaling factor...).

    Returns:
        ``id``, ``revision``, ``fingerprint``, ``class_name``, ``dtype``, ``sample_size``,
        ``in_channels``, ``conditional`` and the ``extra`` fields, in that order.
    """
    return {
        "id": model_id,
        "revision": revision,
        "fingerprint": fingerprint,
        "class_name": type(unet).__name__,
        "dtype": str(unet.dtype).replace("torch.", ""),
        "sample_size": unet.config.get("sample_size"),  # FluxTransformer2DModel has none
        "in_channels": unet.config.get("in_channels"),
        "conditional": conditional,
        **extra,
    }


def base_provenance(unet: torch.nn.Module, bundle) -> dict:
    """What an attribution result records about the base model that scored: ``base_revision`` and ``base_fingerprint``.

    Args:
        unet: The scoring UNet, holding ``bundle`` (whose loading checked that its weights are the bundle's base).
        bundle: The loaded :class:`~diffusers_guda.bundle.AdapterBundle`.

    Returns:
        ``base_revision``: the Hub commit ``unet`` was loaded from (``None`` for a local directory or a
        model built in memory); ``base_fingerprint``: the SHA-256 of its weights (the bundle's, which
        its loading checked against ``unet``), what identifies a local base.
    """
    config = getattr(unet, "config", None)
    snapshot = hub_snapshot_identity(config.get("_name_or_path") if config is not None else None)
    return {"base_revision": snapshot[1] if snapshot else None, "base_fingerprint": bundle.base_model.get("fingerprint")}
