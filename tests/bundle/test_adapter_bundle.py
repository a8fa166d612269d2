"""Tests of diffusers_guda.bundle.adapter_bundle: round trips, stock-diffusers compatibility, base-model
checks, loading into a UNet, and atomic saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import diffusers_guda.bundle.files as bundle_files
from diffusers_guda.adapter_state import adapter_state
from diffusers_guda.bundle import AdapterBundle, GroupRecord, is_local_bundle
from diffusers_guda.errors import BaseModelMismatchError, BundleError, ConfigError

from bundle_helpers import forward, inputs, make_source, make_unet

pytest_plugins = ["bundle_helpers"]  # its fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


# ----------------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_identical(source, saved):
    src_unet, src_names, bundle = source
    assert is_local_bundle(saved) and not is_local_bundle(saved / "adapters")
    loaded = AdapterBundle.from_pretrained(saved, expected_fingerprint=bundle.base_model["fingerprint"])
    assert loaded.group_names == ["cats", "Dogs/Wolves", "A"]
    assert loaded.slugs == ["cats", "dogs-wolves", "a"] and loaded.num_groups == 3
    assert loaded.source == {"path": str(saved.resolve()), "revision": None}
    assert loaded.objective == bundle.objective and loaded.lora == bundle.lora and loaded.elbo == bundle.elbo
    assert loaded.groups[1].stats == bundle.groups[1].stats
    assert loaded.adapter_path("a") == "adapters/a/pytorch_lora_weights.safetensors"

    fresh = make_unet()
    base = forward(fresh)
    names = loaded.load_into(fresh)
    assert names == ["guda_cats", "guda_dogs-wolves", "guda_a"]
    for name, src_name in zip(names, src_names):
        expected = forward(src_unet, src_name)
        assert not torch.equal(expected, base)
        assert torch.equal(forward(fresh, name), expected)
    assert torch.equal(forward(fresh), base)

    # Reloading a subset replaces those adapters and keeps the others.
    assert loaded.load_into(fresh, groups=["a", "cats", "A"]) == ["guda_cats", "guda_a"]
    assert sorted(fresh.peft_config) == sorted(names)
    assert torch.equal(forward(fresh, "guda_a"), forward(src_unet, src_names[2]))
    with pytest.raises(ConfigError, match="Unknown group"):
        loaded.load_into(fresh, groups=["nope"])
    assert loaded.group(1).name == "Dogs/Wolves" and loaded.group("dogs-wolves").id == 1


def test_group_lookup_and_names(source):
    bundle = source[2]
    assert repr(bundle) == "AdapterBundle(num_groups=3, base='tiny/unet', groups=['cats', 'Dogs/Wolves', 'A'])"
    assert AdapterBundle.adapter_name("dogs-wolves") == "guda_dogs-wolves"
    # a name is matched before a slug, a slug before an id; ids only match ints
    assert bundle.group("A").slug == "a" and bundle.group("a").name == "A" and bundle.group(2).name == "A"
    with pytest.raises(ConfigError, match="Unknown group '2'"):
        bundle.group("2")
    with pytest.raises(ConfigError, match="Unknown slug"):
        bundle.adapter_path("Dogs/Wolves")


def test_adapter_files_load_with_stock_diffusers(source, saved):
    src_unet, src_names, bundle = source
    fresh = make_unet()
    fresh.load_lora_adapter(str(saved / bundle.adapter_path("dogs-wolves")), adapter_name="x", prefix="unet")
    assert torch.equal(forward(fresh, "x"), forward(src_unet, src_names[1]))
    # The form the model card advertises: bundle directory + weight_name.
    fresh.load_lora_adapter(str(saved), weight_name=bundle.adapter_path("a"), prefix="unet", adapter_name="y")
    assert torch.equal(forward(fresh, "y"), forward(src_unet, src_names[2]))


def test_hostile_group_names_stay_inside_the_bundle(tmp_path):
    names = ["../x", "a/b", "..", "", "A", "a", "/etc/passwd", "a-2"]
    src_unet, src_names, bundle = make_source(names)
    assert bundle.slugs == ["x", "a-b", "group", "group-2", "a", "a-2", "etc-passwd", "a-2-2"]
    assert bundle.group("a-2").id == 7 and bundle.adapter_path("a-2") == "adapters/a-2/pytorch_lora_weights.safetensors"
    out = bundle.save_pretrained(tmp_path / "bundles" / "b")
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.parts[:2] == ("bundles", "b") for p in written)
    assert len([p for p in written if p.suffix == ".safetensors"]) == len(names)

    loaded = AdapterBundle.from_pretrained(out)
    assert loaded.group_names == names
    fresh = make_unet()
    # 'guda_a' is a prefix of 'guda_a-2': each must still load exactly its own weights.
    for name, src_name in zip(loaded.load_into(fresh), src_names):
        assert torch.equal(forward(fresh, name), forward(src_unet, src_name))


# ------------------------------------------------------------------------------- into a UNet


def test_base_model_mismatch(source, saved):
    bundle = source[2]
    other = make_unet(seed=1)
    with pytest.raises(BaseModelMismatchError, match="fingerprint") as err:
        bundle.load_into(other)
    assert "re-run unlearning" in str(err.value) and "tiny/unet" in str(err.value)
    assert bundle.base_model["fingerprint"][:12] in str(err.value)
    assert not hasattr(other, "peft_config")  # nothing was loaded
    with pytest.raises(BaseModelMismatchError, match="dtype"):
        bundle.check_base(make_unet().half())
    assert bundle.load_into(make_unet(seed=1), check_base=False)  # explicit opt-out

    wrong = "0" * 64
    with pytest.raises(BaseModelMismatchError, match="fingerprint") as err:
        AdapterBundle.from_pretrained(saved, expected_fingerprint=wrong)
    assert "000000000000" in str(err.value) and "Load the bundle into the base model" in str(err.value)


def test_load_into_activates_the_last_adapter_and_keeps_adapters_enabled_or_disabled(source):
    src_unet, src_names, bundle = source
    unet = make_unet()
    base = forward(unet)
    with torch.no_grad():
        assert bundle.load_into(unet, groups=["cats", "A"]) == ["guda_cats", "guda_a"]
        assert adapter_state(unet) == (["guda_a"], False)
        assert torch.equal(unet(*inputs()).sample, forward(src_unet, src_names[2]))

        unet.disable_adapters()  # what pipe.load_guda_bundle leaves: the pipeline generates with the base model
        bundle.load_into(unet, groups=["dogs-wolves", "cats"])  # one new adapter, one replaced
        assert adapter_state(unet) == (["guda_dogs-wolves"], True)
        assert torch.equal(unet(*inputs()).sample, base)
    assert sorted(unet.peft_config) == ["guda_a", "guda_cats", "guda_dogs-wolves"]
    for name, src_name in zip(["guda_cats", "guda_dogs-wolves", "guda_a"], src_names):
        assert torch.equal(forward(unet, name), forward(src_unet, src_name))


def test_an_adapter_that_does_not_fit_leaves_the_loaded_one_in_place(source):
    src_unet, src_names, bundle = source
    unet = make_unet()
    bundle.load_into(unet, groups=["cats"])
    slug = "cats"
    key = next(k for k in bundle.adapters[slug] if "lora_A" in k)
    bad = dict(bundle.adapters[slug], **{key: torch.zeros(3, 3)})
    broken = AdapterBundle(groups=[GroupRecord(0, "cats", slug, 10)], adapters={slug: bad},
                           adapter_configs=bundle.adapter_configs, lora=bundle.lora, base_model=bundle.base_model,
                           objective=bundle.objective)
    with pytest.raises(BundleError, match="does not fit"):
        broken.load_into(unet)
    assert list(unet.peft_config) == ["guda_cats"]
    assert torch.equal(forward(unet, "guda_cats"), forward(src_unet, src_names[0]))


# -------------------------------------------------------------------------------- construction


def test_inconsistent_bundle_construction(source):
    bundle = source[2]
    kwargs = dict(adapter_configs=bundle.adapter_configs, lora=bundle.lora, base_model=bundle.base_model,
                  objective=bundle.objective)
    with pytest.raises(BundleError, match="no adapter"):
        AdapterBundle(groups=bundle.groups, adapters={}, **kwargs)
    with pytest.raises(BundleError, match="names must be unique"):
        AdapterBundle(groups=[GroupRecord(0, "x", "cats", 1), GroupRecord(1, "x", "a", 1)], adapters=bundle.adapters, **kwargs)
    with pytest.raises(BundleError, match="expected 'adapters/cats/"):
        AdapterBundle(groups=[GroupRecord(0, "x", "cats", 1, adapter_file="adapters/cats/w.safetensors")],
                      adapters=bundle.adapters, **kwargs)
    with pytest.raises(BundleError, match="fingerprint"):
        AdapterBundle(groups=bundle.groups, adapters=bundle.adapters, **dict(kwargs, base_model={"id": "x"}))


# ---------------------------------------------------------------------------------- atomic writes


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failed_save_leaves_previous_bundle_intact(source, tmp_path, monkeypatch):
    bundle = source[2]
    target = bundle.save_pretrained(tmp_path / "bundle")
    before = _snapshot(target)
    calls = []
    real_save = bundle_files.save_adapter_file

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(bundle_files, "save_adapter_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        bundle.save_pretrained(target)
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        bundle.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with pytest.raises(FileExistsError):
        bundle.save_pretrained(target, overwrite=False)


def test_save_replaces_a_bundle_or_an_empty_folder_but_never_another_folder(source, tmp_path):
    bundle = source[2]
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", bundle.save_pretrained(tmp_path / "bundle")):
        assert AdapterBundle.from_pretrained(bundle.save_pretrained(target)).group_names == bundle.group_names
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"project is a folder with other files in it \(no guda_bundle.json\)"):
        bundle.save_pretrained(project)
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"] and (project / "notes.txt").read_text() == "mine"
