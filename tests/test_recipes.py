"""Recipes: the shipped files, the family table, overrides, and the errors of unlearn_groups' arguments."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DModel,
)

import diffusers_guda
from diffusers_guda import ConfigError, GUDADDPMPipeline, Recipe, UnlearningConfig, available_recipes, default_recipe
from diffusers_guda.pipelines import (
    GUDAFluxPipeline,
    GUDAStableDiffusion3Pipeline,
    GUDAStableDiffusionPipeline,
    GUDAStableDiffusionXLPipeline,
    GUDATextToImagePipeline,
)
from diffusers_guda.recipes import RECIPE_PACKAGE

from conftest import make_tiny_dataset, tiny_unet_config


def test_the_shipped_recipes_are_the_package_data():
    from importlib import resources

    shipped = sorted(p.name.removesuffix(".json") for p in resources.files(RECIPE_PACKAGE).iterdir() if p.name.endswith(".json"))
    assert available_recipes() == shipped
    assert {"digits-ddpm", "digits-styles", "sd-styles", "sdxl-styles", "sd3-styles", "flux-styles"} <= set(shipped)
    for name in available_recipes():
        assert Recipe.load(name).name == name


@pytest.mark.parametrize("name, rows", [("sd3-styles", 16), ("flux-styles", 8)])
def test_the_flow_matching_recipes_set_a_sigma_grid_and_lora_on_the_joint_attention(name, rows):
    recipe = Recipe.load(name)
    assert recipe.elbo.grid_size == 100 and recipe.elbo.sigma_min == 0.005 and recipe.elbo.stride is None
    assert recipe.elbo.rows_per_forward == rows and recipe.unlearning.autocast_dtype == "auto"
    targets = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert set(recipe.unlearning.lora.target_modules) == targets
    assert recipe.unlearning.gradient_checkpointing is (name == "flux-styles")  # Flux's recipe recomputes activations (memory)


@pytest.mark.parametrize(
    "pipeline_class, recipe",
    [
        (GUDAStableDiffusionPipeline, "sd-styles"),
        (GUDAStableDiffusionXLPipeline, "sdxl-styles"),
        (StableDiffusionXLPipeline, "sdxl-styles"),
        (GUDAStableDiffusion3Pipeline, "sd3-styles"),
        (StableDiffusion3Pipeline, "sd3-styles"),
        (GUDAFluxPipeline, "flux-styles"),
        (FluxPipeline, "flux-styles"),
        (GUDATextToImagePipeline, "digits-styles"),
        (GUDADDPMPipeline, "digits-ddpm"),
        (DDPMPipeline, "digits-ddpm"),  # a stock pipeline passed to the functional API
        (DDIMPipeline, "digits-ddpm"),
    ],
)
def test_each_family_has_its_recipe(pipeline_class, recipe):
    assert default_recipe(pipeline_class).name == recipe


def test_a_family_without_a_recipe_is_named():
    with pytest.raises(ConfigError, match="No recipe is known for UNet2DModel; pass recipe="):
        default_recipe(UNet2DModel)


def test_settings_override_the_recipe():
    recipe = Recipe.load("sd-styles")
    config = recipe.unlearning_with(steps=7, batch_size=3, lora_rank=4, preserve_weight=2.0)
    assert config.steps == 7 and config.forget_batch_size == config.retain_batch_size == 3
    assert config.lora.rank == 4 and config.lora.alpha == 4.0  # alpha follows a new rank
    assert config.lora.target_modules == recipe.unlearning.lora.target_modules
    assert config.objective == "anchor" and config.objective_options["preserve_weight"] == 2.0
    assert config.objective_options["beta"] == recipe.unlearning.objective_options["beta"]  # the rest is the recipe's
    assert recipe.unlearning.steps == 400  # the recipe itself is unchanged


def test_another_objective_starts_from_its_own_defaults():
    config = Recipe.load("sd-styles").unlearning_with(objective="esd")
    assert config.objective == "esd" and config.objective_options == {}


def test_an_unknown_setting_is_named():
    with pytest.raises(ConfigError, match=r"no option\(s\) \['stepz'\]"):
        Recipe.load("digits-ddpm").unlearning_with(stepz=3)


def test_an_unknown_recipe_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown recipe 'nope'; known recipes: \['digits-ddpm'"):
        Recipe.load("nope")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"unlearning": {"stepz": 1}}))
    with pytest.raises(ConfigError, match="'unlearning' has unknown field"):
        Recipe.load(path)


@pytest.fixture
def pipe():
    unet = UNet2DModel(**tiny_unet_config())
    return GUDADDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))


def test_config_and_keyword_settings_together_are_an_error(pipe):
    config = UnlearningConfig(steps=1)
    with pytest.raises(ConfigError, match=r"either config= .* not both \(got config= and \['steps'\]\)"):
        pipe.unlearn_groups(make_tiny_dataset(), config=config, steps=2, progress=False)
    with pytest.raises(ConfigError, match=r"got config= and \['recipe'\]"):
        pipe.unlearn_groups(make_tiny_dataset(), config=config, recipe="digits-ddpm", progress=False)
    assert pipe.guda_bundle is None and not getattr(pipe.unet, "peft_config", None)


def test_unlearn_groups_records_the_recipe_it_used(pipe):
    bundle = diffusers_guda.unlearn_groups(pipe, make_tiny_dataset(), steps=1, batch_size=2, groups=["left"], progress=False)
    recipe = Recipe.load("digits-ddpm")
    assert bundle.objective["name"] == recipe.unlearning.objective
    assert bundle.objective["config"]["kl_cap"] == recipe.unlearning.objective_options["kl_cap"]
    assert bundle.training["steps"] == 1 and bundle.elbo == recipe.elbo.to_dict()
    # a second run replaces the loaded bundle instead of clashing with its adapter names
    again = pipe.unlearn_groups(make_tiny_dataset(), steps=1, batch_size=2, groups=["left"], progress=False)
    assert pipe.guda_bundle is again and all(torch.equal(again.adapters["left"][k], t) for k, t in bundle.adapters["left"].items())


def test_a_bundle_that_records_no_elbo_settings_is_scored_with_the_familys(pipe):
    """Bundles made before bundles recorded their ELBO settings (``"elbo": null``)."""
    bundle = pipe.unlearn_groups(make_tiny_dataset(), steps=1, batch_size=2, progress=False)
    bundle.elbo = None
    result = pipe.attribute(make_tiny_dataset().images[:1], progress=False)
    assert result.metadata["elbo"] == Recipe.load("digits-ddpm").elbo.to_dict()
