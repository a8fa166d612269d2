"""GUDAStableDiffusionPipeline on a tiny Stable Diffusion built offline: latents, prompts, CFG, from_pipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from diffusers_guda import AdapterBundle, ELBOConfig, ELBOEstimator, GroupUnlearner, UnlearningConfig
from diffusers_guda.errors import BaseModelMismatchError, ConfigError, DataError
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.pipelines import GUDAStableDiffusionPipeline

from conftest import SD_WORDS, make_sd_dataset, make_tiny_dataset, tiny_unet_config

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

GEN = dict(num_inference_steps=2, height=16, width=16)
UNLEARN_CONFIG = dict(
    objective_options={"num_neighbors": 2}, lora={"rank": 2, "alpha": 2.0}, steps=2,
    forget_batch_size=4, retain_batch_size=4, eval_images=4, eval_draws=1, learning_rate=1e-2,
)


def load(path) -> GUDAStableDiffusionPipeline:
    pipe = GUDAStableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_bundle(tiny_sd_dir):
    pipe = load(tiny_sd_dir)
    bundle = pipe.unlearn_groups(make_sd_dataset(), config=UnlearningConfig(objective="retrack", **UNLEARN_CONFIG), progress=False)
    bundle.elbo = ELBOConfig(stride=100).to_dict()
    return bundle


@pytest.fixture
def sd_pipe(tiny_sd_dir, sd_bundle):
    pipe = load(tiny_sd_dir)
    pipe.load_guda_bundle(sd_bundle)
    return pipe


def test_from_pretrained_generates_like_the_stock_pipeline(tiny_sd_dir):
    pipe = load(tiny_sd_dir)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    stock.set_progress_bar_config(disable=True)
    ours = pipe("a red square", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    theirs = stock("a red square", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    assert ours.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_from_pipe_shares_every_component(tiny_sd_dir):
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe = GUDAStableDiffusionPipeline.from_pipe(stock)
    assert isinstance(pipe, GUDAStableDiffusionPipeline)
    for name, component in stock.components.items():
        assert getattr(pipe, name) is component, name
    pipe.set_progress_bar_config(disable=True)
    stock.set_progress_bar_config(disable=True)
    a = pipe("a blue stripe", generator=torch.Generator().manual_seed(1), output_type="np", **GEN).images
    b = stock("a blue stripe", generator=torch.Generator().manual_seed(1), output_type="np", **GEN).images
    np.testing.assert_array_equal(a, b)


def test_unlearning_records_a_conditional_latent_base(sd_bundle, tiny_sd_dir):
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    base = sd_bundle.base_model
    assert base["conditional"] is True and base["latent"] is True
    assert base["class_name"] == "UNet2DConditionModel" and base["in_channels"] == 4 and base["sample_size"] == 8
    assert base["fingerprint"] == unet_fingerprint(stock.unet)
    assert base["id"] == str(tiny_sd_dir)
    assert base["vae_scaling_factor"] == pytest.approx(stock.vae.config.scaling_factor)
    assert sd_bundle.group_names == ["red", "green", "blue"]
    for group in sd_bundle.groups:
        assert group.stats["steps"] == 2 and np.isfinite(group.stats["forget_loss_after"])


def test_latents_are_batch_independent_posterior_means(sd_pipe):
    images = make_sd_dataset().images[[0, 7, 13]]
    latents = sd_pipe.encode_latents(images)
    with torch.no_grad():
        mean = sd_pipe.vae.encode(images[1:2]).latent_dist.mean * sd_pipe.vae.config.scaling_factor
    assert latents.shape == (3, 4, 8, 8)
    torch.testing.assert_close(latents[1:2], mean, rtol=0, atol=1e-6)
    assert torch.equal(sd_pipe.encode_latents(images[1:2])[0], latents[1])  # not a sample: no randomness
    assert torch.equal(sd_pipe.encode_latents(images[[2, 1]])[1], latents[1])


def test_conditional_elbo_matches_a_direct_computation(sd_pipe):
    images = make_sd_dataset().images[[0, 7]]
    prompts = ["a square in red style", "a stripe in green style"]
    result = sd_pipe.attribute(images, prompts=prompts, progress=False)
    assert result.scores.shape == (2, 3) and torch.isfinite(result.scores).all()
    assert (result.scores != 0).all() and (result.stderr > 0).all()
    assert result.metadata["prompts"] == prompts and result.metadata["num_rows"] == 9
    # the full model's -ELBO of the latent given its prompt, computed by hand with the same draws
    estimator = ELBOEstimator(DDPMScheduler.from_config(sd_pipe.scheduler.config), ELBOConfig(stride=100))
    latents = sd_pipe.encode_latents(images)
    sd_pipe.unet.disable_adapters()
    for i, prompt in enumerate(prompts):
        embeds, _ = sd_pipe.encode_prompt(prompt, "cpu", 1, False)
        terms = estimator.terms(sd_pipe.unet, latents[i], estimator.noise(latents[i]), unet_kwargs={"encoder_hidden_states": embeds})
        torch.testing.assert_close(result.neg_elbo[i], estimator.scale * terms.mean(), rtol=1e-5, atol=0)
    assert result.image_hashes == estimator.image_hashes(latents)


def test_scores_depend_on_the_prompt_not_on_the_batch(sd_pipe):
    images = make_sd_dataset().images[[0, 7, 13]]
    prompts = ["a square in red style", "a stripe in red style", "a stripe in green style"]
    full = sd_pipe.attribute(images, prompts=prompts, batch_size=3, progress=False)
    alone = sd_pipe.attribute(images[2:3], prompts=prompts[2:], batch_size=1, progress=False)
    assert torch.equal(alone.scores[0], full.scores[2]) and torch.equal(alone.neg_elbo[0], full.neg_elbo[2])
    other = sd_pipe.attribute(images[2:3], prompts="a square in blue style", progress=False)
    assert not torch.equal(other.scores[0], full.scores[2])
    assert other.image_hashes == alone.image_hashes  # same latent, same draws: only the condition changed
    embeds, _ = sd_pipe.encode_prompt(prompts[2], "cpu", 1, False)
    by_embeds = sd_pipe.attribute(images[2:3], prompt_embeds=embeds, progress=False)
    assert torch.equal(by_embeds.scores, alone.scores)


def test_generate_and_attribute_in_one_call_under_guidance(sd_pipe):
    prompt = "a square in red style"
    kwargs = dict(guidance_scale=7.5, num_images_per_prompt=2, **GEN)
    out = sd_pipe(prompt, generator=torch.Generator().manual_seed(4), return_attribution=True, output_type="np",
                  attribution_kwargs={"progress": False}, **kwargs)
    plain = sd_pipe(prompt, generator=torch.Generator().manual_seed(4), output_type="np", **kwargs).images
    np.testing.assert_array_equal(out.images, plain)  # generation is the full model's, unchanged
    result = out.attribution
    assert result.scores.shape == (2, 3) and result.metadata["prompts"] == [prompt, prompt]
    # the conditional ELBO of each image given its prompt: the same as attributing the output afterwards
    again = sd_pipe.attribute(out.images, prompts=prompt, progress=False)
    assert torch.equal(again.scores, result.scores)
    images, nsfw, as_tuple = sd_pipe(prompt, generator=torch.Generator().manual_seed(4), return_attribution=True,
                                     return_dict=False, attribution_kwargs={"progress": False}, **kwargs)
    assert len(images) == 2 and images[0].size == (16, 16)  # PIL by default
    assert torch.equal(as_tuple.scores, result.scores)


def test_save_pretrained_writes_a_stock_directory(sd_pipe, tiny_sd_dir, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "saved")
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(stock.unet).__name__ == "UNet2DConditionModel"
    assert unet_fingerprint(stock.unet) == unet_fingerprint(sd_pipe.unet)
    assert not any("base_layer" in k or "lora" in k for k in stock.unet.state_dict())


# -- bad input ------------------------------------------------------------------------------------


def test_missing_or_miscounted_prompts_are_refused(sd_pipe):
    images = make_sd_dataset().images[:2]
    with pytest.raises(DataError, match="text-conditioned.*prompts="):
        sd_pipe.attribute(images, progress=False)
    with pytest.raises(DataError, match="2 images"):
        sd_pipe.attribute(images, prompts=["a red square"] * 3, progress=False)
    with pytest.raises(ConfigError, match="bundle"):
        load_args = dict(generator=torch.Generator().manual_seed(0), return_attribution=True, **GEN)
        fresh = GUDAStableDiffusionPipeline.from_pipe(sd_pipe)
        fresh._guda_bundle = None
        fresh("a red square", **load_args)


def test_image_sizes_the_vae_cannot_take_are_refused(sd_pipe):
    with pytest.raises(DataError, match="multiples of 2"):
        sd_pipe.attribute(torch.zeros(1, 3, 15, 16), prompts="a red square", progress=False)
    with pytest.raises(DataError, match="3-channel"):
        sd_pipe.attribute(torch.zeros(1, 1, 16, 16), prompts="a red square", progress=False)


def test_dataset_without_prompts_is_refused(tiny_sd_dir):
    pipe = load(tiny_sd_dir)
    data = make_sd_dataset()
    data.prompts = None
    with pytest.raises(DataError, match="no prompts"):
        pipe.unlearn_groups(data, objective="retrack", progress=False)
    assert pipe.guda_bundle is None and not getattr(pipe.unet, "peft_config", None)


def test_bundles_of_other_bases_or_unconditional_unets_are_refused(tiny_sd_dir, sd_bundle):
    from diffusers_guda.testing import tiny_stable_diffusion

    other = tiny_stable_diffusion(words=SD_WORDS, seed=1, pipeline_class=GUDAStableDiffusionPipeline)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        other.load_guda_bundle(sd_bundle)
    assert other.guda_bundle is None and not getattr(other.unet, "peft_config", None)

    from diffusers import DDPMScheduler

    from diffusers_guda import GUDAUNet2DModel

    torch.manual_seed(0)
    unet = GUDAUNet2DModel(**tiny_unet_config()).eval()
    config = UnlearningConfig(objective="retrack", **UNLEARN_CONFIG)
    pixel_bundle = GroupUnlearner(unet, DDPMScheduler(num_train_timesteps=100), config).unlearn(make_tiny_dataset(), groups=[0], progress=False)
    pipe = load(tiny_sd_dir)
    with pytest.raises(ConfigError, match="unconditional UNet"):
        pipe.load_guda_bundle(pixel_bundle)
    assert pipe.guda_bundle is None


# -- bundles ----------------------------------------------------------------------------------------


def test_bundle_adapters_load_with_stock_load_lora_weights_and_change_the_output(sd_pipe, sd_bundle, tiny_sd_dir, tmp_path):
    path = sd_bundle.save_pretrained(tmp_path / "bundle")
    group = sd_bundle.group("green")
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    stock.set_progress_bar_config(disable=True)
    before = stock("a stripe in green style", generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    stock.load_lora_weights(str(path), weight_name=group.adapter_file, adapter_name="green")
    assert stock.get_list_adapters() == {"unet": ["green"]}
    after = stock("a stripe in green style", generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    assert np.abs(after - before).max() > 1e-4  # the unlearned group's adapter changes what is generated
    # and it is exactly the adapter load_guda_bundle activates for that group
    fresh = load(tiny_sd_dir)
    fresh.load_guda_bundle(str(path))
    fresh.unet.enable_adapters()
    fresh.unet.set_adapter(AdapterBundle.adapter_name(group.slug))
    ours = fresh("a stripe in green style", generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    np.testing.assert_allclose(ours, after, rtol=0, atol=1e-6)


def test_saved_bundle_scores_like_the_one_in_memory(sd_pipe, sd_bundle, tiny_sd_dir, tmp_path):
    images, prompts = make_sd_dataset().images[[1, 8]], ["a stripe in red style", "a square in green style"]
    expected = sd_pipe.attribute(images, prompts=prompts, progress=False)
    path = sd_bundle.save_pretrained(tmp_path / "bundle")
    got = load(tiny_sd_dir).attribute(images, prompts=prompts, bundle=str(path), progress=False)
    assert torch.equal(got.scores, expected.scores)


def test_model_card_names_the_base_and_the_stock_loader(sd_bundle, tmp_path):
    from huggingface_hub import ModelCard

    bundle = AdapterBundle(
        groups=sd_bundle.groups, adapters=sd_bundle.adapters, adapter_configs=sd_bundle.adapter_configs, lora=sd_bundle.lora,
        base_model={**sd_bundle.base_model, "id": "someone/sd15-finetuned-styles"}, objective=sd_bundle.objective,
    )
    bundle.save_pretrained(tmp_path / "bundle")
    card = ModelCard.load(tmp_path / "bundle" / "README.md")
    assert card.data.base_model == "someone/sd15-finetuned-styles"
    assert card.data.library_name == "diffusers"
    assert "pipe.load_lora_weights(" in card.text and "prompt" in card.text and "VAE latent" in card.text


def test_half_precision_base_trains_float32_adapters_and_scores_unmerged(tiny_sd_dir):
    pipe = GUDAStableDiffusionPipeline.from_pretrained(tiny_sd_dir, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    config = UnlearningConfig(objective="anchor", **{**UNLEARN_CONFIG, "objective_options": {}, "steps": 1})
    bundle = pipe.unlearn_groups(make_sd_dataset(per_group=2), config=config, groups=["red"], progress=False)
    assert bundle.base_model["dtype"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in bundle.adapters["red"].values())  # AdamW on float32 LoRA weights
    result = pipe.attribute(make_sd_dataset().images[:1], prompts="a square in red style", elbo_config=ELBOConfig(stride=250), progress=False)
    # merging a small ΔW into bfloat16 weights would round it away: auto keeps the LoRA branch
    assert result.metadata["strategy"] == "swap" and torch.isfinite(result.scores).all()
