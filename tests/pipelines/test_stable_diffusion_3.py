"""GUDAStableDiffusion3Pipeline on a tiny Stable Diffusion 3 built offline: three text encoders, flow matching, bundles, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from diffusers_guda import ELBOEstimator, GUDAAutoPipeline
from diffusers_guda.errors import ConfigError, DataError
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.pipelines import GUDAStableDiffusion3Pipeline, model_inputs, pipeline_class_for, pipeline_family
from diffusers_guda.pipelines.flow_conditioning import conditioning_settings
from diffusers_guda.testing import tiny_stable_diffusion_3

from conftest import SD_WORDS, make_sd_dataset
from flow_helpers import (
    ELBO,
    GEN,
    OTHER_OBJECTIVES,
    PROMPTS,
    check_batch_and_order_independence,
    check_bundle_record,
    check_cross_family_refusal,
    check_generate_and_attribute,
    check_other_objective,
    check_saved_bundle_scores_alike,
    check_stock_lora_loading,
    make_bundle,
    run_cli,
)

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def load(path) -> GUDAStableDiffusion3Pipeline:
    pipe = GUDAStableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


T5_LENGTH = 32  # the module's bundle: SD3's 256 T5 tokens would make every forward 5 times longer


@torch.no_grad()  # as the pipeline encodes (T5's attention may take another kernel when it tracks gradients)
def encode(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=T5_LENGTH)
    return embeds, pooled


def stock(path) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3") / "base"
    tiny_stable_diffusion_3(words=SD_WORDS, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd3_bundle(sd3_dir):
    return make_bundle(load(sd3_dir), max_sequence_length=T5_LENGTH)


@pytest.fixture
def sd3_pipe(sd3_dir, sd3_bundle):
    pipe = load(sd3_dir)
    pipe.load_guda_bundle(sd3_bundle)
    return pipe


# -- the pipeline -----------------------------------------------------------------------------------


def test_from_pretrained_generates_like_the_stock_pipeline(sd3_dir):
    ours = load(sd3_dir)("a red square", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    theirs = stock(sd3_dir)("a red square", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    assert ours.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_from_pipe_shares_every_component(sd3_dir):
    base = stock(sd3_dir)
    pipe = GUDAStableDiffusion3Pipeline.from_pipe(base)
    assert isinstance(pipe, GUDAStableDiffusion3Pipeline) and isinstance(GUDAAutoPipeline.from_pipe(base), GUDAStableDiffusion3Pipeline)
    for name, component in base.components.items():
        assert getattr(pipe, name) is component, name
    pipe.set_progress_bar_config(disable=True)
    a = pipe("a blue stripe", generator=torch.Generator().manual_seed(1), output_type="np", **GEN).images
    b = base("a blue stripe", generator=torch.Generator().manual_seed(1), output_type="np", **GEN).images
    np.testing.assert_array_equal(a, b)


def test_unlearning_records_an_sd3_base(sd3_bundle, sd3_dir):
    check_bundle_record(sd3_bundle, stock(sd3_dir), "stable-diffusion-3", "SD3Transformer2DModel")
    assert sd3_bundle.base_model["max_sequence_length"] == T5_LENGTH
    assert conditioning_settings(load(sd3_dir)) == {"max_sequence_length": 256}  # StableDiffusion3Pipeline.encode_prompt's default
    assert "guidance" not in sd3_bundle.base_model
    assert sd3_bundle.base_model["pipeline_class"] == "GUDAStableDiffusion3Pipeline"


def test_save_pretrained_writes_a_stock_directory(sd3_pipe, tmp_path):
    sd3_pipe.save_pretrained(tmp_path / "saved")
    saved = StableDiffusion3Pipeline.from_pretrained(tmp_path / "saved")
    assert unet_fingerprint(saved.transformer) == unet_fingerprint(sd3_pipe.transformer)
    assert not any("base_layer" in k or "lora" in k for k in saved.transformer.state_dict())


# -- SD3's conditioning and the flow-matching ELBO ---------------------------------------------------------


def test_conditioning_is_sd3s_and_the_elbo_matches_a_direct_computation(sd3_pipe):
    images = make_sd_dataset().images[[0, 7]]
    _, per_image, _ = model_inputs(sd3_pipe, images, prompts=PROMPTS[:2], settings={"max_sequence_length": T5_LENGTH})
    embeds, pooled = encode(sd3_pipe, PROMPTS[0])
    # CLIP-L's and CLIP-G's 16 tokens (side by side, padded to T5's width), then T5's tokens; both pooled embeddings
    shapes = {k: tuple(v.shape) for k, v in per_image[0].items()}
    assert shapes == {"encoder_hidden_states": (1, 16 + T5_LENGTH, 96), "pooled_projections": (1, 64)}
    assert torch.equal(per_image[0]["encoder_hidden_states"], embeds) and torch.equal(per_image[0]["pooled_projections"], pooled)
    assert (embeds[0, :16, 64:] == 0).all() and (embeds[0, 16:, 64:] != 0).any()  # CLIP's tokens zero-padded, T5's not

    result = sd3_pipe.attribute(images, prompts=PROMPTS[:2], progress=False)
    assert result.metadata["num_rows"] == 6 and result.metadata["sigmas"][2] == 6
    assert result.metadata["conditioning"] == {"max_sequence_length": T5_LENGTH}

    class Direct(torch.nn.Module):  # the transformer called the way StableDiffusion3Pipeline.__call__ calls it
        def __init__(self, transformer, embeds, pooled):
            super().__init__()
            self.transformer, self.cond = transformer, (embeds, pooled)

        def forward(self, x, t):
            e, p = (c.expand(len(x), *c.shape[1:]) for c in self.cond)
            return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p)

    estimator = ELBOEstimator(sd3_pipe.scheduler, ELBO)
    latents = sd3_pipe.encode_latents(images)
    with torch.no_grad():
        mean = sd3_pipe.vae.encode(images[:1]).latent_dist.mean
    torch.testing.assert_close(latents[:1], (mean - 0.0609) * 1.5035, rtol=0, atol=1e-6)  # SD3's shift and scaling
    sd3_pipe.transformer.disable_adapters()
    for i, prompt in enumerate(PROMPTS[:2]):
        embeds, pooled = encode(sd3_pipe, prompt)
        terms = estimator.terms(Direct(sd3_pipe.transformer, embeds, pooled), latents[i], estimator.noise(latents[i]))
        torch.testing.assert_close(result.neg_elbo[i], estimator.scale * terms.mean(), rtol=1e-5, atol=0)


def test_scores_depend_on_the_prompt_not_on_the_batch_order_or_strategy(sd3_pipe):
    check_batch_and_order_independence(sd3_pipe)
    image = make_sd_dataset().images[13:14]
    embeds, pooled = encode(sd3_pipe, PROMPTS[2])
    by_embeds = sd3_pipe.attribute(image, prompt_embeds=embeds, pooled_prompt_embeds=pooled, progress=False)
    assert torch.equal(by_embeds.scores, sd3_pipe.attribute(image, prompts=PROMPTS[2], progress=False).scores)
    with pytest.raises(DataError, match="pooled_prompt_embeds"):
        sd3_pipe.attribute(image, prompt_embeds=embeds, progress=False)
    with pytest.raises(ConfigError, match="size conditions"):
        sd3_pipe.attribute(image, prompts=PROMPTS[2], size_conditions=[16, 16, 0, 0, 16, 16], progress=False)


def test_generate_and_attribute_in_one_call_under_guidance(sd3_pipe):
    check_generate_and_attribute(sd3_pipe, "prompt_3", guidance_scale=5.0)


def test_image_sizes_the_patches_cannot_take_are_refused(sd3_pipe):
    with pytest.raises(DataError, match=r"2 x 2 latent patches, so height and width must be multiples of 4"):
        sd3_pipe.attribute(torch.zeros(1, 3, 14, 16), prompts=PROMPTS[0], progress=False)


def test_the_t5_length_is_recorded_and_scored_with_and_guidance_is_refused(sd3_dir):
    pipe = load(sd3_dir)
    with pytest.raises(ConfigError, match="no guidance embedding"):
        pipe.unlearn_groups(make_sd_dataset(per_group=2), guidance=3.5, progress=False)
    bundle = make_bundle(pipe, max_sequence_length=8, groups=["red"])
    assert bundle.base_model["max_sequence_length"] == 8
    images = make_sd_dataset().images[:1]
    _, per_image, _ = model_inputs(pipe, images, prompts=PROMPTS[0], settings={"max_sequence_length": 8})
    assert per_image[0]["encoder_hidden_states"].shape[1] == 16 + 8
    result = pipe.attribute(images, prompts=PROMPTS[0], progress=False)
    assert result.metadata["conditioning"] == {"max_sequence_length": 8}
    with pytest.raises(ConfigError, match="guidance"):
        pipe.attribute(images, prompts=PROMPTS[0], guidance=3.5, progress=False)



@pytest.mark.parametrize("objective, options", OTHER_OBJECTIVES)
def test_other_objectives_unlearn_a_sd3_group(sd3_dir, objective, options):
    check_other_objective(load(sd3_dir), objective, options)

# -- bundles ------------------------------------------------------------------------------------------


def test_saved_bundle_scores_like_the_one_in_memory(sd3_pipe, sd3_bundle, sd3_dir, tmp_path):
    check_saved_bundle_scores_alike(sd3_pipe, sd3_bundle, load(sd3_dir), tmp_path)


def test_bundle_adapters_load_with_stock_load_lora_weights(sd3_bundle, sd3_dir, tmp_path):
    check_stock_lora_loading(sd3_bundle, stock(sd3_dir), load(sd3_dir), tmp_path)


def test_sd_and_sdxl_bundles_refuse_sd3_pipelines_and_back(sd3_bundle, sd3_dir):
    check_cross_family_refusal(sd3_bundle, load(sd3_dir), "stable-diffusion-3", "GUDAStableDiffusion3Pipeline")


# -- auto pipeline and command line ----------------------------------------------------------------


def test_auto_pipeline_and_cli_detect_an_sd3_base(sd3_dir, tmp_path):
    assert pipeline_class_for(sd3_dir) is GUDAStableDiffusion3Pipeline
    assert isinstance(GUDAAutoPipeline.from_pretrained(sd3_dir), GUDAStableDiffusion3Pipeline)
    assert pipeline_family(StableDiffusion3Pipeline) == pipeline_family(GUDAStableDiffusion3Pipeline) == "stable-diffusion-3"
    made = run_cli(sd3_dir, tmp_path, "stable-diffusion-3", "--max-sequence-length", 16)
    assert made.elbo["rows_per_forward"] == 16 and made.elbo["grid_size"] == 100  # the sd3-styles recipe
    assert made.base_model["max_sequence_length"] == 16 and made.lora["target_modules"][-1] == "to_add_out"
