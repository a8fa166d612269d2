"""Atomic writes: a finished artifact is either complete on disk or not there at all.

Every output is written beside its final path and renamed into place, so a write that fails (a
full or read-only disk, a kill) leaves the previous output as it was. Outputs get the permissions
the user's umask gives a new file or folder, not the private ones of temporary files.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, OutputError

# write failures that are the disk's or the user's to fix, reported as one line (others stay tracebacks)
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _reported(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS or isinstance(exc, OutputError):
            raise
        raise OutputError(
            f"Cannot write {path}: {exc.strerror or exc}; the previous output there is unchanged. "
            "Free some space, or choose an output path on a writable disk."
        ) from exc


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def remove_unfinished_writes(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that killed writes of ``path`` left beside it; return them.

    Only for the holder of ``path``'s lock (:class:`~diffusers_guda.locks.OutputLock`): every write of a
    locked output happens under its lock, so what is there belongs to a run that is no longer running.
    """
    path = Path(path)
    removed = sorted(path.parent.glob(glob.escape(_temporary_prefix(path)) + "*"))
    for leftover in removed:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return removed


def check_replaceable_directory(path: str | os.PathLike, marker: str) -> None:
    """Refuse to replace ``path`` as a whole while it is a non-empty folder without ``marker``, the file
    that every output of its kind holds (e.g. a bundle's manifest): it is someone's other folder.

    Raises:
        ConfigError: naming the folder and the fix.
    """
    path = Path(path)
    if path.is_dir() and not (path / marker).is_file() and any(path.iterdir()):
        raise ConfigError(f"{path} is a folder with other files in it (no {marker}), which writing there would delete; "
                          "choose a new or empty folder.")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes.

    The temporary directory sits next to ``path`` (same file system), so the final ``rename`` is
    atomic. An existing ``path`` is moved aside first and deleted only after the new one is in place.

    Args:
        path: The output directory.
        overwrite: Replace an existing ``path`` (else ``FileExistsError``).
        marker: A file that every output of this kind holds (e.g. a bundle's manifest). An existing,
            non-empty ``path`` without it is refused instead of replaced: it is someone's other folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is an existing file, not a directory; choose another output path or delete the file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another path.")
    if marker is not None:
        check_replaceable_directory(path, marker)
    with _reported(path):
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent))
        try:
            yield tmp
            tmp.chmod(0o777 & ~_umask())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent)) if path.exists() else None
        try:
            if old is not None:
                os.replace(path, old / "content")
            os.replace(tmp, path)
        except BaseException:
            if old is not None and (old / "content").exists():
                os.replace(old / "content", path)  # the previous output goes back where it was
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if old is not None and path.exists():  # else the previous output is still in `old`: keep it
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path (same suffix) that replaces ``path`` only if the block finishes.

    Raises:
        OutputError: the disk is full or read-only, or the folder is not writable.
    """
    path = Path(path)
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            tmp.chmod(0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise


def cache_dir_from_env(variable: str, name: str) -> Path:
    """``$variable`` if set, else ``<HF_HOME>/diffusers_guda/<name>`` (``~/.cache/huggingface/...``)."""
    if os.environ.get(variable):
        return Path(os.environ[variable]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "diffusers_guda" / name


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
