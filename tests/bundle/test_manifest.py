"""Tests of diffusers_guda.bundle.manifest: the manifest's content and its validation on load."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from diffusers_guda.bundle import FORMAT_VERSION, MANIFEST_NAME, AdapterBundle, GroupRecord
from diffusers_guda.bundle.manifest import library_version, software_versions
from diffusers_guda.errors import BundleError

from bundle_helpers import rewrite_manifest

pytest_plugins = ["bundle_helpers"]  # its fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_manifest_fields_in_the_documented_order(source, saved):
    bundle = source[2]
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    assert list(manifest) == ["format_version", "library", "library_version", "software", "base_model", "groups",
                              "lora", "objective", "elbo", "seeds", "training"]
    assert manifest == json.loads(json.dumps(bundle.to_manifest()))
    assert manifest["format_version"] == FORMAT_VERSION == 1 and manifest["library"] == "diffusers-guda"
    assert list(manifest["software"]) == ["diffusers", "peft", "torch", "huggingface_hub"]
    assert manifest["software"]["torch"] == importlib.metadata.version("torch") == software_versions()["torch"]
    assert manifest["library_version"] == library_version() is not None
    assert list(manifest["groups"][0]) == ["id", "name", "slug", "num_images", "adapter_file", "stats"]
    assert manifest["elbo"] == {"stride": 10} and manifest["seeds"] == {"unlearning": 0}


def test_group_record_defaults_its_adapter_file():
    assert GroupRecord(0, "x", "x", 1).adapter_file == "adapters/x/pytorch_lora_weights.safetensors"
    assert GroupRecord(0, "x", "x", 1).stats == {}


@pytest.mark.parametrize("version, message", [(FORMAT_VERSION + 1, "newer diffusers-guda"), (0, "older"), (None, "older")])
def test_other_format_version(saved, version, message):
    rewrite_manifest(saved, lambda m: m.update(format_version=version))
    with pytest.raises(BundleError, match=message):
        AdapterBundle.from_pretrained(saved)


def test_malformed_or_missing_manifest(saved, tmp_path):
    (saved / MANIFEST_NAME).write_text('{"format_version": 1, "groups": [')
    with pytest.raises(BundleError, match=MANIFEST_NAME) as err:
        AdapterBundle.from_pretrained(saved)
    assert str(saved) in str(err.value)
    (saved / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(BundleError, match="JSON object"):
        AdapterBundle.from_pretrained(saved)
    (saved / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match="not a GUDA adapter bundle"):
        AdapterBundle.from_pretrained(saved)
    with pytest.raises(BundleError, match="is a file"):
        AdapterBundle.from_pretrained(saved / "README.md")
    with pytest.raises(BundleError, match="neither a bundle directory nor a valid Hub repo id"):
        AdapterBundle.from_pretrained(str(tmp_path / "does" / "not" / "exist"))


def _set_group(i, **kw):
    return lambda m: m["groups"][i].update(**kw)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(groups=[]), "no groups"),
    (lambda m: m.pop("groups"), "'groups'"),
    (_set_group(1, id=0), "ids must be"),
    (_set_group(2, id=5), "ids must be"),
    (_set_group(1, name="cats"), "names must be unique"),
    (_set_group(1, slug="cats", adapter_file="adapters/cats/pytorch_lora_weights.safetensors"), "slugs must be unique"),
    (_set_group(0, slug="../cats"), "unsafe slug"),
    (_set_group(0, num_images="10"), "malformed group"),
    (_set_group(0, extra=1), "malformed group"),
    (lambda m: m["groups"][0].pop("stats"), "malformed group"),
    (lambda m: m["base_model"].update(fingerprint="abc"), "fingerprint"),
    (lambda m: m["base_model"].pop("fingerprint"), "fingerprint"),
    (lambda m: m.update(lora="rank 4"), "'lora'"),
    (lambda m: m.update(objective={"config": {}}), "objective name"),
    (lambda m: m.update(elbo=[1]), "'elbo'"),
    (lambda m: m["groups"].append(7), "not an object"),
    (_set_group(0, num_images=-1), "negative image count"),
    (_set_group(0, adapter_file=""), "empty adapter_file"),
    (_set_group(0, id=True), "malformed group"),
    (lambda m: m["base_model"].update(id=3), "base_model.id"),
])
def test_invalid_manifest_fields(saved, edit, message):
    rewrite_manifest(saved, edit)
    with pytest.raises(BundleError, match=message):
        AdapterBundle.from_pretrained(saved)


def test_null_elbo_seeds_and_training_still_load(saved):
    """Bundles of older versions record ``"elbo": null``."""
    rewrite_manifest(saved, lambda m: m.update(elbo=None, seeds=None, training=None))
    loaded = AdapterBundle.from_pretrained(saved)
    assert loaded.elbo is None and loaded.seeds is None and loaded.training is None
