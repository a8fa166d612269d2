"""The ``guda`` command line on text-conditioned bases: a tiny Stable Diffusion, captioned data, query prompts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_guda.bundle import AdapterBundle
from diffusers_guda import GroupedDataset, GUDAError, default_recipe
from diffusers_guda.cli.arguments import image_mode
from diffusers_guda.pipelines import pipeline_class_for
from diffusers_guda.elbo import ELBOConfig
from diffusers_guda.pipelines import GUDAStableDiffusionPipeline
from diffusers_guda.recipes import Recipe

from conftest import write_group_folder
from test_cli import REPO, assert_one_line_error, run

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

COLOURS = {"red": (235, 10, 10), "blue": (10, 10, 235)}
PROMPT = "a square in red style"


def write_captioned_folder(root: Path, per_group: int = 3) -> Path:
    """``root/<group>-<i>.png`` (16x16 RGB squares and stripes in the group's colour) + metadata.jsonl + groups.json."""
    root.mkdir(parents=True)
    rows = []
    for group, colour in COLOURS.items():
        for i in range(per_group):
            array = np.zeros((16, 16, 3), np.uint8)
            shape = "square" if i % 2 == 0 else "stripe"
            if shape == "square":
                array[4:12, 4:12] = colour
            else:
                array[:, 6:10] = colour
            Image.fromarray(array).save(root / f"{group}-{i}.png")
            rows.append({"file_name": f"{group}-{i}.png", "text": f"a {shape} in {group} style", "group": group})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "groups.json").write_text(json.dumps({"red": ["red"], "blue": ["blue"]}))
    return root


def write_jsonl(path: Path, prompts: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"file_name": name, "text": text}) + "\n" for name, text in prompts.items()))
    return path


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory (``None``) under ``path``."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sd_dir):
    """A captioned dataset, two query images, and the bundle `guda unlearn` makes for the tiny Stable Diffusion."""
    root = tmp_path_factory.mktemp("cli-text")
    data = write_captioned_folder(root / "data")
    queries = root / "queries"
    queries.mkdir()
    for name, source in (("q0_red.png", "red-0.png"), ("q1_blue.png", "blue-1.png")):
        shutil.copy(data / source, queries / name)
    bundle = root / "bundle"
    unlearn = run("unlearn", "--base", tiny_sd_dir, "--data", data, "--out", bundle, "--steps", 2, "--batch-size", 2, "--rank", 2, "--quiet")
    return dict(root=root, base=tiny_sd_dir, data=data, queries=queries, bundle=bundle, unlearn=unlearn)


def api_scores(ws, files: list[Path], prompts) -> torch.Tensor:
    """The scores of the Python API on the same base, bundle, images and prompts."""
    pipe = GUDAStableDiffusionPipeline.from_pretrained(ws["base"])
    pipe.load_guda_bundle(ws["bundle"])
    images = [Image.open(f).convert("RGB") for f in files]
    return pipe.attribute(images, prompts=prompts, progress=False).scores


# -- unlearn --------------------------------------------------------------------------------------


def test_unlearn_uses_the_sd_recipe_and_writes_a_loadable_bundle(workspace):
    code, out, err = workspace["unlearn"]
    assert code == 0, err
    recipe = Recipe.load("sd-styles")
    bundle = AdapterBundle.from_pretrained(workspace["bundle"])
    assert bundle.group_names == ["blue", "red"]
    assert bundle.objective["name"] == "anchor"  # the sd-styles recipe, chosen for a Stable Diffusion base
    assert bundle.lora["rank"] == 2 and bundle.training["steps"] == 2  # flags override it
    assert set(bundle.lora["target_modules"]) <= set(recipe.unlearning.lora.target_modules)
    assert bundle.elbo == recipe.elbo.to_dict()
    assert bundle.base_model["conditional"] is True and bundle.base_model["dtype"] == "float32"
    assert all((workspace["bundle"] / g.adapter_file).is_file() for g in bundle.groups)
    assert "red: forget loss" in out and "saved the adapter bundle" in out


def test_the_python_api_makes_the_bundle_guda_unlearn_makes(workspace, tmp_path):
    """Same base, data and settings: tensor for tensor and field for field (times and versions aside) the same bundle."""
    from safetensors.torch import load_file

    pipe = GUDAStableDiffusionPipeline.from_pretrained(workspace["base"])
    dataset = GroupedDataset.from_metadata(workspace["data"], mode="RGB")
    pipe.unlearn_groups(dataset, steps=2, batch_size=2, lora_rank=2, progress=False).save_pretrained(tmp_path / "api")

    def manifest(path: Path) -> dict:
        data = json.loads((path / "guda_bundle.json").read_text())
        for key in ("software", "library_version"):
            data.pop(key)
        for group in data["groups"]:
            group["stats"].pop("wall_s")
        return data

    cli, api = manifest(workspace["bundle"]), manifest(tmp_path / "api")
    assert api == cli and api["elbo"] == Recipe.load("sd-styles").elbo.to_dict()
    for group in api["groups"]:
        cli_tensors, api_tensors = (load_file(root / group["adapter_file"]) for root in (workspace["bundle"], tmp_path / "api"))
        assert cli_tensors.keys() == api_tensors.keys()
        assert all(torch.equal(cli_tensors[k], api_tensors[k]) for k in cli_tensors), group["name"]
    assert not [p.name for p in workspace["root"].iterdir() if "partial" in p.name], "checkpoint left behind"

    pipe = GUDAStableDiffusionPipeline.from_pretrained(workspace["base"])
    assert pipe.load_guda_bundle(workspace["bundle"]).group_names == ["blue", "red"]


def _defaults(spec: str) -> tuple[str, str | None]:
    """The recipe and training-image mode the base ``spec`` gets."""
    pipeline_class = pipeline_class_for(spec)
    return default_recipe(pipeline_class).name, image_mode(pipeline_class)


@pytest.mark.parametrize(
    "class_name, recipe, mode",
    [
        ("StableDiffusionPipeline", "sd-styles", "RGB"),
        ("TextToImageDDPMPipeline", "digits-styles", None),
        ("DDPMPipeline", "digits-ddpm", None),
        ("DDIMPipeline", "digits-ddpm", None),
    ],
)
def test_the_default_recipe_follows_the_base_pipeline(tmp_path, class_name, recipe, mode):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    assert _defaults(str(tmp_path)) == (recipe, mode)


def test_a_directory_without_model_index_is_named_in_one_error(tmp_path):
    with pytest.raises(GUDAError, match="no model_index.json in it"):
        pipeline_class_for(tmp_path)


def test_a_hub_id_is_looked_up_in_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--someone--sd-styles" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "models--someone--sd-styles" / "refs").mkdir()
    (tmp_path / "models--someone--sd-styles" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # not cached: no download attempt
    assert _defaults("someone/sd-styles") == ("sd-styles", "RGB")
    with pytest.raises(GUDAError, match="'someone/not-cached': it is not in the local Hub cache and HF_HUB_OFFLINE=1 forbids"):
        pipeline_class_for("someone/not-cached")


# -- attribute ------------------------------------------------------------------------------------


def prompt_flags(ws, tmp: Path, source: str) -> tuple[list, list[Path], object]:
    """Arguments, query files and the API's ``prompts`` for each way of giving the prompts."""
    files = sorted(ws["queries"].glob("*.png"))
    per_file = {"q0_red.png": "a square in red style", "q1_blue.png": "a stripe in blue style"}
    if source == "prompt":
        return ["--images", ws["queries"], "--prompt", PROMPT], files, PROMPT
    if source == "metadata":  # a metadata.jsonl beside the images, with a row for an image not queried
        queries = tmp / "queries"
        shutil.copytree(ws["queries"], queries)
        write_jsonl(queries / "metadata.jsonl", {**per_file, "other.png": "a photo"})
        files = sorted(queries.glob("*.png"))
        return ["--images", queries], files, [per_file[f.name] for f in files]
    # --prompts FILE elsewhere: a row by file name, and one by path relative to the file's folder
    (tmp / "sub").mkdir()
    table = write_jsonl(tmp / "sub" / "prompts.jsonl", {"q0_red.png": per_file["q0_red.png"], "../queries/q1_blue.png": per_file["q1_blue.png"]})
    shutil.copytree(ws["queries"], tmp / "queries")
    files = sorted((tmp / "queries").glob("*.png"))
    return ["--images", tmp / "queries", "--prompts", table], files, [per_file[f.name] for f in files]


@pytest.mark.parametrize("source", ["prompt", "metadata", "prompts-file"])
def test_attribute_scores_equal_the_python_api(workspace, tmp_path, source):
    args, files, prompts = prompt_flags(workspace, tmp_path, source)
    result = tmp_path / "result.json"
    code, out, err = run("attribute", "--base", workspace["base"], "--bundle", workspace["bundle"], *args, "--out", result, "--quiet")
    assert code == 0, err
    data = json.loads(result.read_text())
    assert data["groups"] == ["blue", "red"]
    expected_prompts = [prompts] * len(files) if isinstance(prompts, str) else prompts
    assert data["metadata"]["prompts"] == expected_prompts
    assert [Path(f).name for f in data["metadata"]["files"]] == [f.name for f in files]
    np.testing.assert_array_equal(np.asarray(data["scores"], dtype=np.float32), api_scores(workspace, files, prompts).numpy())
    assert "q0_red.png" in out and "q1_blue.png" in out


def unlearn_red(ws, bundle: Path, *flags) -> AdapterBundle:
    """``guda unlearn`` of the group ``red`` alone, one small step, with extra ``flags``."""
    code, _, err = run("unlearn", "--base", ws["base"], "--data", ws["data"], "--out", bundle, *flags,
                       "--groups", "red", "--steps", 1, "--batch-size", 2, "--rank", 2, "--quiet")
    assert code == 0, err
    return AdapterBundle.from_pretrained(bundle)


def test_half_precision_base(workspace, tmp_path):
    bundle, result = tmp_path / "bundle-bf16", tmp_path / "result.json"
    made = unlearn_red(workspace, bundle, "--dtype", "bfloat16")
    assert made.base_model["dtype"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in made.adapters["red"].values())  # adapters train in float32
    code, _, err = run("attribute", "--base", workspace["base"], "--bundle", bundle, "--images", workspace["queries"], "--prompt", PROMPT,
                       "--dtype", "bfloat16", "--stride", 250, "--out", result, "--quiet")
    assert code == 0, err
    data = json.loads(result.read_text())
    assert data["metadata"]["strategy"] == "swap"  # half precision keeps the LoRA branch unmerged
    assert np.isfinite(data["scores"]).all()

    # a float32 base is another model than the bfloat16 one the bundle was made with
    code, out, err = run("attribute", "--base", workspace["base"], "--bundle", bundle, "--images", workspace["queries"], "--prompt", PROMPT,
                         "--quiet")
    line = assert_one_line_error(code, out, err, "attribute")
    assert "dtype bfloat16" in line and "same dtype" in line


def test_autocast_flags(workspace, tmp_path):
    result = tmp_path / "result.json"
    assert unlearn_red(workspace, tmp_path / "bundle-autocast", "--autocast", "bfloat16").training["autocast_dtype"] == "bfloat16"

    code, _, err = run("attribute", "--base", workspace["base"], "--bundle", workspace["bundle"], "--images", workspace["queries"],
                       "--prompt", PROMPT, "--autocast", "bfloat16", "--out", result, "--quiet")
    assert code == 0, err
    data = json.loads(result.read_text())
    assert data["metadata"]["strategy"] == "swap"  # under autocast W + ΔW would round ΔW away: not merged
    pipe = GUDAStableDiffusionPipeline.from_pretrained(workspace["base"])
    pipe.load_guda_bundle(workspace["bundle"])
    elbo = ELBOConfig(**{**pipe.guda_bundle.elbo, "autocast_dtype": "bfloat16"})
    files = sorted(workspace["queries"].glob("*.png"))
    expected = pipe.attribute([Image.open(f).convert("RGB") for f in files], prompts=PROMPT, elbo_config=elbo, progress=False).scores
    np.testing.assert_array_equal(np.asarray(data["scores"], dtype=np.float32), expected.numpy())


def test_help_names_the_text_options(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help text at hyphens ("sd-" / "styles")
    code, out, _ = run("attribute", "--help")
    assert code == 0 and "--prompt " in out and "--prompts" in out and "--dtype" in out and "--autocast" in out
    code, out, _ = run("unlearn", "--help")
    assert code == 0 and "--dtype" in out and "sd-styles" in out and "metadata.jsonl" in out


# -- errors: one line, nothing written ------------------------------------------------------------


def unsupported_dir(tmp: Path) -> Path:
    """A pipeline directory whose model_index.json names PixArt-Σ (no weights needed: refused before loading)."""
    path = tmp / "pixart"
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    return path


def odd_sized_query(tmp: Path) -> Path:
    path = tmp / "odd" / "odd.png"
    path.parent.mkdir()
    Image.new("RGB", (15, 15), (200, 0, 0)).save(path)
    return path


ERRORS = {
    "missing-prompt": (
        "attribute", lambda ws, t: ["--images", ws["queries"]],
        ("q0_red.png", "no prompt", "--prompt TEXT", "--prompts FILE.jsonl", "metadata.jsonl"),
    ),
    "prompt-missing-from-file": (
        "attribute", lambda ws, t: ["--images", ws["queries"], "--prompts", write_jsonl(t / "p.jsonl", {"q0_red.png": PROMPT})],
        ("q1_blue.png", "no row for it in", "--prompt TEXT"),
    ),
    "prompts-file-missing": (
        "attribute", lambda ws, t: ["--images", ws["queries"], "--prompts", t / "nope.jsonl"],
        ("nope.jsonl", "not a file"),
    ),
    "prompt-for-an-unconditional-base": (
        "attribute", lambda ws, t: ["--base", t / "ddpm", "--images", ws["queries"], "--prompt", PROMPT],
        ("unconditional", "drop --prompt/--prompts"),
    ),
    "unsupported-pipeline-attribute": (
        "attribute", lambda ws, t: ["--base", unsupported_dir(t), "--images", ws["queries"], "--prompt", PROMPT],
        ("PixArtSigmaPipeline", "does not support yet", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"),
    ),
    "query-size-the-vae-cannot-take": (
        "attribute", lambda ws, t: ["--images", odd_sized_query(t), "--prompt", PROMPT],
        ("15x15", "multiples of 2", "Resize"),
    ),
    "unsupported-pipeline-unlearn": (
        "unlearn", lambda ws, t: ["--base", unsupported_dir(t), "--data", ws["data"]],
        ("PixArtSigmaPipeline", "does not support yet"),
    ),
    "text-base-with-uncaptioned-data": (
        "unlearn", lambda ws, t: ["--data", write_group_folder(t / "folders", ["a", "b"])],
        ("text-conditioned", "no prompts", "metadata.jsonl"),
    ),
    "text-objective-for-an-unconditional-base": (
        "unlearn", lambda ws, t: ["--base", t / "ddpm", "--data", ws["data"], "--objective", "anchor"],
        ("anchor objective", "unconditional", "retrack"),
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_one_line_errors_leave_nothing_behind(case, workspace, tmp_path, stock_pipeline_dir):
    command, build, needles = ERRORS[case]
    shutil.move(stock_pipeline_dir, tmp_path / "ddpm")  # an unconditional DDPMPipeline directory
    args = build(workspace, tmp_path)
    if "--base" not in args:
        args = ["--base", workspace["base"], *args]
    out_dir = tmp_path / "out"
    args += ["--bundle", workspace["bundle"], "--out", out_dir / "result.json"] if command == "attribute" else ["--out", out_dir / "bundle"]
    out_dir.mkdir()
    before = tree(tmp_path), tree(workspace["root"])
    code, out, err = run(command, *args, "--quiet")
    line = assert_one_line_error(code, out, err, command)
    for needle in needles:
        assert needle in line, needle
    assert (tree(tmp_path), tree(workspace["root"])) == before


def test_missing_prompt_is_one_line_in_a_real_process(workspace, tmp_path):
    # importing Stable Diffusion makes transformers log a torchvision fallback notice; the CLI drops it
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "diffusers_guda.cli", "attribute", "--base", str(workspace["base"]), "--bundle", str(workspace["bundle"]),
         "--images", str(workspace["queries"]), "--out", str(tmp_path / "r.json"), "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    line = assert_one_line_error(done.returncode, done.stdout, done.stderr, "attribute")
    assert "no prompt" in line and not (tmp_path / "r.json").exists()
