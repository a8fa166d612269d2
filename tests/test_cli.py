"""Tests of the ``guda`` command line: help, the train -> unlearn -> attribute loop, the demo, errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMPipeline, UNet2DModel

from diffusers_guda.bundle import MANIFEST_NAME, AdapterBundle
from diffusers_guda.cli import main

from conftest import TINY_RECIPE, write_group_folder

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def run(*args: str) -> tuple[int, str, str]:
    """Run ``guda`` in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) with its bytes."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, out: str, err: str, command: str) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"guda {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A recipe, a grouped image folder, query images, and the base + bundle made from them by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    recipe = root / "tiny-recipe.json"
    recipe.write_text(json.dumps(TINY_RECIPE))
    data = write_group_folder(root / "data", ["left", "middle", "right"])
    queries = root / "queries"
    queries.mkdir()
    for i, group in enumerate(["left", "right"]):
        shutil.copy(data / group / "0.png", queries / f"q{i}_{group}.png")
    base, bundle = root / "base", root / "bundle"
    train = run("train", "--data", data, "--out", base, "--recipe", recipe, "--steps", 10, "--quiet")
    unlearn = run("unlearn", "--base", base, "--data", data, "--out", bundle, "--recipe", recipe, "--steps", 2, "--quiet")
    return dict(root=root, recipe=recipe, data=data, queries=queries, base=base, bundle=bundle, train=train, unlearn=unlearn)


# -- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, options",
    [
        ([], ["train", "unlearn", "attribute", "demo"]),
        (["train"], ["--data", "--benchmark", "--out", "--recipe", "--steps", "--batch-size", "--lr", "--seed", "--mode", "--quiet", "--threads"]),
        (["unlearn"], ["--base", "--data", "--out", "--recipe", "--objective", "--option", "--groups", "--steps", "--size-exponent", "--lr", "--rank", "--alpha"]),
        (["attribute"], ["--base", "--bundle", "--images", "--out", "--plot", "--top-k", "--batch-size", "--stride", "--draws"]),
        (["demo"], ["--out", "--recipe", "--queries"]),
    ],
)
def test_help(command, options):
    code, out, err = run(*command, "--help")
    assert code == 0
    assert out.startswith("usage: guda")
    for option in options:
        assert option in out, option


def test_help_and_error_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    guda = shutil.which("guda", path=str(Path(sys.executable).parent))
    command = [guda] if guda else [sys.executable, "-m", "diffusers_guda.cli"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: guda" in done.stdout and "unlearn" in done.stdout and "attribute" in done.stdout

    done = subprocess.run(
        [*command, "unlearn", "--base", "nowhere", "--out", "bundle", "--objective", "nope", "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert_one_line_error(done.returncode, done.stdout, done.stderr, "unlearn")
    assert "nope" in done.stderr
    assert not (tmp_path / "bundle").exists()


# -- the loop -----------------------------------------------------------------------------------


def test_train_writes_a_stock_pipeline(workspace):
    code, out, err = workspace["train"]
    assert code == 0, err
    assert "saved the base pipeline" in out
    base = workspace["base"]
    pipe = DDPMPipeline.from_pretrained(base)
    assert type(pipe.unet) is UNet2DModel
    log = json.loads((base / "guda_train.json").read_text())
    assert log["config"]["steps"] == 10  # --steps overrides the recipe
    assert log["config"]["block_out_channels"] == [16, 32]
    assert log["groups"] == ["left", "middle", "right"] and log["num_images"] == 24


def test_unlearn_writes_a_bundle(workspace):
    code, out, err = workspace["unlearn"]
    assert code == 0, err
    bundle_dir = workspace["bundle"]
    assert (bundle_dir / MANIFEST_NAME).is_file() and (bundle_dir / "README.md").is_file()
    bundle = AdapterBundle.from_pretrained(bundle_dir)
    assert bundle.group_names == ["left", "middle", "right"]
    assert all((bundle_dir / g.adapter_file).is_file() for g in bundle.groups)
    assert bundle.training["steps"] == 2
    assert bundle.lora["rank"] == 2
    assert bundle.objective["name"] == "retrack" and bundle.objective["config"]["num_neighbors"] == 3
    assert bundle.elbo["stride"] == 10  # the recipe's ELBO settings travel with the bundle
    assert bundle.base_model["id"] == str(workspace["base"])
    for name in bundle.group_names:
        assert f"{name}: forget loss" in out
    assert "saved the adapter bundle" in out
    assert not [p.name for p in workspace["root"].iterdir() if "partial" in p.name], "checkpoint left behind"


def test_attribute_writes_json_and_plot(workspace, tmp_path):
    result_path, plot_path = tmp_path / "r.json", tmp_path / "p.png"
    code, out, err = run(
        "attribute", "--base", workspace["base"], "--bundle", workspace["bundle"], "--images", workspace["queries"],
        "--out", result_path, "--plot", plot_path, "--quiet",
    )
    assert code == 0, err
    data = json.loads(result_path.read_text())
    assert data["groups"] == ["left", "middle", "right"]
    assert np.array(data["scores"]).shape == (2, 3) and np.isfinite(data["scores"]).all()
    assert np.array(data["stderr"]).shape == (2, 3) and np.isfinite(data["stderr"]).all()
    assert len(data["top_group"]) == 2 and set(data["top_group"]) <= {"left", "middle", "right"}
    assert [Path(f).name for f in data["metadata"]["files"]] == ["q0_left.png", "q1_right.png"]
    assert data["metadata"]["elbo"]["stride"] == 10
    assert plot_path.read_bytes()[:8] == PNG_MAGIC
    assert "q0_left.png" in out and "q1_right.png" in out and f"wrote {result_path}" in out

    # a single file and ELBO overrides
    code, out, err = run(
        "attribute", "--base", workspace["base"], "--bundle", workspace["bundle"],
        "--images", workspace["queries"] / "q0_left.png", "--stride", 30, "--out", tmp_path / "one.json", "--quiet",
    )
    assert code == 0, err
    one = json.loads((tmp_path / "one.json").read_text())
    assert np.array(one["scores"]).shape == (1, 3)
    assert one["metadata"]["elbo"]["stride"] == 30


def test_demo_writes_a_report_and_reuses_finished_stages(tmp_path, tiny_recipe):
    recipe = tiny_recipe
    out_dir = tmp_path / "d"
    code, out, err = run("demo", "--out", out_dir, "--recipe", recipe, "--queries", 4, "--quiet")
    assert code == 0, err
    for name in ("base", "bundle", "queries"):
        assert (out_dir / name).is_dir(), name
    for name in ("report.json", "queries.png", "attribution_bars.png", "label_heatmap.png", "unlearning.png"):
        assert (out_dir / name).is_file(), name
    for name in ("queries.png", "attribution_bars.png", "label_heatmap.png", "unlearning.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC, name
    assert len(list((out_dir / "queries").glob("*.png"))) == 4
    assert not (out_dir / ".bundle-partial").exists()
    assert type(DDPMPipeline.from_pretrained(out_dir / "base").unet) is UNet2DModel

    report = json.loads((out_dir / "report.json").read_text())
    assert 0.0 <= report["metrics"]["label_top1"] <= 1.0
    assert report["metrics"]["num_queries"] == 4
    assert report["groups"] == [str(d) for d in range(10)]
    assert len(report["queries"]) == 4
    for query in report["queries"]:
        assert len(query["scores"]) == 10 and len(query["stderr"]) == 10
        assert query["top_group"] in report["groups"]
        assert query["top_group"] == report["groups"][int(np.argmax(query["scores"]))]
        assert 0 <= query["digit"] <= 9
        assert (out_dir / query["file"]).is_file()
    assert len(report["unlearning"]) == 10
    for row in report["unlearning"]:
        for key in ("forget_loss_before", "forget_loss_after", "retain_loss_before", "retain_loss_after"):
            assert row[key] > 0, key
        assert row["steps"] == 3
    for stage in ("train_base", "unlearn", "generate", "attribute", "total"):
        assert report["wall_s"][stage] >= 0, stage
    assert report["seeds"] == {"train": 0, "unlearning": 0, "elbo": 0, "queries": 0}
    assert "label_top1" in out

    base_files, bundle_files = snapshot(out_dir / "base"), snapshot(out_dir / "bundle")
    code, out2, err = run("demo", "--out", out_dir, "--recipe", recipe, "--queries", 4, "--quiet")
    assert code == 0, err
    assert out2.count("reusing") == 2, out2
    assert "training the base model" not in out2 and "unlearning 10 groups" not in out2
    assert snapshot(out_dir / "base") == base_files
    assert snapshot(out_dir / "bundle") == bundle_files
    again = json.loads((out_dir / "report.json").read_text())
    assert [q["scores"] for q in again["queries"]] == [q["scores"] for q in report["queries"]]
    assert again["metrics"]["label_top1"] == report["metrics"]["label_top1"]


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "logo", "demo", "evaluate"])
def test_a_recipe_without_a_train_section_trains_nothing(command, tmp_path):
    extra = ["--benchmark", "digits-classes"] if command == "evaluate" else []
    code, out, err = run(command, *extra, "--recipe", "sd-styles", "--out", tmp_path / "out", "--quiet")
    line = assert_one_line_error(code, out, err, command)
    assert "'sd-styles' has no train section" in line and "--recipe digits-ddpm" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("command", ["train", "unlearn", "logo"])
def test_data_source_is_a_folder_or_a_benchmark(command, tmp_path):
    extra = ["--base", tmp_path / "base"] if command == "unlearn" else []
    code, out, err = run(command, *extra, "--benchmark", "no-such-benchmark", "--out", tmp_path / "out", "--quiet")
    line = assert_one_line_error(code, out, err, command)
    assert "no-such-benchmark" in line and "digits-contributors" in line
    code, _, err = run(command, *extra, "--benchmark", "digits-classes", "--data", "digits", "--out", tmp_path / "out")
    assert code == 2 and "not allowed with argument" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "logo"])
def test_train_and_logo_default_to_the_benchmarks_recipe(command, tmp_path):
    from dataclasses import replace

    from diffusers_guda.recipes import Recipe
    from guda_lab.evaluation.benchmarks import get_benchmark
    from guda_lab.recipes import training_config

    benchmark = get_benchmark("digits-contributors-flow")  # recipe digits-flow, not the default digits-ddpm
    first = benchmark.load().group_names[0]
    extra = ["--groups", first] if command == "logo" else []
    code, _, err = run(command, "--benchmark", benchmark.name, "--out", tmp_path / "out", *extra, "--steps", 1, "--quiet")
    assert code == 0, err
    model = tmp_path / "out" / "seed_0" / first if command == "logo" else tmp_path / "out"
    recorded = json.loads((model / "guda_train.json").read_text())["config"]
    assert recorded == replace(training_config(Recipe.load("digits-flow"), command), steps=1).to_dict()
    assert recorded["scheduler"] == "flow"


def test_unlearn_groups_together(workspace, tmp_path):
    out = tmp_path / "joint"
    code, _, err = run("unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", out, "--recipe", workspace["recipe"],
                       "--steps", 1, "--groups", "right", "left", "--joint-groups", 2, "--quiet")
    assert code == 0, err
    bundle = AdapterBundle.from_pretrained(out)
    assert bundle.training["joint_groups"] == 2
    assert [g.stats["trained_with"] for g in bundle.groups] == [["left"], ["right"]]
    code, _, err = run("unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", tmp_path / "refused",
                       "--recipe", workspace["recipe"], "--joint-groups", 2, "--gradient-checkpointing", "--quiet")
    assert code == 2 and "joint_groups > 1 cannot be combined with gradient_checkpointing" in err
    assert not (tmp_path / "refused").exists()


def test_unlearn_with_shared_draws(workspace, tmp_path):
    out = tmp_path / "shared"
    code, _, err = run("unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", out, "--recipe", workspace["recipe"],
                       "--steps", 2, "--groups", "right", "left", "--shared-draws", 3, "--option", "num_neighbors=all",
                       "--option", "target=teacher_posterior", "--option", "preserve=teacher_posterior",
                       "--timestep-sampling", "log_snr", "--quiet")
    assert code == 0, err
    bundle = AdapterBundle.from_pretrained(out)
    assert bundle.training["shared_draws"] == 3 and bundle.training["timestep_sampling"] == "log_snr"
    assert all(0 < g.stats["shared_teacher_rows"] <= g.stats["sample_passes"] for g in bundle.groups)


def test_unlearn_a_subset_of_groups(workspace, tmp_path):
    out = tmp_path / "subset"
    code, _, err = run(
        "unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", out, "--recipe", workspace["recipe"],
        "--steps", 1, "--size-exponent", 0.5, "--groups", "right", "left", "--gradient-checkpointing", "--autocast", "none", "--quiet",
    )
    assert code == 0, err
    bundle = AdapterBundle.from_pretrained(out)
    assert sorted(bundle.group_names) == ["left", "right"]
    assert bundle.training["size_exponent"] == 0.5
    assert bundle.training["gradient_checkpointing"] is True and bundle.training["autocast_dtype"] is None
    code, _, err = run("attribute", "--base", workspace["base"], "--bundle", out, "--images", workspace["queries"],
                       "--out", tmp_path / "r.json", "--stride", 30, "--autocast", "none", "--quiet")
    assert code == 0, err
    assert np.array(json.loads((tmp_path / "r.json").read_text())["scores"]).shape == (2, 2)


def test_identical_unlearn_runs_write_byte_identical_adapter_files(workspace, tmp_path):
    """Adapter files can be compared by hash: same data, base and settings give the same sha256."""
    import hashlib

    again = tmp_path / "bundle"
    code, _, err = run("unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", again,
                       "--recipe", workspace["recipe"], "--steps", 2, "--quiet")
    assert code == 0, err
    files = sorted(p.relative_to(workspace["bundle"]) for p in workspace["bundle"].rglob("*.safetensors"))
    assert len(files) == 3
    for name in files:
        digests = {hashlib.sha256((root / name).read_bytes()).hexdigest() for root in (workspace["bundle"], again)}
        assert len(digests) == 1, name


# -- reproducible artifacts and provenance ------------------------------------------------------------

WALL_TIME = re.compile(r'"wall_s": [0-9.eE+-]+')  # the only field two identical runs may write differently


def masked_manifest(bundle: Path) -> tuple[str, int]:
    """The bundle's manifest text with its wall times masked, and how many were masked."""
    return WALL_TIME.subn('"wall_s": "<masked>"', (bundle / MANIFEST_NAME).read_text())


def test_identical_runs_write_identical_bundles_and_results_apart_from_wall_times(workspace, tmp_path):
    """A bundle can be compared file by file: the manifest differs only in its wall times, the rest byte for byte."""
    again = tmp_path / "bundle"
    code, _, err = run("unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", again,
                       "--recipe", workspace["recipe"], "--steps", 2, "--quiet")
    assert code == 0, err
    (text, masked), (expected, _) = masked_manifest(again), masked_manifest(workspace["bundle"])
    assert masked == 3 and text == expected  # one wall time per group; order, floats and paths are the same
    files = sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(workspace["bundle"])) for p in workspace["bundle"].rglob("*") if p.is_file())
    for name in files:
        if name != MANIFEST_NAME:
            assert (again / name).read_bytes() == (workspace["bundle"] / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no lock or checkpoint left

    results = [tmp_path / "one.json", tmp_path / "two.json"]
    for result in results:
        code, _, err = run("attribute", "--base", workspace["base"], "--bundle", again, "--images", workspace["queries"],
                           "--out", result, "--quiet")
        assert code == 0, err
    assert results[0].read_bytes() == results[1].read_bytes()
    metadata = json.loads(results[0].read_text())["metadata"]
    manifest = json.loads((again / MANIFEST_NAME).read_text())
    assert manifest["base_model"]["revision"] is None  # a local base: its fingerprint identifies it
    assert metadata["base_fingerprint"] == manifest["base_model"]["fingerprint"] and metadata["base_revision"] is None


SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(workspace, tmp_path, monkeypatch):
    """An offline Hub cache holding the workspace base as the repo guda-test/tiny-base (commit SNAPSHOT, branch main)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--guda-test--tiny-base"
    shutil.copytree(workspace["base"], repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_bundles_and_results_record_the_commit_of_a_hub_base(workspace, hub_cache, tmp_path):
    out = tmp_path / "bundle"
    code, _, err = run("unlearn", "--base", "guda-test/tiny-base", "--base-revision", "main", "--data", workspace["data"],
                       "--out", out, "--recipe", workspace["recipe"], "--steps", 1, "--quiet")
    assert code == 0, err
    base = json.loads((out / MANIFEST_NAME).read_text())["base_model"]
    assert (base["id"], base["revision"]) == ("guda-test/tiny-base", SNAPSHOT)  # the branch resolved to its commit
    code, _, err = run("attribute", "--base", "guda-test/tiny-base", "--base-revision", SNAPSHOT, "--bundle", out,
                       "--images", workspace["queries"], "--out", tmp_path / "r.json", "--quiet")
    assert code == 0, err
    metadata = json.loads((tmp_path / "r.json").read_text())["metadata"]
    assert metadata["base_model"] == "guda-test/tiny-base" and metadata["base_revision"] == SNAPSHOT
    assert metadata["base_fingerprint"] == base["fingerprint"]


def test_a_finished_bundle_is_replaced_only_with_overwrite(workspace, tmp_path):
    out = tmp_path / "bundle"
    args = ["unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", out, "--recipe", workspace["recipe"],
            "--groups", "left", "--quiet"]
    assert run(*args, "--steps", 1)[0] == 0
    before = snapshot(out)
    code, stdout, err = run(*args, "--steps", 2)
    assert "already holds an adapter bundle; pass --overwrite" in assert_one_line_error(code, stdout, err, "unlearn")
    assert snapshot(out) == before
    code, _, err = run(*args, "--steps", 2, "--overwrite")
    assert code == 0, err
    assert AdapterBundle.from_pretrained(out).training["steps"] == 2


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(workspace, tmp_path):
    """The first run holds <out>.lock (here: a lock this test takes); the second refuses at once and changes nothing."""
    from diffusers_guda.locks import OutputLock

    out = tmp_path / "bundle"
    with OutputLock(out, command="guda unlearn"):
        code, stdout, err = run("unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", out,
                                "--recipe", workspace["recipe"], "--steps", 1, "--quiet")
        line = assert_one_line_error(code, stdout, err, "unlearn")
        assert f"pid {os.getpid()}" in line and "bundle.lock" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.lock"]  # no checkpoint, no bundle
    code, _, err = run("unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", out,
                       "--recipe", workspace["recipe"], "--steps", 1, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
