"""Kill ``guda unlearn`` and ``guda logo`` with SIGKILL at several points, rerun them, and compare.

Each command runs in a real subprocess (``python -m diffusers_guda.cli``). The test watches the
output and checkpoint directories and kills the process at a moment chosen from what it sees (a new
file or directory, a group finished) plus a delay: while a group trains, while a group's checkpoint,
a LOGO model or the bundle is being written. Wherever the kill actually lands, after it:

* the final ``--out`` bundle does not exist or is complete, loadable and equal to an uninterrupted run's;
* every finished group in the checkpoint (``.<out>-partial/<slug>``) and every LOGO model directory
  is complete and bit-identical to the uninterrupted run's, and was never rewritten by a later run;
* anything else lies under the temporary names of ``io_utils`` (``.<name>.tmp-*``, ``.<name>.old-*``).

The rerun then finishes, skips the finished groups and produces bit-identical weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from diffusers import UNet2DModel
from safetensors.torch import load_file

from diffusers_guda.bundle import CARD_NAME, MANIFEST_NAME, AdapterBundle, unique_slugs
from diffusers_guda.cli import main
from diffusers_guda.lora import ADAPTER_WEIGHT_NAME, load_adapter_file
from guda_lab.training import TRAIN_LOG_NAME
from diffusers_guda.unlearning import RUN_NAME, STATS_NAME

from conftest import TINY_RECIPE, assert_bit_identical, drop_timing, write_group_folder

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals (SIGKILL)"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
]

REPO = Path(__file__).resolve().parent.parent
GROUPS = ["left", "middle", "right"]
SLUGS = unique_slugs(GROUPS)
UNLEARN_STEPS = 12  # per group: long enough for a kill to land inside a group, short enough for CI
LOGO_STEPS = 12
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
LOGO_FILES = {"model_index.json", TRAIN_LOG_NAME, "unet/config.json", UNET_WEIGHTS, "scheduler/scheduler_config.json"}
KILLED = -signal.SIGKILL if hasattr(signal, "SIGKILL") else None


def temporary_name(name: str) -> re.Pattern:
    """Names ``io_utils`` gives its temporary files and directories beside ``name``."""
    return re.compile(rf"\.{re.escape(name)}\.(tmp-|old-)?[A-Za-z0-9_]+")


def is_temporary(entry: str, names) -> bool:
    return any(temporary_name(name).fullmatch(entry) for name in names)


def in_process(*args) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, err.getvalue()
    return out.getvalue()


def listing(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError:
        return set()


def something_new_in(path: Path):
    """A trigger that holds once ``path`` has an entry it lacks now (a directory being written, or just written)."""
    before = listing(path)
    return lambda: bool(listing(path) - before)


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


# -- running and killing a real process ---------------------------------------------------------


class Process:
    """One ``guda`` command in a subprocess, killed with SIGKILL when asked."""

    def __init__(self, args, cwd: Path, log: Path):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = log
        self._out, self._err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "diffusers_guda.cli", *map(str, args)], cwd=cwd, env=env, stdout=self._out, stderr=self._err
        )

    def kill_after(self, trigger, delay: float = 0.0, timeout: float = 180.0) -> bool:
        """SIGKILL the process ``delay`` seconds after ``trigger()`` first holds; wait for it to end.

        Returns:
            Whether the kill ended it (``False``: it had already exited by itself).
        """
        deadline, fired = time.monotonic() + timeout, None
        try:
            while self.proc.poll() is None:
                now = time.monotonic()
                assert now < deadline, f"{self.log.name} neither finished nor reached its kill point in {timeout} s"
                if fired is None and trigger is not None and trigger():
                    fired = now
                if fired is not None and now >= fired + delay:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.002)
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
            self._err.close()
        code = self.proc.returncode
        assert code in (0, KILLED), f"{self.log.name} failed with exit code {code}:\n{self.stderr}"
        return code == KILLED

    def finish(self, timeout: float = 180.0) -> str:
        """Wait for the process; it must exit 0. Returns its stdout."""
        assert not self.kill_after(None, timeout=timeout)
        return self.stdout

    @property
    def stdout(self) -> str:
        return Path(f"{self.log}.out").read_text()

    @property
    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()


# -- shared inputs and the uninterrupted reference runs -------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    recipe = root / "tiny-recipe.json"
    recipe.write_text(json.dumps(TINY_RECIPE))
    data = write_group_folder(root / "data", GROUPS)
    base = root / "base"
    in_process("train", "--data", data, "--out", base, "--recipe", recipe, "--steps", 5, "--threads", 1, "--quiet")
    return dict(root=root, recipe=recipe, data=data, base=base)


def unlearn_args(inputs, out: Path) -> list:
    return ["unlearn", "--base", inputs["base"], "--data", inputs["data"], "--out", out, "--recipe", inputs["recipe"],
            "--steps", UNLEARN_STEPS, "--threads", 1, "--quiet"]


def logo_args(inputs, out: Path) -> list:
    return ["logo", "--data", inputs["data"], "--out", out, "--recipe", inputs["recipe"], "--steps", LOGO_STEPS, "--threads", 1, "--quiet"]


# -- guda unlearn -----------------------------------------------------------------------------------


class UnlearnCheck:
    """Checks of the bundle and checkpoint directories against the uninterrupted run's bundle."""

    def __init__(self, workdir: Path, reference: Path):
        self.workdir, self.out, self.partial = workdir, workdir / "bundle", workdir / ".bundle-partial"
        self.reference = reference
        self.manifest = json.loads((reference / MANIFEST_NAME).read_text())
        self.stats = {g["slug"]: g["stats"] for g in self.manifest["groups"]}
        self.adapters = {slug: load_adapter_file(reference / "adapters" / slug / ADAPTER_WEIGHT_NAME) for slug in SLUGS}
        self.identity: dict[str, tuple] = {}  # slug -> (inode, mtime) of its checkpoint, first time seen

    def finished(self) -> int:
        """Groups the checkpoint holds as finished (what a rerun skips)."""
        return sum((self.partial / s / STATS_NAME).is_file() and (self.partial / s / ADAPTER_WEIGHT_NAME).is_file() for s in SLUGS)

    def writing_bundle(self) -> bool:
        try:
            return self.out.exists() or any(is_temporary(e, ["bundle"]) for e in os.listdir(self.workdir))
        except OSError:
            return False

    def assert_bundle_matches(self, path: Path) -> None:
        AdapterBundle.from_pretrained(path)  # complete and valid
        assert files_under(path) == files_under(self.reference)
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        assert drop_timing(manifest) == drop_timing(self.manifest)
        assert (path / CARD_NAME).read_text() == (self.reference / CARD_NAME).read_text()
        for slug in SLUGS:
            state, config = load_adapter_file(path / "adapters" / slug / ADAPTER_WEIGHT_NAME)
            assert config == self.adapters[slug][1]
            assert_bit_identical(state, self.adapters[slug][0], f"bundle adapter {slug}")

    def assert_consistent(self) -> dict[str, dict]:
        """After a kill: no half-written bundle or group. Returns the finished groups' stats."""
        for entry in os.listdir(self.workdir):
            # a killed run leaves its lock file (the OS lock died with it): the rerun takes it over
            assert entry in ("bundle", ".bundle-partial", "bundle.lock") or is_temporary(entry, ["bundle"]), \
                f"unexpected {entry} beside the bundle"
        complete = self.out.exists()
        if complete:
            self.assert_bundle_matches(self.out)
        finished = {}
        if not self.partial.exists():
            return finished
        for entry in os.listdir(self.partial):
            if entry == RUN_NAME:
                assert json.loads((self.partial / entry).read_text())["groups"] == GROUPS
                continue
            if is_temporary(entry, [RUN_NAME, *SLUGS]):
                continue
            assert entry in SLUGS, f"unexpected {entry} in the checkpoint"
            group = self.partial / entry
            if complete and sorted(os.listdir(group)) != sorted([ADAPTER_WEIGHT_NAME, STATS_NAME]):
                continue  # the checkpoint of a finished run, being deleted
            assert sorted(os.listdir(group)) == sorted([ADAPTER_WEIGHT_NAME, STATS_NAME]), f"half-written checkpoint {group}"
            state, config = load_adapter_file(group / ADAPTER_WEIGHT_NAME)
            assert config == self.adapters[entry][1]
            assert_bit_identical(state, self.adapters[entry][0], f"checkpointed adapter {entry}")
            stats = json.loads((group / STATS_NAME).read_text())
            assert drop_timing(stats) == drop_timing(self.stats[entry])
            identity = (group.stat().st_ino, (group / STATS_NAME).stat().st_mtime_ns)
            assert self.identity.setdefault(entry, identity) == identity, f"finished group {entry} was trained again"
            finished[entry] = stats
        return finished


@pytest.fixture(scope="module")
def unlearn_reference(inputs):
    """The bundle of an uninterrupted run, and the seconds the training loop of one group takes."""
    reference = inputs["root"] / "reference" / "bundle"
    in_process(*unlearn_args(inputs, reference))
    groups = json.loads((reference / MANIFEST_NAME).read_text())["groups"]
    return reference, sum(g["stats"]["wall_s"] for g in groups) / len(groups)


def test_unlearn_killed_at_several_points_resumes_to_identical_bundle(inputs, unlearn_reference, tmp_path):
    reference, group_s = unlearn_reference

    workdir = tmp_path / "work"
    workdir.mkdir()
    check = UnlearnCheck(workdir, reference)
    args = unlearn_args(inputs, check.out)

    def one_more_finished():
        before = check.finished()
        return lambda: check.finished() > before

    # (label, trigger factory, delay): each rerun resumes from where the previous one was killed
    plans = [
        ("while the first group trains", lambda: (lambda: (check.partial / RUN_NAME).exists()), 0.5 * group_s),
        ("while a group's checkpoint is written", lambda: something_new_in(check.partial), 0.0),
        ("while the next group trains, after one finished in the same process", one_more_finished, 0.5 * group_s),
        ("while the bundle is written", lambda: check.writing_bundle, 0.0),
    ]
    hits, skipped_before, completed = [], {}, None
    for n, (label, trigger, delay) in enumerate(plans, 1):
        had = check.assert_consistent()
        temporary = {e for e in listing(check.partial) if is_temporary(e, SLUGS)}
        watch = trigger()
        process = Process(args, workdir, tmp_path / f"unlearn-{n}")
        killed = process.kill_after(watch, delay)
        after = check.assert_consistent()
        assert set(had) <= set(after) or check.out.exists()
        state = "bundle written" if check.out.exists() else (
            "bundle being written" if check.writing_bundle() else f"{len(after)}/{len(SLUGS)} groups checkpointed")
        if {e for e in listing(check.partial) if is_temporary(e, SLUGS)} - temporary:
            state += ", a group's checkpoint being written"
        hits.append(f"run {n} {'killed' if killed else 'exited by itself'} {label}: {state}")
        skipped_before = {**skipped_before, **had}
        if not killed:
            completed = process
            break
    if completed is None:
        had = check.assert_consistent()
        skipped_before = {**skipped_before, **had}
        completed = Process(args, workdir, tmp_path / "unlearn-final")
        completed.finish()
        hits.append("final rerun finished")
    print("\nguda unlearn kill points:\n  " + "\n  ".join(hits))

    assert "saved the adapter bundle" in completed.stdout
    assert not check.partial.exists(), "the checkpoint is removed once the bundle is written"
    assert not (workdir / "bundle.lock").exists(), "the finished run removes its lock"
    check.assert_bundle_matches(check.out)
    # finished groups were reused, not retrained: their recorded statistics (wall time included)
    # are the ones of the run that trained them
    assert skipped_before, "no rerun ever found a finished group"
    manifest = json.loads((check.out / MANIFEST_NAME).read_text())
    final_stats = {g["slug"]: g["stats"] for g in manifest["groups"]}
    for slug, stats in skipped_before.items():
        assert final_stats[slug] == stats, f"group {slug} was trained again after it had finished"


def test_unlearn_resumes_after_a_kill_while_deleting_the_checkpoint(inputs, unlearn_reference, tmp_path, monkeypatch):
    """A kill inside ``rmtree(.<out>-partial)`` can leave a group with its stats but no adapter file."""
    reference, _ = unlearn_reference
    workdir = tmp_path / "work"
    check = UnlearnCheck(workdir, reference)
    rmtree = shutil.rmtree

    def keep_checkpoint(path, *args, **kwargs):
        if not Path(path).name.endswith("-partial"):
            rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch:  # the state just before the cleanup: bundle written, checkpoint complete
        patch.setattr(shutil, "rmtree", keep_checkpoint)
        in_process(*unlearn_args(inputs, check.out))
    assert check.finished() == len(SLUGS)
    kept = check.assert_consistent()
    # rmtree had deleted this file when the kill came; before the fix, the rerun stopped with
    # "Adapter file ... is corrupted" however often it was run
    (check.partial / SLUGS[0] / ADAPTER_WEIGHT_NAME).unlink()

    stdout = in_process(*unlearn_args(inputs, check.out), "--overwrite")  # the bundle was saved before the kill
    assert f"({len(SLUGS) - 1} of {len(SLUGS)} groups resumed from {check.partial})" in stdout
    assert not check.partial.exists()
    check.assert_bundle_matches(check.out)
    final = {g["slug"]: g["stats"] for g in json.loads((check.out / MANIFEST_NAME).read_text())["groups"]}
    for slug in SLUGS[1:]:
        assert final[slug] == kept[slug]  # the intact groups were reused


# -- guda logo ----------------------------------------------------------------------------------------


class LogoCheck:
    """Checks of a LOGO output root against the uninterrupted run's."""

    def __init__(self, root: Path, reference: Path):
        self.root, self.models = root, root / "seed_0"
        self.reference = reference / "seed_0"
        self.identity: dict[str, tuple] = {}

    def finished(self) -> int:
        return sum((self.models / s / TRAIN_LOG_NAME).exists() for s in SLUGS)

    def assert_model_matches(self, path: Path, slug: str) -> None:
        expected = self.reference / slug
        assert LOGO_FILES <= files_under(path), f"half-written LOGO model {path}: {sorted(files_under(path))}"
        assert files_under(path) == files_under(expected)
        unet = UNet2DModel.from_pretrained(path / "unet")  # loadable
        weights = load_file(expected / UNET_WEIGHTS)
        assert_bit_identical(load_file(path / UNET_WEIGHTS), weights, f"LOGO model {slug}")
        assert_bit_identical({k: v for k, v in unet.state_dict().items()}, weights, f"loaded LOGO model {slug}")
        for name in files_under(expected):
            if name.endswith(".json"):
                got, want = json.loads((path / name).read_text()), json.loads((expected / name).read_text())
                assert drop_timing(got) == drop_timing(want), f"{slug}/{name}"
        assert json.loads((path / TRAIN_LOG_NAME).read_text())["excluded_group"] == GROUPS[SLUGS.index(slug)]

    def assert_consistent(self) -> set[str]:
        """After a kill: every model directory is complete. Returns the finished groups."""
        if not self.root.exists():
            return set()
        assert set(os.listdir(self.root)) <= {"seed_0"}
        finished = set()
        for entry in os.listdir(self.models) if self.models.exists() else []:
            if is_temporary(entry, SLUGS) or entry in {f"{s}.lock" for s in SLUGS}:  # a killed run's model lock: the next run takes it over
                continue
            assert entry in SLUGS, f"unexpected {entry} among the LOGO models"
            self.assert_model_matches(self.models / entry, entry)
            identity = (os.stat(self.models / entry).st_ino, (self.models / entry / TRAIN_LOG_NAME).stat().st_mtime_ns)
            assert self.identity.setdefault(entry, identity) == identity, f"finished LOGO model {entry} was trained again"
            finished.add(entry)
        return finished


def test_logo_killed_at_several_points_resumes_to_identical_models(inputs, tmp_path):
    reference = tmp_path / "reference"
    in_process(*logo_args(inputs, reference))
    group_s = sum(json.loads((reference / "seed_0" / s / TRAIN_LOG_NAME).read_text())["wall_s"] for s in SLUGS) / len(SLUGS)

    check = LogoCheck(tmp_path / "logo", reference)
    args = logo_args(inputs, check.root)

    def one_more_finished():
        before = check.finished()
        return lambda: check.finished() > before

    plans = [
        ("while the second group trains", one_more_finished, 0.5 * group_s),
        ("while a model is written", lambda: something_new_in(check.models), 0.0),
    ]
    hits, reused, completed = [], set(), None
    for n, (label, trigger, delay) in enumerate(plans, 1):
        had = check.assert_consistent()  # what this run finds finished
        temporary = {e for e in listing(check.models) if is_temporary(e, SLUGS)}
        watch = trigger()
        process = Process(args, tmp_path, tmp_path / f"logo-{n}")
        killed = process.kill_after(watch, delay)
        after = check.assert_consistent()
        assert had <= after
        for slug in had:
            assert f"LOGO without {GROUPS[SLUGS.index(slug)]!r}: reusing" in process.stdout or killed
        tmp = ", a model being written" if {e for e in listing(check.models) if is_temporary(e, SLUGS)} - temporary else ""
        hits.append(f"run {n} {'killed' if killed else 'exited by itself'} {label}: {len(after)}/{len(SLUGS)} models written{tmp}")
        reused |= had
        if not killed:
            completed = process
            break
    if completed is None:
        had = check.assert_consistent()
        reused |= had
        completed = Process(args, tmp_path, tmp_path / "logo-final")
        completed.finish()
        hits.append("final rerun finished")
    print("\nguda logo kill points:\n  " + "\n  ".join(hits))

    assert f"{len(GROUPS)} leave-one-group-out models" in completed.stdout
    assert reused, "no rerun ever found a finished LOGO model"
    for slug, name in zip(SLUGS, GROUPS):  # the last run reused exactly the models it found, and trained the others
        assert (f"LOGO without {name!r}: reusing" in completed.stdout) == (slug in had), completed.stdout
    assert check.assert_consistent() == set(SLUGS)
    assert not {e for e in listing(check.models) if e.endswith(".lock")}  # the finished run took over the killed runs' locks and removed them
