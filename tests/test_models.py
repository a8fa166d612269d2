"""Tests of diffusers_guda.models: adapter support for UNet2DModel without copying its weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.loaders import PeftAdapterMixin
from peft import LoraConfig

from diffusers_guda.models import GUDAUNet2DModel, with_adapter_support

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
