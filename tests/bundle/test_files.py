"""Tests of diffusers_guda.bundle.files: what loading refuses (pickles, foreign files, paths outside the
bundle) and incomplete or corrupted bundles."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from diffusers_guda.bundle import MANIFEST_NAME, AdapterBundle
from diffusers_guda.bundle.files import read_bundle_manifest, write_bundle
from diffusers_guda.errors import BaseModelMismatchError, BundleError
from diffusers_guda.lora import save_adapter_file

from bundle_helpers import rewrite_manifest

pytest_plugins = ["bundle_helpers"]  # its fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


class _Exploit:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("relative", [
    "adapters/cats/pytorch_lora_weights.bin",
    "adapters/a/model.pkl",
    "adapters/x.pt",
    "adapters/dogs-wolves/weights.ckpt",
    "adapters/cats/notes.txt",
])
def test_pickles_and_foreign_files_are_refused(saved, tmp_path, relative, no_unpickling):
    marker = tmp_path / "pwned"
    (saved / relative).write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(BundleError, match="Refusing") as err:
        AdapterBundle.from_pretrained(saved)
    assert Path(relative).name in str(err.value)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused(saved, tmp_path, no_unpickling):
    marker = tmp_path / "pwned"
    (saved / "adapters/cats/pytorch_lora_weights.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(BundleError, match="corrupted"):
        AdapterBundle.from_pretrained(saved)
    assert not marker.exists()


@pytest.mark.parametrize("adapter_file", [
    "../../evil.safetensors", "adapters/../../evil.safetensors", "ABSOLUTE", "adapters\\..\\..\\evil.safetensors",
    "adapters/cats/pytorch_lora_weights.bin", "", "README.md",
])
def test_manifest_paths_outside_the_bundle_are_refused(source, saved, tmp_path, adapter_file):
    evil = tmp_path / "evil.safetensors"
    bundle = source[2]
    save_adapter_file(evil, bundle.adapters["cats"], bundle.adapter_configs["cats"])
    adapter_file = str(evil) if adapter_file == "ABSOLUTE" else adapter_file
    rewrite_manifest(saved, lambda m: m["groups"][0].update(adapter_file=adapter_file))
    with pytest.raises(BundleError, match="cats"):
        AdapterBundle.from_pretrained(saved)


def test_symlink_escaping_the_bundle_is_refused(source, saved, tmp_path):
    evil = tmp_path / "evil.safetensors"
    save_adapter_file(evil, source[2].adapters["cats"], source[2].adapter_configs["cats"])
    target = saved / "adapters/cats/pytorch_lora_weights.safetensors"
    target.unlink()
    target.symlink_to(evil)
    with pytest.raises(BundleError, match="inside the bundle"):
        AdapterBundle.from_pretrained(saved)


def test_corrupted_adapter_file(saved):
    path = saved / "adapters/dogs-wolves/pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match="corrupted") as err:
        AdapterBundle.from_pretrained(saved)
    assert "dogs-wolves" in str(err.value)


def test_missing_adapter_file(saved):
    (saved / "adapters/a/pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(BundleError, match="incomplete"):
        AdapterBundle.from_pretrained(saved)


def test_a_wrong_fingerprint_is_reported_before_adapters_are_read(source, saved):
    (saved / "adapters/a/pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        AdapterBundle.from_pretrained(saved, expected_fingerprint="0" * 64)


def test_write_bundle_writes_exactly_the_bundle_files(source, tmp_path):
    bundle = source[2]
    write_bundle(bundle, tmp_path, repo_id="someone/bundle")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST_NAME, "README.md", *(g.adapter_file for g in bundle.groups)])
    assert 'from_pretrained("someone/bundle")' in (tmp_path / "README.md").read_text()
    assert read_bundle_manifest(tmp_path)["groups"][1]["name"] == "Dogs/Wolves"
