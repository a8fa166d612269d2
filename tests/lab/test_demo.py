"""The demo's reuse of a finished bundle: only with the recipe's unlearning settings."""

from __future__ import annotations

import json
from dataclasses import replace

from diffusers_guda import GroupUnlearner
from diffusers_guda.bundle import MANIFEST_NAME
from guda_lab.demo import reusable_bundle
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.recipes import Recipe


def test_a_bundle_is_reused_only_with_the_same_unlearning_settings(tiny_unet, tiny_scheduler, tiny_dataset, tiny_recipe, tmp_path):
    recipe = Recipe.load(str(tiny_recipe))
    config = replace(recipe.unlearning, steps=1)
    recipe = replace(recipe, unlearning=config)
    path = tmp_path / "bundle"
    GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(tiny_dataset, groups=[0], progress=False).save_pretrained(path)
    fingerprint = unet_fingerprint(tiny_unet)

    assert reusable_bundle(path, fingerprint, recipe) is not None
    assert reusable_bundle(path, fingerprint, replace(recipe, unlearning=replace(config, size_exponent=1.0))) is None
    assert reusable_bundle(path, fingerprint, replace(recipe, unlearning=replace(config, steps=2))) is None

    # a bundle written before size_exponent existed was made with its default, 0
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    del manifest["training"]["size_exponent"]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert reusable_bundle(path, fingerprint, recipe) is not None
    assert reusable_bundle(path, fingerprint, replace(recipe, unlearning=replace(config, size_exponent=1.0))) is None
