"""The SD 1.5 GPU check script runs on CPU with --tiny and writes its measurements as JSON."""

from __future__ import annotations

import json

from conftest import load_benchmark_script


def test_tiny_run_writes_every_measurement(tmp_path):
    module = load_benchmark_script("sd15_gpu_check")
    out = tmp_path / "check.json"
    module.main(["--tiny", "--device", "cpu", "--warmup", "0", "--iters", "1", "--rows-per-forward", "8", "--batch", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["config"] == "tiny" and data["device"] == "cpu"
    assert set(data["elbo"]) == {
        "base (no LoRA wrappers)", "base (LoRA wrappers, adapters disabled)", "one adapter active (swap)", "adapter merged (merged)",
    }
    assert all(entry["rows_per_s"] > 0 and entry["rows"] == 16 for entry in data["elbo"].values())
    assert data["unlearning_step"]["steps_per_s"] > 0 and data["lora_parameters"] > 0


def test_the_full_configuration_is_stable_diffusion_15s_unet():
    """Built on the meta device (no memory), the script's full UNet has SD 1.5's 859,520,964 parameters."""
    import torch
    from diffusers import UNet2DConditionModel

    module = load_benchmark_script("sd15_gpu_check")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**module.SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
