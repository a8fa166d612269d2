"""What the Stable Diffusion 3 and Flux pipeline tests share: settings, data, and the checks both families pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_guda import AdapterBundle, ELBOConfig, UnlearningConfig
from diffusers_guda.errors import BaseModelMismatchError
from diffusers_guda.hashing import unet_fingerprint

from conftest import SD_WORDS, make_sd_dataset

GEN = dict(num_inference_steps=2, height=16, width=16)
UNLEARN = dict(lora={"rank": 2, "alpha": 2.0}, steps=2, forget_batch_size=2, retain_batch_size=2, eval_images=2, eval_draws=1,
               learning_rate=1e-2)
ELBO = ELBOConfig(grid_size=6)  # few noise levels: fast, and every level still runs all models
PROMPTS = ["a square in red style", "a stripe in red style", "a stripe in green style"]
FLOW_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
OTHER_OBJECTIVES = [("esd", {}), ("retrack", {"num_neighbors": 2}), ("gradient_ascent", {})]


def flow_dataset(per_group: int = 4):
    return make_sd_dataset(per_group=per_group)


def make_bundle(pipe, **kwargs) -> AdapterBundle:
    """Unlearn the three colour groups (2 steps each, rank 2, on the recipe's attention targets) with a small ELBO grid."""
    lora = {**UNLEARN["lora"], "target_modules": list(FLOW_TARGETS)}
    config = UnlearningConfig(objective="anchor", **{**UNLEARN, "lora": lora})
    return pipe.unlearn_groups(flow_dataset(), config=config, elbo_config=ELBO, progress=False, **kwargs)


def check_other_objective(pipe, objective: str, options: dict) -> None:
    """``objective`` unlearns a group of the flow-matching pipeline ``pipe`` (one step, finite losses)."""
    config = UnlearningConfig(objective=objective, objective_options=options, **{**UNLEARN, "steps": 1})
    bundle = pipe.unlearn_groups(flow_dataset(per_group=2), config=config, groups=["green"], max_sequence_length=8, progress=False)
    stats = bundle.group("green").stats
    assert stats["steps"] == 1 and np.isfinite(stats["forget_loss_after"]) and np.isfinite(stats["retain_loss_after"])


def check_bundle_record(bundle: AdapterBundle, stock_pipe, family: str, class_name: str) -> None:
    """The bundle records the family, the transformer and the VAE's factors; its adapters are transformer LoRA on the attention."""
    base = bundle.base_model
    assert base["family"] == family and base["class_name"] == class_name and base["conditional"] is True and base["latent"] is True
    assert base["fingerprint"] == unet_fingerprint(stock_pipe.transformer)
    assert base["vae_scaling_factor"] == pytest.approx(1.5035) and base["vae_shift_factor"] == pytest.approx(0.0609)
    assert bundle.objective["name"] == "anchor" and bundle.group_names == ["red", "green", "blue"] and bundle.elbo == ELBO.to_dict()
    keys = list(bundle.adapters["red"])
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    for target in FLOW_TARGETS:
        assert any(f".{target}.lora_A" in k for k in keys), target
    for group in bundle.groups:
        assert group.stats["steps"] == 2 and np.isfinite(group.stats["forget_loss_after"])


def check_batch_and_order_independence(pipe) -> None:
    """Scores do not depend on the batch size, the other images or their order; strategies agree to float32 rounding."""
    images = make_sd_dataset().images[[0, 7, 13]]
    results = {s: pipe.attribute(images, prompts=PROMPTS, batch_size=3, strategy=s, progress=False) for s in ("merged", "swap", "mixed")}
    assert results["merged"].scores.shape == (3, 3) and torch.isfinite(results["merged"].scores).all()
    assert (results["merged"].scores != 0).all() and (results["merged"].stderr > 0).all()
    scale = results["swap"].neg_elbo.abs().max()
    for name, full in results.items():
        assert full.metadata["strategy"] == name
        assert (full.scores - results["swap"].scores).abs().max() / scale < 1e-5, name  # float32 reordering only
        alone = pipe.attribute(images[2:3], prompts=PROMPTS[2:], batch_size=1, strategy=name, progress=False)
        assert torch.equal(alone.scores[0], full.scores[2]) and torch.equal(alone.neg_elbo[0], full.neg_elbo[2]), name
        shuffled = pipe.attribute(images[[2, 0]], prompts=[PROMPTS[2], PROMPTS[0]], batch_size=2, strategy=name, progress=False)
        assert torch.equal(shuffled.scores[0], full.scores[2]) and torch.equal(shuffled.scores[1], full.scores[0]), name
    other = pipe.attribute(images[2:3], prompts="a square in blue style", progress=False)
    assert not torch.equal(other.scores[0], results["merged"].scores[2])  # the prompt is the condition
    assert other.image_hashes == results["merged"].image_hashes[2:]  # same latent, same draws


def check_generate_and_attribute(pipe, other_prompt: str, **kwargs) -> None:
    """``return_attribution=True`` generates as without it and scores what ``attribute`` scores on the output."""
    from diffusers_guda.errors import ConfigError

    prompt = PROMPTS[0]
    call = dict(num_images_per_prompt=2, **GEN, **kwargs)
    out = pipe(prompt, generator=torch.Generator().manual_seed(4), return_attribution=True, output_type="np",
               attribution_kwargs={"progress": False}, **call)
    plain = pipe(prompt, generator=torch.Generator().manual_seed(4), output_type="np", **call).images
    np.testing.assert_array_equal(out.images, plain)  # generation is the full model's, unchanged
    assert out.attribution.scores.shape == (2, 3) and out.attribution.metadata["prompts"] == [prompt, prompt]
    assert torch.equal(pipe.attribute(out.images, prompts=prompt, progress=False).scores, out.attribution.scores)
    images, result = pipe(prompt, generator=torch.Generator().manual_seed(4), return_attribution=True, return_dict=False,
                          output_type="pt", attribution_kwargs={"progress": False}, **call)
    assert torch.equal(pipe.attribute(images * 2 - 1, prompts=prompt, progress=False).scores, result.scores)
    with pytest.raises(ConfigError, match=other_prompt):
        pipe(prompt, **{other_prompt: "a stripe"}, return_attribution=True, **GEN)


def check_saved_bundle_scores_alike(pipe, bundle: AdapterBundle, fresh_pipe, tmp_path) -> AdapterBundle:
    """A bundle saved and loaded again (into a fresh pipeline) scores bit-identically; returns it as loaded."""
    images = make_sd_dataset().images[[1, 8]]
    expected = pipe.attribute(images, prompts=PROMPTS[1:], progress=False)
    path = bundle.save_pretrained(tmp_path / "bundle")
    loaded = AdapterBundle.from_pretrained(path)
    assert loaded.base_model == bundle.base_model and loaded.elbo == bundle.elbo
    got = fresh_pipe.attribute(images, prompts=PROMPTS[1:], bundle=str(path), progress=False)
    assert torch.equal(got.scores, expected.scores) and torch.equal(got.neg_elbo, expected.neg_elbo)
    return loaded


def check_stock_lora_loading(bundle: AdapterBundle, stock_pipe, ours, tmp_path) -> None:
    """A group's adapter file loads into the stock pipeline with load_lora_weights, changes what it generates, and
    is exactly the adapter load_guda_bundle activates for that group."""
    path = bundle.save_pretrained(tmp_path / "stock-bundle")
    group, prompt = bundle.group("green"), PROMPTS[2]
    before = stock_pipe(prompt, generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    stock_pipe.load_lora_weights(str(path), weight_name=group.adapter_file, adapter_name="green")
    assert stock_pipe.get_list_adapters() == {"transformer": ["green"]}
    after = stock_pipe(prompt, generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    assert np.abs(after - before).max() > 1e-5
    ours.load_guda_bundle(str(path))
    ours.transformer.enable_adapters()
    ours.transformer.set_adapter(AdapterBundle.adapter_name(group.slug))
    ours_after = ours(prompt, generator=torch.Generator().manual_seed(2), output_type="np", **GEN).images
    np.testing.assert_allclose(ours_after, after, rtol=0, atol=1e-6)


def check_cross_family_refusal(bundle: AdapterBundle, pipe, family: str, guda_class: str) -> None:
    """A Stable Diffusion bundle is refused by ``pipe`` and ``bundle`` by Stable Diffusion and SDXL pipelines, naming both families."""
    from diffusers_guda.pipelines import GUDAStableDiffusionPipeline, GUDAStableDiffusionXLPipeline
    from diffusers_guda.testing import tiny_stable_diffusion, tiny_stable_diffusion_xl

    sd = tiny_stable_diffusion(words=SD_WORDS, pipeline_class=GUDAStableDiffusionPipeline)
    sdxl = tiny_stable_diffusion_xl(words=SD_WORDS, pipeline_class=GUDAStableDiffusionXLPipeline)
    for other, other_family in ((sd, "stable-diffusion"), (sdxl, "stable-diffusion-xl")):
        expected = rf"made for a {family} pipeline .* is a {other_family} pipeline; load the bundle into a {guda_class}"
        with pytest.raises(BaseModelMismatchError, match=expected):
            other.load_guda_bundle(bundle)
        assert other.guda_bundle is None and not getattr(other.unet, "peft_config", None)
    config = UnlearningConfig(objective="anchor", **{**UNLEARN, "steps": 1})
    sd_bundle = sd.unlearn_groups(flow_dataset(per_group=2), config=config, groups=["red"], progress=False)
    with pytest.raises(BaseModelMismatchError, match=rf"made for a stable-diffusion pipeline .* is a {family} pipeline"):
        pipe.load_guda_bundle(sd_bundle)
    assert pipe.guda_bundle is None and not getattr(pipe.transformer, "peft_config", None)


def run_cli(base_dir, tmp_path, family: str, *unlearn_flags) -> AdapterBundle:
    """``guda unlearn`` and ``guda attribute`` on ``base_dir``; returns the bundle the CLI wrote."""
    from test_cli import run
    from test_cli_text import write_captioned_folder

    data, bundle, out = write_captioned_folder(tmp_path / "data"), tmp_path / "cli-bundle", tmp_path / "result.json"
    code, _, err = run("unlearn", "--base", base_dir, "--data", data, "--out", bundle, "--steps", 1, "--batch-size", 2, "--rank", 2,
                       "--quiet", *unlearn_flags)
    assert code == 0, err
    made = AdapterBundle.from_pretrained(bundle)
    assert made.base_model["family"] == family and made.objective["name"] == "anchor"
    code, stdout, err = run("attribute", "--base", base_dir, "--bundle", bundle, "--images", data / "red-0.png",
                            "--prompt", "a square in red style", "--grid-size", 4, "--out", out, "--quiet")
    assert code == 0, err
    assert "red-0.png" in stdout and out.is_file()
    code, _, err = run("attribute", "--base", base_dir, "--bundle", bundle, "--images", data / "red-0.png",
                       "--prompt", "a square in red style", "--stride", 100, "--quiet")
    assert code == 2 and "flow-matching model" in err and "grid_size" in err  # the DDPM grid flag, refused in one line
    return made
