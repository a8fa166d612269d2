"""GUDAStableDiffusionXLPipeline on a tiny SDXL built offline: SDXL's conditioning, objectives, bundles, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from diffusers_guda import AdapterBundle, ELBOConfig, ELBOEstimator, GroupedDataset, GUDAAutoPipeline, UnlearningConfig
from diffusers_guda.errors import BaseModelMismatchError, ConfigError, DataError
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.objectives import NoiseSchedule, UnlearningBatch, get_objective
from diffusers_guda.pipelines import (
    GUDAStableDiffusionPipeline,
    GUDAStableDiffusionXLPipeline,
    model_inputs,
    pipeline_class_for,
    pipeline_family,
)
from diffusers_guda.pipelines.conditioning import SDXLPromptEncoder
from diffusers_guda.testing import tiny_stable_diffusion, tiny_stable_diffusion_xl
from diffusers_guda.unlearning.forwards import UNetForwards

from conftest import SD_WORDS, make_sd_dataset
from test_cli import run

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

GEN = dict(num_inference_steps=2, height=16, width=16)
UNLEARN = dict(lora={"rank": 2, "alpha": 2.0}, steps=2, forget_batch_size=2, retain_batch_size=2, eval_images=2, eval_draws=1,
               learning_rate=1e-2)
DESCRIPTORS = {"red": ["red"], "green": ["green"], "blue": ["blue"]}
PROMPTS = ["a square in red style", "a stripe in red style", "a stripe in green style"]
DEFAULT_SIZES = [16, 16, 0, 0, 16, 16]


def load(path) -> GUDAStableDiffusionXLPipeline:
    pipe = GUDAStableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_dataset(per_group: int = 4, sizes: bool = False) -> GroupedDataset:
    data = make_sd_dataset(per_group=per_group)
    data.group_descriptors = DESCRIPTORS
    if sizes:  # every image "originally" 32x24, cropped at (4, 2)
        data.size_conditions = torch.tensor([[32, 24, 4, 2, 16, 16]] * len(data))
    return data


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl") / "base"
    tiny_stable_diffusion_xl(words=SD_WORDS, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sdxl_bundle(tiny_sdxl_dir):
    pipe = load(tiny_sdxl_dir)
    bundle = pipe.unlearn_groups(sdxl_dataset(), config=UnlearningConfig(objective="anchor", **UNLEARN), progress=False)
    bundle.elbo = ELBOConfig(stride=100).to_dict()
    return bundle


@pytest.fixture
def sdxl_pipe(tiny_sdxl_dir, sdxl_bundle):
    pipe = load(tiny_sdxl_dir)
    pipe.load_guda_bundle(sdxl_bundle)
    return pipe


def stock(path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the pipeline -----------------------------------------------------------------------------------


def test_from_pretrained_generates_like_the_stock_pipeline(tiny_sdxl_dir):
    ours = load(tiny_sdxl_dir)("a red square", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    theirs = stock(tiny_sdxl_dir)("a red square", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    assert ours.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_from_pipe_shares_every_component(tiny_sdxl_dir):
    base = stock(tiny_sdxl_dir)
    pipe = GUDAStableDiffusionXLPipeline.from_pipe(base)
    assert isinstance(pipe, GUDAStableDiffusionXLPipeline) and isinstance(GUDAAutoPipeline.from_pipe(base), GUDAStableDiffusionXLPipeline)
    for name, component in base.components.items():
        assert getattr(pipe, name) is component, name
    pipe.set_progress_bar_config(disable=True)
    a = pipe("a blue stripe", generator=torch.Generator().manual_seed(1), output_type="np", **GEN).images
    b = base("a blue stripe", generator=torch.Generator().manual_seed(1), output_type="np", **GEN).images
    np.testing.assert_array_equal(a, b)


def test_unlearning_records_an_sdxl_base(sdxl_bundle, tiny_sdxl_dir):
    base = sdxl_bundle.base_model
    assert base["pipeline_class"] == "GUDAStableDiffusionXLPipeline" and base["family"] == "stable-diffusion-xl"
    assert base["conditional"] is True and base["latent"] is True
    assert base["fingerprint"] == unet_fingerprint(stock(tiny_sdxl_dir).unet)
    assert sdxl_bundle.objective["name"] == "anchor" and sdxl_bundle.group_names == ["red", "green", "blue"]
    for group in sdxl_bundle.groups:
        assert group.stats["steps"] == 2 and np.isfinite(group.stats["forget_loss_after"])
        assert group.stats["forget_loss_after"] != group.stats["forget_loss_before"]


def test_save_pretrained_writes_a_stock_directory(sdxl_pipe, tmp_path):
    sdxl_pipe.save_pretrained(tmp_path / "saved")
    saved = StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved")
    assert unet_fingerprint(saved.unet) == unet_fingerprint(sdxl_pipe.unet)
    assert not any("base_layer" in k or "lora" in k for k in saved.unet.state_dict())


# -- SDXL's conditioning -------------------------------------------------------------------------------


def test_conditioning_is_sdxls_and_the_elbo_matches_a_direct_computation(sdxl_pipe):
    images = make_sd_dataset().images[[0, 7]]
    _, per_image, _ = model_inputs(sdxl_pipe, images, prompts=PROMPTS[:2])
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPTS[0], device="cpu", do_classifier_free_guidance=False)
    time_ids = sdxl_pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, sdxl_pipe.text_encoder_2.config.projection_dim)
    shapes = {k: tuple(v.shape) for k, v in per_image[0].items()}
    assert shapes == {"encoder_hidden_states": (1, 16, 64), "text_embeds": (1, 32), "time_ids": (1, 6)}
    assert torch.equal(per_image[0]["encoder_hidden_states"], embeds) and torch.equal(per_image[0]["text_embeds"], pooled)
    assert torch.equal(per_image[0]["time_ids"], time_ids) and time_ids.tolist() == [DEFAULT_SIZES]

    result = sdxl_pipe.attribute(images, prompts=PROMPTS[:2], progress=False)
    assert result.scores.shape == (2, 3) and (result.scores != 0).all() and (result.stderr > 0).all()

    class Direct(torch.nn.Module):  # the UNet called the way diffusers' SDXL __call__ calls it
        def __init__(self, unet, embeds, pooled, time_ids):
            super().__init__()
            self.unet, self.cond = unet, (embeds, pooled, time_ids)

        def forward(self, x, t):
            e, p, ids = (c.expand(len(x), *c.shape[1:]) for c in self.cond)
            return self.unet(x, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": p, "time_ids": ids})

    estimator = ELBOEstimator(DDPMScheduler.from_config(sdxl_pipe.scheduler.config), ELBOConfig(stride=100))
    latents = sdxl_pipe.encode_latents(images)
    sdxl_pipe.unet.disable_adapters()
    for i, prompt in enumerate(PROMPTS[:2]):
        embeds, _, pooled, _ = sdxl_pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        terms = estimator.terms(Direct(sdxl_pipe.unet, embeds, pooled, time_ids), latents[i], estimator.noise(latents[i]))
        torch.testing.assert_close(result.neg_elbo[i], estimator.scale * terms.mean(), rtol=1e-5, atol=0)


def test_scores_depend_on_the_prompt_not_on_the_batch(sdxl_pipe):
    images = make_sd_dataset().images[[0, 7, 13]]
    full = sdxl_pipe.attribute(images, prompts=PROMPTS, batch_size=3, progress=False)
    alone = sdxl_pipe.attribute(images[2:3], prompts=PROMPTS[2:], batch_size=1, progress=False)
    assert torch.equal(alone.scores[0], full.scores[2]) and torch.equal(alone.neg_elbo[0], full.neg_elbo[2])
    shuffled = sdxl_pipe.attribute(images[[2, 0]], prompts=[PROMPTS[2], PROMPTS[0]], batch_size=2, progress=False)
    assert torch.equal(shuffled.scores[0], full.scores[2]) and torch.equal(shuffled.scores[1], full.scores[0])
    other = sdxl_pipe.attribute(images[2:3], prompts="a square in blue style", progress=False)
    assert not torch.equal(other.scores[0], full.scores[2]) and other.image_hashes == alone.image_hashes
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPTS[2], device="cpu", do_classifier_free_guidance=False)
    by_embeds = sdxl_pipe.attribute(images[2:3], prompt_embeds=embeds, pooled_prompt_embeds=pooled, progress=False)
    assert torch.equal(by_embeds.scores, alone.scores)
    with pytest.raises(DataError, match="pooled_prompt_embeds"):
        sdxl_pipe.attribute(images[2:3], prompt_embeds=embeds, progress=False)


def test_size_conditions_set_the_time_ids_and_change_the_score(sdxl_pipe):
    images = make_sd_dataset().images[[0, 7]]
    default = sdxl_pipe.attribute(images, prompts=PROMPTS[:2], progress=False)
    explicit = sdxl_pipe.attribute(images, prompts=PROMPTS[:2], size_conditions=DEFAULT_SIZES, progress=False)
    assert torch.equal(explicit.scores, default.scores)
    sizes = torch.tensor([[32, 24, 4, 2, 16, 16], DEFAULT_SIZES])
    _, per_image, _ = model_inputs(sdxl_pipe, images, prompts=PROMPTS[:2], size_conditions=sizes)
    assert per_image[0]["time_ids"].tolist() == [[32.0, 24.0, 4.0, 2.0, 16.0, 16.0]]
    moved = sdxl_pipe.attribute(images, prompts=PROMPTS[:2], size_conditions=sizes, progress=False)
    assert not torch.equal(moved.scores[0], default.scores[0]) and torch.equal(moved.scores[1], default.scores[1])
    with pytest.raises(DataError, match=r"size_conditions must be whole numbers \[N, 6\]"):
        sdxl_pipe.attribute(images, prompts=PROMPTS[:2], size_conditions=[16, 16], progress=False)


def test_training_time_ids_come_from_the_datasets_size_conditions(sdxl_pipe):
    encoder = SDXLPromptEncoder(sdxl_pipe)
    forwards = UNetForwards(sdxl_pipe.unet, conditional=True, encode_prompts=encoder)
    index = torch.tensor([0, 5])
    latent = sdxl_pipe.encode_latents(sdxl_dataset().images)
    plain = forwards.cond(sdxl_dataset().with_images(latent), index)
    sized = forwards.cond(sdxl_dataset(sizes=True).with_images(latent), index)
    assert plain["time_ids"].tolist() == [DEFAULT_SIZES] * 2  # the pixel size: latent size x the VAE's factor
    assert sized["time_ids"].tolist() == [[32, 24, 4, 2, 16, 16]] * 2
    assert torch.equal(sized["encoder_hidden_states"], plain["encoder_hidden_states"]) and sized["text_embeds"].shape == (2, 32)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
    with torch.no_grad(), forwards.running(None):
        assert not torch.equal(forwards(x, t, plain), forwards(x, t, sized))


def test_generate_and_attribute_in_one_call_under_guidance(sdxl_pipe):
    prompt, kwargs = PROMPTS[0], dict(guidance_scale=5.0, num_images_per_prompt=2, **GEN)
    out = sdxl_pipe(prompt, generator=torch.Generator().manual_seed(4), return_attribution=True, output_type="np",
                    attribution_kwargs={"progress": False}, **kwargs)
    plain = sdxl_pipe(prompt, generator=torch.Generator().manual_seed(4), output_type="np", **kwargs).images
    np.testing.assert_array_equal(out.images, plain)  # generation is the full model's, unchanged
    assert out.attribution.scores.shape == (2, 3) and out.attribution.metadata["prompts"] == [prompt, prompt]
    assert torch.equal(sdxl_pipe.attribute(out.images, prompts=prompt, progress=False).scores, out.attribution.scores)
    # generated with other size conditions: scored with them
    sized = dict(original_size=(32, 24), crops_coords_top_left=(4, 2))
    images, result = sdxl_pipe(prompt, generator=torch.Generator().manual_seed(4), return_attribution=True, return_dict=False,
                               output_type="pt", attribution_kwargs={"progress": False}, **sized, **kwargs)
    again = sdxl_pipe.attribute(images * 2 - 1, prompts=prompt, size_conditions=[32, 24, 4, 2, 16, 16], progress=False)
    assert torch.equal(again.scores, result.scores)
    with pytest.raises(ConfigError, match="prompt_2"):
        sdxl_pipe(prompt, prompt_2="a stripe", return_attribution=True, **GEN)


# -- objectives ---------------------------------------------------------------------------------------


def sdxl_batch(pipe, group: int) -> tuple[UnlearningBatch, GroupedDataset]:
    """A batch (and its latent dataset) whose images have non-default time ids; student and teacher are one UNet."""
    encoder = SDXLPromptEncoder(pipe)
    forwards = UNetForwards(pipe.unet, conditional=True, encode_prompts=encoder)
    data = sdxl_dataset(sizes=True)
    data = data.with_images(pipe.encode_latents(data.images))
    fi, ri = data.forget_indices(group)[:2], data.retain_indices(group)[:2]
    generator, t = torch.Generator().manual_seed(0), torch.tensor([200, 800])
    schedule = NoiseSchedule(DDPMScheduler.from_config(pipe.scheduler.config))
    return UnlearningBatch(
        data.images[fi], fi, t, torch.randn(2, 4, 8, 8, generator=generator), data.images[ri], ri, t,
        torch.randn(2, 4, 8, 8, generator=generator), forwards, forwards.teacher(), schedule, generator,
        forget_cond=forwards.cond(data, fi), retain_cond=forwards.cond(data, ri),
        forget_prompts=[data.prompts[i] for i in fi.tolist()], retain_prompts=[data.prompts[i] for i in ri.tolist()],
        encode_prompts=encoder, group=group,
    ), data


def test_anchor_redirects_to_other_groups_with_the_images_own_time_ids(tiny_sdxl_dir):
    pipe = load(tiny_sdxl_dir)
    batch, data = sdxl_batch(pipe, group=0)
    objective = get_objective("anchor", {})
    objective.setup(data, 0, batch.schedule)
    encoder = batch.encode_prompts
    # similarities use the pooled text embedding
    torch.testing.assert_close(objective._embed(encoder, PROMPTS[:1]), torch.nn.functional.normalize(encoder(PROMPTS[:1])["text_embeds"]))
    state = batch.generator.get_state()
    loss = objective.forget_loss(batch)
    anchors = objective.anchor_prompts(batch.forget_prompts, encoder, torch.Generator().set_state(state))
    assert all("red" not in a for a in anchors)
    anchor_cond = batch.prompt_cond(anchors, batch.forget_cond)
    assert torch.equal(anchor_cond["time_ids"], batch.forget_cond["time_ids"])
    assert anchor_cond["time_ids"][0].tolist() == [32, 24, 4, 2, 16, 16]
    assert torch.equal(anchor_cond["text_embeds"], encoder(anchors)["text_embeds"])
    x_t = batch.schedule.add_noise(batch.forget_x0, batch.forget_noise, batch.forget_t)
    with torch.no_grad():
        own, anchored = batch.model(x_t, batch.forget_t, batch.forget_cond), batch.model(x_t, batch.forget_t, anchor_cond)
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(own, anchored), rtol=1e-5, atol=1e-8)
    assert loss.item() > 0 and objective.preserve_loss(batch).item() == 0.0  # student == teacher


def test_esd_guides_away_with_the_images_own_time_ids(tiny_sdxl_dir):
    pipe = load(tiny_sdxl_dir)
    batch, _ = sdxl_batch(pipe, group=1)
    loss = get_objective("esd", {"guidance_weight": 2.0}).forget_loss(batch)
    empty = batch.prompt_cond([""], batch.forget_cond)
    assert empty["encoder_hidden_states"].shape == (2, 16, 64) and torch.equal(empty["time_ids"], batch.forget_cond["time_ids"])
    x_t = batch.schedule.add_noise(batch.forget_x0, batch.forget_noise, batch.forget_t)
    with torch.no_grad():
        cond, uncond = batch.model(x_t, batch.forget_t, batch.forget_cond), batch.model(x_t, batch.forget_t, empty)
    torch.testing.assert_close(loss.detach(), 9.0 * torch.nn.functional.mse_loss(cond, uncond), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("objective, options", [("esd", {}), ("retrack", {"num_neighbors": 2}), ("gradient_ascent", {})])
def test_other_objectives_unlearn_an_sdxl_group(tiny_sdxl_dir, objective, options):
    pipe = load(tiny_sdxl_dir)
    config = UnlearningConfig(objective=objective, objective_options=options, **{**UNLEARN, "steps": 1})
    bundle = pipe.unlearn_groups(sdxl_dataset(sizes=True), config=config, groups=["green"], progress=False)
    stats = bundle.group("green").stats
    assert stats["steps"] == 1 and np.isfinite(stats["forget_loss_after"]) and np.isfinite(stats["retain_loss_after"])


# -- bundles ------------------------------------------------------------------------------------------


def test_saved_bundle_scores_like_the_one_in_memory(sdxl_pipe, sdxl_bundle, tiny_sdxl_dir, tmp_path):
    images = make_sd_dataset().images[[1, 8]]
    expected = sdxl_pipe.attribute(images, prompts=PROMPTS[1:], progress=False)
    path = sdxl_bundle.save_pretrained(tmp_path / "bundle")
    loaded = AdapterBundle.from_pretrained(path)
    assert loaded.base_model["family"] == "stable-diffusion-xl" and loaded.elbo == sdxl_bundle.elbo
    got = load(tiny_sdxl_dir).attribute(images, prompts=PROMPTS[1:], bundle=str(path), progress=False)
    assert torch.equal(got.scores, expected.scores)


def test_bundle_adapters_load_with_stock_load_lora_weights(sdxl_bundle, tiny_sdxl_dir, tmp_path):
    path = sdxl_bundle.save_pretrained(tmp_path / "bundle")
    group, prompt = sdxl_bundle.group("green"), "a stripe in green style"
    base = stock(tiny_sdxl_dir)
    before = base(prompt, generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    base.load_lora_weights(str(path), weight_name=group.adapter_file, adapter_name="green")
    assert base.get_list_adapters() == {"unet": ["green"]}
    after = base(prompt, generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    assert np.abs(after - before).max() > 1e-4
    ours = load(tiny_sdxl_dir)
    ours.load_guda_bundle(str(path))
    ours.unet.enable_adapters()
    ours.unet.set_adapter(AdapterBundle.adapter_name(group.slug))
    ours_after = ours(prompt, generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    np.testing.assert_allclose(ours_after, after, rtol=0, atol=1e-6)


def test_sd_and_sdxl_bundles_refuse_each_others_pipelines(sdxl_bundle, tiny_sdxl_dir):
    sd = tiny_stable_diffusion(words=SD_WORDS, pipeline_class=GUDAStableDiffusionPipeline)
    expected = r"made for a stable-diffusion-xl pipeline .* GUDAStableDiffusionXLPipeline of the base"
    with pytest.raises(BaseModelMismatchError, match=expected):
        sd.load_guda_bundle(sdxl_bundle)
    assert sd.guda_bundle is None and not getattr(sd.unet, "peft_config", None)  # refused before any adapter was added

    config = UnlearningConfig(objective="anchor", **{**UNLEARN, "steps": 1})
    sd_bundle = sd.unlearn_groups(sdxl_dataset(per_group=2), config=config, groups=["red"], progress=False)
    pipe = load(tiny_sdxl_dir)
    with pytest.raises(BaseModelMismatchError, match=r"made for a stable-diffusion pipeline .* this GUDAStableDiffusionXLPipeline"):
        pipe.load_guda_bundle(sd_bundle)
    del sd_bundle.base_model["family"]  # a bundle from before families were recorded: its pipeline class decides
    with pytest.raises(BaseModelMismatchError, match="stable-diffusion pipeline"):
        pipe.load_guda_bundle(sd_bundle)
    assert pipe.guda_bundle is None and not getattr(pipe.unet, "peft_config", None)


# -- auto pipeline and command line ----------------------------------------------------------------


def test_auto_pipeline_and_cli_detect_an_sdxl_base(tiny_sdxl_dir, tmp_path):
    from test_cli_text import write_captioned_folder

    assert pipeline_class_for(tiny_sdxl_dir) is GUDAStableDiffusionXLPipeline
    assert isinstance(GUDAAutoPipeline.from_pretrained(tiny_sdxl_dir), GUDAStableDiffusionXLPipeline)
    assert pipeline_family(StableDiffusionXLPipeline) == pipeline_family(GUDAStableDiffusionXLPipeline) == "stable-diffusion-xl"
    data, bundle, out = write_captioned_folder(tmp_path / "data"), tmp_path / "bundle", tmp_path / "result.json"
    code, _, err = run("unlearn", "--base", tiny_sdxl_dir, "--data", data, "--out", bundle, "--steps", 1, "--batch-size", 2,
                       "--rank", 2, "--quiet")
    assert code == 0, err
    made = AdapterBundle.from_pretrained(bundle)
    assert made.base_model["family"] == "stable-diffusion-xl" and made.objective["name"] == "anchor"  # the sdxl-styles recipe
    assert made.elbo["rows_per_forward"] == 16
    code, stdout, err = run("attribute", "--base", tiny_sdxl_dir, "--bundle", bundle, "--images", data / "red-0.png",
                            "--prompt", "a square in red style", "--stride", 250, "--out", out, "--quiet")
    assert code == 0, err
    assert "red-0.png" in stdout and out.is_file()


def test_a_float16_vae_that_overflows_encodes_in_float32(sdxl_pipe):
    """SDXL's VAE sets force_upcast (it overflows in float16): its latents are computed in float32."""
    import copy

    from diffusers_guda.pipelines.conditioning import encode_latent, vae_encoding_precision

    half = copy.deepcopy(sdxl_pipe.vae).to(torch.float16)
    full = copy.deepcopy(half).to(torch.float32)  # the same (rounded) weights, in float32
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert half.config.force_upcast
    with vae_encoding_precision(half):
        assert half.dtype == torch.float32
        upcast = encode_latent(half, image)
    assert half.dtype == torch.float16  # back as it was
    assert torch.equal(upcast, encode_latent(full, image))
    half.register_to_config(force_upcast=False)
    with vae_encoding_precision(half):
        assert half.dtype == torch.float16  # a VAE that does not ask for it stays in float16
