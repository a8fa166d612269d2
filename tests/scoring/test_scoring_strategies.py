"""Tests of diffusers_guda.scoring.strategies: which strategy runs, and each one runs the right model."""

from __future__ import annotations

import pytest
import torch

from diffusers_guda import ELBOConfig, ELBOEstimator
from diffusers_guda.errors import ConfigError
from diffusers_guda.scoring.strategies import MergedStrategy, MixedStrategy, SwapStrategy, make_strategy, resolve_strategy

from scoring_helpers import add_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


@pytest.fixture
def unet_with_adapters(tiny_unet):
    add_adapter(tiny_unet, "a", seed=1)
    add_adapter(tiny_unet, "b", seed=2)
    tiny_unet.disable_adapters()
    return tiny_unet


def _inputs():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 40, 90])


def test_auto_merges_plain_lora_in_full_precision_only(unet_with_adapters, tiny_scheduler):
    full = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10))
    autocast = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, autocast_dtype="bfloat16"))
    assert resolve_strategy("auto", unet_with_adapters, ["a", "b"], full) == "merged"
    assert resolve_strategy("auto", unet_with_adapters, ["a", "b"], autocast) == "swap"
    for name in ("merged", "swap", "mixed"):
        assert resolve_strategy(name, unet_with_adapters, ["a", "b"], autocast) == name
    with pytest.raises(ConfigError, match="strategy must be one of"):
        resolve_strategy("fast", unet_with_adapters, ["a", "b"], full)
    assert resolve_strategy("auto", unet_with_adapters.to(torch.bfloat16), ["a", "b"], full) == "swap"


def test_make_strategy_builds_each_kind(unet_with_adapters):
    kinds = {name: make_strategy(name, unet_with_adapters) for name in ("merged", "swap", "mixed")}
    assert [type(s) for s in kinds.values()] == [MergedStrategy, SwapStrategy, MixedStrategy]
    assert all(s.name == name and s.unet is unet_with_adapters for name, s in kinds.items())


@pytest.mark.parametrize("kind", ["swap", "merged", "mixed"])
def test_each_strategy_runs_the_base_and_each_adapter(unet_with_adapters, kind):
    unet, (x, t) = unet_with_adapters, _inputs()
    with torch.no_grad():
        expected = {None: unet(x, t).sample}
        for name in ("a", "b"):
            unet.enable_adapters()
            unet.set_adapter(name)
            expected[name] = unet(x, t).sample
        unet.disable_adapters()
        strategy = make_strategy(kind, unet)
        for name, output in expected.items():
            with strategy.model(name) as model:
                got = model(x, t).sample
            if kind == "merged":  # W + ΔW merged: float32 rounding only
                assert torch.allclose(got, output, atol=1e-5), name
            else:
                assert torch.equal(got, output), name
        assert torch.equal(unet(x, t).sample, expected[None])  # the UNet is left as it was
    assert not expected["a"].equal(expected[None]) and not expected["a"].equal(expected["b"])


def test_merged_strategy_copies_the_unet_on_first_use_only(unet_with_adapters, monkeypatch):
    import diffusers_guda.scoring.strategies as strategies

    built = []
    original = strategies.MergedAdapterRunner
    monkeypatch.setattr(strategies, "MergedAdapterRunner", lambda unet: built.append(unet) or original(unet))
    strategy = MergedStrategy(unet_with_adapters)
    assert built == []  # nothing to copy before a model runs (e.g. no query on this process)
    x, t = _inputs()
    with torch.no_grad():
        for name in (None, "a", "b", "a"):
            with strategy.model(name) as model:
                model(x, t)
    assert built == [unet_with_adapters]


def test_mixed_strategy_runs_one_adapter_per_row(unet_with_adapters):
    unet, (x, t) = unet_with_adapters, _inputs()
    strategy = MixedStrategy(unet)
    with torch.no_grad():
        with strategy.per_row([None, "a", "b"]) as model:
            mixed = model(x, t).sample
        for row, name in enumerate([None, "a", "b"]):
            with strategy.model(name) as model:
                alone = model(x[row : row + 1], t[row : row + 1]).sample
            assert torch.allclose(mixed[row : row + 1], alone, atol=1e-6), name
    with pytest.raises(ConfigError, match="not loaded"):
        with strategy.per_row(["a", "nope", None]):
            pass
