"""Several processes: ``torchrun`` and ``accelerate launch`` split the work and give one process's results.

The launches are real: two CPU processes joined over gloo, started by each launcher around
``python -m diffusers_guda.cli``. Their bundles and scores are compared, bit for bit, with one
in-process run of the same command, and their outputs must say that two processes did the work.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_guda import GUDADDPMPipeline
from diffusers_guda.bundle import MANIFEST_NAME
from diffusers_guda.cli import main
from diffusers_guda.distributed import SINGLE_PROCESS, ProcessInfo, detect_process
from diffusers_guda.errors import DistributedError
from diffusers_guda.lora import ADAPTER_WEIGHT_NAME, load_adapter_file
from diffusers_guda.pipelines import to_model_images
from diffusers_guda.scoring import concatenate_results
from guda_lab.training import TRAIN_LOG_NAME

from conftest import TINY_RECIPE, assert_bit_identical, drop_timing, write_group_folder

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

REPO = Path(__file__).resolve().parent.parent
GROUPS = ["left", "middle", "right"]
UNLEARN_STEPS = 3
LOGO_STEPS = 3
ACCELERATE = Path(sys.executable).with_name("accelerate")


def in_process(*args) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, err.getvalue()
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], *args, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    """Run ``launcher -m diffusers_guda.cli args`` (this checkout first on the path)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [*launcher, "-m", "diffusers_guda.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def accelerate_multi_cpu() -> list[str]:
    # --multi_gpu without --cpu is what starts several CPU processes (over gloo) on a machine without GPUs
    return [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


needs_accelerate = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher is not installed beside python")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny recipe, grouped images, three queries, a base model, and its bundle made by one process."""
    root = tmp_path_factory.mktemp("distributed")
    recipe = root / "tiny-recipe.json"
    recipe.write_text(json.dumps(TINY_RECIPE))
    data = write_group_folder(root / "data", GROUPS)
    queries = root / "queries"
    queries.mkdir()
    for i, group in enumerate(GROUPS):  # three queries: two processes get 1 and 2
        shutil.copy(data / group / f"{i}.png", queries / f"q{i}.png")
    base, bundle = root / "base", root / "bundle"
    in_process("train", "--data", data, "--out", base, "--recipe", recipe, "--steps", 5, "--threads", 1, "--quiet")
    in_process(*unlearn_args(base, data, recipe, bundle))
    return dict(root=root, recipe=recipe, data=data, queries=queries, base=base, bundle=bundle)


def unlearn_args(base, data, recipe, out) -> list:
    return ["unlearn", "--base", base, "--data", data, "--out", out, "--recipe", recipe, "--steps", UNLEARN_STEPS, "--threads", 1, "--quiet"]


def attribute_args(inputs, out: Path, *extra) -> list:
    return ["attribute", "--base", inputs["base"], "--bundle", inputs["bundle"], "--images", inputs["queries"],
            "--out", out, "--batch-size", 2, "--threads", 1, "--quiet", *extra]


def assert_same_scores(got: dict, expected: dict) -> None:
    for key in ("groups", "scores", "stderr", "neg_elbo", "image_hashes", "top_group"):
        assert got[key] == expected[key], key  # exact: floats compared as written by one process
    ignore = {"world_size"}
    assert {k: v for k, v in got["metadata"].items() if k not in ignore} == {k: v for k, v in expected["metadata"].items() if k not in ignore}


# -- the process description ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, (0, 1, 0)),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, (1, 2, 1)),  # torchrun, accelerate --multi_gpu
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1)),  # second machine of two
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, (1, 2, 1)),  # mpirun
        ({"ACCELERATE_USE_CPU": "False"}, (0, 1, 0)),  # accelerate launch of one process
    ],
)
def test_process_is_read_from_the_launcher_environment(environ, expected):
    info = detect_process(environ, cuda_devices=0)
    assert (info.rank, info.world_size, info.local_rank) == expected
    assert info.device == torch.device("cpu") and info.is_main == (expected[0] == 0)
    assert detect_process(environ, cuda_devices=2).device == torch.device("cuda", expected[2])


@pytest.mark.parametrize(
    "environ, message",
    [
        # what `accelerate launch --cpu --num_processes 2` (or without --multi_gpu, on CPU) gives its one process
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "started 1 process although several"),
        ({"WORLD_SIZE": "2"}, "RANK is not"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "does not fit"),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, "not an integer"),
    ],
)
def test_a_broken_launch_is_refused(environ, message):
    with pytest.raises(DistributedError, match=message):
        detect_process(environ, cuda_devices=0)


def test_each_process_needs_a_gpu_of_its_own():
    with pytest.raises(DistributedError, match="LOCAL_RANK=1 has no GPU of its own"):
        detect_process({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, cuda_devices=1)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_cover_the_items_once_in_order(n, world_size):
    items = list(range(n))
    shards = [ProcessInfo(rank=r, world_size=world_size).shard(items) for r in range(world_size)]
    assert [i for shard in shards for i in shard] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("command", ["train", "demo", "evaluate"])
def test_commands_that_do_not_split_refuse_several_processes(command, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([command, "--out", str(tmp_path / "out"), *(["--data", "digits"] if command == "evaluate" else [])])
    assert code == 2 and err.getvalue().strip() == (
        f"guda {command}: error: guda {command} runs in one process; start it without torchrun or accelerate launch "
        "(unlearn, attribute and logo split their work across processes)."
    )


# -- query shards, in one process -------------------------------------------------------------------


@dataclass(frozen=True)
class AloneInLaunch(ProcessInfo):
    """One rank of a launch whose other ranks the test plays itself: collectives see this rank only."""

    def gather(self, obj):
        return [obj]

    def check_same(self, value, what):
        pass


@pytest.mark.parametrize("num_images", [1, 3])
@pytest.mark.parametrize("adaptive_z", [None, 1.0])
def test_score_shards_join_into_the_one_process_result(inputs, num_images, adaptive_z):
    pipe = GUDADDPMPipeline.from_pretrained(inputs["base"])
    pipe.load_guda_bundle(inputs["bundle"])
    from PIL import Image

    images = to_model_images([Image.open(p) for p in sorted(inputs["queries"].iterdir())][:num_images])
    whole = pipe.attribute(images, batch_size=2, adaptive_z=adaptive_z, progress=False, process=SINGLE_PROCESS)
    parts = [pipe.attribute(images, batch_size=2, adaptive_z=adaptive_z, progress=False, process=AloneInLaunch(rank=r, world_size=2))
             for r in range(2)]
    assert [len(p) for p in parts] == [num_images // 2, num_images - num_images // 2]  # one image: rank 0 has none
    joined = concatenate_results(parts)
    for key in ("scores", "stderr", "neg_elbo"):
        assert torch.equal(getattr(joined, key), getattr(whole, key)), key
    assert joined.image_hashes == whole.image_hashes
    assert joined.metadata == {**whole.metadata, "world_size": 2} and whole.metadata["world_size"] == 1


# -- real launches ----------------------------------------------------------------------------------


def test_torchrun_unlearns_the_bundle_of_one_process(inputs, tmp_path):
    out = tmp_path / "bundle"
    done = launch(torchrun(), *unlearn_args(inputs["base"], inputs["data"], inputs["recipe"], out), cwd=tmp_path)
    assert f"saved the adapter bundle to {out} (groups shared by 2 processes)" in done.stdout
    assert done.stdout.count("saved the adapter bundle") == 1  # the main process reports, once
    assert sorted(os.listdir(tmp_path)) == ["bundle"]  # the shared checkpoint is gone
    reference = inputs["bundle"]
    got, expected = (json.loads((p / MANIFEST_NAME).read_text()) for p in (out, reference))
    assert drop_timing(got) == drop_timing(expected)
    for slug in GROUPS:
        state, config = load_adapter_file(out / "adapters" / slug / ADAPTER_WEIGHT_NAME)
        ref_state, ref_config = load_adapter_file(reference / "adapters" / slug / ADAPTER_WEIGHT_NAME)
        assert config == ref_config
        assert_bit_identical(state, ref_state, f"adapter {slug}")


def test_torchrun_scores_like_one_process(inputs, tmp_path):
    reference, got = tmp_path / "one.json", tmp_path / "two.json"
    in_process(*attribute_args(inputs, reference))
    done = launch(torchrun(), *attribute_args(inputs, got), cwd=tmp_path)
    assert done.stdout.count(f"wrote {got}") == 1
    result = json.loads(got.read_text())
    assert result["metadata"]["world_size"] == 2
    assert_same_scores(result, json.loads(reference.read_text()))


@needs_accelerate
def test_accelerate_launch_scores_like_one_process(inputs, tmp_path):
    reference, got = tmp_path / "one.json", tmp_path / "two.json"
    in_process(*attribute_args(inputs, reference, "--adaptive-z", 1))
    launch(accelerate_multi_cpu(), *attribute_args(inputs, got, "--adaptive-z", 1), cwd=tmp_path)
    result = json.loads(got.read_text())
    assert result["metadata"]["world_size"] == 2
    assert_same_scores(result, json.loads(reference.read_text()))  # rows_used of the adaptive walk included


@needs_accelerate
def test_accelerate_launch_of_one_cpu_process_for_two_is_refused(inputs, tmp_path):
    launcher = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    done = launch(launcher, *attribute_args(inputs, tmp_path / "out.json"), cwd=tmp_path, expect=1)
    assert "guda attribute: error: accelerate launch started 1 process although several were asked" in done.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_torchrun_trains_the_logo_models_of_one_process(inputs, tmp_path):
    args = ["logo", "--data", inputs["data"], "--recipe", inputs["recipe"], "--steps", LOGO_STEPS, "--threads", 1, "--quiet"]
    in_process(*args, "--out", tmp_path / "one", "--groups", "left", "right")
    done = launch(torchrun(), *args, "--out", tmp_path / "two", cwd=tmp_path)
    assert done.stdout.count("3 leave-one-group-out models") == 1
    for slug in ("left", "right"):
        one, two = tmp_path / "one" / "seed_0" / slug, tmp_path / "two" / "seed_0" / slug
        weights = "unet/diffusion_pytorch_model.safetensors"
        assert_bit_identical(load_file(two / weights), load_file(one / weights), f"LOGO model {slug}")
        assert drop_timing(json.loads((two / TRAIN_LOG_NAME).read_text())) == drop_timing(json.loads((one / TRAIN_LOG_NAME).read_text()))
