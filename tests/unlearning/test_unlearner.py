"""Tests of diffusers_guda.unlearning.unlearner: frozen base, bundle contents, determinism, divergence,
the objectives, and the UNet's adapter state around unlearning."""

from __future__ import annotations

import json

import pytest
import torch

from diffusers_guda import AdapterBundle, GroupedDataset, GroupUnlearner, LoRASettings
from diffusers_guda.adapter_state import adapter_state
from diffusers_guda.elbo import ELBOConfig
from diffusers_guda.errors import UnlearningDivergedError
from diffusers_guda.hashing import base_state_dict, unet_fingerprint
from diffusers_guda.lora import ADAPTER_WEIGHT_NAME

from unlearning_helpers import assert_same_adapters, has_adapters, small_config

pytest_plugins = ["unlearning_helpers"]  # its fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


# -- the base model is never changed ------------------------------------------------------------


def test_base_weights_are_bit_identical_after_unlearning(tiny_unet, tiny_scheduler, tiny_dataset):
    before_fingerprint = unet_fingerprint(tiny_unet)
    before = {k: v.clone() for k, v in base_state_dict(tiny_unet).items()}
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_before = tiny_unet(x, torch.tensor([5, 50])).sample

    unlearner = GroupUnlearner(tiny_unet, tiny_scheduler, small_config())
    bundle = unlearner.unlearn(tiny_dataset, progress=False)

    assert unlearner.unet is tiny_unet  # an adapter-capable UNet is used as it is
    assert unet_fingerprint(tiny_unet) == before_fingerprint == bundle.base_model["fingerprint"]
    after = base_state_dict(tiny_unet)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not has_adapters(tiny_unet)
    assert not [n for n, _ in tiny_unet.named_parameters() if "lora_" in n and "guda_" in n]
    with torch.no_grad():
        assert torch.equal(tiny_unet(x, torch.tensor([5, 50])).sample, out_before)


def test_plain_unet2dmodel_is_accepted(tiny_scheduler, tiny_dataset):
    from diffusers import UNet2DModel

    from conftest import tiny_unet_config

    torch.manual_seed(0)
    plain = UNet2DModel(**tiny_unet_config()).eval()
    fingerprint = unet_fingerprint(plain)
    bundle = GroupUnlearner(plain, tiny_scheduler, small_config(steps=1)).unlearn(tiny_dataset, groups=["left"], progress=False)
    assert bundle.group_names == ["left"]
    assert unet_fingerprint(plain) == fingerprint


# -- the bundle ---------------------------------------------------------------------------------


def test_bundle_contents(full_bundle, tiny_dataset):
    bundle = full_bundle
    assert bundle.num_groups == 3
    assert bundle.group_names == ["left", "middle", "right"]
    assert bundle.slugs == ["left", "middle", "right"]
    assert [g.id for g in bundle.groups] == [0, 1, 2]
    assert [g.num_images for g in bundle.groups] == [12, 12, 12]
    assert [g.adapter_file for g in bundle.groups] == [f"adapters/{s}/{ADAPTER_WEIGHT_NAME}" for s in bundle.slugs]
    assert bundle.objective["name"] == "retrack"
    assert bundle.objective["config"]["num_neighbors"] == 2
    assert bundle.lora == LoRASettings(rank=2, alpha=2.0).to_dict()
    assert bundle.seeds == {"unlearning": 0, "elbo": 0}
    assert bundle.training["steps"] == 3 and bundle.training["learning_rate"] == 1e-2
    assert bundle.base_model["class_name"] == "GUDAUNet2DModel"
    assert bundle.base_model["conditional"] is False
    assert len(bundle.base_model["fingerprint"]) == 64

    seeds = set()
    for group in bundle.groups:
        state = bundle.adapters[group.slug]
        assert state and all(k.startswith("unet.") for k in state)
        lora_b = [v for k, v in state.items() if "lora_B" in k]
        lora_a = [v for k, v in state.items() if "lora_A" in k]
        assert lora_b and len(lora_a) == len(lora_b)
        assert any(v.abs().max() > 0 for v in lora_b), f"{group.name}: lora_B is still zero after training"
        assert all(torch.isfinite(v).all() for v in state.values())
        config = bundle.adapter_configs[group.slug]
        assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 2.0

        stats = group.stats
        for key in ("forget_loss_before", "forget_loss_after", "retain_loss_before", "retain_loss_after"):
            assert isinstance(stats[key], float) and stats[key] > 0, key
        assert stats["forget_loss_after"] != stats["forget_loss_before"]
        assert stats["sample_passes"] == 3 * (4 + 4)
        assert stats["steps"] == 3
        assert isinstance(stats["seed"], int)
        seeds.add(stats["seed"])
        json.dumps(stats)  # JSON-able
    assert len(seeds) == 3, "each group gets its own seed"
    # different groups give different adapters
    first = bundle.adapters["left"]
    assert any(not torch.equal(first[k], bundle.adapters["middle"][k]) for k in first)


def test_bundle_saves_and_loads(full_bundle, tmp_path):
    path = full_bundle.save_pretrained(tmp_path / "bundle")
    loaded = AdapterBundle.from_pretrained(path)
    assert loaded.group_names == full_bundle.group_names
    assert_same_adapters(full_bundle, loaded)
    assert [g.stats for g in loaded.groups] == json.loads(json.dumps([g.stats for g in full_bundle.groups]))


def test_redirect_over_every_retain_image_trains_and_round_trips(tiny_unet, tiny_scheduler, tiny_dataset, tmp_path):
    config = small_config(objective_options={"num_neighbors": "all", "kl_cap": 20.0})
    bundle = GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(tiny_dataset, groups=[0], progress=False)
    stats = bundle.groups[0].stats
    assert stats["forget_loss_after"] != stats["forget_loss_before"]
    loaded = AdapterBundle.from_pretrained(bundle.save_pretrained(tmp_path / "bundle"))
    assert loaded.objective["config"]["num_neighbors"] == "all"
    assert_same_adapters(bundle, loaded)


def test_teacher_posterior_trains_counts_teacher_passes_and_keeps_far_images(tiny_unet, tiny_scheduler, tiny_dataset):
    options = {"num_neighbors": "all", "kl_cap": 20.0, "target": "teacher_posterior", "preserve": "teacher_posterior"}
    config = small_config(objective_options=options, steps=6)
    bundle = GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(tiny_dataset, groups=[0], progress=False)
    stats = bundle.groups[0].stats
    assert stats["sample_passes"] == 6 * 2 * (4 + 4)  # student and teacher, forget and retain
    # the forget images move; the retain images (other bars, far from the group) hardly do
    assert stats["forget_loss_change"] > 10 * abs(stats["retain_loss_change"])


# -- determinism --------------------------------------------------------------------------------


def test_one_group_alone_equals_that_group_in_a_full_run(full_bundle, tiny_unet, tiny_scheduler, tiny_dataset):
    alone = GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, groups=[1], progress=False)
    assert alone.group_names == ["middle"]
    assert alone.groups[0].id == 0  # bundle ids are positions in the bundle
    assert_same_adapters(full_bundle, alone, ["middle"])
    assert alone.groups[0].stats["seed"] == full_bundle.group("middle").stats["seed"]
    for key in ("forget_loss_before", "forget_loss_after", "retain_loss_before", "retain_loss_after"):
        assert alone.groups[0].stats[key] == full_bundle.group("middle").stats[key]
    # also by name and in another order
    reordered = GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, groups=["right", "middle"], progress=False)
    assert_same_adapters(full_bundle, reordered, ["middle", "right"])


def test_two_runs_are_identical_and_the_seed_matters(full_bundle, tiny_unet, tiny_scheduler, tiny_dataset):
    again = GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, progress=False)
    assert_same_adapters(full_bundle, again)
    other = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(seed=1)).unlearn(tiny_dataset, groups=[0], progress=False)
    state, other_state = full_bundle.adapters["left"], other.adapters["left"]
    assert any(not torch.equal(state[k], other_state[k]) for k in state)


# -- divergence ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(learning_rate=1e6, max_grad_norm=None),
        dict(objective="gradient_ascent", objective_options={"max_loss": 1e30}, learning_rate=1e6, max_grad_norm=None),
    ],
)
def test_huge_learning_rate_raises_a_helpful_error(overrides, tiny_unet, tiny_scheduler, tiny_dataset):
    fingerprint = unet_fingerprint(tiny_unet)
    with pytest.raises(UnlearningDivergedError) as info:
        GroupUnlearner(tiny_unet, tiny_scheduler, small_config(**overrides)).unlearn(tiny_dataset, progress=False)
    message = str(info.value)
    assert "'left'" in message
    assert "learning rate" in message.lower()
    assert "1e+06" in message and "100000" in message  # the current and a suggested lower value
    # the failed adapter is removed and the base untouched
    assert not has_adapters(tiny_unet)
    assert unet_fingerprint(tiny_unet) == fingerprint


# -- objectives ---------------------------------------------------------------------------------


def test_steps_scale_with_group_size(tiny_unet, tiny_scheduler, tiny_dataset):
    # groups of 12, 12 and 3 images (mean 9): with exponent 1, 4 * 12/9 -> 5 steps and 4 * 3/9 -> 1
    keep = torch.cat([torch.arange(24), torch.arange(24, 27)])
    unequal = GroupedDataset(tiny_dataset.images[keep], tiny_dataset.group_ids[keep], tiny_dataset.group_names)
    scaled = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=4, size_exponent=1.0)).unlearn(unequal, progress=False)
    assert [g.stats["steps"] for g in scaled.groups] == [5, 5, 1]
    assert scaled.groups[2].stats["sample_passes"] == 1 * (4 + 4)
    assert scaled.training["size_exponent"] == 1.0
    same = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=4)).unlearn(unequal, groups=["right"], progress=False)
    assert same.groups[0].stats["steps"] == 4


def test_distill_preserve_mode_runs(tiny_unet, tiny_scheduler, tiny_dataset):
    config = small_config(steps=2, objective_options={"num_neighbors": 2, "preserve": "distill"})
    fingerprint = unet_fingerprint(tiny_unet)
    bundle = GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(tiny_dataset, groups=[0, 2], progress=False)
    assert bundle.group_names == ["left", "right"]
    assert bundle.objective["config"]["preserve"] == "distill"
    stats = bundle.groups[0].stats
    assert stats["sample_passes"] == 2 * (4 + 4 + 4)  # the teacher's passes count too
    # at the first step the adapter is the identity (lora_B = 0): the student equals its teacher
    assert stats["curve_first"]["preserve"] == 0.0
    assert stats["curve_first"]["forget"] > 0
    assert any(v.abs().max() > 0 for k, v in bundle.adapters["left"].items() if "lora_B" in k)
    assert unet_fingerprint(tiny_unet) == fingerprint
    assert not has_adapters(tiny_unet)


def test_gradient_ascent_objective_runs(tiny_unet, tiny_scheduler, tiny_dataset):
    config = small_config(steps=3, objective="gradient_ascent", objective_options={"max_loss": 2.0})
    bundle = GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(tiny_dataset, groups=["middle"], progress=False)
    stats = bundle.groups[0].stats
    assert bundle.objective == {"name": "gradient_ascent", "config": {"forget_weight": 1.0, "preserve": "mse", "preserve_weight": 1.0, "max_loss": 2.0}}
    assert stats["curve_first"]["forget"] < 0  # ascent: the forget term is a negated loss
    assert stats["forget_loss_after"] > stats["forget_loss_before"]
    assert any(v.abs().max() > 0 for k, v in bundle.adapters["middle"].items() if "lora_B" in k)
    assert not has_adapters(tiny_unet)


def test_unknown_group_is_refused(tiny_unet, tiny_scheduler, tiny_dataset):
    from diffusers_guda.errors import DataError

    with pytest.raises(DataError, match="nope"):
        GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, groups=["nope"], progress=False)


# -- what the bundle records --------------------------------------------------------------------


def test_bundle_records_its_elbo_config_and_seeds(full_bundle, tiny_unet, tiny_scheduler, tiny_dataset, tmp_path):
    assert full_bundle.elbo == ELBOConfig().to_dict()
    elbo = ELBOConfig(stride=5, seed=7)
    unlearner = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(seed=3, steps=1), elbo_config=elbo)
    bundle = unlearner.unlearn(tiny_dataset, groups=[0], progress=False)
    assert bundle.elbo == elbo.to_dict() and bundle.elbo["stride"] == 5
    assert bundle.seeds == {"unlearning": 3, "elbo": 7}
    loaded = AdapterBundle.from_pretrained(bundle.save_pretrained(tmp_path / "bundle"))
    assert ELBOConfig(**loaded.elbo) == elbo and loaded.seeds == bundle.seeds


def test_bundle_records_the_base_model(tiny_unet, tiny_scheduler, tiny_dataset):
    unlearner = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=1), base_model_id="org/tiny",
                               base_model_revision="v1", base_model_extra={"pipeline_class": "X"})
    base = unlearner.unlearn(tiny_dataset, groups=[0], progress=False).base_model
    assert base == {"id": "org/tiny", "revision": "v1", "fingerprint": unet_fingerprint(tiny_unet),
                    "class_name": "GUDAUNet2DModel", "dtype": "float32", "sample_size": 8, "in_channels": 1,
                    "conditional": False, "pipeline_class": "X"}
    assert list(base)[:3] == ["id", "revision", "fingerprint"]


# -- the UNet's adapters around unlearning ------------------------------------------------------


@torch.no_grad()
def _output(unet) -> torch.Tensor:
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return unet(x, torch.tensor([3, 70])).sample


@pytest.mark.parametrize("disabled", [True, False], ids=["bundle-disabled", "bundle-active"])
def test_unlearning_a_unet_that_holds_a_bundle(disabled, full_bundle, tiny_unet, tiny_scheduler, tiny_dataset):
    """The new group's adapter is the one a bare UNet gives, and the UNet's adapter state is kept."""
    base = _output(tiny_unet)
    full_bundle.load_into(tiny_unet, groups=["left", "right"])
    tiny_unet.set_adapter("guda_right")  # not the first: peft falls back to the first when the active one is deleted
    if disabled:  # as pipe.load_guda_bundle leaves it
        tiny_unet.disable_adapters()
    before_state, before_output = adapter_state(tiny_unet), _output(tiny_unet)
    assert torch.equal(before_output, base) == disabled

    again = GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, groups=["middle"], progress=False)
    assert_same_adapters(full_bundle, again, ["middle"])
    assert again.groups[0].stats == {**full_bundle.group("middle").stats, "wall_s": again.groups[0].stats["wall_s"]}
    assert adapter_state(tiny_unet) == before_state == (["guda_right"], disabled)
    assert sorted(tiny_unet.peft_config) == ["guda_left", "guda_right"]
    assert torch.equal(_output(tiny_unet), before_output)


def test_a_bundle_loaded_after_unlearning_runs_its_adapters(full_bundle, tiny_unet):
    """Unlearning leaves LoRA layers without adapters behind; they must not stay switched off."""
    fresh = type(tiny_unet).from_config(tiny_unet.config)
    fresh.load_state_dict(base_state_dict(tiny_unet))
    assert [n for n, _ in tiny_unet.named_modules() if n.endswith("conv1.lora_A")], "unlearning left LoRA layers"
    base = _output(tiny_unet)
    for unet in (tiny_unet, fresh):
        names = full_bundle.load_into(unet)
        unet.set_adapter(names[1])  # the model card's usage
    assert not torch.equal(_output(tiny_unet), base)
    assert torch.equal(_output(tiny_unet), _output(fresh))


# -- memory ---------------------------------------------------------------------------------------


def test_the_bundle_records_the_autocast_resolved_for_the_device(tiny_unet, tiny_scheduler, tiny_dataset):
    unlearner = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=1))
    assert unlearner.config.autocast_dtype is None  # "auto" on CPU
    bundle = unlearner.unlearn(tiny_dataset, groups=[0], progress=False)
    assert bundle.training["autocast_dtype"] is None
    assert bundle.training["gradient_checkpointing"] is False


def test_gradient_checkpointing_trains_the_same_adapter_and_is_switched_off_after(tiny_scheduler, tiny_dataset):
    from diffusers_guda import GUDAUNet2DModel
    from conftest import tiny_unet_config

    def run(checkpointing: bool):
        torch.manual_seed(0)
        unet = GUDAUNet2DModel(**tiny_unet_config())
        seen = []
        for block in unet.down_blocks:  # record whether the blocks checkpoint while training
            block.register_forward_pre_hook(lambda module, args: seen.append(module.gradient_checkpointing and torch.is_grad_enabled()))
        bundle = GroupUnlearner(unet, tiny_scheduler, small_config(steps=2, gradient_checkpointing=checkpointing)).unlearn(
            tiny_dataset, groups=[0], progress=False)
        return bundle, unet, seen

    plain, _, seen_plain = run(False)
    checkpointed, unet, seen = run(True)
    assert any(seen) and not any(seen_plain)
    assert not unet.is_gradient_checkpointing  # restored after the run
    slug = plain.slugs[0]
    for key, value in plain.adapters[slug].items():
        torch.testing.assert_close(checkpointed.adapters[slug][key], value, rtol=1e-5, atol=1e-6)
    assert checkpointed.training["gradient_checkpointing"] is True


def test_a_step_that_does_not_fit_in_memory_names_the_settings_that_make_it_fit(tiny_unet, tiny_scheduler, tiny_dataset, monkeypatch):
    from diffusers_guda.errors import BatchTooLargeError
    from diffusers_guda.objectives.retrack import ReTrack

    def out_of_memory(self, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ReTrack, "loss", out_of_memory)
    unlearner = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(forget_batch_size=8, retain_batch_size=8))
    with pytest.raises(BatchTooLargeError) as info:
        unlearner.unlearn(tiny_dataset, groups=[0], progress=False)
    message = str(info.value)
    assert "group 'left'" in message and "step 0" in message and "forget batch 8" in message
    assert "batch_size=4" in message and "--batch-size 4" in message
    assert "gradient_checkpointing=True" in message and "--autocast bfloat16" in message
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert not has_adapters(tiny_unet)  # the half-trained adapter is removed
