"""The evaluation's methods on one base: the settings that key their cached scores, their sample passes."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from diffusers_guda.elbo import ELBOEstimator
from diffusers_guda.pipelines import GUDADDPMPipeline
from diffusers_guda.recipes import Recipe
from guda_lab import training_config
from guda_lab.evaluation.gradient import GradientConfig
from guda_lab.evaluation.instance_unlearning import InstanceUnlearningConfig
from guda_lab.evaluation.kernel import DASConfig, DTRAKConfig
from guda_lab.evaluation.methods import METHODS, MethodScorer, model_classes
from guda_lab.evaluation.report import CEILING, REFERENCE
from guda_lab.evaluation.similarity import nearest_neighbour_scores, similarity_scores


def _scorer(stock_pipeline_dir, tiny_dataset, tiny_recipe, logo_groups=None) -> MethodScorer:
    recipe = Recipe.load(str(tiny_recipe))
    pipe = GUDADDPMPipeline.from_pretrained(stock_pipeline_dir)
    models = {g: stock_pipeline_dir / "logo" / g for g in (logo_groups or tiny_dataset.group_names)}  # never loaded here
    logo = {REFERENCE: (0, models), CEILING: (7, models)}
    return MethodScorer(stock_pipeline_dir, pipe, tiny_dataset, recipe, training_config(recipe, "evaluate"), logo,
                        tiny_dataset.images[[0, 20]], None, GradientConfig(timesteps=(10, 50), num_draws=3),
                        InstanceUnlearningConfig(timesteps=(30,), steps=4), progress=False,
                        dtrak_config=DTRAKConfig(timesteps=(20, 40, 60), damping=0.5), das_config=DASConfig(num_draws=2, leverage=False))


def test_settings_key_each_method_by_what_its_scores_depend_on(stock_pipeline_dir, tiny_dataset, tiny_recipe):
    scorer = _scorer(stock_pipeline_dir, tiny_dataset, tiny_recipe)
    recipe = scorer.recipe
    assert scorer.settings(REFERENCE) == {"elbo": recipe.elbo.to_dict(), "train": scorer.train.to_dict(), "seed": 0}
    assert scorer.settings(CEILING)["seed"] == 7
    assert scorer.settings("guda") == {"elbo": recipe.elbo.to_dict(), "unlearning": recipe.unlearning.to_dict()}
    assert scorer.settings("similarity") == scorer.settings("nearest_neighbour") == {"features": "pixels"}
    assert scorer.settings("gradient") == GradientConfig(timesteps=(10, 50), num_draws=3).to_dict()
    assert scorer.settings("instance_unlearning")["steps"] == 4
    assert scorer.settings("dtrak") == DTRAKConfig(timesteps=(20, 40, 60), damping=0.5).to_dict()
    assert scorer.settings("das") == DASConfig(num_draws=2, leverage=False).to_dict() != DASConfig().to_dict()
    # LOGO for a subset of the groups: its scores are another matrix, so the subset is part of the key
    subset = _scorer(stock_pipeline_dir, tiny_dataset, tiny_recipe, logo_groups=tiny_dataset.group_names[:2])
    assert subset.settings(REFERENCE) == {**scorer.settings(REFERENCE), "logo_groups": tiny_dataset.group_names[:2]}
    assert subset.settings("guda") == scorer.settings("guda")


def test_passes_count_sample_passes(stock_pipeline_dir, tiny_dataset, tiny_recipe):
    scorer = _scorer(stock_pipeline_dir, tiny_dataset, tiny_recipe)
    n, m, k = 2, len(tiny_dataset), 3
    rows = ELBOEstimator(scorer.scheduler, scorer.recipe.elbo).num_rows
    for method in (REFERENCE, CEILING, "guda"):
        assert scorer.passes(method) == {"forwards": n * rows * (k + 1), "backwards": 0}
    subset = _scorer(stock_pipeline_dir, tiny_dataset, tiny_recipe, logo_groups=tiny_dataset.group_names[:2])
    assert subset.passes(REFERENCE) == {"forwards": n * rows * 3, "backwards": 0}  # the full model and 2 LOGO models
    assert subset.passes("guda") == scorer.passes("guda")
    assert scorer.passes("similarity")["forwards"] == scorer.passes("nearest_neighbour")["backwards"] == 0
    gradient = scorer.passes("gradient")  # 2 timesteps x 3 draws per image
    assert gradient["forwards"] == gradient["backwards"] == (n + m) * 6
    dtrak = scorer.passes("dtrak")  # 3 timesteps x 1 draw per image
    assert dtrak["forwards"] == dtrak["backwards"] == (n + m) * 3 and "kernel inverse" in dtrak["note"]
    das = scorer.passes("das")  # the default 10 timesteps x 2 draws per image
    assert das["forwards"] == das["backwards"] == (n + m) * 20
    instance = scorer.passes("instance_unlearning")  # 1 timestep x 1 draw, 4 ascent steps
    assert instance["forwards"] == m + n * (4 + m) and instance["backwards"] == n * 4


def test_similarity_methods_compute_the_baselines(stock_pipeline_dir, tiny_dataset, tiny_recipe):
    scorer = _scorer(stock_pipeline_dir, tiny_dataset, tiny_recipe)
    assert torch.equal(scorer.compute("similarity"), similarity_scores(scorer.queries, tiny_dataset))
    assert torch.equal(scorer.compute("nearest_neighbour"), nearest_neighbour_scores(scorer.queries, tiny_dataset))
    assert set(METHODS) == {"guda", "similarity", "nearest_neighbour", "gradient", "instance_unlearning", "dtrak", "das"}
    assert model_classes(False) == (GUDADDPMPipeline, UNet2DModel)
    assert type(scorer.full_unet) is UNet2DModel and not scorer.full_unet.training
