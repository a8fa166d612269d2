"""Where a bundle comes from and goes to: a local directory, or a Hub model repo (downloaded into the
Hub cache, uploaded in one commit)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import BundleError
from .layout import ADAPTERS_DIR, BUNDLE_FILE_PATTERNS, MANIFEST_NAME

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
# network failures of the HTTP clients huggingface_hub uses (requests, httpx), by class name
_NETWORK_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "TimeoutException", "NetworkError", "TransportError"}


def hub_error_reason(exc: BaseException, repo_id: str, *, revision: str | None = None) -> str | None:
    """What a ``huggingface_hub`` download error means and how to fix it, as one sentence.

    Args:
        exc: The error a download raised.
        repo_id: The repo it was downloading.
        revision: The revision asked for, if any.

    Returns:
        The reason and its fix, or ``None`` if ``exc`` is not a Hub or network error.
    """
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    rev = f" --revision {revision}" if revision else ""
    if isinstance(exc, RevisionNotFoundError):
        return f"the Hub repo {repo_id} has no revision {revision!r}; check the branch, tag or commit name"
    if isinstance(exc, GatedRepoError):
        return f"the Hub repo {repo_id} is gated; accept its conditions on its Hub page and log in with `hf auth login` (or pass a token)"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"there is no such local directory, and no Hub repo {repo_id} that this login can see; check the id (or the path), "
                "or log in with `hf auth login` (or pass a token) if the repo is private")
    names = {klass.__name__ for klass in type(exc).__mro__}
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or names & _NETWORK_ERRORS:
        why = "HF_HUB_OFFLINE=1 forbids downloads" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return (f"it is not in the local Hub cache and {why}; go online, or pre-download it with `hf download {repo_id}{rev}` "
                "(`huggingface-cli download` with older huggingface_hub), or pass a local directory")
    if isinstance(exc, HfHubHTTPError):
        return (f"the Hub refused the download of {repo_id} ({first}); check the id, log in with `hf auth login` if the repo is "
                "private, or retry later")
    return None


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
        BundleError: if ``location`` is a file, neither a directory nor a valid repo id, or the Hub repo
            cannot be downloaded (missing, private, no such revision, offline and not cached), naming the fix.
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
    except Exception as exc:
        reason = hub_error_reason(exc, location, revision=revision)
        if reason is None:
            raise
        at = f" at revision {revision!r}" if revision else ""
        raise BundleError(f"Cannot load the bundle {location!r}{at}: {reason}.") from exc
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
