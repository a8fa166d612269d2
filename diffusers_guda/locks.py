"""Output locks: a second run on the same output refuses to start while the first is still writing it.

A run holds ``<output>.lock`` beside its output (a bundle directory, a result file, a lab folder) for as
long as it works on it. The file is JSON naming the run (``pid``, ``host``, ``command``, ``started``)
and is locked with the operating system's advisory lock (``flock``), which ends with the process, so a
killed run never blocks the next one: its leftover file is taken over with a note, and the temporary
files its unfinished write left beside the output are removed. Where the file
system has no such locks, a leftover lock of a process of this machine that is no longer running is
taken over too. A lock of a run on another machine is never taken over: the error says to delete the
file once that run is over. See docs/formats.md#concurrent-runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import OutputError, OutputLockedError
from .io_utils import remove_unfinished_writes

try:
    import fcntl
except ImportError:  # Windows: the lock file's record alone decides
    fcntl = None

if TYPE_CHECKING:
    from .distributed import ProcessInfo

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_NO_OS_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of ``output``: ``<output>.lock`` beside it."""
    output = Path(output)
    if output.name in ("", ".", ".."):  # "." or "..": the folder's own name
        output = output.resolve()
    return output.with_name(output.name + LOCK_SUFFIX)


def _pid_running(pid: object) -> bool:
    """Whether process ``pid`` of this machine is running (``True`` when that cannot be told)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or sys.platform == "win32":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _describe(record: dict) -> str:
    parts = [f"pid {record.get('pid', '?')} on {record.get('host', '?')}"]
    if record.get("command"):
        parts.append(f"`{record['command']}`")
    if record.get("started"):
        parts.append(f"started {record['started']}")
    return ", ".join(parts)


class OutputLock:
    """The lock of one output path, held by at most one run at a time.

    Use it as a context manager, or call :meth:`acquire` and :meth:`release`. Nothing is created beside
    the output until the lock is acquired; a released lock leaves nothing behind.

    Args:
        output: The output path (file or directory) the run writes.
        command: What the run is, recorded for the error another run gets (e.g. ``"guda unlearn"``).
        timeout: Seconds to wait for another run to finish before giving up (0: refuse at once; ``math.inf``:
            wait as long as it runs). A lock left by a run on another machine is refused at once.

    Raises:
        OutputLockedError: from :meth:`acquire`, when another run holds the lock.
    """

    def __init__(self, output: str | os.PathLike, *, command: str | None = None, timeout: float = 0.0):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.command = command
        self.timeout = timeout
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "OutputLock":
        """Take the lock, waiting up to ``timeout`` seconds for another run to finish.

        Returns:
            ``self``.

        Raises:
            OutputLockedError: another run holds it (naming that run and what to do).
        """
        if self.held:
            return self
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self._try_acquire()
            except OutputLockedError as exc:
                # a leftover lock of another machine stays until someone deletes it: waiting would never end
                if time.monotonic() >= deadline or exc.remote:
                    self._remove_created_folders()
                    raise
                time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))

    def _try_acquire(self) -> "OutputLock":
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self._created = self._created or missing
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(
                    f"Cannot create the lock file {self.path} beside the output: {exc.strerror or exc}. Choose an output path "
                    "in a folder you can write to."
                ) from exc
            try:
                locked, record = self._lock(fd), self._read(fd)
                if locked is False or (locked is None and record and not self._stale(record)):
                    raise self._refusal(record)
                if locked and record and record.get("host") != socket.gethostname():
                    raise self._refusal(record, remote=True)  # this machine cannot tell whether that run is over
                if not self._still_named(fd):  # a finishing run removed the file meanwhile: lock the new one
                    os.close(fd)
                    continue
                if record:
                    logger.warning("Taking over the lock %s of a run that is no longer running (%s).", self.path, _describe(record))
                self._write(fd)
                if record:
                    for leftover in remove_unfinished_writes(self.output):
                        logger.warning("Removed %s, an unfinished write of that run.", leftover)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd = fd
            return self

    def release(self) -> None:
        """Give the lock up and remove its file (and folders that acquiring created, if still empty)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            if self._still_named(fd):
                self.path.unlink()
        os.close(fd)  # after the unlink: a run waiting on this file then sees it is gone and locks a new one
        self._remove_created_folders()

    def _remove_created_folders(self) -> None:
        if self.output.exists():
            return
        for folder in self._created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()

    @staticmethod
    def _lock(fd: int) -> bool | None:
        """``True``: locked; ``False``: another process holds it; ``None``: no OS locks here."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _NO_OS_LOCKS:
                return None
            raise
        return True

    @staticmethod
    def _read(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            record = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"pid": "?", "host": "?"}
        return record if isinstance(record, dict) else {"pid": "?", "host": "?"}

    def _stale(self, record: dict) -> bool:
        return record.get("host") == socket.gethostname() and not _pid_running(record.get("pid"))

    def _still_named(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _write(self, fd: int) -> None:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "output": str(self.output),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record, indent=2) + "\n").encode("utf-8"))

    def _refusal(self, record: dict, remote: bool = False) -> OutputLockedError:
        who = _describe(record) if record else "a run that has not recorded itself yet"
        end = (
            f"that run is on another machine: if it is no longer running, delete {self.path} and rerun"
            if remote
            else f"if that run is no longer running, delete {self.path}"
        )
        error = OutputLockedError(
            f"{self.output} is being written by another run ({who}; lock {self.path}). Wait for it to finish or choose "
            f"another output path; {end}."
        )
        error.remote = remote
        return error


@contextlib.contextmanager
def output_lock(*outputs: str | os.PathLike | None, command: str | None = None, process: ProcessInfo | None = None) -> Iterator[list[OutputLock]]:
    """Hold the locks of ``outputs`` (``None`` entries are skipped) for the block.

    In a launch of several processes that share the outputs (``torchrun``, ``accelerate launch``), the
    main process alone holds the locks and every process refuses when it could not take them.

    Args:
        *outputs: The output paths the block writes.
        command: What the run is (recorded in the lock files).
        process: This process of a launch (default: one process).

    Raises:
        OutputLockedError: on every process, when another run holds one of the locks.
    """
    paths = {lock_path(p).resolve(): p for p in outputs if p is not None}  # one lock per output, however it is spelled
    locks = [OutputLock(p, command=command) for p in paths.values()]
    main = process is None or process.is_main
    with contextlib.ExitStack() as stack:
        refusal = None
        if main:
            try:
                for lock in locks:
                    stack.enter_context(lock)
            except OutputLockedError as exc:
                refusal = str(exc)
                if process is None or not process.is_distributed:
                    raise
        if process is not None and process.is_distributed:
            refusal = process.broadcast(refusal)
        if refusal is not None:
            raise OutputLockedError(refusal)
        yield locks if main else []
