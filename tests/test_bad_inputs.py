"""Bad inputs: every one gives exit code 2 and one line naming the problem, and leaves existing outputs alone.

The command-line cases are a table: each builds its bad input under ``tmp_path`` (beside an existing
output that must survive) and names the words its one-line error must contain. A few cases that
only the Python API can express follow the table.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_guda import GroupedDataset, GUDADDPMPipeline
from diffusers_guda.bundle import MANIFEST_NAME, AdapterBundle
from diffusers_guda.errors import DataError, ScoringError
from guda_lab import training_config
from guda_lab.evaluation.logo import train_logo_models
from diffusers_guda.recipes import Recipe
from diffusers_guda.testing import tiny_stable_diffusion

from conftest import TINY_RECIPE, make_tiny_dataset, write_group_folder
from test_cli import assert_one_line_error, run, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

PREVIOUS = b'{"previous": true}\n'
ADAPTER = Path("adapters") / "middle" / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A recipe, a grouped image folder, query images, and the base + bundle made from them by the CLI."""
    root = tmp_path_factory.mktemp("bad-inputs")
    recipe = root / "tiny-recipe.json"
    recipe.write_text(json.dumps(TINY_RECIPE))
    data = write_group_folder(root / "data", ["left", "middle", "right"])
    queries = root / "queries"
    queries.mkdir()
    shutil.copy(data / "left" / "0.png", queries / "q0.png")
    base, bundle = root / "base", root / "bundle"
    code, _, err = run("train", "--data", data, "--out", base, "--recipe", recipe, "--steps", 10, "--quiet")
    assert code == 0, err
    code, _, err = run("unlearn", "--base", base, "--data", data, "--out", bundle, "--recipe", recipe, "--steps", 2, "--quiet")
    assert code == 0, err
    tiny_stable_diffusion().save_pretrained(root / "sd-base")  # a latent, text-conditioned base
    return dict(root=root, recipe=recipe, data=data, queries=queries, base=base, bundle=bundle, sd_base=root / "sd-base")


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory (``None``) under ``path``."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


# -- builders of bad inputs -----------------------------------------------------------------------


def previous_dir(path: Path) -> Path:
    """An existing output directory that a failed command must leave as it is."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "previous.txt").write_bytes(PREVIOUS)
    return path


def previous_file(path: Path) -> Path:
    """An existing output file that a failed command must leave as it is."""
    path.write_bytes(PREVIOUS)
    return path


def png(path: Path, size: int = 8, mode: str = "L") -> Path:
    """A small valid image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color=128 if mode == "L" else (128, 0, 0)).save(path)
    return path


def data_folder(tmp: Path, edit: Callable[[Path], object] = lambda root: None, groups=("a", "b")) -> Path:
    """A grouped image folder under ``tmp`` after ``edit(root)``."""
    root = write_group_folder(tmp / "data", list(groups))
    edit(root)
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def out_args(ws, tmp, *extra, data=None, recipe=None) -> list:
    """Data, recipe and an existing --out directory: the arguments of train, logo and evaluate."""
    return ["--data", data or ws["data"], "--out", previous_dir(tmp / "out"), "--recipe", recipe or ws["recipe"], *extra]


def train_args(ws, tmp, *extra, data=None, recipe=None) -> list:
    return out_args(ws, tmp, "--steps", 2, *extra, data=data, recipe=recipe)


def unlearn_args(ws, tmp, *extra, data=None, base=None) -> list:
    # --out is the workspace's finished bundle: a failed run must not touch it (the workspace is compared too).
    return [
        "--base", base or ws["base"], "--data", data or ws["data"], "--out", ws["bundle"], "--recipe", ws["recipe"], "--steps", 1, *extra,
    ]


def attribute_args(ws, tmp, *extra, base=None, bundle=None, images=None) -> list:
    return [
        "--base", base or ws["base"], "--bundle", bundle or ws["bundle"], "--images", *(images or [ws["queries"]]),
        "--out", previous_file(tmp / "result.json"), "--plot", tmp / "plot.png", *extra,
    ]


def captioned_folder(tmp: Path, size: int = 16, corrupt: int | None = None) -> Path:
    """A metadata.jsonl folder of 8 RGB images in two groups; image ``corrupt`` (if given) cut in half."""
    root = tmp / "captioned"
    root.mkdir()
    rows = []
    for i in range(8):
        Image.new("RGB", (size, size), color=(30 * i, 0, 0)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a photo", "group": "ab"[i % 2]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if corrupt is not None:
        truncate(root / f"{corrupt}.png")
    return root


def datasets_folder(tmp: Path) -> Path:
    """A ``datasets`` ``save_to_disk`` folder whose group column is called ``label``."""
    from datasets import Dataset

    images = [Image.new("RGB", (16, 16), color=(30 * i, 0, 0)) for i in range(8)]
    Dataset.from_dict({"image": images, "label": ["a", "b"] * 4, "text": ["a photo"] * 8}).save_to_disk(str(tmp / "hf"))
    return tmp / "hf"


def sd_unlearn_args(ws, tmp, data: Path, *extra) -> list:
    """``guda unlearn`` of the tiny Stable Diffusion base, its latent cache under ``tmp`` (which must stay unwritten)."""
    return ["--base", ws["sd_base"], "--data", data, "--out", ws["bundle"], "--steps", 1, "--latent-cache", tmp / "cache", *extra]


def recipe_file(tmp: Path, content) -> Path:
    """A recipe JSON file holding ``content`` (a string is written as is)."""
    path = tmp / "recipe.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def with_train(**values) -> dict:
    return {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], **values}}


def bundle_copy(ws, tmp, manifest: Callable[[dict], object] | None = None, adapter: Callable[[Path], object] | None = None) -> Path:
    """A copy of the workspace bundle with its manifest and/or the 'middle' adapter file edited."""
    bundle = tmp / "bundle"
    shutil.copytree(ws["bundle"], bundle)
    if manifest is not None:
        data = json.loads((bundle / MANIFEST_NAME).read_text())
        manifest(data)
        (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    if adapter is not None:
        adapter(bundle / ADAPTER)
    return bundle


def edit_tensors(edit: Callable[[str, torch.Tensor], tuple[str, torch.Tensor]]) -> Callable[[Path], None]:
    """Rewrite an adapter file's tensors with ``edit(key, tensor) -> (key, tensor)``, keeping its metadata."""

    def apply(path: Path) -> None:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = dict(edit(key, tensor) for key, tensor in load_file(str(path)).items())
        save_file(tensors, str(path), metadata=metadata)

    return apply


def nan_lora_b(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    return key, torch.full_like(tensor, float("nan")) if "lora_B" in key else tensor


def integer_weights(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    return key, tensor.round().to(torch.int32)


def wider_inputs(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """lora_A of a UNet whose layers take twice as many channels."""
    if "lora_A" in key:
        tensor = torch.zeros(tensor.shape[0], 2 * tensor.shape[1], *tensor.shape[2:])
    return key, tensor


def renamed_layers(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Keys of a UNet whose middle block has another name."""
    return key.replace("mid_block", "extra_block"), tensor


class Tripwire:
    """Unpickling this creates the directory ``marker``: proof that the file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def pickled(tmp: Path) -> Callable[[Path], None]:
    """Replace an adapter file with a torch.save pickle that trips a wire when loaded."""
    return lambda path: torch.save({"unet.x.lora_A.weight": torch.zeros(1), "payload": Tripwire(tmp / "unpickled")}, path)


def pickle_beside(tmp: Path) -> Callable[[Path], None]:
    """Put a pickle-based ``.bin`` adapter next to the real one."""
    return lambda path: pickled(tmp)(path.with_suffix(".bin"))


def other_base(ws, tmp) -> Path:
    """A base pipeline with the same architecture and other weights (another seed)."""
    base = tmp / "other-base"
    code, _, err = run("train", "--data", ws["data"], "--out", base, "--recipe", ws["recipe"], "--steps", 2, "--seed", 1, "--quiet")
    assert code == 0, err
    return base


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input to one command.

    Attributes:
        id: Test id.
        command: The ``guda`` command.
        build: ``(workspace, tmp_path) -> arguments after the command``; writes the bad input under ``tmp_path``.
        needles: Substrings the one-line error must contain (the problem, and the fix where there is one).
    """

    id: str
    command: str
    build: Callable[[dict, Path], list]
    needles: tuple[str, ...]


CASES = [
    # -- training data: a folder with one subfolder per group
    Case("data-one-group", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, groups=["only"])),
         ("at least 2", "one subfolder per group")),
    Case("data-one-group-unlearn", "unlearn",
         lambda ws, t: unlearn_args(ws, t, data=data_folder(t, groups=["only"])),
         ("at least 2",)),
    Case("data-empty-group", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: (r / "c").mkdir())),
         ("'c'", "no images", "remove the folder")),
    Case("data-mixed-sizes", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: png(r / "a" / "big.png", size=9))),
         ("different sizes", "big.png", "Resize")),
    Case("data-grayscale-and-rgb", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: png(r / "b" / "rgb.png", mode="RGB"))),
         ("mixes grayscale and colour", "--mode")),
    Case("data-non-image-file", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: (r / "a" / "notes.txt").write_text("x"))),
         ("notes.txt", "is not an image", "Remove it")),
    Case("data-truncated-png", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: truncate(r / "a" / "3.png"))),
         ("Cannot read image", "3.png", "Remove or replace")),
    Case("data-garbage-png", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: (r / "b" / "5.png").write_bytes(b"no png"))),
         ("Cannot read image", "5.png")),
    Case("data-missing", "train",
         lambda ws, t: train_args(ws, t, data=t / "no-data"),
         ("no-data", "does not exist")),
    Case("data-is-a-file", "train",
         lambda ws, t: train_args(ws, t, data=png(t / "one.png")),
         ("one.png", "not a directory")),
    Case("data-stray-top-level-file", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: png(r / "stray.png"))),
         ("stray.png", "outside group subfolders", "subfolder named after its group")),
    Case("data-does-not-fit-base", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--mode", "RGB"),
         ("(3, 8, 8)", "do not fit this model", "1 channel")),
    # -- train flags and outputs
    Case("train-negative-lr", "train",
         lambda ws, t: train_args(ws, t, "--lr", -1),
         ("learning_rate must be > 0",)),
    Case("train-out-is-a-file", "train",
         lambda ws, t: [*train_args(ws, t), "--out", previous_file(t / "base.txt")],  # the last --out counts
         ("base.txt", "existing file", "choose another path")),
    Case("train-unknown-device", "train",
         lambda ws, t: train_args(ws, t, "--device", "gpu"),
         ("--device 'gpu'", "not a torch device", "cuda")),
    Case("negative-threads", "train",
         lambda ws, t: train_args(ws, t, "--threads", -1),
         ("--threads must be >= 1",)),
    # -- unlearn settings and the base pipeline
    Case("unknown-objective", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--objective", "nope"),
         ("'nope'", "retrack", "gradient_ascent")),
    Case("unknown-objective-option", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--option", "num_neighbours_typo=3"),
         ("num_neighbours_typo", "num_neighbors")),
    Case("objective-option-wrong-type", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--option", "num_neighbors=abc"),
         ("num_neighbors must be an integer", "'abc'")),
    Case("objective-option-without-value", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--option", "num_neighbors"),
         ("KEY=VALUE",)),
    Case("unlearn-unknown-group", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--groups", "left", "nope"),
         ("'nope'", "'middle'")),
    Case("unlearn-rank-zero", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--rank", 0),
         ("rank must be >= 1",)),
    Case("unlearn-batch-size-zero", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--batch-size", 0),
         ("batch sizes must be >= 1",)),
    Case("unlearn-lr-zero", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--lr", 0),
         ("learning_rate must be > 0",)),
    Case("missing-base-unlearn", "unlearn",
         lambda ws, t: unlearn_args(ws, t, base=t / "no-base"),
         ("no-base", "guda train")),
    Case("base-is-a-bundle", "unlearn",
         lambda ws, t: unlearn_args(ws, t, base=ws["bundle"]),
         ("Cannot load the base pipeline", "guda train")),
    # -- large datasets and latent pipelines
    Case("dataset-column-missing", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, datasets_folder(t)),
         ("no column 'group'", "'label'", "--group-column")),
    Case("dataset-caption-column-missing", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, datasets_folder(t), "--group-column", "label", "--caption-column", "caption"),
         ("no column 'caption'", "'text'", "--caption-column")),
    Case("corrupt-image-in-a-lazy-dataset", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, captioned_folder(t, corrupt=5)),
         ("5.png", "index 5", "Remove or replace")),
    Case("image-size-not-a-multiple-of-the-vae-factor", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, captioned_folder(t, size=15)),
         ("15x15", "downsamples by 2", "--resolution")),
    Case("resolution-below-the-vae-factor", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, captioned_folder(t), "--resolution", 1),
         ("1x1", "downsamples by 2", "multiple of 2")),
    # -- attribute: the base and the bundle
    Case("bundle-for-another-family", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["base_model"].update(
             family="stable-diffusion-xl", pipeline_class="StableDiffusionXLPipeline"))),
         ("made for a stable-diffusion-xl pipeline", "GUDAStableDiffusionXLPipeline")),
    Case("missing-base-attribute", "attribute",
         lambda ws, t: attribute_args(ws, t, base=t / "no-base"),
         ("no-base", "guda train")),
    Case("bundle-for-another-base", "attribute",
         lambda ws, t: attribute_args(ws, t, base=other_base(ws, t)),
         ("fingerprint", "base model", "re-run unlearning")),
    Case("bundle-is-the-base", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=ws["base"]),
         ("not a GUDA adapter bundle",)),
    Case("adapter-truncated", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, adapter=truncate)),
         ("corrupted", "middle", "guda unlearn")),
    Case("adapter-is-a-pickle", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, adapter=pickled(t))),
         ("corrupted or not a safetensors file", "middle")),
    Case("pickle-beside-adapter", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, adapter=pickle_beside(t))),
         ("Refusing", "pytorch_lora_weights.bin", "pickle")),
    Case("manifest-newer-format", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m.update(format_version=2))),
         ("newer diffusers-guda", "upgrade")),
    Case("manifest-missing-field", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m.pop("lora"))),
         ("'lora'", "JSON dict")),
    Case("manifest-wrong-type", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["groups"][1].update(num_images="8"))),
         ("malformed group", "num_images")),
    Case("adapter-shapes-of-another-architecture", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, adapter=edit_tensors(wider_inputs))),
         ("'guda_middle' does not fit", "(2, 32, 3, 3)", "(2, 16, 3, 3)", "guda unlearn")),
    Case("adapter-layers-of-another-architecture", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, adapter=edit_tensors(renamed_layers))),
         ("'guda_middle' does not fit", "extra_block", "names no layer")),
    Case("adapter-nan-weights", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, adapter=edit_tensors(nan_lora_b))),
         ("middle", "NaN or infinite", "guda unlearn")),
    Case("adapter-integer-weights", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, adapter=edit_tensors(integer_weights))),
         ("middle", "torch.int32", "not floating point")),
    Case("manifest-elbo-wrong-type", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["elbo"].update(stride="ten"))),
         ("malformed ELBO settings", "re-run `guda unlearn`")),
    Case("manifest-elbo-unknown-field", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["elbo"].update(strides=5))),
         ("malformed ELBO settings", "strides")),
    # -- attribute: the queries and the outputs
    Case("query-wrong-size", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[png(t / "big.png", size=9)]),
         ("(1, 9, 9)", "8x8")),
    Case("query-wrong-channels", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[png(t / "rgb.png", mode="RGB")]),
         ("(3, 8, 8)", "1 channel")),
    Case("query-missing", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[t / "nothing"]),
         ("nothing", "does not exist")),
    Case("query-not-an-image", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[previous_file(t / "notes.txt")]),
         ("Cannot read query image", "notes.txt")),
    Case("query-corrupt-png", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[previous_file(t / "bad.png")]),
         ("Cannot read query image", "bad.png")),
    Case("query-folder-without-images", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[previous_dir(t / "empty")]),
         ("No images found",)),
    Case("result-path-is-a-directory", "attribute",
         lambda ws, t: [*attribute_args(ws, t), "--out", previous_dir(t / "results")],
         ("--out", "is a directory", "file path")),
    Case("plot-format-unknown", "attribute",
         lambda ws, t: [*attribute_args(ws, t), "--plot", t / "plot.xyz"],
         ("unsupported image format .xyz", ".png")),
    Case("stride-zero", "attribute",
         lambda ws, t: attribute_args(ws, t, "--stride", 0),
         ("stride must be >= 1",)),
    Case("draws-zero", "attribute",
         lambda ws, t: attribute_args(ws, t, "--draws", 0),
         ("num_draws", ">= 1")),
    Case("top-k-zero", "attribute",
         lambda ws, t: attribute_args(ws, t, "--top-k", 0),
         ("--top-k must be >= 1",)),
    # -- recipes
    Case("unknown-recipe", "train",
         lambda ws, t: train_args(ws, t, recipe="no-such-recipe"),
         ("no-such-recipe", "digits-ddpm")),
    Case("recipe-malformed-json", "train",
         lambda ws, t: train_args(ws, t, recipe=recipe_file(t, '{"train": {')),
         ("recipe.json", "is invalid", "line 1")),
    Case("recipe-not-an-object", "train",
         lambda ws, t: train_args(ws, t, recipe=recipe_file(t, [TINY_RECIPE])),
         ("must hold a JSON object",)),
    Case("recipe-unknown-field", "train",
         lambda ws, t: train_args(ws, t, recipe=recipe_file(t, with_train(stepz=3))),
         ("'train' has unknown field(s) ['stepz']", "steps")),
    Case("recipe-unknown-section", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", recipe_file(t, {**TINY_RECIPE, "unlearnig": {}})],
         ("unknown field(s) ['unlearnig']", "unlearning")),
    Case("recipe-section-not-an-object", "train",
         lambda ws, t: train_args(ws, t, recipe=recipe_file(t, {**TINY_RECIPE, "elbo": [10]})),
         ("'elbo' must be a JSON object",)),
    # -- evaluate and logo (an unknown method or benchmark: tests/evaluation/test_runner.py and tests/test_cli.py)
    Case("evaluate-seed-b-equals-seed", "evaluate",
         lambda ws, t: [*out_args(ws, t), "--seed-b", TINY_RECIPE["train"]["seed"]],
         ("seed B must differ", "training seeds")),
    Case("evaluate-zero-queries", "evaluate",
         lambda ws, t: [*out_args(ws, t), "--queries", 0],
         ("--queries must be >= 1",)),
    Case("logo-unknown-group", "logo",
         lambda ws, t: [*out_args(ws, t), "--groups", "nope"],
         ("'nope'", "'left'")),
    Case("logo-zero-steps", "logo",
         lambda ws, t: [*out_args(ws, t), "--steps", 0],
         ("steps", "must be >= 1")),
    # -- images: one reader for training data and queries
    # -- provenance, concurrent runs and the Hub
    # -- further cases
]


def test_the_table_has_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 22


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, workspace, tmp_path):
    args = case.build(workspace, tmp_path)
    before = tree(tmp_path), tree(workspace["root"])
    code, out, err = run(case.command, *args, "--quiet")
    line = assert_one_line_error(code, out, err, case.command)
    for needle in case.needles:
        assert needle in line, needle
    # nothing written, replaced, left half-done or unpickled: neither beside the inputs nor in the workspace
    assert (tree(tmp_path), tree(workspace["root"])) == before


def test_diverging_unlearning_keeps_finished_groups(workspace):
    before = snapshot(workspace["bundle"])
    code, out, err = run(
        "unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", workspace["bundle"],
        "--recipe", workspace["recipe"], "--lr", "1e6", "--quiet",
    )
    partial = workspace["root"] / ".bundle-partial"
    try:
        line = assert_one_line_error(code, out, err, "unlearn")
        assert "'left'" in line and "--lr" in line
        assert snapshot(workspace["bundle"]) == before
        assert (partial / "run.json").is_file()  # kept, so that a rerun with the same settings resumes
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# -- the Python API -------------------------------------------------------------------------------


def test_group_names_equal_as_strings_are_duplicates():
    with pytest.raises(DataError) as info:
        GroupedDataset.from_arrays(np.zeros((4, 8, 8), dtype=np.uint8), [0, 0, 1, 1], [1, "1"])
    assert "distinct" in str(info.value) and "'1'" in str(info.value)


def test_hostile_group_names_stay_inside_every_output_directory(workspace, tmp_path):
    """Names with '/' and '..' are slugified (bundle.slugify) for checkpoints, bundles and LOGO models alike."""
    tiny = make_tiny_dataset()
    names = ["../escape", "a/b", ".."]
    dataset = GroupedDataset(tiny.images, tiny.group_ids, names)
    recipe = Recipe.load(workspace["recipe"])
    out = tmp_path / "run" / "inner"

    pipe = GUDADDPMPipeline.from_pretrained(workspace["base"])
    bundle = pipe.unlearn_groups(dataset, config=replace(recipe.unlearning, steps=1), checkpoint_dir=out / "checkpoint", progress=False)
    bundle.save_pretrained(out / "bundle")
    train_logo_models(dataset, replace(training_config(recipe, "logo"), steps=1), out / "logo", progress=False, log=lambda *a: None)

    allowed = {out / "checkpoint", out / "bundle", out / "logo"}
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not allowed.intersection(p.parents)]
    assert not outside, outside
    assert bundle.slugs == ["escape", "a-b", "group"]
    for slug in bundle.slugs:
        assert (out / "checkpoint" / slug).is_dir() and (out / "logo" / "seed_0" / slug).is_dir(), slug
    assert AdapterBundle.from_pretrained(out / "bundle").group_names == names


def test_a_result_written_onto_a_full_disk_leaves_the_previous_one(workspace, tmp_path, monkeypatch):
    out = tmp_path / "result.json"
    args = ["attribute", "--base", workspace["base"], "--bundle", workspace["bundle"], "--images", workspace["queries"], "--out", out]
    code, _, err = run(*args, "--quiet")
    assert code == 0, err
    previous = out.read_bytes()
    real = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst) == str(out):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    code, out_text, err = run(*args, "--stride", 20, "--quiet")
    line = assert_one_line_error(code, out_text, err, "attribute")
    assert "No space left on device" in line and "unchanged" in line
    assert out.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_an_empty_batch_is_refused(workspace):
    pipe = GUDADDPMPipeline.from_pretrained(workspace["base"])
    pipe.load_guda_bundle(workspace["bundle"])
    with pytest.raises(DataError, match="No query images"):
        pipe.attribute(torch.zeros(0, 1, 8, 8), progress=False)


def test_scores_that_are_not_finite_name_the_group(workspace):
    bundle = AdapterBundle.from_pretrained(workspace["bundle"])
    for key, tensor in bundle.adapters["middle"].items():
        if "lora_B" in key:
            tensor.fill_(1e38)  # finite weights whose outputs overflow
    pipe = GUDADDPMPipeline.from_pretrained(workspace["base"])
    pipe.load_guda_bundle(bundle)
    with pytest.raises(ScoringError, match=r"group\(s\) \['middle'\] are not finite"):
        pipe.attribute(make_tiny_dataset().images[:1], progress=False)
