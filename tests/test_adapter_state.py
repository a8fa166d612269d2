"""Tests of diffusers_guda.adapter_state: running a UNet as the base, one adapter or one adapter per row."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from diffusers_guda.adapter_state import (
    BASE_ROWS,
    adapter_state,
    check_loaded,
    loaded_adapters,
    restore_adapter_state,
    switch_adapters,
    use_adapters,
)
from diffusers_guda.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def _add(unet, name: str, seed: int) -> None:
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["conv1", "conv2", "to_q"]), adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a fresh LoRA is the identity: randomise lora_B
        for n, p in unet.named_parameters():
            if f"lora_B.{name}." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.fixture
def unet(tiny_unet):
    _add(tiny_unet, "a", seed=1)
    _add(tiny_unet, "b", seed=2)
    return tiny_unet


@pytest.fixture
def inputs():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 40, 90])


@torch.no_grad()
def _outputs(unet, x, t) -> dict:
    """The base's and each adapter's outputs, by peft's own switches."""
    out = {}
    unet.disable_adapters()
    out[None] = unet(x, t).sample
    for name in ("a", "b"):
        unet.enable_adapters()
        unet.set_adapter(name)
        out[name] = unet(x, t).sample
    return out


def test_state_of_a_unet_without_adapters(tiny_unet):
    assert loaded_adapters(tiny_unet) == [] and adapter_state(tiny_unet) is None
    restore_adapter_state(tiny_unet, None)  # nothing to put back
    with use_adapters(tiny_unet, None) as same:  # the base model is what it runs anyway
        assert same is tiny_unet
    switch_adapters(tiny_unet, None)
    with pytest.raises(ConfigError, match="not loaded"):
        with use_adapters(tiny_unet, "a"):
            pass


def test_use_adapters_runs_each_model(unet, inputs):
    x, t = inputs
    expected = _outputs(unet, x, t)
    assert not torch.equal(expected["a"], expected[None]) and not torch.equal(expected["a"], expected["b"])
    with torch.no_grad():
        for name, output in expected.items():
            with use_adapters(unet, name) as model:
                assert model is unet
                assert torch.equal(model(x, t).sample, output), name


@pytest.mark.parametrize("before", ["disabled", "a", "b"])
def test_use_adapters_restores_the_previous_state(unet, inputs, before):
    x, t = inputs
    expected = _outputs(unet, x, t)
    if before == "disabled":
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(before)
    state = adapter_state(unet)
    assert state == ((["b"] if before == "disabled" else [before]), before == "disabled")  # peft keeps the last active one
    for adapters in (None, "a", "b", [None, "a", "b"]):
        with use_adapters(unet, adapters):
            pass
        assert adapter_state(unet) == state, adapters
    with pytest.raises(RuntimeError):  # restored on errors too
        with use_adapters(unet, "a" if before != "a" else "b"):
            raise RuntimeError("boom")
    assert adapter_state(unet) == state
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, expected[None if before == "disabled" else before])


def test_unknown_names_are_refused_before_anything_changes(unet):
    unet.enable_adapters()
    unet.set_adapter("a")
    state = adapter_state(unet)
    for adapters in ("nope", [None, "a", "nope"]):
        with pytest.raises(ConfigError, match="nope"):
            with use_adapters(unet, adapters):
                pass
        assert adapter_state(unet) == state
    with pytest.raises(ConfigError, match="not loaded"):
        switch_adapters(unet, "nope")
    with pytest.raises(ConfigError, match=r"\['x', 'y'\]"):
        check_loaded(unet, ["a", "y", None, "x"])
    check_loaded(unet, ["a", None, "b"])  # fine


def test_per_row_equals_per_adapter_forwards(unet, inputs):
    x, t = inputs
    names = [None, "a", "b"]
    expected = _outputs(unet, x, t)
    unet.disable_adapters()
    with torch.no_grad():
        with use_adapters(unet, names):
            mixed = unet(x, t).sample
        again = unet(x, t).sample  # the hooks are gone: the base model again
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], expected[name][row], atol=1e-6), name
    assert torch.equal(again, expected[None])
    assert not torch.allclose(mixed[1], expected[None][1], atol=1e-4)  # row 1 really ran adapter a


def test_per_row_refuses_an_adapter_named_like_peft_base_rows(unet):
    _add(unet, BASE_ROWS, seed=3)
    with pytest.raises(ConfigError, match="reserves"):
        with use_adapters(unet, [None, "a"]):
            pass
    with use_adapters(unet, BASE_ROWS):  # as a single model it is only a name
        pass


def test_switch_adapters_lasts(unet, inputs):
    x, t = inputs
    expected = _outputs(unet, x, t)
    with torch.no_grad():
        switch_adapters(unet, "b")
        assert torch.equal(unet(x, t).sample, expected["b"]) and adapter_state(unet) == (["b"], False)
        switch_adapters(unet, None)
        assert torch.equal(unet(x, t).sample, expected[None]) and adapter_state(unet) == (["b"], True)


@pytest.mark.filterwarnings("ignore:Adapter b was active which is now deleted:UserWarning")
def test_restore_skips_adapters_deleted_since(unet):
    unet.enable_adapters()
    unet.set_adapter("b")
    state = adapter_state(unet)
    unet.delete_adapters("b")
    restore_adapter_state(unet, state)
    assert loaded_adapters(unet) == ["a"] and adapter_state(unet)[1] is False


@torch.no_grad()
def test_the_base_model_runs_after_every_adapter_was_deleted(unet, inputs):
    """A UNet whose adapters were all deleted keeps its LoRA layers; running it as the base model is allowed."""
    expected = _outputs(unet, *inputs)[None]
    unet.delete_adapters(["a", "b"])
    assert not loaded_adapters(unet) and adapter_state(unet) is not None  # the LoRA layers stay
    with use_adapters(unet, None) as model:
        assert torch.equal(model(*inputs).sample, expected)
    switch_adapters(unet, None)
