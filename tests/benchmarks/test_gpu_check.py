"""The GPU check runs on CPU with --tiny, writes every measurement as JSON, and its full configurations
are Stable Diffusion 1.5's and SDXL's UNets and SD3-medium's and FLUX.1-dev's transformers."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark_script


def test_tiny_run_writes_every_measurement(tmp_path):
    module = load_benchmark_script("gpu_check")
    out = tmp_path / "check.json"
    module.main(["--tiny", "--device", "cpu", "--warmup", "0", "--iters", "1", "--steps", "1", "--queries", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["config"] == "tiny" and data["device"] == "cpu" and data["total_s"] > 0
    for model, recipe, channels in (("sd15", "sd-styles", 4), ("sdxl", "sdxl-styles", 4), ("sd3", "sd3-styles", 16), ("flux", "flux-styles", 16)):
        entry = data[model]
        assert "error" not in entry and "unlearning_does_not_fit" not in entry, entry
        assert entry["model"]["recipe"] == recipe and entry["model"]["denoiser_parameters"] > 0
        assert entry["model"]["latent_shape"][0] == channels
        unlearning = entry["unlearning"]
        assert unlearning["s_per_step"] > 0 and unlearning["steps_timed"] == 1 and unlearning["recipe_steps"] == 400
        assert unlearning["gradient_checkpointing"] is (model == "flux")  # the recipe's own setting
        assert unlearning["projected_group_s"] == pytest.approx(unlearning["fixed_s"] + 400 * unlearning["s_per_step"], abs=0.2)
        joint = entry["joint_unlearning"]
        assert joint["sequential s per group-step"] > 0 and joint["joint_groups=4 s per group-step"] > 0
        assert joint["speedup"] == pytest.approx(joint["sequential s per group-step"] / joint["joint_groups=4 s per group-step"], rel=0.02)
        rates = entry["elbo_rows_per_s"]
        assert rates["groups"] == 16 and all(rates[name] > 0 for name in ("bare denoiser forward", "merged", "swap", "mixed"))
        assert rates["auto_picks"] == "merged"  # float32 weights, no autocast
        attribution = entry["attribute_one_image"]
        assert attribution["full grid s"] > 0 and attribution["adaptive s"] > 0
        assert 0 < attribution["adaptive rows used (mean per group)"] <= attribution["grid rows"]


@pytest.mark.parametrize("name, parameters", [("SD15_UNET", 859_520_964), ("SDXL_UNET", 2_567_463_684)])
def test_the_full_configurations_are_the_real_unets(name, parameters):
    """Built on the meta device (no memory), the full UNets have SD 1.5's and SDXL's parameter counts."""
    import torch
    from diffusers import UNet2DConditionModel

    module = load_benchmark_script("gpu_check")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**getattr(module, name))
    assert sum(p.numel() for p in unet.parameters()) == parameters


@pytest.mark.parametrize("name, parameters", [("SD3_MEDIUM_TRANSFORMER", 2_028_328_000), ("FLUX_DEV_TRANSFORMER", 11_901_408_320)])
def test_the_full_configurations_are_the_real_transformers(name, parameters):
    """Built on the meta device, the full transformers have SD3-medium's (2.0 B) and FLUX.1-dev's (11.9 B) parameter counts."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    module = load_benchmark_script("gpu_check")
    cls = FluxTransformer2DModel if name.startswith("FLUX") else SD3Transformer2DModel
    with torch.device("meta"):
        transformer = cls(**getattr(module, name))
    assert sum(p.numel() for p in transformer.parameters()) == parameters


def test_a_recipe_batch_that_does_not_fit_is_recorded_and_retried_with_checkpointing(tmp_path, monkeypatch):
    from diffusers_guda.errors import BatchTooLargeError

    module = load_benchmark_script("gpu_check")
    measured = module.time_unlearning

    def fits_only_with_checkpointing(pipe, dataset, recipe, args, device, checkpointing):
        if not checkpointing:
            raise BatchTooLargeError("Unlearning group 'style00' ran out of device memory at step 0")
        return measured(pipe, dataset, recipe, args, device, checkpointing)

    monkeypatch.setattr(module, "time_unlearning", fits_only_with_checkpointing)
    out = tmp_path / "check.json"
    module.main(["--tiny", "--models", "sd15", "--device", "cpu", "--warmup", "0", "--iters", "1", "--steps", "1", "--queries", "1",
                 "--out", str(out)])
    entry = json.loads(out.read_text())["sd15"]
    assert "ran out of device memory" in entry["unlearning_does_not_fit"]
    assert entry["unlearning"]["gradient_checkpointing"] is True and entry["unlearning"]["s_per_step"] > 0
    assert entry["attribute_one_image"]["full grid s"] > 0  # the rest is still measured
