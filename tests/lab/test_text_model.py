"""The text-conditioned pixel-space recipe: training with prompts, the saved pipeline, the recipe section."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_guda import ConfigError, DataError, GroupedDataset
from guda_lab.evaluation.gradient import GradientConfig, gradient_scores
from guda_lab.evaluation.digits_styles import digits_styles
from diffusers_guda.pipelines.text_to_image import GUDATextToImagePipeline
from diffusers_guda.recipes import Recipe
from guda_lab import training_config
from guda_lab.text_model import TextTrainConfig
from guda_lab.training import TRAIN_LOG_NAME, train_base_model

VOCAB = ("digit", "plain", "thick", "slanted", "inverted")


def tiny_config(**overrides) -> TextTrainConfig:
    settings = dict(vocabulary=VOCAB, block_out_channels=(16, 32), norm_num_groups=8, num_train_timesteps=100,
                    steps=3, batch_size=8, warmup_steps=1)
    return TextTrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def data():
    return digits_styles(images_per_digit=4)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("text-model") / "base"
    train_base_model(data, tiny_config(), output_dir=path, progress=False)
    return path


def test_trains_and_saves_a_conditional_pipeline(trained, data):
    pipe = GUDATextToImagePipeline.from_pretrained(trained)
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.unet.config.cross_attention_dim == 32
    log = json.loads((trained / TRAIN_LOG_NAME).read_text())
    assert log["config"]["conditioning"] == "text" and log["config"]["vocabulary"] == list(VOCAB)
    assert log["num_images"] == len(data)
    generators = [torch.Generator().manual_seed(s) for s in range(2)]
    images = pipe(["digit 3, thick", "digit 3"], generator=generators, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and 0 <= images.min() and images.max() <= 1
    again = pipe(["digit 3, thick"], generator=[torch.Generator().manual_seed(0)], num_inference_steps=3, output_type="np").images
    assert torch.allclose(torch.from_numpy(again[0]), torch.from_numpy(images[0]), atol=1e-5)  # each image its own noise


def test_deterministic_and_text_encoder_shared_across_seeds(trained, data):
    first = GUDATextToImagePipeline.from_pretrained(trained)
    same = train_base_model(data, tiny_config(), progress=False)
    other = train_base_model(data.without_group(1), tiny_config(seed=5), progress=False)
    for key, value in first.unet.state_dict().items():
        assert torch.equal(value, same.unet.state_dict()[key]), key
    for key, value in first.text_encoder.state_dict().items():  # frozen, from text_seed: identical for every model
        assert torch.equal(value, other.text_encoder.state_dict()[key]), key
    assert not torch.equal(first.unet.conv_in.weight, other.unet.conv_in.weight)


def test_prompts_change_the_prediction(trained):
    pipe = GUDATextToImagePipeline.from_pretrained(trained)
    a, _ = pipe.encode_prompt("digit 3, thick")
    b, _ = pipe.encode_prompt("digit 3, inverted")
    x, t = torch.zeros(1, 1, 8, 8), torch.tensor([50])
    with torch.no_grad():
        assert not torch.allclose(pipe.unet(x, t, encoder_hidden_states=a).sample, pipe.unet(x, t, encoder_hidden_states=b).sample)


def test_needs_prompts_and_a_valid_section():
    plain = GroupedDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(DataError, match="no prompts"):
        train_base_model(plain, tiny_config(), progress=False)
    with pytest.raises(ConfigError, match="conditioning must be 'text'"):
        tiny_config(conditioning="image")


def test_recipe_section_selects_the_class(tmp_path):
    recipe = json.loads(json.dumps(Recipe.load("digits-styles").to_dict()))
    recipe["train"]["typo"] = 1
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(ConfigError, match="typo"):
        training_config(Recipe.load(path), "train")
    assert isinstance(training_config(Recipe.load("digits-styles"), "train"), TextTrainConfig)
    assert not isinstance(training_config(Recipe.load("digits-ddpm"), "train"), TextTrainConfig)


def test_loss_baselines_need_conditioning_for_a_conditional_unet(trained, data):
    pipe = GUDATextToImagePipeline.from_pretrained(trained)
    config = GradientConfig(timesteps=(50,), projection_dim=8)
    with pytest.raises(ConfigError, match="text-conditioned"):
        gradient_scores(pipe.unet, pipe.scheduler, data.images[:2], data, config)
    small = GroupedDataset(data.images[:6], torch.tensor([0, 0, 1, 1, 2, 3]), data.group_names, data.prompts[:6])
    cond = torch.cat([pipe.encode_prompt(p)[0] for p in small.prompts])
    scores = gradient_scores(pipe.unet, pipe.scheduler, small.images[:2], small, config, query_conditioning=cond[:2], train_conditioning=cond)
    assert scores.shape == (2, 4) and torch.isfinite(scores).all()


def test_flow_recipe_trains_a_text_to_image_flow_model_that_samples_at_sigma_times_t(data, tmp_path):
    """A text recipe with ``scheduler: flow`` saves a pipeline with a flow-matching scheduler; its sampler
    gives the UNet σ T, the time input it was trained at, and 4 Euler steps go from σ = 1 to σ = 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    train_base_model(data, tiny_config(scheduler="flow", num_train_timesteps=1000), output_dir=tmp_path / "base", progress=False)
    pipe = GUDATextToImagePipeline.from_pretrained(tmp_path / "base")
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, **kwargs: seen.append(float(t)) or forward(x, t, **kwargs)
    images = pipe(["digit 3, thick", "digit 7"], generator=[torch.Generator().manual_seed(s) for s in range(2)],
                  num_inference_steps=4, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and 0 <= images.min() and images.max() <= 1
    assert seen == pytest.approx([1000.0, 667.0, 334.0, 1.0])  # σ T on the sampler's grid from σ = 1 to 1/T
    assert pipe.scheduler.sigmas[-1] == 0
