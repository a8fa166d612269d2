"""Tests of diffusers_guda.bundle.hub: pushing bundles to a Hub and loading them by repo id, online and
from the cache, against a local stand-in for the Hub."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from diffusers_guda.bundle import MANIFEST_NAME, AdapterBundle
from diffusers_guda.bundle.hub import looks_like_hub_id
from diffusers_guda.errors import BundleError

from bundle_helpers import forward, make_source, make_unet

pytest_plugins = ["bundle_helpers"]  # its fixtures
from hub_server import FakeHub

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


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


def test_looks_like_hub_id(tmp_path):
    assert looks_like_hub_id("org/name") and looks_like_hub_id("name")
    assert not looks_like_hub_id(None) and not looks_like_hub_id("") and not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id(str(tmp_path))  # an existing path is a path


@pytest.mark.parametrize(
    "repo, kwargs, needles",
    [
        ("guda/missing", {}, ["'guda/missing'", "no Hub repo guda/missing", "check the id", "hf auth login"]),
        ("guda/test-bundle", {"revision": "v9"}, ["at revision 'v9'", "has no revision 'v9'", "branch, tag or commit"]),
        ("guda/test-bundle", {"local_files_only": True}, ["not in the local Hub cache", "go online", "hf download guda/test-bundle"]),
    ],
    ids=["no-such-repo", "no-such-revision", "not-cached-offline"],
)
def test_hub_failures_are_one_line_bundle_errors(source, fake_hub, tmp_path, repo, kwargs, needles):
    source[2].push_to_hub("guda/test-bundle", token="hf_test", endpoint=fake_hub.url)
    with pytest.raises(BundleError) as caught:
        AdapterBundle.from_pretrained(repo, cache_dir=tmp_path / "cache", endpoint=fake_hub.url, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, needle


def test_a_hub_that_cannot_be_reached_is_a_bundle_error(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BundleError, match=r"HF_HUB_OFFLINE=1 forbids downloads; go online, or pre-download it with `hf download guda/x --revision v1`"):
        AdapterBundle.from_pretrained("guda/x", revision="v1", cache_dir=tmp_path)
