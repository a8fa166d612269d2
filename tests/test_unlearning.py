"""Tests of diffusers_guda.unlearning: frozen base, bundle contents, determinism, resume, divergence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffusers_guda import AdapterBundle, GroupedDataset, GroupUnlearner, LoRASettings, UnlearningConfig
from diffusers_guda.errors import ConfigError, UnlearningDivergedError
from diffusers_guda.hashing import base_state_dict, unet_fingerprint
from diffusers_guda.lora import ADAPTER_WEIGHT_NAME
from diffusers_guda.objectives import ReTrack, register_objective
from diffusers_guda.objectives import base as objectives_base
from diffusers_guda.unlearning import RUN_NAME, STATS_NAME

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def small_config(**overrides) -> UnlearningConfig:
    values = dict(
        objective="retrack",
        objective_options={"num_neighbors": 2},
        lora=LoRASettings(rank=2, alpha=2.0),
        steps=3,
        learning_rate=1e-2,
        forget_batch_size=4,
        retain_batch_size=4,
        eval_images=4,
        eval_draws=1,
        seed=0,
    )
    values.update(overrides)
    return UnlearningConfig(**values)


def has_adapters(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def assert_same_adapters(a: AdapterBundle, b: AdapterBundle, slugs=None):
    for slug in slugs or a.slugs:
        sa, sb = a.adapters[slug], b.adapters[slug]
        assert sa.keys() == sb.keys(), slug
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (slug, key)
        assert a.adapter_configs[slug] == b.adapter_configs[slug]


@pytest.fixture
def full_bundle(tiny_unet, tiny_scheduler, tiny_dataset):
    """An uninterrupted run over all three groups, without checkpoints."""
    return GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, progress=False)


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


# -- resume -------------------------------------------------------------------------------------


def test_resume_skips_finished_groups_and_matches_an_uninterrupted_run(
    full_bundle, tiny_unet, tiny_scheduler, tiny_dataset, tmp_path, monkeypatch
):
    checkpoint = tmp_path / "ckpt"
    first = GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, checkpoint_dir=checkpoint, progress=False)
    assert (checkpoint / RUN_NAME).is_file()
    for slug in first.slugs:
        assert (checkpoint / slug / ADAPTER_WEIGHT_NAME).is_file()
        assert (checkpoint / slug / STATS_NAME).is_file()
    assert_same_adapters(full_bundle, first)

    # a crash while the middle group was being trained: its folder never appeared
    shutil.rmtree(checkpoint / "middle")
    calls = []
    original = GroupUnlearner.unlearn_group

    def counting(self, dataset, group, *args, **kwargs):
        calls.append(group)
        return original(self, dataset, group, *args, **kwargs)

    monkeypatch.setattr(GroupUnlearner, "unlearn_group", counting)
    resumed = GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, checkpoint_dir=checkpoint, progress=False)
    assert calls == [1], "only the missing group is retrained"
    assert resumed.group_names == ["left", "middle", "right"]
    assert_same_adapters(full_bundle, resumed)
    assert [g.stats["seed"] for g in resumed.groups] == [g.stats["seed"] for g in full_bundle.groups]
    assert (checkpoint / "middle" / STATS_NAME).is_file()

    # a complete checkpoint: nothing is retrained
    calls.clear()
    again = GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, checkpoint_dir=checkpoint, progress=False)
    assert calls == []
    assert_same_adapters(full_bundle, again)


@pytest.mark.parametrize(
    "change",
    [
        dict(seed=1),
        dict(steps=4),
        dict(learning_rate=2e-2),
        dict(objective_options={"num_neighbors": 3}),
        dict(objective_options={"num_neighbors": "all"}),
        dict(lora=LoRASettings(rank=4, alpha=4.0)),
    ],
)
def test_checkpoint_from_other_settings_is_refused(change, tiny_unet, tiny_scheduler, tiny_dataset, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=1)).unlearn(
        tiny_dataset, groups=[0], checkpoint_dir=checkpoint, progress=False
    )
    before = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    calls = []
    monkeypatch.setattr(GroupUnlearner, "unlearn_group", lambda *a, **k: calls.append(1))
    settings = dict(steps=1)
    settings.update(change)
    with pytest.raises(ConfigError, match="other settings"):
        GroupUnlearner(tiny_unet, tiny_scheduler, small_config(**settings)).unlearn(tiny_dataset, checkpoint_dir=checkpoint, progress=False)
    assert calls == []
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == before


def test_checkpoint_of_another_base_model_is_refused(tiny_unet, tiny_scheduler, tiny_dataset, tmp_path):
    checkpoint = tmp_path / "ckpt"
    GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=1)).unlearn(
        tiny_dataset, groups=[0], checkpoint_dir=checkpoint, progress=False
    )
    with torch.no_grad():
        tiny_unet.conv_in.bias.add_(0.01)
    with pytest.raises(ConfigError, match="other settings"):
        GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=1)).unlearn(tiny_dataset, checkpoint_dir=checkpoint, progress=False)


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


class _NaNOnMiddle(ReTrack):
    """A test objective that diverges on the group named 'middle' only."""

    name = "_test_nan_on_middle"

    def setup(self, dataset, group, schedule):
        super().setup(dataset, group, schedule)
        self._diverge = dataset.group_names[group] == "middle"

    def forget_loss(self, batch):
        loss = super().forget_loss(batch)
        return loss * float("inf") if self._diverge else loss


def test_divergence_keeps_groups_finished_before(tiny_unet, tiny_scheduler, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(objectives_base, "_REGISTRY", dict(objectives_base._REGISTRY))  # keep the registry clean
    register_objective(_NaNOnMiddle)
    checkpoint = tmp_path / "ckpt"
    config = small_config(objective="_test_nan_on_middle")
    with pytest.raises(UnlearningDivergedError, match="'middle'"):
        GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(tiny_dataset, checkpoint_dir=checkpoint, progress=False)
    assert (checkpoint / "left" / ADAPTER_WEIGHT_NAME).is_file()
    assert (checkpoint / "left" / STATS_NAME).is_file()
    assert not (checkpoint / "middle").exists()
    assert not (checkpoint / "right").exists()
    assert not [p.name for p in checkpoint.iterdir() if p.name.startswith(".")], "no half-written group folders"
    assert not has_adapters(tiny_unet)


# -- objectives ---------------------------------------------------------------------------------


def test_unknown_objective_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        small_config(objective="nope", objective_options={})
    message = str(info.value)
    assert "'nope'" in message
    assert "retrack" in message and "gradient_ascent" in message


def test_unknown_objective_option_is_refused():
    with pytest.raises(ConfigError, match="no option"):
        small_config(objective_options={"num_neighbours_typo": 2})


@pytest.mark.parametrize(
    "overrides",
    [dict(learning_rate=0.0), dict(steps=0), dict(forget_batch_size=0), dict(retain_batch_size=0), dict(size_exponent=-1.0)],
)
def test_invalid_numbers_are_refused(overrides):
    with pytest.raises(ConfigError):
        small_config(**overrides)


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
    assert UnlearningConfig(steps=40, size_exponent=0.5).steps_for(36, 9.0) == 80
    assert UnlearningConfig(steps=40).describe_steps() == "40 steps each"
    assert UnlearningConfig(steps=120, size_exponent=1.0).describe_steps() == "120 steps at the mean group size, ∝ size^1"


def test_lora_settings_given_as_dict():
    config = small_config(lora={"rank": 3, "alpha": 6.0})
    assert isinstance(config.lora, LoRASettings) and config.lora.rank == 3


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
