"""Tests of diffusers_guda.models: adapter support for UNet2DModel without copying its weights, and conditioning."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.loaders import PeftAdapterMixin
from peft import LoraConfig

from diffusers_guda.models import (
    GUDAUNet2DModel,
    map_conditioning,
    merge_conditioning,
    unet_call_kwargs,
    with_adapter_support,
)

from conftest import tiny_unet_config


def _plain_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**tiny_unet_config()).eval()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=generator)
    t = torch.tensor([1, 40, 99])
    return x, t


def test_plain_unet_is_converted_with_identical_outputs():
    plain = _plain_unet()
    converted = with_adapter_support(plain)
    assert type(converted) is GUDAUNet2DModel
    assert isinstance(converted, UNet2DModel) and isinstance(converted, PeftAdapterMixin)
    assert converted is not plain
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(converted.config) == public(plain.config)
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(plain(x, t).sample, converted(x, t).sample)


def test_conversion_shares_tensors_without_copying():
    plain = _plain_unet()
    converted = with_adapter_support(plain)
    source, target = plain.state_dict(), converted.state_dict()
    assert source.keys() == target.keys()
    for key, value in source.items():
        assert target[key].data_ptr() == value.data_ptr(), key
    # a change to the original weights is seen by the converted model (same storage)
    with torch.no_grad():
        plain.conv_in.weight.add_(1.0)
    assert torch.equal(converted.conv_in.weight, plain.conv_in.weight)


def test_conversion_keeps_training_mode():
    plain = _plain_unet().train()
    assert with_adapter_support(plain).training
    assert not with_adapter_support(plain.eval()).training


def test_converted_unet_takes_adapters():
    converted = with_adapter_support(_plain_unet())
    converted.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["conv1"]), adapter_name="a")
    assert "a" in converted.peft_config


def test_adapter_capable_unet_is_returned_unchanged():
    torch.manual_seed(0)
    unet = GUDAUNet2DModel(**tiny_unet_config())
    assert with_adapter_support(unet) is unet

    conditional = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )
    assert with_adapter_support(conditional) is conditional


@pytest.mark.parametrize("module", [torch.nn.Linear(2, 2), torch.nn.Conv2d(1, 1, 3)])
def test_other_modules_raise_type_error(module):
    with pytest.raises(TypeError, match="cannot take LoRA adapters"):
        with_adapter_support(module)


def test_conditioning_becomes_the_unets_keyword_arguments():
    embeds = torch.zeros(2, 3, 4, dtype=torch.float64)
    assert set(unet_call_kwargs(embeds, torch.device("cpu"), torch.bfloat16)) == {"encoder_hidden_states"}
    assert unet_call_kwargs(embeds, torch.device("cpu"), torch.bfloat16)["encoder_hidden_states"].dtype == torch.bfloat16
    sdxl = {"encoder_hidden_states": embeds, "text_embeds": torch.zeros(2, 5), "time_ids": torch.ones(2, 6)}
    kwargs = unet_call_kwargs(sdxl, torch.device("cpu"), torch.float16)
    assert sorted(kwargs) == ["added_cond_kwargs", "encoder_hidden_states"]
    assert sorted(kwargs["added_cond_kwargs"]) == ["text_embeds", "time_ids"]
    assert all(v.dtype == torch.float16 for v in kwargs["added_cond_kwargs"].values())
    assert unet_call_kwargs(None, torch.device("cpu"), torch.float32) == {}
    assert unet_call_kwargs(sdxl)["encoder_hidden_states"] is embeds  # no device or dtype: as it is


def test_conditioning_edits_keep_its_form():
    embeds, other = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert merge_conditioning(embeds, other) is other  # plain embeddings replace plain embeddings
    sdxl = {"encoder_hidden_states": embeds, "time_ids": torch.tensor([[1.0] * 6, [2.0] * 6])}
    merged = merge_conditioning(sdxl, {"encoder_hidden_states": other})
    assert merged["encoder_hidden_states"] is other and merged["time_ids"] is sdxl["time_ids"]
    assert map_conditioning(sdxl, lambda v: v[1:])["time_ids"].tolist() == [[2.0] * 6]
    assert map_conditioning(embeds, lambda v: v[:1]).shape == (1, 3, 4) and map_conditioning(None, lambda v: v) is None
