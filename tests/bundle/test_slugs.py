"""Tests of diffusers_guda.bundle.slugs: group names as safe, unique directory names."""

from __future__ import annotations

import pytest

from diffusers_guda.bundle import MAX_SLUG_LENGTH, adapter_file_for, slugify, unique_slugs


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


def test_unique_slugs_in_order():
    assert unique_slugs(["B", "b", "a/b", "a-b"]) == ["b", "b-2", "a-b", "a-b-2"]
    assert unique_slugs([]) == []
    assert all(len(s) <= MAX_SLUG_LENGTH for s in unique_slugs(["y" * 300] * 12))
    assert adapter_file_for("b-2") == "adapters/b-2/pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("name, slug", [("CON", "con-group"), ("nul", "nul-group"), ("com1", "com1-group"), ("console", "console")])
def test_names_windows_reserves_for_devices_get_a_suffix(name, slug):
    assert slugify(name) == slug
