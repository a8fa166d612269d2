"""Where a bundle comes from and goes to: a local directory, or a Hub model repo (downloaded into the
Hub cache, uploaded in one commit)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import BundleError
from .layout import ADAPTERS_DIR, BUNDLE_FILE_PATTERNS, MANIFEST_NAME

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def looks_like_hub_id(name: Any) -> bool:
    """Whether ``name`` is a valid Hub repo id and not an existing local path."""
    if not isinstance(name, str) or not name or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def locate_bundle(
    location: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> tuple[Path, dict, Path]:
    """Find a bundle's directory: ``location`` itself, or the Hub snapshot of repo ``location``.

    Only the bundle's own files (manifest, model card, ``adapters/**/*.safetensors``) are downloaded.

    Args:
        location: A bundle directory or a Hub repo id.
        revision: Branch, tag or commit on the Hub.
        cache_dir: Hub cache directory.
        local_files_only: Only use the local Hub cache.
        token: Hub token.
        endpoint: Hub endpoint; defaults to ``HF_ENDPOINT``.

    Returns:
        ``(root, source, jail)``: the bundle directory; ``{"path": ..., "revision": None}`` or
        ``{"repo_id": ..., "revision": <commit>}``; the directory its adapter files must resolve into.

    Raises:
        BundleError: if ``location`` is a file, or neither a directory nor a valid repo id.
    """
    if Path(location).is_dir():
        root = Path(location)
        return root, {"path": str(root.resolve()), "revision": None}, root.resolve()
    if Path(location).exists():
        raise BundleError(f"{location} is a file; pass the bundle directory that contains {MANIFEST_NAME}.")
    try:
        root = Path(
            snapshot_download(
                location, revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only),
                token=token, endpoint=endpoint, allow_patterns=list(BUNDLE_FILE_PATTERNS),
            )
        )
    except HFValidationError as exc:
        raise BundleError(f"{location!r} is neither a bundle directory nor a valid Hub repo id ({exc}).") from exc
    commit = root.name if root.parent.name == "snapshots" and _COMMIT_SHA.fullmatch(root.name) else None
    # snapshot files link into the repo's shared blobs: the repo's cache folder is the jail
    return root, {"repo_id": location, "revision": commit}, root.parent.parent.resolve()


def upload_bundle(
    write: Callable[[Path, str], None],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload GUDA adapter bundle",
    create_pr: bool = False,
    endpoint: str | None = None,
) -> str:
    """Upload a bundle to a Hub model repo in one commit, creating the repo (and branch) if needed.

    ``write(folder, repo_id)`` writes the bundle's files (the model card's usage snippets name the
    repo); the other arguments and the return value are those of :meth:`AdapterBundle.push_to_hub`.
    """
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guda-bundle-") as tmp:
        folder = Path(tmp) / "bundle"
        folder.mkdir()
        write(folder, repo_id)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
            create_pr=create_pr, delete_patterns=[f"{ADAPTERS_DIR}/**"],
        )
    return info.pr_url if create_pr and info.pr_url else info.commit_url
