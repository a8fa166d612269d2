"""Tests of diffusers_guda.unlearning.base_model: the base model's identity recorded in a bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import UNet2DModel

from diffusers_guda import GroupUnlearner
from diffusers_guda.unlearning.base_model import base_model_identity, hub_snapshot_identity

from unlearning_helpers import small_config

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("path, expected", [
    (f"/cache/hub/models--org--tiny-unet/snapshots/{SHA}/unet", ("org/tiny-unet", SHA)),
    (f"/cache/hub/models--tiny/snapshots/{SHA}", ("tiny", SHA)),
    (Path(f"~/.cache/huggingface/hub/models--a--b.c/snapshots/{SHA}/unet"), ("a/b.c", SHA)),
    ("/cache/hub/models--org--tiny/snapshots/main/unet", None),  # not a commit
    (f"/cache/hub/datasets--org--tiny/snapshots/{SHA}", None),  # not a model repo
    ("org/tiny", None),
    ("", None),
    (None, None),
    (3, None),
])
def test_hub_snapshot_identity(path, expected):
    assert hub_snapshot_identity(path) == expected


def _saved_unet(tiny_unet, directory: Path) -> Path:
    UNet2DModel.from_config(tiny_unet.config).save_pretrained(directory)
    return directory


def test_a_unet_from_the_hub_cache_records_its_repo_and_commit(tiny_unet, tiny_scheduler, tiny_dataset, tmp_path):
    path = _saved_unet(tiny_unet, tmp_path / "models--org--tiny" / "snapshots" / SHA / "unet")
    unet = UNet2DModel.from_pretrained(path)  # a plain UNet2DModel: the unlearner converts it
    assert base_model_identity(unet, None, None) == ("org/tiny", SHA)
    assert base_model_identity(unet, "org/tiny", None) == ("org/tiny", SHA)
    assert base_model_identity(unet, "my-name", None) == ("my-name", None)  # not that repo: no revision
    assert base_model_identity(unet, None, "v2") == ("org/tiny", "v2")

    bundle = GroupUnlearner(unet, tiny_scheduler, small_config(steps=1)).unlearn(tiny_dataset, groups=[0], progress=False)
    assert bundle.base_model["id"] == "org/tiny" and bundle.base_model["revision"] == SHA


def test_a_unet_from_a_directory_records_the_directory(tiny_unet, tmp_path):
    path = _saved_unet(tiny_unet, tmp_path / "base" / "unet")
    assert base_model_identity(UNet2DModel.from_pretrained(path), None, None) == (str(path), None)
    assert base_model_identity(UNet2DModel.from_pretrained(path), "given", "r") == ("given", "r")


def test_a_unet_made_in_memory_records_only_what_it_is_given(tiny_unet, tiny_scheduler):
    assert base_model_identity(tiny_unet, None, None) == (None, None)
    unlearner = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(), base_model_id="x", base_model_revision="y")
    assert (unlearner.base_model_id, unlearner.base_model_revision) == ("x", "y")
