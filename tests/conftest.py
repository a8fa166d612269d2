"""Shared fixtures: tiny models built from configs in code, tiny grouped data, one torch thread."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from diffusers_guda import GroupedDataset, GUDAUNet2DModel


TIMING_KEYS = {"wall_s"}  # wall-clock fields, the only ones allowed to differ between runs


@pytest.fixture(autouse=True, scope="session")
def _latent_cache_in_tmp(tmp_path_factory):
    # latent caches default to the Hugging Face cache folder: keep the tests' out of the user's
    previous = os.environ.get("GUDA_LATENT_CACHE")
    os.environ["GUDA_LATENT_CACHE"] = str(tmp_path_factory.mktemp("latent-cache"))
    yield
    if previous is None:
        os.environ.pop("GUDA_LATENT_CACHE", None)
    else:
        os.environ["GUDA_LATENT_CACHE"] = previous


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # On a shared 2-core machine, one torch thread is far faster than two fighting for cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_unet_config(channels: int = 1, sample_size: int = 8) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


@pytest.fixture
def tiny_unet() -> GUDAUNet2DModel:
    torch.manual_seed(0)
    return GUDAUNet2DModel(**tiny_unet_config()).eval()


@pytest.fixture
def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=100, beta_schedule="linear")


def with_random_adapters(unet, names=("g0", "g1")):
    """``unet`` holding a rank-2 LoRA adapter per name whose lora_B is random (seeded by position), adapters disabled."""
    from diffusers_guda import LoRASettings

    for k, name in enumerate(names):
        torch.manual_seed(k)
        unet.add_adapter(LoRASettings(rank=2, alpha=2).to_peft(unet), adapter_name=name)
        for param_name, param in unet.named_parameters():
            if f"lora_B.{name}." in param_name:
                torch.nn.init.normal_(param, std=0.1)
    unet.disable_adapters()
    return unet


def make_tiny_dataset() -> GroupedDataset:
    """Three groups of 8x8 grayscale images with distinct structure (bars in different places)."""
    generator = torch.Generator().manual_seed(0)
    images, ids = [], []
    for group in range(3):
        for _ in range(12):
            image = torch.full((1, 8, 8), -1.0)
            image[0, :, 2 * group + 1 : 2 * group + 3] = 1.0
            image += 0.1 * torch.randn(image.shape, generator=generator)
            images.append(image.clamp(-1, 1))
            ids.append(group)
    return GroupedDataset(torch.stack(images), torch.tensor(ids), ["left", "middle", "right"])


@pytest.fixture
def tiny_dataset() -> GroupedDataset:
    return make_tiny_dataset()


@pytest.fixture
def stock_pipeline_dir(tmp_path):
    """A stock DDPMPipeline directory (plain UNet2DModel) as `guda train` writes it."""
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_config()).eval()
    path = tmp_path / "base"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


TINY_RECIPE = {
    "name": "tiny",
    "train": {"block_out_channels": [16, 32], "norm_num_groups": 8, "num_train_timesteps": 100, "steps": 30, "batch_size": 16, "warmup_steps": 5, "seed": 0},
    "unlearning": {"objective": "retrack", "objective_options": {"num_neighbors": 3, "kl_cap": 10.0}, "lora": {"rank": 2, "alpha": 2.0}, "steps": 3, "forget_batch_size": 8, "retain_batch_size": 8, "eval_images": 8, "eval_draws": 1, "seed": 0},
    "elbo": {"stride": 10, "t_min": 10, "seed": 0},
    "queries": {"num_queries": 4, "seed": 0, "num_inference_steps": 5},
}


def write_evaluation_recipe(path: Path) -> Path:
    """The tiny recipe cut to a few steps and 4 queries, for ``guda evaluate`` runs, written to ``path``."""
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["train"].update(steps=10, batch_size=8, warmup_steps=2)
    recipe["unlearning"].update(steps=2, forget_batch_size=4, retain_batch_size=4, eval_images=4)
    recipe["elbo"] = {"stride": 20, "t_min": 10, "seed": 0}
    recipe["queries"] = {"num_queries": 4, "seed": 0, "num_inference_steps": 3}
    path.write_text(json.dumps(recipe))
    return path


def load_benchmark_script(name: str):
    """The module ``benchmarks/<name>.py`` (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_evaluation(tmp_path):
    """``(recipe, data, out)`` of a finished ``guda evaluate --methods guda --no-ceiling`` on three groups."""
    from diffusers_guda.cli import main as guda

    recipe = write_evaluation_recipe(tmp_path / "recipe.json")
    data, out = write_group_folder(tmp_path / "data", ["left", "middle", "right"]), tmp_path / "eval"
    assert guda(["evaluate", "--data", str(data), "--out", str(out), "--recipe", str(recipe), "--no-ceiling",
                 "--methods", "guda", "--quiet"]) == 0
    return recipe, data, out


@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny-recipe.json"
    path.write_text(json.dumps(TINY_RECIPE))
    return path


def write_group_folder(root: Path, groups: list[str], per_group: int = 8, seed: int = 0) -> Path:
    """``root/<group>/<i>.png``: 8x8 grayscale bars, a different column pair per group."""
    rng = np.random.default_rng(seed)
    for g, name in enumerate(groups):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_group):
            array = np.zeros((8, 8), dtype=np.int64)
            array[:, 2 * g + 1 : 2 * g + 3] = 235
            array += rng.integers(0, 20, (8, 8))
            Image.fromarray(array.astype(np.uint8), mode="L").save(folder / f"{i}.png")
    return root


def drop_timing(value):
    """``value`` without wall-clock fields, at any depth."""
    if isinstance(value, dict):
        return {k: drop_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [drop_timing(v) for v in value]
    return value


def assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for key in expected:
        a, b = got[key], expected[key]
        assert a.dtype == b.dtype and a.shape == b.shape, (what, key)
        same = torch.equal(a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))
        assert same, f"{what}: tensor {key} differs from the reference run's (max abs diff {(a - b).abs().max().item()})"


# -- tiny Stable Diffusion ----------------------------------------------------------------------

SD_WORDS = ["a", "photo", "in", "red", "green", "blue", "style", "square", "stripe", "of"]
SD_COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


def make_sd_dataset(per_group: int = 6, size: int = 16) -> GroupedDataset:
    """Three colour styles of 16x16 RGB images (squares and stripes), each image captioned."""
    generator = torch.Generator().manual_seed(0)
    images, ids, prompts = [], [], []
    for g, (name, colour) in enumerate(SD_COLOURS.items()):
        for i in range(per_group):
            image = torch.full((3, size, size), -1.0)
            shape = "square" if i % 2 == 0 else "stripe"
            if shape == "square":
                image[:, 4:12, 4:12] = torch.tensor(colour).view(3, 1, 1)
            else:
                image[:, :, 6:10] = torch.tensor(colour).view(3, 1, 1)
            images.append((image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(-1, 1))
            ids.append(g)
            prompts.append(f"a {shape} in {name} style")
    return GroupedDataset(torch.stack(images), torch.tensor(ids), list(SD_COLOURS), prompts)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A stock StableDiffusionPipeline directory of the tiny offline Stable Diffusion."""
    from diffusers_guda.testing import tiny_stable_diffusion

    path = tmp_path_factory.mktemp("tiny-sd") / "base"
    tiny_stable_diffusion(words=SD_WORDS, seed=0).save_pretrained(path)
    return path
