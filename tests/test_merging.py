"""Tests of diffusers_guda.merging: the merged-adapter runner shares and never writes the base weights."""

from __future__ import annotations

import pytest
import torch

from diffusers_guda.errors import ConfigError
from diffusers_guda.hashing import base_state_dict
from diffusers_guda.merging import MergedAdapterRunner, can_merge, plain_copy

from conftest import with_random_adapters

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_merged_runner_shares_and_never_writes_the_base_weights(tiny_unet):
    with_random_adapters(tiny_unet)
    before = {k: v.clone() for k, v in base_state_dict(tiny_unet).items()}
    runner = MergedAdapterRunner(tiny_unet)
    shared = base_state_dict(tiny_unet)
    assert all(p.data_ptr() == shared[k].data_ptr() for k, p in runner.plain.state_dict().items())  # no copy
    x, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.full((2,), 30)
    with torch.no_grad():
        for name in ("g0", "g1"):
            tiny_unet.enable_adapters()
            tiny_unet.set_adapter(name)
            unmerged = tiny_unet(x, t).sample
            with runner.merged(name) as merged:
                assert torch.allclose(merged(x, t).sample, unmerged, atol=1e-5)
        tiny_unet.disable_adapters()
        with runner.merged(None) as base:
            assert torch.equal(base(x, t).sample, tiny_unet(x, t).sample)
    assert all(torch.equal(v, before[k]) for k, v in base_state_dict(tiny_unet).items())
    with pytest.raises(ConfigError, match="not loaded"):
        with runner.merged("nope"):
            pass


def test_merged_runner_keeps_merged_weights_within_its_budget(tiny_unet):
    with_random_adapters(tiny_unet)
    keeping, merging = MergedAdapterRunner(tiny_unet), MergedAdapterRunner(tiny_unet, cache_bytes=0)
    x, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.full((2,), 30)
    with torch.no_grad():
        for name in ("g0", "g1", "g0"):  # g0 again: from the kept weights
            with keeping.merged(name) as a:
                kept = a(x, t).sample
            with merging.merged(name) as b:
                assert torch.equal(kept, b(x, t).sample)
    assert sorted(keeping._kept) == ["g0", "g1"] and not merging._kept


def test_can_merge_needs_plain_lora_layers_of_every_adapter(tiny_unet):
    from peft import LoraConfig

    with_random_adapters(tiny_unet)
    assert can_merge(tiny_unet, ["g0", "g1"])
    assert not can_merge(tiny_unet, ["g0", "missing"])  # no layers hold it
    tiny_unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["conv1"], use_dora=True), adapter_name="dora")
    assert not can_merge(tiny_unet, ["g0", "dora"])


def test_plain_copy_drops_lora_wrappers_and_shares_the_base_weights(tiny_unet):
    with_random_adapters(tiny_unet, ["g0"])
    plain = plain_copy(tiny_unet)
    assert type(plain) is type(tiny_unet) and not any("lora" in name or "base_layer" in name for name in plain.state_dict())
    base = base_state_dict(tiny_unet)
    assert plain.state_dict().keys() == base.keys()
    assert all(plain.state_dict()[k].data_ptr() == v.data_ptr() for k, v in base.items())  # shared, not copied
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 50])
    with torch.no_grad():
        tiny_unet.disable_adapters()
        torch.testing.assert_close(plain(x, t).sample, tiny_unet(x, t).sample, rtol=0, atol=0)
