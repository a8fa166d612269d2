"""GUDAFluxPipeline on a tiny Flux built offline: packed latents, CLIP + T5, embedded guidance, bundles, CLI."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from diffusers_guda import ELBOEstimator, GUDAAutoPipeline
from diffusers_guda.errors import BundleError, ConfigError, DataError
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.pipelines import GUDAFluxPipeline, model_inputs, pipeline_class_for, pipeline_family
from diffusers_guda.pipelines.flow_conditioning import conditioning_settings
from diffusers_guda.testing import tiny_flux

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


def load(path) -> GUDAFluxPipeline:
    pipe = GUDAFluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock(path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


T5_LENGTH = 32  # the module's bundle: FluxPipeline's 512 T5 tokens would make every forward 16 times longer


@torch.no_grad()  # as the pipeline encodes (T5's attention may take another kernel when it tracks gradients)
def encode(pipe, prompt: str, max_sequence_length: int = T5_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, pooled, _ = pipe.encode_prompt(prompt, None, device="cpu", max_sequence_length=max_sequence_length)
    return embeds, pooled


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flux") / "base"
    tiny_flux(words=SD_WORDS, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_bundle(flux_dir):
    return make_bundle(load(flux_dir), max_sequence_length=T5_LENGTH)


@pytest.fixture
def flux_pipe(flux_dir, flux_bundle):
    pipe = load(flux_dir)
    pipe.load_guda_bundle(flux_bundle)
    return pipe


# -- the pipeline -----------------------------------------------------------------------------------


def test_from_pretrained_generates_like_the_stock_pipeline(flux_dir):
    ours = load(flux_dir)("a red square", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    theirs = stock(flux_dir)("a red square", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    assert ours.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_from_pipe_shares_every_component(flux_dir):
    base = stock(flux_dir)
    pipe = GUDAFluxPipeline.from_pipe(base)
    assert isinstance(pipe, GUDAFluxPipeline) and isinstance(GUDAAutoPipeline.from_pipe(base), GUDAFluxPipeline)
    for name, component in base.components.items():
        assert getattr(pipe, name) is component, name
    pipe.set_progress_bar_config(disable=True)
    a = pipe("a blue stripe", generator=torch.Generator().manual_seed(1), output_type="np", **GEN).images
    b = base("a blue stripe", generator=torch.Generator().manual_seed(1), output_type="np", **GEN).images
    np.testing.assert_array_equal(a, b)


def test_unlearning_records_a_flux_base_and_its_guidance(flux_bundle, flux_dir):
    check_bundle_record(flux_bundle, stock(flux_dir), "flux", "FluxTransformer2DModel")
    base = flux_bundle.base_model
    assert base["guidance"] == 3.5 and base["max_sequence_length"] == T5_LENGTH  # the default guidance, FluxPipeline's
    assert conditioning_settings(load(flux_dir)) == {"max_sequence_length": 512, "guidance": 3.5}  # FluxPipeline's defaults
    assert base["in_channels"] == 64 and base["sample_size"] is None  # 2 x 2 patches of 16 channels; no sample size


def test_save_pretrained_writes_a_stock_directory(flux_pipe, tmp_path):
    flux_pipe.save_pretrained(tmp_path / "saved")
    saved = FluxPipeline.from_pretrained(tmp_path / "saved")
    assert unet_fingerprint(saved.transformer) == unet_fingerprint(flux_pipe.transformer)
    assert not any("base_layer" in k or "lora" in k for k in saved.transformer.state_dict())


# -- Flux's conditioning and the flow-matching ELBO --------------------------------------------------------


def test_conditioning_is_fluxs_and_the_elbo_matches_a_direct_computation(flux_pipe):
    images = make_sd_dataset().images[[0, 7]]
    _, per_image, _ = model_inputs(flux_pipe, images, prompts=PROMPTS[:2], settings={"max_sequence_length": T5_LENGTH, "guidance": 3.5})
    embeds, pooled = encode(flux_pipe, PROMPTS[0])
    shapes = {k: tuple(v.shape) for k, v in per_image[0].items()}
    assert shapes == {"encoder_hidden_states": (1, T5_LENGTH, 64), "pooled_projections": (1, 32), "guidance": (1,)}
    assert torch.equal(per_image[0]["encoder_hidden_states"], embeds) and torch.equal(per_image[0]["pooled_projections"], pooled)
    assert per_image[0]["guidance"].tolist() == [3.5]

    result = flux_pipe.attribute(images, prompts=PROMPTS[:2], progress=False)
    assert result.metadata["conditioning"] == {"max_sequence_length": T5_LENGTH, "guidance": 3.5}

    class Direct(torch.nn.Module):  # the transformer called the way FluxPipeline.__call__ calls it
        def __init__(self, pipe, embeds, pooled):
            super().__init__()
            self.pipe, self.transformer, self.cond = pipe, pipe.transformer, (embeds, pooled)

        def forward(self, x, t):
            b, c, h, w = x.shape
            e, p = (v.expand(b, *v.shape[1:]) for v in self.cond)
            out = self.transformer(
                hidden_states=self.pipe._pack_latents(x, b, c, h, w), timestep=t / 1000, guidance=torch.full([b], 3.5),
                pooled_projections=p, encoder_hidden_states=e, txt_ids=torch.zeros(e.shape[1], 3),
                img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
            ).sample
            return type("Output", (), {"sample": self.pipe._unpack_latents(out, h * 2, w * 2, self.pipe.vae_scale_factor)})

    estimator = ELBOEstimator(flux_pipe.scheduler, ELBO)
    latents = flux_pipe.encode_latents(images)
    assert latents.shape == (2, 16, 8, 8)
    flux_pipe.transformer.disable_adapters()
    for i, prompt in enumerate(PROMPTS[:2]):
        embeds, pooled = encode(flux_pipe, prompt)
        terms = estimator.terms(Direct(flux_pipe, embeds, pooled), latents[i], estimator.noise(latents[i]))
        torch.testing.assert_close(result.neg_elbo[i], estimator.scale * terms.mean(), rtol=1e-5, atol=0)


def test_scores_depend_on_the_prompt_not_on_the_batch_order_or_strategy(flux_pipe):
    check_batch_and_order_independence(flux_pipe)
    image = make_sd_dataset().images[13:14]
    embeds, pooled = encode(flux_pipe, PROMPTS[2])
    by_embeds = flux_pipe.attribute(image, prompt_embeds=embeds, pooled_prompt_embeds=pooled, progress=False)
    assert torch.equal(by_embeds.scores, flux_pipe.attribute(image, prompts=PROMPTS[2], progress=False).scores)
    with pytest.raises(DataError, match="pooled_prompt_embeds"):
        flux_pipe.attribute(image, prompt_embeds=embeds, progress=False)


def test_generate_and_attribute_in_one_call_under_guidance(flux_pipe):
    # the embedded guidance generated with shapes the sample; the score is the bundle's guidance (3.5)
    check_generate_and_attribute(flux_pipe, "prompt_2", guidance_scale=5.0)


def test_image_sizes_the_packing_cannot_take_are_refused(flux_pipe):
    with pytest.raises(DataError, match=r"2 x 2 latent patches, so height and width must be multiples of 4"):
        flux_pipe.attribute(torch.zeros(1, 3, 16, 18), prompts=PROMPTS[0], progress=False)


# -- embedded guidance ---------------------------------------------------------------------------------


def test_guidance_is_a_recorded_setting_and_a_mismatch_is_refused(flux_dir, flux_bundle):
    pipe = load(flux_dir)
    bundle = make_bundle(pipe, guidance=2.0, max_sequence_length=8, groups=["red", "green"])
    assert bundle.base_model["guidance"] == 2.0 and bundle.base_model["max_sequence_length"] == 8
    images = make_sd_dataset().images[:1]
    result = pipe.attribute(images, prompts=PROMPTS[0], progress=False)
    assert result.metadata["conditioning"] == {"max_sequence_length": 8, "guidance": 2.0}
    assert torch.equal(pipe.attribute(images, prompts=PROMPTS[0], guidance=2.0, progress=False).scores, result.scores)
    with pytest.raises(ConfigError, match=r"unlearned with guidance 2.0.*drop guidance=3.5"):
        pipe.attribute(images, prompts=PROMPTS[0], guidance=3.5, progress=False)
    # the same adapters told another guidance score otherwise: the guidance is part of the condition
    other = copy.copy(bundle)
    other.base_model = {**bundle.base_model, "guidance": 3.5}
    assert not torch.equal(pipe.attribute(images, prompts=PROMPTS[0], bundle=other, progress=False).scores, result.scores)
    missing = copy.copy(flux_bundle)
    missing.base_model = {k: v for k, v in flux_bundle.base_model.items() if k != "guidance"}
    with pytest.raises(ConfigError, match="records no guidance, but this FluxTransformer2DModel is guidance-distilled"):
        pipe.load_guda_bundle(missing)
    with pytest.raises(ConfigError, match="guidance must be a finite number"):
        pipe.unlearn_groups(make_sd_dataset(per_group=2), guidance=float("nan"), progress=False)


def test_a_checkpoint_is_not_resumed_with_another_guidance(flux_dir, tmp_path):
    pipe = load(flux_dir)
    make_bundle(pipe, guidance=2.0, max_sequence_length=8, groups=["red"], checkpoint_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="unlearned with other"):
        make_bundle(pipe, guidance=3.0, max_sequence_length=8, groups=["red", "green"], checkpoint_dir=tmp_path / "run")


def test_a_transformer_without_guidance_embedding_takes_none(tmp_path):
    pipe = tiny_flux(words=SD_WORDS, guidance_embeds=False, pipeline_class=GUDAFluxPipeline)
    with pytest.raises(ConfigError, match="not guidance-distilled"):
        pipe.unlearn_groups(make_sd_dataset(per_group=2), guidance=3.5, progress=False)
    bundle = make_bundle(pipe, groups=["blue"], max_sequence_length=T5_LENGTH)
    assert bundle.base_model["guidance"] is None
    settings = {"max_sequence_length": T5_LENGTH, "guidance": None}
    _, per_image, _ = model_inputs(pipe, make_sd_dataset().images[:1], prompts=PROMPTS[0], settings=settings)
    assert "guidance" not in per_image[0]
    result = pipe.attribute(make_sd_dataset().images[:1], prompts=PROMPTS[0], progress=False)
    assert torch.isfinite(result.scores).all() and result.metadata["conditioning"]["guidance"] is None
    with pytest.raises(ConfigError, match="not guidance-distilled"):
        pipe.attribute(make_sd_dataset().images[:1], prompts=PROMPTS[0], guidance=3.5, progress=False)
    # a saved manifest with a malformed guidance is refused when read
    path = bundle.save_pretrained(tmp_path / "bundle")
    manifest = path / "guda_bundle.json"
    manifest.write_text(manifest.read_text().replace('"guidance": null', '"guidance": "high"'))
    with pytest.raises(BundleError, match="base_model.guidance"):
        pipe.load_guda_bundle(str(path))



@pytest.mark.parametrize("objective, options", OTHER_OBJECTIVES)
def test_other_objectives_unlearn_a_flux_group(flux_dir, objective, options):
    check_other_objective(load(flux_dir), objective, options)

# -- bundles ------------------------------------------------------------------------------------------


def test_saved_bundle_scores_like_the_one_in_memory(flux_pipe, flux_bundle, flux_dir, tmp_path):
    loaded = check_saved_bundle_scores_alike(flux_pipe, flux_bundle, load(flux_dir), tmp_path)
    assert loaded.base_model["guidance"] == 3.5
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "bundle.load_into(pipe.transformer)" in card and 'prefix="transformer"' in card and "`GUDAFluxPipeline`" in card
    assert "embedded guidance 3.5" in card and "(posterior mean - shift) x scaling factor" in card


def test_transformer_adapters_are_refused_by_a_unet_before_anything_is_added(flux_bundle):
    from diffusers_guda.testing import tiny_stable_diffusion

    unet = tiny_stable_diffusion(words=SD_WORDS).unet
    with pytest.raises(BundleError, match=r"does not fit this UNet2DConditionModel: its weights are a transformer's"):
        flux_bundle.load_into(unet, check_base=False)
    assert not getattr(unet, "peft_config", None)


def test_bundle_adapters_load_with_stock_load_lora_weights(flux_bundle, flux_dir, tmp_path):
    check_stock_lora_loading(flux_bundle, stock(flux_dir), load(flux_dir), tmp_path)


def test_sd_and_sdxl_bundles_refuse_flux_pipelines_and_back(flux_bundle, flux_dir):
    check_cross_family_refusal(flux_bundle, load(flux_dir), "flux", "GUDAFluxPipeline")


# -- auto pipeline and command line ----------------------------------------------------------------


def test_auto_pipeline_and_cli_detect_a_flux_base(flux_dir, tmp_path):
    assert pipeline_class_for(flux_dir) is GUDAFluxPipeline
    assert isinstance(GUDAAutoPipeline.from_pretrained(flux_dir), GUDAFluxPipeline)
    assert pipeline_family(FluxPipeline) == pipeline_family(GUDAFluxPipeline) == "flux"
    made = run_cli(flux_dir, tmp_path, "flux", "--guidance", 4.0, "--max-sequence-length", 16)
    assert made.base_model["guidance"] == 4.0 and made.base_model["max_sequence_length"] == 16
    assert made.elbo["rows_per_forward"] == 8 and made.training["gradient_checkpointing"] is True  # the flux-styles recipe
