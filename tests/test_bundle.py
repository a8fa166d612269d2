"""Tests of diffusers_guda.bundle: round trips, stock-diffusers compatibility, safety and the Hub."""

from __future__ import annotations

import json
import pickle
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants

import diffusers_guda.bundle as bundle_module
from diffusers_guda.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    AdapterBundle,
    GroupRecord,
    is_local_bundle,
    slugify,
)
from diffusers_guda.errors import BaseModelMismatchError, BundleError, ConfigError
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.lora import LoRASettings, adapter_state_dict, peft_config_metadata, save_adapter_file
from diffusers_guda.models import GUDAUNet2DModel

try:
    from .hub_server import FakeHub
except ImportError:
    from hub_server import FakeHub

TAGS = {"data-attribution", "machine-unlearning", "guda", "lora"}
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; several threads crawl when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_unet(seed: int = 0) -> GUDAUNet2DModel:
    torch.manual_seed(seed)
    return GUDAUNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


def make_source(names: list[str], base_id: str | None = "tiny/unet"):
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
                    "class_name": "GUDAUNet2DModel", "dtype": "float32", "sample_size": 8, "in_channels": 1},
        objective={"name": "retrack", "config": {"k": 4}}, elbo={"stride": 10}, seeds={"unlearning": 0},
        training={"steps": 5},
    )
    return unet, sources, bundle


def inputs():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([10, 500])


@torch.no_grad()
def forward(unet, adapter: str | None = None) -> torch.Tensor:
    if adapter is None:
        if hasattr(unet, "peft_config"):
            unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(adapter)
    return unet(*inputs()).sample


@pytest.fixture(scope="module")
def source():
    return make_source(["cats", "Dogs/Wolves", "A"])


@pytest.fixture
def saved(source, tmp_path):
    return source[2].save_pretrained(tmp_path / "bundle")


def rewrite_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    edit(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


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


def test_adapter_files_load_with_stock_diffusers(source, saved):
    src_unet, src_names, bundle = source
    fresh = make_unet()
    fresh.load_lora_adapter(str(saved / bundle.adapter_path("dogs-wolves")), adapter_name="x", prefix="unet")
    assert torch.equal(forward(fresh, "x"), forward(src_unet, src_names[1]))
    # The form the model card advertises: bundle directory + weight_name.
    fresh.load_lora_adapter(str(saved), weight_name=bundle.adapter_path("a"), prefix="unet", adapter_name="y")
    assert torch.equal(forward(fresh, "y"), forward(src_unet, src_names[2]))


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


# ---------------------------------------------------------------------------------------- safety


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


@pytest.mark.parametrize("name, slug", [
    ("../x", "x"), ("a/b", "a-b"), ("..", "group"), ("", "group"), ("A", "a"), ("..\\..\\evil", "evil"),
    ("/etc/passwd", "etc-passwd"), (".hidden", "hidden"), ("Ünïcödé Stylé", "unicode-style"), ("a - b", "a-b"),
    ("under_score", "under_score"), ("x" * 200, "x" * 64), ("C:\\Windows", "c-windows"), ("\u4e2d\u6587", "group"),
])
def test_slugify(name, slug):
    assert slugify(name) == slug
    assert slugify(slug) == slug


def test_slugify_makes_unique_slugs():
    taken: set[str] = set()
    slugs = [slugify(n, taken) for n in ["a", "A", "a!", "", "..", "x" * 100, "X" * 100]]
    assert slugs[:5] == ["a", "a-2", "a-3", "group", "group-2"]
    assert slugs[6] == "x" * 62 + "-2" and len(set(slugs)) == len(slugs) == len(taken)


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


# ----------------------------------------------------------------------------- malformed bundles


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
])
def test_invalid_manifest_fields(saved, edit, message):
    rewrite_manifest(saved, edit)
    with pytest.raises(BundleError, match=message):
        AdapterBundle.from_pretrained(saved)


def test_inconsistent_bundle_construction(source):
    bundle = source[2]
    kwargs = dict(adapter_configs=bundle.adapter_configs, lora=bundle.lora, base_model=bundle.base_model,
                  objective=bundle.objective)
    with pytest.raises(BundleError, match="no adapter"):
        AdapterBundle(groups=bundle.groups, adapters={}, **kwargs)
    with pytest.raises(BundleError, match="names must be unique"):
        AdapterBundle(groups=[GroupRecord(0, "x", "cats", 1), GroupRecord(1, "x", "a", 1)], adapters=bundle.adapters, **kwargs)


# ---------------------------------------------------------------------------------- atomic writes


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failed_save_leaves_previous_bundle_intact(source, tmp_path, monkeypatch):
    bundle = source[2]
    target = bundle.save_pretrained(tmp_path / "bundle")
    before = _snapshot(target)
    calls = []
    real_save = bundle_module.save_adapter_file

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(bundle_module, "save_adapter_file", flaky)
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


# ------------------------------------------------------------------------------------ model card


def test_model_card(source, saved, tmp_path):
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "diffusers"
    assert TAGS <= set(card.data.tags)
    assert card.data.base_model == "tiny/unet"
    text = card.text
    assert "unlearned" in text and "ELBO(x; base) - ELBO(x; base + adapter_k)" in text
    assert "| 1 | Dogs/Wolves | `dogs-wolves` | 11 | 0.1 → 1.3 | 0.09 → 0.095 |" in text
    assert 'prefix="unet"' in text and "AdapterBundle.from_pretrained" in text and "load_guda_bundle" in text

    _, _, anonymous = make_source(["p|q"], base_id=None)
    card = ModelCard.load(anonymous.save_pretrained(tmp_path / "anon") / "README.md")
    assert card.data.base_model is None and card.data.library_name == "diffusers"
    assert "p\\|q" in card.text


# ------------------------------------------------------------------------------------------- Hub


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A local Hub on 127.0.0.1; huggingface_hub is pointed at it and may not resolve any other host."""
    real_getaddrinfo = socket.getaddrinfo
    attempts: list[str] = []

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(host)
            raise socket.gaierror(f"tests may not contact {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    with FakeHub() as hub:
        monkeypatch.setattr(socket, "getaddrinfo", local_only)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"), raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield hub
    assert attempts == []


@pytest.mark.parametrize("xet", [True, False], ids=["default-upload", "no-xet-upload"])
def test_push_to_hub_and_load_by_repo_id(source, fake_hub, tmp_path, monkeypatch, xet):
    if not xet:
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
    src_unet, src_names, bundle = source
    url = bundle.push_to_hub("guda/test-bundle", token="hf_test", endpoint=fake_hub.url)
    sha = fake_hub.repos["guda/test-bundle"]["refs"]["main"]
    assert url == f"{fake_hub.url}/guda/test-bundle/commit/{sha}"
    files = fake_hub.files("guda/test-bundle")
    assert set(files) == {".gitattributes", MANIFEST_NAME, "README.md",
                          *(f"adapters/{s}/pytorch_lora_weights.safetensors" for s in bundle.slugs)}
    assert "guda/test-bundle" in files["README.md"].decode()
    # With hf_xet, upload_folder runs its pipelined upload, else create_commit; both validate the card's
    # YAML and, as the server asks, send every file as a "regular" git blob (no LFS, no xet).
    assert ("POST", "/api/validate-yaml") in fake_hub.requests

    cache = tmp_path / "cache"
    loaded = AdapterBundle.from_pretrained("guda/test-bundle", cache_dir=cache, token="hf_test")
    assert loaded.source == {"repo_id": "guda/test-bundle", "revision": sha}
    fresh = make_unet()
    for name, src_name in zip(loaded.load_into(fresh), src_names):
        assert torch.equal(forward(fresh, name), forward(src_unet, src_name))

    # A second push with fewer groups removes the stale adapter in the same commit.
    _, _, smaller = make_source(["cats"])
    smaller.push_to_hub("guda/test-bundle", token="hf_test", endpoint=fake_hub.url, commit_message="shrink")
    assert not any(p.startswith("adapters/a/") for p in fake_hub.files("guda/test-bundle"))
    assert AdapterBundle.from_pretrained("guda/test-bundle", cache_dir=cache).group_names == ["cats"]
    assert AdapterBundle.from_pretrained("guda/test-bundle", cache_dir=cache, revision=sha).num_groups == 3

    # Offline, from the cache: the server is gone.
    fake_hub.stop()
    offline = AdapterBundle.from_pretrained("guda/test-bundle", cache_dir=cache, local_files_only=True)
    assert offline.group_names == ["cats"] and offline.source["revision"] != sha
    assert AdapterBundle.from_pretrained("guda/test-bundle", cache_dir=cache, endpoint=fake_hub.url).num_groups == 1


def test_push_to_branch_and_pickles_on_the_hub_are_not_downloaded(source, fake_hub, tmp_path):
    bundle = source[2]
    bundle.push_to_hub("guda/branchy", token="hf_test", endpoint=fake_hub.url, revision="v1", private=True)
    fake_hub.repos["guda/branchy"]["commits"][fake_hub.repos["guda/branchy"]["refs"]["v1"]][
        "adapters/cats/pytorch_lora_weights.bin"] = b"not downloaded"
    assert set(fake_hub.files("guda/branchy")) == {".gitattributes"}
    loaded = AdapterBundle.from_pretrained("guda/branchy", revision="v1", cache_dir=tmp_path / "c", endpoint=fake_hub.url)
    assert loaded.num_groups == 3
    snapshot = Path(tmp_path / "c").rglob("*.bin")
    assert list(snapshot) == []
    with pytest.raises(BundleError, match="not a GUDA adapter bundle"):
        AdapterBundle.from_pretrained("guda/branchy", cache_dir=tmp_path / "c", endpoint=fake_hub.url)
