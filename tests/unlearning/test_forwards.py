"""Tests of diffusers_guda.unlearning.forwards: how the unlearner runs the UNet, and as which model."""

from __future__ import annotations

import pytest
import torch

from diffusers_guda.adapter_state import adapter_state
from diffusers_guda.errors import ConfigError
from diffusers_guda.lora import LoRASettings
from diffusers_guda.unlearning.forwards import UNetForwards

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.tensor([4, 60])


def _add_adapter(unet, name: str, seed: int) -> None:
    """A non-identity adapter: lora_B random instead of zero."""
    unet.add_adapter(LoRASettings(rank=2, alpha=2.0).to_peft(unet), adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    for pname, param in unet.named_parameters():
        if f"lora_B.{name}." in pname:
            param.data = torch.randn(param.shape, generator=generator) * 0.2


@torch.no_grad()
def test_teacher_runs_the_base_model_and_leaves_the_trained_adapter_active(tiny_unet):
    forwards = UNetForwards(tiny_unet, conditional=False)
    base = forwards(X, T)
    _add_adapter(tiny_unet, "other", seed=1)
    _add_adapter(tiny_unet, "trained", seed=2)
    teacher = forwards.teacher()
    with forwards.running("trained"):
        adapted = forwards(X, T)
        assert not torch.equal(adapted, base)
        assert torch.equal(teacher(X, T), base)
        assert adapter_state(tiny_unet) == (["trained"], False)
        assert torch.equal(forwards(X, T), adapted)
        with forwards.running(None):
            assert torch.equal(forwards(X, T), base)
        assert torch.equal(forwards(X, T), adapted)


def test_trained_adapter_keeps_its_gradients_across_teacher_calls(tiny_unet):
    forwards = UNetForwards(tiny_unet, conditional=False)
    _add_adapter(tiny_unet, "trained", seed=2)
    params = [p for n, p in tiny_unet.named_parameters() if "lora_" in n]
    with forwards.running("trained"):
        student = forwards(X, T)
        target = forwards.teacher()(X, T)
        assert all(p.requires_grad for p in params)
        (student - target).pow(2).mean().backward()
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)


@torch.no_grad()
def test_the_base_model_of_a_unet_without_adapters_runs_as_it_is(tiny_unet):
    forwards = UNetForwards(tiny_unet, conditional=False)
    base = forwards(X, T)
    _add_adapter(tiny_unet, "gone", seed=1)
    tiny_unet.delete_adapters("gone")  # what unlearning a group leaves: LoRA layers without adapters
    state = adapter_state(tiny_unet)
    with forwards.running(None):
        assert torch.equal(forwards(X, T), base)
    assert adapter_state(tiny_unet) == state == ([], False)  # nothing switched


def test_conditioning_inputs(tiny_unet):
    unconditional = UNetForwards(tiny_unet, conditional=False)
    assert unconditional.cond(None, torch.tensor([0, 1])) is None
    conditional = UNetForwards(tiny_unet, conditional=True, encode_prompts=lambda prompts: torch.zeros(len(prompts), 3, 4))
    x_t = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="text-conditioned"):
        conditional(x_t, torch.tensor([1, 2]))


def test_autocast_only_when_asked(tiny_unet):
    assert not isinstance(UNetForwards(tiny_unet, False).autocast(), torch.autocast)
    assert isinstance(UNetForwards(tiny_unet, False, autocast_dtype="bfloat16").autocast(), torch.autocast)
