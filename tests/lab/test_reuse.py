"""Finished stages the demo and the evaluation reuse: the base (same training config and images) and the
bundle (same base, same unlearning settings); a bundle made here records the recipe's ELBO settings;
an evaluation directory refuses other data."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from diffusers_guda import GroupUnlearner, GUDADDPMPipeline
from diffusers_guda.bundle import MANIFEST_NAME
from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.recipes import Recipe
from diffusers_guda.unlearning import STATS_NAME
from guda_lab import training_config
from guda_lab.reuse import DATA_RECORD, PARTIAL_BUNDLE, check_data_record, reusable_base, reusable_bundle, unlearn_bundle
from guda_lab.training import TRAIN_LOG_NAME
from guda_lab.training_checkpoint import data_identity

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_a_bundle_is_reused_only_with_the_same_unlearning_settings(tiny_unet, tiny_scheduler, tiny_dataset, tiny_recipe, tmp_path):
    recipe = Recipe.load(str(tiny_recipe))
    config = replace(recipe.unlearning, steps=1)
    recipe = replace(recipe, unlearning=config)
    path = tmp_path / "bundle"
    GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(tiny_dataset, groups=[0], progress=False).save_pretrained(path)
    fingerprint = unet_fingerprint(tiny_unet)

    assert reusable_bundle(path, fingerprint, recipe, "cpu") is not None
    assert reusable_bundle(path, fingerprint, replace(recipe, unlearning=replace(config, size_exponent=1.0)), "cpu") is None
    assert reusable_bundle(path, fingerprint, replace(recipe, unlearning=replace(config, steps=2)), "cpu") is None

    # a bundle written before size_exponent existed was made with its default, 0
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    del manifest["training"]["size_exponent"]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert reusable_bundle(path, fingerprint, recipe, "cpu") is not None
    assert reusable_bundle(path, fingerprint, replace(recipe, unlearning=replace(config, size_exponent=1.0)), "cpu") is None
    # the same for an objective setting: one the record lacks was at its default (the recipe's kl_cap 10 is retrack's)
    assert manifest["objective"]["name"] == "retrack" and manifest["objective"]["config"]["kl_cap"] == 10.0
    objective = manifest["objective"]["config"]
    del objective["kl_cap"]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert reusable_bundle(path, fingerprint, recipe, "cpu") is not None
    changed = replace(config, objective_options={**config.objective_options, "kl_cap": 20.0})
    assert reusable_bundle(path, fingerprint, replace(recipe, unlearning=changed), "cpu") is None
    # a setting this version does not know: not reusable, and no error
    objective["no_such_setting"] = 1
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert reusable_bundle(path, fingerprint, recipe, "cpu") is None
    del objective["no_such_setting"]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    # autocast "auto" is bfloat16 on CUDA: a bundle made on CPU is not what a CUDA run would make
    assert reusable_bundle(path, fingerprint, recipe, "cuda") is None
    # another base model (fingerprint) or no bundle at all: nothing to reuse
    assert reusable_bundle(path, "0" * len(fingerprint), recipe, "cpu") is None
    assert reusable_bundle(tmp_path / "missing", fingerprint, recipe, "cpu") is None


def test_a_base_is_reused_only_with_the_same_training_config_and_images(tiny_recipe, tiny_dataset, tmp_path):
    train = training_config(Recipe.load(str(tiny_recipe)), "demo")
    base = tmp_path / "base"
    assert not reusable_base(base, train, tiny_dataset)
    base.mkdir()
    log = {"config": train.to_dict(), "data": data_identity(tiny_dataset)}
    (base / TRAIN_LOG_NAME).write_text(json.dumps(log))
    assert reusable_base(base, train, tiny_dataset)
    assert not reusable_base(base, replace(train, steps=train.steps + 1), tiny_dataset)
    assert not reusable_base(base, train, tiny_dataset.with_images(tiny_dataset.images.flip(-1)))
    # a log from before the data were recorded cannot be checked: trusted
    (base / TRAIN_LOG_NAME).write_text(json.dumps({"config": train.to_dict()}))
    assert reusable_base(base, train, tiny_dataset.with_images(tiny_dataset.images.flip(-1)))


def test_the_data_record_refuses_other_images_or_groups_and_trusts_an_old_directory(tiny_dataset, tmp_path):
    check_data_record(tmp_path, tiny_dataset)
    recorded = (tmp_path / DATA_RECORD).read_bytes()
    check_data_record(tmp_path, tiny_dataset)  # the same data: accepted
    with pytest.raises(ConfigError, match="other images or prompts"):
        check_data_record(tmp_path, tiny_dataset.with_images(tiny_dataset.images.flip(-1)))
    regrouped = GroupedDataset.from_arrays(tiny_dataset.images, tiny_dataset.group_ids.roll(1), tiny_dataset.group_names)
    with pytest.raises(ConfigError, match="other groups of these images; choose another --out .copy its base/, queries/ and queries.json"):
        check_data_record(tmp_path, regrouped)
    assert (tmp_path / DATA_RECORD).read_bytes() == recorded
    (tmp_path / DATA_RECORD).unlink()  # a directory made before the record: trusted, and recorded now
    check_data_record(tmp_path, regrouped)
    assert json.loads((tmp_path / DATA_RECORD).read_text())["members"] != json.loads(recorded)["members"]


def _evaluation_dir(tmp_path, stock_pipeline_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "base").symlink_to(stock_pipeline_dir, target_is_directory=True)
    return out


def _base_pipe(out):
    pipe = GUDADDPMPipeline.from_pretrained(out / "base")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_unlearn_bundle_records_the_recipe_and_leaves_no_partial_bundle(stock_pipeline_dir, tiny_dataset, tiny_recipe, tmp_path):
    recipe = Recipe.load(str(tiny_recipe))
    # ELBO settings unlike any shipped recipe's, so the manifest can only have them from this recipe
    recipe = replace(recipe, unlearning=replace(recipe.unlearning, steps=1), elbo=replace(recipe.elbo, stride=30, t_min=7))
    out = _evaluation_dir(tmp_path, stock_pipeline_dir)
    pipe = _base_pipe(out)
    bundle, resumed = unlearn_bundle(pipe, tiny_dataset, recipe, out, progress=False)
    assert resumed == []
    assert not (out / PARTIAL_BUNDLE).exists()
    manifest = json.loads((out / "bundle" / MANIFEST_NAME).read_text())
    assert manifest["elbo"] == recipe.elbo.to_dict() == bundle.elbo
    assert manifest["base_model"]["id"] == str(out / "base")
    assert [g["name"] for g in manifest["groups"]] == tiny_dataset.group_names
    assert reusable_bundle(out / "bundle", unet_fingerprint(pipe.unet), recipe, pipe.device) is not None


def test_unlearn_bundle_resumes_an_interrupted_run_and_drops_groups_of_another(stock_pipeline_dir, tiny_dataset, tiny_recipe, tmp_path):
    recipe = Recipe.load(str(tiny_recipe))
    recipe = replace(recipe, unlearning=replace(recipe.unlearning, steps=1))
    first = tiny_dataset.group_names[0]
    out = _evaluation_dir(tmp_path, stock_pipeline_dir)
    whole, _ = unlearn_bundle(_base_pipe(out), tiny_dataset, recipe, out, progress=False)

    # an interrupted run: the first group finished, nothing else; a marker in its statistics shows whether it is reused
    _base_pipe(out).unlearn_groups(tiny_dataset, recipe=recipe, groups=[0], checkpoint_dir=out / PARTIAL_BUNDLE, progress=False)
    stats_path = out / PARTIAL_BUNDLE / whole.slugs[0] / STATS_NAME
    stats_path.write_text(json.dumps({**json.loads(stats_path.read_text()), "wall_s": 1e6}))
    messages = []
    resumed_bundle, resumed = unlearn_bundle(_base_pipe(out), tiny_dataset, recipe, out, progress=False, log=messages.append)
    assert resumed == [first] and messages == []
    assert resumed_bundle.groups[0].stats["wall_s"] == 1e6  # loaded from the checkpoint, not trained again
    assert all(torch.equal(whole.adapters[g][k], resumed_bundle.adapters[g][k]) for g in whole.adapters for k in whole.adapters[g])

    # groups of a run with other settings are not mixed in: deleted, and every group unlearned here
    _base_pipe(out).unlearn_groups(tiny_dataset, recipe=replace(recipe, unlearning=replace(recipe.unlearning, steps=2)), groups=[0],
                                   checkpoint_dir=out / PARTIAL_BUNDLE, progress=False)
    again, resumed = unlearn_bundle(_base_pipe(out), tiny_dataset, recipe, out, progress=False, log=messages.append)
    assert resumed == [] and len(messages) == 1 and "other settings, data or base model" in messages[0]
    assert [g.stats["steps"] for g in again.groups] == [1] * tiny_dataset.num_groups
    assert not (out / PARTIAL_BUNDLE).exists()
