"""diffusers_guda.io_utils: atomic outputs with the user's permissions, and failed writes as one-line errors."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from diffusers_guda import OutputError
from diffusers_guda.io_utils import atomic_directory, atomic_file, write_json_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_permissions_of_the_users_umask(tmp_path, umask_022):
    write_json_atomic(tmp_path / "result.json", {"a": 1})
    with atomic_directory(tmp_path / "bundle") as tmp:
        (tmp / "x.txt").write_text("x")
    assert mode(tmp_path / "result.json") == 0o644 and mode(tmp_path / "bundle") == 0o755


def no_space(path_to_fail):
    """An ``os.replace`` that fails like a full disk when it would put ``path_to_fail`` in place."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst) == str(path_to_fail) and ".old-" not in str(src):  # putting the previous output back works
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    return replace


def test_a_failed_write_keeps_the_previous_file_and_says_so_in_one_line(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    write_text_atomic(target, "previous\n")
    monkeypatch.setattr(os, "replace", no_space(target))
    with pytest.raises(OutputError) as caught:
        write_json_atomic(target, {"new": True})
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message and "previous output there is unchanged" in message
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left behind


def test_a_failed_directory_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("previous")
    monkeypatch.setattr(os, "replace", no_space(target))
    with pytest.raises(OutputError, match="Cannot write .*bundle"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_other_errors_are_not_disguised(tmp_path):
    with pytest.raises(KeyError):
        with atomic_file(tmp_path / "x.json"):
            raise KeyError("a bug, not a disk")
    assert not list(tmp_path.iterdir())
