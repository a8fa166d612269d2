"""diffusers_guda.locks: a second run on the same output refuses while the first holds it; a killed run's lock is taken over."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffusers_guda import OutputError, OutputLockedError
from diffusers_guda.distributed import ProcessInfo
from diffusers_guda.locks import OutputLock, lock_path, output_lock

REPO = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from diffusers_guda.locks import OutputLock
lock = OutputLock(sys.argv[1], command="guda unlearn").acquire()
print("held", flush=True)
time.sleep(120)
"""


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of ``tmp_path / 'bundle'``; yields it (killed at the end)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "bundle")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_records_the_run_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "bundle"
    with OutputLock(out, command="guda unlearn") as lock:
        assert lock.held and lock.path == lock_path(out) == tmp_path / "bundle.lock"
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["command"] == "guda unlearn"
        assert record["output"] == str(out) and record["started"]
    assert not lock.held and list(tmp_path.iterdir()) == []


def test_folders_made_for_the_lock_go_when_nothing_was_written(tmp_path):
    with OutputLock(tmp_path / "a" / "b" / "result.json"):
        assert (tmp_path / "a" / "b").is_dir()
    assert list(tmp_path.iterdir()) == []
    with OutputLock(tmp_path / "a" / "b" / "result.json"):
        (tmp_path / "a" / "b" / "result.json").write_text("{}")
    assert (tmp_path / "a" / "b" / "result.json").is_file()  # an output that was written keeps its folders


def test_a_live_run_in_another_process_is_named_and_its_lock_left_alone(tmp_path, holder):
    before = (tmp_path / "bundle.lock").read_bytes()
    with pytest.raises(OutputLockedError) as caught:
        OutputLock(tmp_path / "bundle").acquire()
    message = str(caught.value)
    assert isinstance(caught.value, OutputError) and "\n" not in message
    for needle in (f"pid {holder.pid}", "`guda unlearn`", "Wait for it to finish", "another output path", f"delete {tmp_path / 'bundle.lock'}"):
        assert needle in message, needle
    assert (tmp_path / "bundle.lock").read_bytes() == before


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path, holder, caplog):
    holder.kill()
    holder.wait()
    assert (tmp_path / "bundle.lock").is_file()  # a kill leaves the file; the OS lock ended with the process
    with caplog.at_level(logging.WARNING, logger="diffusers_guda.locks"):
        with OutputLock(tmp_path / "bundle", command="guda unlearn") as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text


WRITER = """
import sys, time
from diffusers_guda.io_utils import atomic_directory, atomic_file
from diffusers_guda.locks import OutputLock
out, kind = sys.argv[1:]
lock = OutputLock(out, command="guda unlearn").acquire()
with (atomic_directory(out) if kind == "directory" else atomic_file(out)) as tmp:
    (tmp / "adapter.safetensors" if kind == "directory" else tmp).write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_taking_over_a_killed_run_removes_its_unfinished_write_and_nothing_else(tmp_path, caplog, kind):
    out = tmp_path / ("bundle" if kind == "directory" else "bundle.json")
    finished = out / "adapter.safetensors" if kind == "directory" else out  # the previous, finished output
    finished.parent.mkdir(exist_ok=True)
    finished.write_bytes(b"finished")
    kept = [tmp_path / f".{out.name}-partial", tmp_path / ".other.tmp-x", tmp_path / f"{out.name}.tmp-x"]
    for path in kept:
        path.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out), kind], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline().strip() == "writing"
        unfinished = list(tmp_path.glob(f".{out.name}.tmp-*"))
        assert len(unfinished) == 1
        with pytest.raises(OutputLockedError):  # a live run's temporary output is its own
            OutputLock(out).acquire()
        assert unfinished[0].exists()
    finally:
        writer.kill()
        writer.wait()
    with caplog.at_level(logging.WARNING, logger="diffusers_guda.locks"), OutputLock(out):
        assert not unfinished[0].exists()
    assert all(p.exists() for p in kept) and finished.read_bytes() == b"finished"
    assert str(unfinished[0]) in caplog.text and "unfinished write" in caplog.text


def test_a_second_lock_in_one_process_is_refused_too(tmp_path):
    with OutputLock(tmp_path / "result.json", command="guda attribute"):
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on"):
            OutputLock(tmp_path / "result.json").acquire()
    OutputLock(tmp_path / "result.json").acquire().release()


def test_waiting_takes_the_lock_once_the_other_run_ends(tmp_path):
    first = OutputLock(tmp_path / "out").acquire()
    threading.Timer(0.3, first.release).start()
    start = time.monotonic()
    with OutputLock(tmp_path / "out", timeout=10):
        assert time.monotonic() - start < 5
    with OutputLock(tmp_path / "out"), pytest.raises(OutputLockedError):
        OutputLock(tmp_path / "out", timeout=0.2).acquire()


def write_record(tmp_path: Path, **record) -> Path:
    path = tmp_path / "out.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "command": "guda train", "started": "then", **record}))
    return path


def test_without_os_locks_the_record_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(OutputLock, "_lock", staticmethod(lambda fd: None))  # a file system without flock
    write_record(tmp_path, pid=dead_pid())
    with OutputLock(tmp_path / "out"):  # a dead process of this machine: stale
        pass
    write_record(tmp_path, pid=os.getpid())
    with pytest.raises(OutputLockedError, match="guda train"):  # a running one: live
        OutputLock(tmp_path / "out").acquire()


def test_a_lock_of_another_machine_is_never_taken_over(tmp_path):
    write_record(tmp_path, pid=12345, host="elsewhere")
    with pytest.raises(OutputLockedError) as caught:
        OutputLock(tmp_path / "out").acquire()
    assert "pid 12345 on elsewhere" in str(caught.value) and "another machine" in str(caught.value)
    assert json.loads((tmp_path / "out.lock").read_text())["host"] == "elsewhere"
    start = time.monotonic()
    with pytest.raises(OutputLockedError, match="another machine"):  # waiting would never end it
        OutputLock(tmp_path / "out", timeout=math.inf).acquire()
    assert time.monotonic() - start < 5


@dataclass(frozen=True)
class FakeLaunch(ProcessInfo):
    """A rank of a two-process launch whose broadcast hands out ``main_says`` (what process 0 sent)."""

    main_says: str | None = None

    def broadcast(self, obj):
        return obj if self.is_main else self.main_says


def test_in_a_launch_process_zero_holds_the_lock_for_all(tmp_path):
    with output_lock(tmp_path / "out", command="guda logo", process=FakeLaunch(rank=1, world_size=2)) as locks:
        assert locks == [] and not (tmp_path / "out.lock").exists()  # the other ranks hold nothing
    with output_lock(tmp_path / "out", process=FakeLaunch(rank=0, world_size=2)) as locks:
        assert [lock.held for lock in locks] == [True]
        with pytest.raises(OutputLockedError):  # process 0 refused: it tells the others, which refuse too
            with output_lock(tmp_path / "out", process=FakeLaunch(rank=0, world_size=2)):
                pass
    with pytest.raises(OutputLockedError, match="being written by another run"):
        with output_lock(tmp_path / "out", process=FakeLaunch(rank=1, world_size=2, main_says="x is being written by another run")):
            pass
    assert list(tmp_path.iterdir()) == []
