"""Tests of GUDADDPMPipeline and the functional API on stock diffusers pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

import diffusers_guda
from diffusers_guda import AdapterBundle, AttributionResult, ELBOConfig, GUDADDPMPipeline, GUDAUNet2DModel
from diffusers_guda.errors import BaseModelMismatchError, ConfigError, DataError
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.recipes import Recipe

from conftest import make_tiny_dataset, tiny_unet_config

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

UNLEARN = dict(steps=2, batch_size=4, lora_rank=2, progress=False)  # over the digits-ddpm recipe


def load(path) -> GUDADDPMPipeline:
    pipe = GUDADDPMPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_uint8(pipe, n: int = 3, seed: int = 0) -> np.ndarray:
    """Samples as uint8 NHWC, the way they are saved as PNG."""
    images = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=3, output_type="np").images
    return np.round(images * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shared_bundle(tmp_path_factory):
    """One bundle unlearned on the base that ``stock_pipeline_dir`` holds (same seed, same weights)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_config()).eval()
    path = tmp_path_factory.mktemp("shared") / "base"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    dataset = make_tiny_dataset()
    bundle = load(path).unlearn_groups(dataset, **UNLEARN)
    bundle.elbo = ELBOConfig(stride=5).to_dict()  # recorded ELBO settings are what attribute() uses by default
    return bundle


@pytest.fixture
def unlearned(stock_pipeline_dir, shared_bundle):
    """A GUDA pipeline loaded from the stock directory, with the shared bundle loaded."""
    pipe = load(stock_pipeline_dir)
    pipe.load_guda_bundle(shared_bundle)
    return pipe, shared_bundle


def test_from_pretrained_of_a_stock_directory(stock_pipeline_dir):
    pipe = load(stock_pipeline_dir)
    assert isinstance(pipe, GUDADDPMPipeline) and isinstance(pipe, DDPMPipeline)
    assert type(pipe.unet) is GUDAUNet2DModel
    assert pipe.guda_bundle is None
    stock = DDPMPipeline.from_pretrained(stock_pipeline_dir)
    assert unet_fingerprint(pipe.unet) == unet_fingerprint(stock.unet)


def test_generation_is_unchanged(stock_pipeline_dir):
    pipe = load(stock_pipeline_dir)
    stock = DDPMPipeline.from_pretrained(stock_pipeline_dir)
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="np")
    ours = pipe(generator=torch.Generator().manual_seed(7), **kwargs).images
    theirs = stock(generator=torch.Generator().manual_seed(7), **kwargs).images
    assert ours.shape == theirs.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_generation_with_a_loaded_bundle_is_the_full_model(unlearned, stock_pipeline_dir):
    pipe, _ = unlearned
    stock = DDPMPipeline.from_pretrained(stock_pipeline_dir)
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=3, output_type="np")
    ours = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    theirs = stock(generator=torch.Generator().manual_seed(1), **kwargs).images
    # a loaded bundle does not change what the pipeline generates: that is still the full model
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    pipe.attribute(torch.zeros(1, 1, 8, 8), progress=False)
    after = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_allclose(after, theirs, rtol=0, atol=1e-6)


def test_unlearn_groups_and_attribute(stock_pipeline_dir, tiny_dataset, shared_bundle):
    pipe = load(stock_pipeline_dir)
    bundle = pipe.unlearn_groups(tiny_dataset, **UNLEARN)
    assert isinstance(bundle, AdapterBundle)
    assert bundle.num_groups == 3 and bundle.group_names == ["left", "middle", "right"]
    assert pipe.guda_bundle is bundle
    assert set(pipe.unet.peft_config) == {AdapterBundle.adapter_name(s) for s in bundle.slugs}
    assert bundle.base_model["fingerprint"] == unet_fingerprint(DDPMPipeline.from_pretrained(stock_pipeline_dir).unet)
    assert bundle.base_model["id"] == str(stock_pipeline_dir)
    assert all(g.stats["steps"] == 2 for g in bundle.groups)
    assert bundle.lora["rank"] == 2 and bundle.objective["config"]["num_neighbors"] == "all"  # the recipe's
    # the same data, settings and base weights give the same adapters (here: as the shared bundle)
    for slug in bundle.slugs:
        assert all(torch.equal(v, shared_bundle.adapters[slug][k]) for k, v in bundle.adapters[slug].items())

    images = tiny_dataset.images[[0, 12, 24, 5]]
    result = pipe.attribute(images, progress=False)
    assert isinstance(result, AttributionResult)
    assert result.groups == ["left", "middle", "right"]
    assert result.scores.shape == result.stderr.shape == (4, 3)
    assert torch.isfinite(result.scores).all() and torch.isfinite(result.stderr).all()
    assert (result.stderr > 0).all()
    assert (result.scores != 0).any()
    assert result.neg_elbo.shape == (4,)
    assert result.metadata["base_model"] == str(stock_pipeline_dir)
    # scored with the ELBO settings the bundle recorded when it was made (the digits-ddpm recipe's:
    # stride 10 from t = 10 on this 100-step schedule), and the result says so
    assert bundle.elbo == Recipe.load("digits-ddpm").elbo.to_dict()
    assert result.metadata["elbo"] == bundle.elbo and result.metadata["num_rows"] == 9
    assert len(result.top_groups()) == 4


def test_attribute_uses_the_bundles_elbo_settings(unlearned, tiny_dataset):
    pipe, _ = unlearned
    result = pipe.attribute(tiny_dataset.images[:1], progress=False)
    assert result.metadata["elbo"]["stride"] == 5 and result.metadata["num_rows"] == 19
    override = pipe.attribute(tiny_dataset.images[:1], elbo_config=ELBOConfig(stride=20), progress=False)
    assert override.metadata["num_rows"] == 4
    assert not torch.equal(override.scores, result.scores)


def test_input_formats_give_the_same_scores(unlearned):
    pipe, _ = unlearned
    u8 = generate_uint8(pipe)
    as_float = u8.astype(np.float32) / 255.0  # numpy NHWC in [0, 1], like output_type="np"
    as_tensor = torch.from_numpy(as_float).permute(0, 3, 1, 2) * 2.0 - 1.0
    as_pil = [Image.fromarray(a[..., 0]) for a in u8]
    reference = pipe.attribute(as_tensor, progress=False)
    for images in (as_float, u8, as_pil):
        other = pipe.attribute(images, progress=False)
        assert torch.equal(other.scores, reference.scores), type(images)
        assert torch.equal(other.stderr, reference.stderr), type(images)
    # a single image without the batch dimension
    single = pipe.attribute(as_tensor[0], progress=False)
    assert torch.equal(single.scores, reference.scores[:1])


def test_raw_pipeline_output_is_accepted(unlearned):
    pipe, _ = unlearned
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=3, output_type="np").images
    from_np = pipe.attribute(images, progress=False)
    from_tensor = pipe.attribute(torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0, progress=False)
    assert torch.equal(from_np.scores, from_tensor.scores)


def test_scores_do_not_depend_on_the_batch_size(unlearned, tiny_dataset):
    pipe, _ = unlearned
    images = tiny_dataset.images[[1, 13, 25, 2]]
    one = pipe.attribute(images, batch_size=1, progress=False)
    four = pipe.attribute(images, batch_size=4, progress=False)
    assert torch.equal(one.scores, four.scores)
    assert torch.equal(one.stderr, four.stderr)
    assert torch.equal(one.neg_elbo, four.neg_elbo)
    # nor on the other images in the batch or their order
    alone = pipe.attribute(images[2:3], progress=False)
    assert torch.equal(alone.scores[0], one.scores[2])
    reversed_ = pipe.attribute(images.flip(0), batch_size=3, progress=False)
    assert torch.equal(reversed_.scores.flip(0), one.scores)


def test_bundle_round_trip_through_a_fresh_pipeline(unlearned, tiny_dataset, stock_pipeline_dir, tmp_path):
    pipe, bundle = unlearned
    images = tiny_dataset.images[[0, 13, 26]]
    expected = pipe.attribute(images, progress=False)
    bundle.save_pretrained(tmp_path / "bundle")

    fresh = load(stock_pipeline_dir)
    loaded = fresh.load_guda_bundle(str(tmp_path / "bundle"))
    assert loaded.group_names == bundle.group_names
    assert fresh.guda_bundle is loaded
    got = fresh.attribute(images, progress=False)
    assert torch.equal(got.scores, expected.scores)
    assert torch.equal(got.stderr, expected.stderr)
    assert got.metadata["bundle"]["path"] == str((tmp_path / "bundle").resolve())

    # and through the bundle= argument of attribute
    third = load(stock_pipeline_dir)
    assert torch.equal(third.attribute(images, bundle=tmp_path / "bundle", progress=False).scores, expected.scores)


def test_bundle_for_another_base_is_refused(unlearned, tmp_path):
    _, bundle = unlearned
    torch.manual_seed(1)
    other = GUDADDPMPipeline(unet=UNet2DModel(**tiny_unet_config()).eval(), scheduler=DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(BaseModelMismatchError) as info:
        other.load_guda_bundle(bundle)
    message = str(info.value)
    assert "fingerprint" in message and bundle.base_model["fingerprint"][:12] in message
    assert "base model" in message
    assert other.guda_bundle is None
    assert not getattr(other.unet, "peft_config", None)

    bundle.save_pretrained(tmp_path / "bundle")
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        other.load_guda_bundle(str(tmp_path / "bundle"))


def test_wrong_query_shape_is_refused(unlearned):
    pipe, _ = unlearned
    with pytest.raises(DataError, match=r"\(1, 8, 8\)"):
        pipe.attribute(torch.zeros(2, 1, 16, 16), progress=False)
    with pytest.raises(DataError, match=r"\(1, 8, 8\)"):
        pipe.attribute(torch.zeros(2, 3, 8, 8), progress=False)
    with pytest.raises(DataError, match=r"\(1, 8, 8\)"):
        pipe.attribute(np.zeros((2, 8, 8, 3), dtype=np.float32), progress=False)
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        pipe.attribute(torch.full((1, 1, 8, 8), 3.0), progress=False)
    with pytest.raises(DataError, match="Unsupported"):
        pipe.attribute("not an image", progress=False)


def test_attribute_without_a_bundle_is_refused(stock_pipeline_dir):
    pipe = load(stock_pipeline_dir)
    with pytest.raises(ConfigError, match="load_guda_bundle"):
        pipe.attribute(torch.zeros(1, 1, 8, 8), progress=False)


def test_functional_api_on_a_stock_pipeline(stock_pipeline_dir, tiny_dataset, tmp_path):
    stock = DDPMPipeline.from_pretrained(stock_pipeline_dir)
    stock.set_progress_bar_config(disable=True)
    fingerprint = unet_fingerprint(stock.unet)
    bundle = diffusers_guda.unlearn_groups(stock, tiny_dataset, **UNLEARN)
    assert type(stock) is DDPMPipeline  # its class is unchanged
    assert bundle.num_groups == 3
    assert bundle.base_model["fingerprint"] == fingerprint
    images = tiny_dataset.images[[0, 12]]
    elbo = ELBOConfig(stride=10)
    result = diffusers_guda.attribute(stock, images, elbo_config=elbo, progress=False)
    assert result.scores.shape == (2, 3) and torch.isfinite(result.scores).all()

    # the same adapters give the same scores in a GUDA pipeline
    guda = load(stock_pipeline_dir)
    assert torch.equal(guda.attribute(images, bundle=bundle, elbo_config=elbo, progress=False).scores, result.scores)

    # a second stock pipeline takes a saved bundle through the functional API
    bundle.save_pretrained(tmp_path / "bundle")
    other = DDPMPipeline.from_pretrained(stock_pipeline_dir)
    diffusers_guda.load_guda_bundle(other, str(tmp_path / "bundle"))
    assert type(other) is DDPMPipeline
    assert torch.equal(diffusers_guda.attribute(other, images, elbo_config=elbo, progress=False).scores, result.scores)


def test_unlearn_groups_refuses_a_dataset_of_another_size(stock_pipeline_dir):
    pipe = load(stock_pipeline_dir)
    dataset = diffusers_guda.GroupedDataset(torch.zeros(4, 1, 16, 16), torch.tensor([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(DataError, match=r"\(1, 8, 8\)"):
        pipe.unlearn_groups(dataset, **UNLEARN)


def test_unlearn_groups_subset_and_objective(stock_pipeline_dir, tiny_dataset):
    pipe = load(stock_pipeline_dir)
    bundle = pipe.unlearn_groups(tiny_dataset, groups=["right", "left"], objective="gradient_ascent",
                                 steps=2, batch_size=4, lora_rank=2, progress=False)
    assert bundle.group_names == ["right", "left"]
    assert bundle.objective["name"] == "gradient_ascent"
    result = pipe.attribute(tiny_dataset.images[:2], elbo_config=ELBOConfig(stride=10), progress=False)
    assert result.groups == ["right", "left"] and result.scores.shape == (2, 2)
    with pytest.raises(ConfigError, match="retrack"):
        pipe.unlearn_groups(tiny_dataset, objective="nope", progress=False)


def test_save_pretrained_writes_a_stock_base_even_with_adapters_loaded(unlearned, tmp_path):
    pipe, bundle = unlearned
    pipe.save_pretrained(tmp_path / "saved")
    index = (tmp_path / "saved" / "model_index.json").read_text()
    assert '"DDPMPipeline"' in index and '"UNet2DModel"' in index
    stock = DDPMPipeline.from_pretrained(tmp_path / "saved")
    assert type(stock.unet) is UNet2DModel
    assert unet_fingerprint(stock.unet) == bundle.base_model["fingerprint"]
    reloaded = load(tmp_path / "saved")
    reloaded.load_guda_bundle(bundle)  # the fingerprint check passes: same base weights


def test_from_pipe_shares_the_components(stock_pipeline_dir):
    stock = DDPMPipeline.from_pretrained(stock_pipeline_dir)
    pipe = GUDADDPMPipeline.from_pipe(stock)
    assert type(pipe.unet) is GUDAUNet2DModel and pipe.scheduler is stock.scheduler
    shared = [a.data_ptr() == b.data_ptr() for a, b in zip(pipe.unet.parameters(), stock.unet.parameters())]
    assert shared and all(shared)
