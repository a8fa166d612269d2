"""Tests of diffusers_guda.unlearning.checkpoint: resuming a run, refusing a checkpoint of other
settings, and keeping the groups finished before a failure."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import diffusers_guda.unlearning.unlearner as unlearner_module
from diffusers_guda import GroupUnlearner, LoRASettings
from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import BundleError, CheckpointMismatchError, UnlearningDivergedError
from diffusers_guda.lora import ADAPTER_WEIGHT_NAME, load_adapter_file
from diffusers_guda.objectives import ReTrack, get_objective
from diffusers_guda.unlearning import RUN_NAME, STATS_NAME, UnlearningCheckpoint

from unlearning_helpers import assert_same_adapters, has_adapters, small_config

pytest_plugins = ["unlearning_helpers"]  # its fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


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
    assert UnlearningCheckpoint(checkpoint).finished_groups(tiny_dataset.group_names) == ["left", "right"]
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
    assert UnlearningCheckpoint(checkpoint).finished_groups(tiny_dataset.group_names) == ["left", "middle", "right"]

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
    with pytest.raises(CheckpointMismatchError, match="other settings"):
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
    with pytest.raises(CheckpointMismatchError, match="other settings"):
        GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=1)).unlearn(tiny_dataset, checkpoint_dir=checkpoint, progress=False)


@pytest.mark.parametrize("change", ["images", "members", "prompts"])
def test_checkpoint_of_other_data_of_the_same_sizes_is_refused(change, tiny_unet, tiny_scheduler, tiny_dataset, tmp_path):
    checkpoint = tmp_path / "ckpt"
    GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=1)).unlearn(
        tiny_dataset, groups=[0], checkpoint_dir=checkpoint, progress=False
    )
    images, group_ids, prompts = tiny_dataset.images, tiny_dataset.group_ids, None
    if change == "images":
        images = images.flip(-1)
    elif change == "members":  # two images of different groups trade places: the same group sizes
        a, b = tiny_dataset.forget_indices(0)[0], tiny_dataset.forget_indices(1)[0]
        group_ids = group_ids.clone()
        group_ids[a], group_ids[b] = group_ids[b].clone(), group_ids[a].clone()
    else:
        prompts = ["a photo"] * len(tiny_dataset)
    other = GroupedDataset(images, group_ids, tiny_dataset.group_names, prompts)
    assert other.group_sizes() == tiny_dataset.group_sizes()
    with pytest.raises(CheckpointMismatchError, match="other settings, data or base model"):
        GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=1)).unlearn(other, checkpoint_dir=checkpoint, progress=False)


class _NaNOnMiddle(ReTrack):
    """A test objective that diverges on the group named 'middle' only."""

    def setup(self, dataset, group, schedule):
        super().setup(dataset, group, schedule)
        self.diverge = dataset.group_names[group] == "middle"

    def forget_loss(self, batch):
        loss = super().forget_loss(batch)
        return loss * float("inf") if self.diverge else loss


def test_divergence_keeps_groups_finished_before(tiny_unet, tiny_scheduler, tiny_dataset, tmp_path, monkeypatch):
    # the unlearner gets the retrack objective as a _NaNOnMiddle, without registering a test objective
    monkeypatch.setattr(unlearner_module, "get_objective", lambda name, options=None: _NaNOnMiddle(get_objective(name, options).config))
    checkpoint = tmp_path / "ckpt"
    config = small_config()
    with pytest.raises(UnlearningDivergedError, match="'middle'"):
        GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(tiny_dataset, checkpoint_dir=checkpoint, progress=False)
    assert (checkpoint / "left" / ADAPTER_WEIGHT_NAME).is_file()
    assert (checkpoint / "left" / STATS_NAME).is_file()
    assert not (checkpoint / "middle").exists()
    assert not (checkpoint / "right").exists()
    assert not [p.name for p in checkpoint.iterdir() if p.name.startswith(".")], "no half-written group folders"
    assert not has_adapters(tiny_unet)


# -- the checkpoint directory itself ------------------------------------------------------------


def test_checkpoint_saves_loads_and_needs_both_files(full_bundle, tmp_path):
    checkpoint = UnlearningCheckpoint(tmp_path / "ckpt")
    assert repr(checkpoint) == f"UnlearningCheckpoint({str(tmp_path / 'ckpt')!r})"
    state, config, stats = full_bundle.adapters["left"], full_bundle.adapter_configs["left"], full_bundle.groups[0].stats
    assert not checkpoint.is_finished("left")
    checkpoint.save("left", state, config, stats)
    assert checkpoint.is_finished("left")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["left"]  # no temporary leftovers
    got_state, got_config, got_stats = checkpoint.load("left")
    assert got_state.keys() == state.keys() and all(torch.equal(got_state[k], state[k]) for k in state)
    assert got_config == config and got_stats == json.loads(json.dumps(stats))
    assert load_adapter_file(tmp_path / "ckpt" / "left" / ADAPTER_WEIGHT_NAME)[1] == config

    (tmp_path / "ckpt" / "left" / STATS_NAME).unlink()
    assert not checkpoint.is_finished("left")
    checkpoint.save("left", state, config, stats)  # rewritten as a whole
    (tmp_path / "ckpt" / "left" / ADAPTER_WEIGHT_NAME).write_bytes(b"garbage")
    with pytest.raises(BundleError, match="corrupted"):
        checkpoint.load("left")


def test_checkpoint_run_record(tmp_path):
    checkpoint = UnlearningCheckpoint(tmp_path / "ckpt")
    run = {"fingerprint": "f" * 64, "config": {"steps": 3, "lora": {"target_modules": ("a", "b")}}, "groups": ["x"]}
    checkpoint.check_run(run)  # recorded
    assert json.loads((tmp_path / "ckpt" / RUN_NAME).read_text())["config"]["lora"]["target_modules"] == ["a", "b"]
    checkpoint.check_run(run)  # the same record (tuples and lists compare as JSON)
    with pytest.raises(CheckpointMismatchError, match="other settings, data or base model"):
        checkpoint.check_run({**run, "groups": ["y"]})
