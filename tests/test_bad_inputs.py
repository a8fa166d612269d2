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


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def out_args(ws, tmp, *extra, data=None, recipe=None) -> list:
    """Data, recipe and an existing --out directory: the arguments of train, logo and evaluate."""
    return ["--data", data or ws["data"], "--out", previous_dir(tmp / "out"), "--recipe", recipe or ws["recipe"], *extra]


def train_args(ws, tmp, *extra, data=None, recipe=None) -> list:
    """The arguments of train; its --out holds an earlier base model (model_index.json), which a run may replace."""
    args = out_args(ws, tmp, "--steps", 2, *extra, data=data, recipe=recipe)
    (tmp / "out" / "model_index.json").write_bytes(PREVIOUS)
    return args


def unlearn_args(ws, tmp, *extra, data=None, base=None) -> list:
    # --out is the workspace's finished bundle, which --overwrite lets a run replace: a failed run must not touch it
    # (the workspace is compared too).
    return [
        "--base", base or ws["base"], "--data", data or ws["data"], "--out", ws["bundle"], "--overwrite", "--recipe", ws["recipe"],
        "--steps", 1, *extra,
    ]


def attribute_args(ws, tmp, *extra, base=None, bundle=None, images=None) -> list:
    return [
        "--base", base or ws["base"], "--bundle", bundle or ws["bundle"], "--images", *(images or [ws["queries"]]),
        "--out", previous_file(tmp / "result.json"), "--plot", tmp / "plot.png", *extra,
    ]


def captioned_folder(tmp: Path, size: int = 16, edit: Callable[[Path], object] = lambda root: None) -> Path:
    """A metadata.jsonl folder of 8 RGB images ``0.png`` ... ``7.png`` in two groups, after ``edit(root)``."""
    root = tmp / "captioned"
    root.mkdir()
    rows = []
    for i in range(8):
        Image.new("RGB", (size, size), color=(30 * i, 0, 0)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a photo", "group": "ab"[i % 2]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    edit(root)
    return root


def animated(path: Path, frames: int = 2, mode: str = "L", size: int = 8) -> Path:
    """An image file of several frames (GIF, PNG or TIFF, by the suffix)."""
    Image.new(mode, (size, size)).save(path, save_all=True, append_images=[Image.new(mode, (size, size), 255)] * (frames - 1))
    return path


def declared_bomb(path: Path, side: int) -> Path:
    """A file whose header declares a ``side`` x ``side`` image (a PPM header, whatever the suffix)."""
    path.write_bytes(f"P5 {side} {side} 255\n".encode())
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def tiff(path: Path, array: np.ndarray | None = None) -> Path:
    """A TIFF of 32-bit floats (default) or of ``array``'s values."""
    (Image.new("F", (8, 8)) if array is None else Image.fromarray(array)).save(path)
    return path


def datasets_folder(tmp: Path) -> Path:
    """A ``datasets`` ``save_to_disk`` folder whose group column is called ``label``."""
    from datasets import Dataset

    images = [Image.new("RGB", (16, 16), color=(30 * i, 0, 0)) for i in range(8)]
    Dataset.from_dict({"image": images, "label": ["a", "b"] * 4, "text": ["a photo"] * 8}).save_to_disk(str(tmp / "hf"))
    return tmp / "hf"


def sd_unlearn_args(ws, tmp, data: Path, *extra) -> list:
    """``guda unlearn`` of the tiny Stable Diffusion base, its latent cache under ``tmp`` (which must stay unwritten)."""
    return ["--base", ws["sd_base"], "--data", data, "--out", ws["bundle"], "--overwrite", "--steps", 1, "--latent-cache", tmp / "cache", *extra]


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
         ("rank must be an integer >= 1", "got 0")),
    Case("unlearn-batch-size-zero", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--batch-size", 0),
         ("batch sizes must be >= 1",)),
    Case("unlearn-lr-zero", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--lr", 0),
         ("learning_rate must be > 0",)),
    Case("missing-base-unlearn", "unlearn",
         lambda ws, t: unlearn_args(ws, t, base=t / "no-base"),
         ("no-base", "guda train")),
    Case("base-is-a-bundle", "unlearn",  # another --out: the bundle's own path is refused as an --out equal to --base
         lambda ws, t: [*unlearn_args(ws, t, base=ws["bundle"]), "--out", t / "new-bundle"],
         ("Cannot load the base pipeline", "guda train")),
    # -- large datasets and latent pipelines
    Case("dataset-column-missing", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, datasets_folder(t)),
         ("no column 'group'", "'label'", "--group-column")),
    Case("dataset-caption-column-missing", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, datasets_folder(t), "--group-column", "label", "--caption-column", "caption"),
         ("no column 'caption'", "'text'", "--caption-column")),
    Case("corrupt-image-in-a-lazy-dataset", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, captioned_folder(t, edit=lambda root: truncate(root / "5.png"))),
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
    Case("data-animated-gif", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: animated(r / "a" / "anim.gif"))),
         ("anim.gif", "is animated or has several frames (2)", "save the one frame")),
    Case("data-decompression-bomb", "train",  # a header declaring 20000 x 20000 pixels: refused before decoding
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: declared_bomb(r / "b" / "bomb.png", 20000))),
         ("bomb.png", "400,000,000 pixels", "decompression bombs", "Resize the image", "GUDA_MAX_IMAGE_PIXELS=400000000")),
    Case("data-empty-file", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: empty_file(r / "a" / "empty.png"))),
         ("empty.png", "the file is empty (0 bytes)", "Remove or replace")),
    Case("data-float-tiff", "train",
         lambda ws, t: train_args(ws, t, data=data_folder(t, lambda r: tiff(r / "a" / "float.tif"))),
         ("float.tif", "32-bit floating-point", "8-bit")),
    Case("data-animated-png-in-a-lazy-dataset", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, captioned_folder(t, edit=lambda root: animated(root / "3.png", mode="RGB", size=16))),
         ("3.png", "index 3", "is animated")),
    Case("data-decompression-bomb-in-a-lazy-dataset", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, captioned_folder(t, edit=lambda root: declared_bomb(root / "2.png", 10000))),
         ("2.png", "index 2", "10000x10000 = 100,000,000 pixels", "GUDA_MAX_IMAGE_PIXELS")),
    Case("query-animated-gif", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[animated(t / "anim.gif")]),
         ("Query image", "anim.gif", "is animated", "save the one frame")),
    Case("query-multi-page-tiff", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[animated(t / "pages.tif", frames=3)]),
         ("Query image", "pages.tif", "several frames (3)")),
    Case("query-decompression-bomb", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[declared_bomb(t / "bomb.png", 10000)]),
         ("Cannot read query image", "bomb.png", "10000x10000", "Resize the image", "GUDA_MAX_IMAGE_PIXELS=100000000")),
    Case("query-empty-file", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[empty_file(t / "empty.png")]),
         ("Cannot read query image", "empty.png", "0 bytes")),
    Case("query-truncated-png", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[truncate(png(t / "cut.png", size=64))]),
         ("Cannot read query image", "cut.png", "truncated", "Remove or replace")),
    Case("query-float-tiff", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[tiff(t / "float.tif")]),
         ("Query image", "float.tif", "32-bit floating-point")),
    Case("query-integers-beyond-16-bit", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[tiff(t / "wide.tif", np.full((8, 8), 70000, np.int32))]),
         ("Query image", "wide.tif", "outside 0..65535", "8-bit or 16-bit")),
    # -- provenance, concurrent runs and the Hub
    # (builders below the table; in this module the Hub is offline with an empty cache, see hub_offline)
    Case("unlearn-out-locked-by-a-live-run", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--out", held_lock(previous_dir(t / "bundle"), "guda unlearn")],
         ("bundle is being written by another run", "`guda unlearn`", "bundle.lock", "Wait for it to finish")),
    Case("unlearn-out-locked-on-another-machine", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--out", foreign_lock(previous_dir(t / "bundle"))],
         ("pid 4242 on another-machine", "on another machine", "delete", "bundle.lock")),
    Case("attribute-out-locked-by-a-live-run", "attribute",
         lambda ws, t: [*attribute_args(ws, t), "--out", held_lock(previous_file(t / "result.json"), "guda attribute")],
         ("result.json is being written by another run", "`guda attribute`", "result.json.lock")),
    Case("attribute-plot-locked-by-a-live-run", "attribute",
         lambda ws, t: [*attribute_args(ws, t), "--plot", held_lock(previous_file(t / "bars.png"), "guda attribute")],
         ("bars.png is being written by another run", "bars.png.lock")),
    Case("train-out-locked-by-a-live-run", "train",
         lambda ws, t: [*train_args(ws, t), "--out", held_lock(previous_dir(t / "base"), "guda train")],
         ("base is being written by another run", "`guda train`", "base.lock")),
    Case("logo-model-locked-on-another-machine", "logo",  # a live run's model is waited for instead (tests/lab/evaluation/test_logo.py)
         lambda ws, t: [*out_args(ws, t), "--steps", 1, "--groups", "left", "--out", logo_model_locked_elsewhere(t / "logo", "left")],
         ("pid 4242 on another-machine", "on another machine", "delete", "left.lock")),
    Case("evaluate-out-locked-by-a-live-run", "evaluate",
         lambda ws, t: [*out_args(ws, t), "--out", held_lock(previous_dir(t / "eval"), "guda evaluate")],
         ("eval is being written by another run", "eval.lock")),
    Case("demo-out-locked-by-a-live-run", "demo",
         lambda ws, t: ["--out", held_lock(previous_dir(t / "demo"), "guda demo"), "--recipe", ws["recipe"]],
         ("demo is being written by another run", "demo.lock")),
    Case("bundle-on-the-hub-not-cached-offline", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle="guda-test/no-such-bundle"),
         ("'guda-test/no-such-bundle'", "not in the local Hub cache", "HF_HUB_OFFLINE=1", "hf download guda-test/no-such-bundle")),
    Case("bundle-revision-not-cached-offline", "attribute",
         lambda ws, t: attribute_args(ws, t, "--revision", "v9", bundle="guda-test/no-such-bundle"),
         ("at revision 'v9'", "hf download guda-test/no-such-bundle --revision v9")),
    Case("base-on-the-hub-not-cached-offline", "unlearn",
         lambda ws, t: unlearn_args(ws, t, base="guda-test/no-such-base"),
         ("base pipeline 'guda-test/no-such-base'", "not in the local Hub cache", "hf download guda-test/no-such-base")),
    Case("base-revision-not-cached-offline", "attribute",
         lambda ws, t: attribute_args(ws, t, "--base-revision", "v2", base="guda-test/no-such-base"),
         ("at revision 'v2'", "--revision v2")),
    Case("base-revision-for-a-local-directory", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--base-revision", "main"),
         ("--base-revision main", "local directory", "drop --base-revision")),
    Case("base-revision-for-a-local-directory-attribute", "attribute",
         lambda ws, t: attribute_args(ws, t, "--base-revision", "main"),
         ("--base-revision main", "local directory", "fingerprint")),
    Case("base-with-only-pickle-weights", "unlearn",
         lambda ws, t: unlearn_args(ws, t, base=pickle_only_base(ws, t)),
         ("only pickle-based weights", "unet/diffusion_pytorch_model.bin", "--allow-pickle-weights")),
    Case("base-with-only-pickle-weights-attribute", "attribute",
         lambda ws, t: attribute_args(ws, t, base=pickle_only_base(ws, t)),
         ("only pickle-based weights", "can run code", "--allow-pickle-weights")),
    # -- further cases
    Case("recipe-train-steps-text", "train",
         lambda ws, t: train_args(ws, t, recipe=recipe_file(t, with_train(steps="x"))),
         ("TrainConfig.steps must be an integer", "'x'")),
    Case("query-named-twice", "attribute",
         lambda ws, t: attribute_args(ws, t, images=[ws["queries"], ws["queries"] / "q0.png"]),
         ("q0.png", "is named twice", "name each image once")),
    # outputs that are, hold or lie inside an input: writing them would destroy it
    Case("unlearn-out-is-the-base", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--out", ws["base"]],
         ("--out", "is --base", "would overwrite", "outside the inputs")),
    Case("unlearn-out-is-the-data", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--out", ws["data"]],
         ("is --data", "outside the inputs")),
    Case("unlearn-out-holds-the-base", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--out", ws["root"]],
         ("holds --base", "outside the inputs")),
    Case("unlearn-out-inside-the-data", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--out", ws["data"] / "left" / "bundle"],
         ("lies inside --data", "outside the inputs")),
    Case("unlearn-out-is-a-finished-bundle", "unlearn",
         lambda ws, t: [a for a in unlearn_args(ws, t) if a != "--overwrite"],
         ("already holds an adapter bundle", "--overwrite", "another --out")),
    Case("unlearn-out-is-another-folder", "unlearn",  # replacing it would delete previous.txt
         lambda ws, t: [*unlearn_args(ws, t), "--out", previous_dir(t / "my-project")],
         ("my-project is a folder with other files", "no guda_bundle.json", "new or empty folder")),
    Case("train-out-is-another-folder", "train",
         lambda ws, t: [*train_args(ws, t), "--out", previous_dir(t / "my-project")],
         ("my-project is a folder with other files", "no model_index.json", "new or empty folder")),
    Case("train-out-is-the-data", "train",
         lambda ws, t: [*train_args(ws, t), "--out", ws["data"]],
         ("is --data", "outside the inputs")),
    Case("logo-out-is-the-data", "logo",
         lambda ws, t: [*out_args(ws, t), "--out", ws["data"]],
         ("is --data", "outside the inputs")),
    Case("evaluate-out-holds-the-data", "evaluate",
         lambda ws, t: [*out_args(ws, t), "--out", ws["root"]],
         ("holds --data", "outside the inputs")),
    Case("attribute-out-is-a-query", "attribute",
         lambda ws, t: [*attribute_args(ws, t), "--out", ws["queries"] / "q0.png"],
         ("--out", "is --images", "q0.png", "outside the inputs")),
    Case("attribute-out-inside-the-bundle", "attribute",
         lambda ws, t: [*attribute_args(ws, t), "--out", ws["bundle"] / "result.json"],
         ("lies inside --bundle", "outside the inputs")),
    Case("attribute-plot-is-the-out", "attribute",
         lambda ws, t: [*attribute_args(ws, t), "--out", t / "both.png", "--plot", t / "both.png"],
         ("--out and --plot both name", "different paths")),
    Case("plot-without-extension", "attribute",
         lambda ws, t: [*attribute_args(ws, t), "--plot", t / "chart"],
         ("no extension", ".png")),
    Case("latent-cache-is-a-file", "unlearn",
         lambda ws, t: [*sd_unlearn_args(ws, t, captioned_folder(t)), "--latent-cache", previous_file(t / "cache.bin")],
         ("--latent-cache", "is a file", "directory")),
    # flag values: usage errors are one line too, and no value that is not a number passes as one
    Case("strategy-unknown", "attribute",
         lambda ws, t: attribute_args(ws, t, "--strategy", "fastest"),
         ("invalid choice: 'fastest'", "'swap'", "guda attribute --help")),
    Case("elbo-seed-not-an-integer", "attribute",
         lambda ws, t: attribute_args(ws, t, "--elbo-seed", "x"),
         ("--elbo-seed", "invalid int value", "--help")),
    Case("adaptive-z-nan", "attribute",
         lambda ws, t: attribute_args(ws, t, "--adaptive-z", "nan"),
         ("--adaptive-z must be a finite number", "nan")),
    Case("adaptive-z-negative", "attribute",
         lambda ws, t: attribute_args(ws, t, "--adaptive-z", -2),
         ("--adaptive-z must be a finite number of standard errors > 0", "got -2.0")),
    Case("attribute-batch-size-zero", "attribute",
         lambda ws, t: attribute_args(ws, t, "--batch-size", 0),
         ("batch_size must be >= 1",)),
    Case("threads-zero", "attribute",
         lambda ws, t: attribute_args(ws, t, "--threads", 0),
         ("--threads must be >= 1, got 0",)),
    Case("unlearn-groups-twice", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--groups", "left", "middle", "left"),
         ("--groups names 'left' more than once",)),
    Case("logo-groups-twice", "logo",
         lambda ws, t: [*out_args(ws, t), "--groups", "left", "left"],
         ("--groups names 'left' more than once",)),
    Case("option-given-twice", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--option", "num_neighbors=2", "--option", "num_neighbors=3"),
         ("num_neighbors", "given twice", "keep one")),
    Case("unlearn-alpha-nan", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--alpha", "nan"),
         ("LoRA alpha must be a finite number",)),
    Case("unlearn-lr-infinite", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--lr", "inf"),
         ("learning_rate must be > 0 and finite", "inf")),
    Case("train-lr-infinite", "train",
         lambda ws, t: train_args(ws, t, "--lr", "inf"),
         ("--lr must be a finite number > 0", "inf")),
    Case("unlearn-size-exponent-infinite", "unlearn",
         lambda ws, t: unlearn_args(ws, t, "--size-exponent", "inf"),
         ("size_exponent must be a finite number",)),
    Case("resolution-zero", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, captioned_folder(t), "--resolution", 0),
         ("--resolution must be >= 1",)),
    Case("evaluate-gradient-option-unreadable", "evaluate",
         lambda ws, t: [*out_args(ws, t), "--gradient-option", "timesteps=abc"],
         ("--gradient-option", "'a'")),
    # recipes: each field of the right JSON type
    Case("recipe-lora-not-an-object", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "unlearning", lora=[8])],
         ("lora must be a JSON object",)),
    Case("recipe-lora-rank-text", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "unlearning", lora={"rank": "two"})],
         ("LoRA rank must be an integer", "'two'")),
    Case("recipe-objective-options-not-an-object", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "unlearning", objective_options=[3])],
         ("objective_options must be a JSON object",)),
    Case("recipe-max-grad-norm-negative", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "unlearning", max_grad_norm=-1)],
         ("max_grad_norm must be a finite number > 0", "null")),
    Case("recipe-eval-images-zero", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "unlearning", eval_images=0)],
         ("eval_images and eval_draws must be >= 1",)),
    Case("recipe-gradient-checkpointing-text", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "unlearning", gradient_checkpointing="yes")],
         ("gradient_checkpointing must be true or false", "'yes'")),
    Case("recipe-steps-fractional", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "unlearning", steps=2.5)],
         ("UnlearningConfig.steps must be an integer", "2.5")),
    Case("recipe-learning-rate-text", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "unlearning", learning_rate="1e-3")],
         ("UnlearningConfig.learning_rate must be a number", "'1e-3'")),
    Case("recipe-elbo-stride-text", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "elbo", stride="10")],
         ("ELBOConfig.stride must be an integer", "'10'")),
    Case("recipe-elbo-t-min-above-t-max", "unlearn",
         lambda ws, t: [*unlearn_args(ws, t), "--recipe", section_recipe(t, "elbo", t_min=50, t_max=20)],
         ("t_min must be below t_max", "t_min=50")),
    Case("recipe-name-not-a-string", "train",
         lambda ws, t: train_args(ws, t, recipe=recipe_file(t, {**TINY_RECIPE, "name": 5})),
         ("'name' must be a string",)),
    # bundles: the manifest and its adapters agree, every recorded setting well-typed
    Case("manifest-drops-a-group", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["groups"].pop())),
         ("adapters/right/pytorch_lora_weights.safetensors", "gives to no group", "Re-save")),
    Case("manifest-group-named-twice", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["groups"][1].update(name="left"))),
         ("group names must be unique", "'left', 'left'")),
    Case("manifest-adapter-path-escapes", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["groups"][1].update(
             adapter_file="adapters/../../bundle/adapters/middle/pytorch_lora_weights.safetensors"))),
         ("not a .safetensors file inside the bundle", "Refusing")),
    Case("manifest-lora-rank-text", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["lora"].update(rank="two"))),
         ("malformed LoRA settings", "LoRA rank must be an integer", "guda unlearn")),
    Case("manifest-lora-unknown-field", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["lora"].update(ranq=2))),
         ("malformed LoRA settings", "'ranq'")),
    Case("manifest-objective-config-not-an-object", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["objective"].update(config=[1]))),
         ("objective.config that is not an object",)),
    Case("manifest-elbo-fractional-stride", "attribute",
         lambda ws, t: attribute_args(ws, t, bundle=bundle_copy(ws, t, lambda m: m["elbo"].update(stride=2.5))),
         ("malformed ELBO settings", "stride must be an integer")),
    # captioned and datasets training data
    Case("dataset-split-it-does-not-have", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, datasets_folder(t), "--group-column", "label", "--split", "test"),
         ("no split 'test'", "without splits", "--split")),
    Case("metadata-group-missing", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, edit_metadata(captioned_folder(t), 3, group=None)),
         ("metadata.jsonl line 4", "group")),
    Case("metadata-caption-not-text", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, edit_metadata(captioned_folder(t), 2, text=5)),
         ("metadata.jsonl line 3", "text")),
    Case("groups-json-names-an-unknown-group", "unlearn",
         lambda ws, t: sd_unlearn_args(ws, t, with_groups_json(captioned_folder(t), {"a": ["red"], "c": ["blue"]})),
         ("groups.json", "['c']", "fix or remove")),
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
        "unlearn", "--base", workspace["base"], "--data", workspace["data"], "--out", workspace["bundle"], "--overwrite",
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


# -- further cases: builders of the table's captioned-data cases, then the Python API ---------------


def edit_metadata(root: Path, row: int, **values) -> Path:
    """``root`` after setting ``values`` in row ``row`` (0-based) of its metadata.jsonl (``None``: the JSON null)."""
    path = root / "metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[row].update(values)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def section_recipe(tmp: Path, section: str, **values) -> Path:
    """A recipe file: the tiny recipe with ``values`` set in its ``section``."""
    return recipe_file(tmp, {**TINY_RECIPE, section: {**TINY_RECIPE[section], **values}})


def with_groups_json(root: Path, descriptors) -> Path:
    (root / "groups.json").write_text(json.dumps(descriptors))
    return root


def test_a_split_of_a_dataset_without_splits_is_refused():
    from datasets import Dataset

    from diffusers_guda import LazyGroupedDataset

    data = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 4, "group": ["a", "b"] * 2})
    with pytest.raises(DataError, match=r"one dataset without splits, so it has no split 'test'; drop split="):
        LazyGroupedDataset.from_hf_dataset(data, caption_column=None, split="test")
    assert len(LazyGroupedDataset.from_hf_dataset(data, caption_column=None)) == 4  # no split given: the dataset itself


@pytest.mark.parametrize("lazy", [False, True], ids=["in-memory", "lazy"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts="abcd"), r"prompts must be a list of strings, one per image; got the single string 'abcd'"),
    (dict(group_names="ab"), r"group_names must be a list of strings, one per group; got the single string 'ab'"),
    (dict(group_ids=[0.0, 0.5, 1.0, 1.0]), r"group_ids must be integer group indices"),
], ids=["prompts-one-string", "names-one-string", "fractional-group-ids"])
def test_datasets_refuse_what_conversion_would_change(kwargs, message, lazy):
    from diffusers_guda import LazyGroupedDataset

    args = {**dict(group_ids=[0, 0, 1, 1], group_names=["a", "b"], prompts=None), **kwargs}
    images = [Image.new("L", (8, 8))] * 4 if lazy else torch.zeros(4, 1, 8, 8)
    with pytest.raises(DataError, match=message):
        (LazyGroupedDataset if lazy else GroupedDataset)(images, args["group_ids"], args["group_names"], args["prompts"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(shard_size=2.5), r"shard_size must be an integer >= 1, got 2.5"),
    (dict(shard_size=0), r"shard_size must be an integer >= 1, got 0"),
    (dict(cache_dir="FILE"), r"latent cache folder .* is a file; pass a directory"),
], ids=["fractional-shard-size", "zero-shard-size", "cache-dir-is-a-file"])
def test_latent_cache_settings_are_checked_before_any_work(kwargs, message, tmp_path):
    from diffusers_guda import LatentCache

    if kwargs.get("cache_dir") == "FILE":
        kwargs = dict(cache_dir=previous_file(tmp_path / "cache"))
    with pytest.raises(DataError, match=message):
        LatentCache(tiny_stable_diffusion().vae, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["cache"] if "cache_dir" in kwargs else [])


@pytest.mark.parametrize("config, kwargs, message", [
    ("UnlearningConfig", dict(steps=2.5), r"UnlearningConfig.steps must be an integer, got 2.5"),
    ("UnlearningConfig", dict(seed="1"), r"UnlearningConfig.seed must be an integer, got '1'"),
    ("UnlearningConfig", dict(eval_draws=0), r"eval_images and eval_draws must be >= 1"),
    ("UnlearningConfig", dict(max_grad_norm=0.0), r"max_grad_norm must be a finite number > 0"),
    ("UnlearningConfig", dict(learning_rate=float("inf")), r"learning_rate must be > 0 and finite"),
    ("UnlearningConfig", dict(lora={"rank": 2, "alpha": float("nan")}), r"LoRA alpha must be a finite number"),
    ("UnlearningConfig", dict(lora={"rank": 2, "target_modules": "to_q"}), r"target_modules must be a non-empty list"),
    ("LoRASettings", dict(rank=2, target_modules=[]), r"target_modules must be a non-empty list"),
    ("LoRASettings", dict(rank=True), r"LoRA rank must be an integer >= 1, got True"),
    ("ELBOConfig", dict(rows_per_forward=0), r"num_draws and rows_per_forward must be >= 1"),
    ("ELBOConfig", dict(num_draws=True), r"ELBOConfig.num_draws must be an integer, got True"),
    ("ELBOConfig", dict(t_min=-1), r"t_min must be >= 0, got -1"),
    ("ELBOConfig", dict(t_min=30, t_max=30), r"t_min must be below t_max"),
], ids=["steps-fractional", "seed-text", "eval-draws-zero", "max-grad-norm-zero", "lr-infinite", "alpha-nan", "targets-one-string",
        "targets-empty", "rank-bool", "rows-per-forward-zero", "draws-bool", "t-min-negative", "t-min-equals-t-max"])
def test_settings_of_the_wrong_type_or_range_are_named(config, kwargs, message):
    import diffusers_guda

    with pytest.raises(diffusers_guda.ConfigError, match=message):
        getattr(diffusers_guda, config)(**kwargs)


def test_a_recipe_that_is_neither_a_name_nor_a_path_is_refused():
    from diffusers_guda import ConfigError

    with pytest.raises(ConfigError, match=r"recipe must be a recipe name .*digits-ddpm.*, not 5"):
        Recipe.load(5)


def test_config_with_settings_and_prompts_for_an_unconditional_pipe_are_refused(workspace):
    from diffusers_guda import ConfigError, UnlearningConfig

    pipe = GUDADDPMPipeline.from_pretrained(workspace["base"])
    dataset = GroupedDataset.from_image_folder(workspace["data"])
    with pytest.raises(ConfigError, match=r"either config= .* not both \(got config= and \['steps'\]\)"):
        pipe.unlearn_groups(dataset, config=UnlearningConfig(steps=1), steps=2, progress=False)
    pipe.load_guda_bundle(workspace["bundle"])
    with pytest.raises(ConfigError, match=r"unconditional; drop prompts"):
        pipe.attribute(dataset.images[:2], prompts=["a digit", "a digit"], progress=False)


def test_result_methods_check_their_arguments(tmp_path):
    from diffusers_guda import AttributionResult, ConfigError

    result = AttributionResult(torch.zeros(2, 3), torch.ones(2, 3), ["a", "b", "c"], torch.zeros(2))
    assert len(result.top(10)[0]) == 3  # more than there are groups: all of them
    for k in (0, -1, 1.5):
        with pytest.raises(ConfigError, match=r"k must be an integer >= 1"):
            result.top(k)
    with pytest.raises(ConfigError, match=r"needs the extension of an image format .*\.png"):
        result.plot(tmp_path / "chart")
    with pytest.raises(ConfigError, match=r"unsupported|needs the extension"):
        result.plot(tmp_path / "chart.xyz")
    with pytest.raises(ConfigError, match=r"max_queries must be an integer >= 1, got 0"):
        result.plot(tmp_path / "chart.png", max_queries=0)
    with pytest.raises(ConfigError, match=r"to_json: .* is a directory; pass a file path"):
        result.to_json(previous_dir(tmp_path / "results"))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["results", "results/previous.txt"]


# -- provenance, concurrent runs and the Hub: builders of the table's cases, and the API --------------

HELD_LOCKS: list = []  # locks that cases hold while their command runs; hub_offline releases them after each test


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch, tmp_path_factory):
    """No test here reaches the Hub: offline, with an empty cache (a Hub id is then 'not cached')."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hub-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    while HELD_LOCKS:
        HELD_LOCKS.pop().release()


def held_lock(output: Path, command: str) -> Path:
    """``output``, locked by a live run (this process, through another lock object) until the test ends."""
    from diffusers_guda.locks import OutputLock

    HELD_LOCKS.append(OutputLock(output, command=command).acquire())
    return output


def foreign_lock(output: Path) -> Path:
    """``output`` with the lock file of a run on another machine (which this machine cannot check)."""
    from diffusers_guda.locks import lock_path

    record = {"pid": 4242, "host": "another-machine", "command": "guda unlearn", "started": "2026-01-01T00:00:00+00:00"}
    lock_path(output).write_text(json.dumps(record))
    return output


def logo_model_locked_elsewhere(root: Path, group: str) -> Path:
    """A LOGO root whose (seed 0) model of ``group`` has the lock of a run on another machine."""
    (previous_dir(root) / "seed_0").mkdir()
    foreign_lock(root / "seed_0" / group)
    return root


def pickle_only_base(ws, tmp: Path) -> Path:
    """The workspace base saved again with pickle-based ``.bin`` weights only."""
    from diffusers import DDPMPipeline

    DDPMPipeline.from_pretrained(ws["base"]).save_pretrained(tmp / "bin-base", safe_serialization=False)
    return tmp / "bin-base"


def test_a_base_with_pickle_weights_loads_when_the_user_opts_in(workspace, tmp_path):
    from diffusers_guda.cli.arguments import load_base
    from diffusers_guda.errors import ConfigError

    base = pickle_only_base(workspace, tmp_path)
    with pytest.raises(ConfigError, match="use_safetensors=False"):
        load_base(str(base))
    pipe = load_base(str(base), allow_pickle_weights=True)
    reference = GUDADDPMPipeline.from_pretrained(workspace["base"])
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), reference.unet.state_dict().values()))
    code, _, err = run("attribute", "--base", base, "--allow-pickle-weights", "--bundle", workspace["bundle"],
                       "--images", workspace["queries"], "--out", tmp_path / "r.json", "--quiet")
    assert code == 0, err


def test_the_api_refuses_a_training_set_or_settings_of_the_wrong_type(workspace):
    from diffusers_guda.errors import ConfigError

    pipe = GUDADDPMPipeline.from_pretrained(workspace["base"])
    with pytest.raises(DataError, match="must be a GroupedDataset or a LazyGroupedDataset, not list"):
        pipe.unlearn_groups([1, 2], progress=False)
    pipe.load_guda_bundle(workspace["bundle"])
    with pytest.raises(ConfigError, match="elbo_config must be an ELBOConfig, not dict"):
        pipe.attribute(torch.zeros(1, 1, 8, 8), elbo_config={"stride": 10}, progress=False)
    for z in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="adaptive_z must be a finite number > 0"):
            pipe.attribute(torch.zeros(1, 1, 8, 8), adaptive_z=z, progress=False)
