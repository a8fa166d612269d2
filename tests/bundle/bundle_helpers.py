"""Shared by the tests of diffusers_guda.bundle: a tiny UNet, a bundle of random adapters made from it,
and forwards that run the UNet as the base model or with one adapter.

The test modules import its helpers and load it as a plugin (``pytest_plugins``) for its fixtures; it is
imported before pytest could rewrite its asserts, hence PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_guda.bundle import MANIFEST_NAME, AdapterBundle, GroupRecord, slugify
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.lora import LoRASettings, adapter_state_dict, peft_config_metadata
from diffusers_guda.models import GUDAUNet2DModel

TAGS = {"data-attribution", "machine-unlearning", "guda", "lora"}


def make_unet(seed: int = 0) -> GUDAUNet2DModel:
    torch.manual_seed(seed)
    return GUDAUNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


def make_source(names: list[str], base_id: str | None = "tiny/unet", base_extra: dict | None = None):
    """A UNet with one random (non-identity) adapter per group, and the bundle built from it."""
    unet = make_unet()
    gen = torch.Generator().manual_seed(123)
    taken: set[str] = set()
    groups, adapters, configs, sources = [], {}, {}, []
    for i, name in enumerate(names):
        source_name = f"src_{i:03d}"
        unet.add_adapter(LoRASettings(rank=4, alpha=4).to_peft(unet), adapter_name=source_name)
        for pname, param in unet.named_parameters():
            if f"lora_B.{source_name}." in pname:
                param.data = torch.randn(param.shape, generator=gen) * 0.2
        slug = slugify(name, taken)
        groups.append(GroupRecord(id=i, name=name, slug=slug, num_images=10 + i,
                                  stats={"forget_loss_before": 0.1, "forget_loss_after": 0.3 + i,
                                         "retain_loss_before": 0.09, "retain_loss_after": 0.095}))
        adapters[slug] = adapter_state_dict(unet, source_name)
        configs[slug] = peft_config_metadata(unet, source_name)
        sources.append(source_name)
    bundle = AdapterBundle(
        groups=groups, adapters=adapters, adapter_configs=configs, lora=LoRASettings(rank=4, alpha=4).to_dict(),
        base_model={"id": base_id, "revision": None, "fingerprint": unet_fingerprint(unet),
                    "class_name": "GUDAUNet2DModel", "dtype": "float32", "sample_size": 8, "in_channels": 1,
                    **(base_extra or {})},
        objective={"name": "retrack", "config": {"k": 4}}, elbo={"stride": 10}, seeds={"unlearning": 0},
        training={"steps": 5},
    )
    return unet, sources, bundle


def inputs():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([10, 500])


@torch.no_grad()
def forward(unet, adapter: str | None = None) -> torch.Tensor:
    """The UNet's output on fixed inputs, as the base model (``None``) or with ``adapter``."""
    if adapter is None:
        if hasattr(unet, "peft_config"):
            unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(adapter)
    return unet(*inputs()).sample


def rewrite_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    edit(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def source():
    return make_source(["cats", "Dogs/Wolves", "A"])


@pytest.fixture
def saved(source, tmp_path):
    return source[2].save_pretrained(tmp_path / "bundle")
