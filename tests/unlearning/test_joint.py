"""Tests of diffusers_guda.unlearning.joint: adapters trained together equal the ones trained alone (up
to float rounding), bit-identical reruns, groups with their own step counts, the UNet left as it
was, text-conditioned objectives, and objectives that cannot be batched this way."""

from __future__ import annotations

import pytest
import torch

from diffusers_guda import GroupedDataset, GroupUnlearner, UnlearningConfig
from diffusers_guda.adapter_state import adapter_state
from diffusers_guda.errors import ConfigError
from diffusers_guda.hashing import unet_fingerprint
from diffusers_guda.objectives import UnlearningObjective, base as objectives_base
from diffusers_guda.pipelines import GUDAStableDiffusionPipeline

from conftest import GUDAUNet2DModel, make_sd_dataset, tiny_unet_config
from unlearning_helpers import assert_same_adapters, has_adapters, small_config

pytest_plugins = ["unlearning_helpers"]

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

def assert_close_adapters(a, b, learning_rate: float = 1e-2):
    """Equal up to float rounding: 99 % of the entries within 1 % of an Adam step, and none off by half a step.

    Each group's model calls get the same inputs bit for bit, but run on its rows of a larger forward,
    whose kernels round differently from the group's own (measured ≤ 2e-6 per forward, on the tiny UNet
    and on the tiny Stable Diffusion, with or without the adapters). Adam amplifies that where a
    gradient entry is near its ε (1e-8): the entry's update ``lr g / (|g| + ε)`` then follows the
    gradient's rounding, by up to a whole step. Measured at lr 1e-2: ≤ 1e-4 on the tiny UNet; on the
    tiny Stable Diffusion (gradient entries of 1e-9 there) up to 2.5e-3, with ≤ 0.25 % of the entries
    off by more than 1e-4 (but 4 % by more than 1e-5). A gradient mixed between groups would move most
    entries by whole steps.
    """
    assert a.slugs == b.slugs
    for slug in a.slugs:
        assert a.adapters[slug].keys() == b.adapters[slug].keys()
        diff = torch.cat([(a.adapters[slug][k] - b.adapters[slug][k]).abs().flatten() for k in a.adapters[slug]])
        assert (diff > 0.01 * learning_rate).float().mean() < 0.01, (slug, (diff > 0.01 * learning_rate).sum())
        assert diff.max() < 0.5 * learning_rate, (slug, diff.max())


OBJECTIVES = [
    ("retrack", {"num_neighbors": 2}),
    ("retrack", {"num_neighbors": "all", "target": "teacher_posterior", "preserve": "teacher_posterior"}),
    ("retrack", {"num_neighbors": 2, "target": "teacher_neighbour", "preserve": "distill"}),  # draws inside the loss
    ("gradient_ascent", {}),
]


@pytest.mark.parametrize("objective,options", OBJECTIVES)
def test_adapters_trained_together_are_the_ones_trained_alone(objective, options, tiny_scheduler, tiny_dataset):
    def run(joint_groups):
        torch.manual_seed(0)
        unet = GUDAUNet2DModel(**tiny_unet_config()).eval()
        config = small_config(objective=objective, objective_options=options, joint_groups=joint_groups, steps=4)
        return GroupUnlearner(unet, tiny_scheduler, config).unlearn(tiny_dataset, progress=False)

    alone, together = run(1), run(3)
    assert_close_adapters(alone, together)
    for a, b in zip(alone.groups, together.groups):
        assert b.stats["steps"] == a.stats["steps"] and b.stats["sample_passes"] == a.stats["sample_passes"]
        assert "trained_with" not in a.stats
        assert sorted(b.stats["trained_with"] + [b.name]) == sorted(tiny_dataset.group_names)
        assert b.stats["forget_loss_after"] == pytest.approx(a.stats["forget_loss_after"], rel=1e-4)


def test_joint_runs_are_bit_identical_and_leave_the_unet_as_it_was(tiny_unet, tiny_scheduler, tiny_dataset):
    fingerprint = unet_fingerprint(tiny_unet)
    GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, groups=[0], progress=False)
    state = adapter_state(tiny_unet)  # what unlearning one group at a time leaves: LoRA layers, no adapter
    unlearner = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(joint_groups=2))
    first = unlearner.unlearn(tiny_dataset, progress=False)
    second = unlearner.unlearn(tiny_dataset, progress=False)
    assert_same_adapters(first, second)
    assert unet_fingerprint(tiny_unet) == fingerprint and adapter_state(tiny_unet) == state and not has_adapters(tiny_unet)
    # 3 groups, 2 at a time: the first two together, the third alone in its own loop
    assert [g.stats.get("trained_with") for g in first.groups] == [["middle"], ["left"], None]
    assert first.training["joint_groups"] == 2


def test_a_group_does_not_depend_on_the_groups_it_is_trained_with(tiny_unet, tiny_scheduler, tiny_dataset):
    unlearner = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(joint_groups=3))
    with_one = unlearner.unlearn_jointly(tiny_dataset, [0, 1], ["a", "b"], progress=False)
    with_two = unlearner.unlearn_jointly(tiny_dataset, [0, 2, 1], ["a", "c", "b"], progress=False)
    for (state_1, _, _), (state_2, _, _) in [(with_one[0], with_two[0]), (with_one[1], with_two[2])]:
        for key, value in state_1.items():
            torch.testing.assert_close(state_2[key], value, rtol=0, atol=0.1 * 1e-2)


def test_groups_with_their_own_step_counts(tiny_unet, tiny_scheduler, tiny_dataset):
    keep = torch.cat([torch.arange(0, 12), torch.arange(12, 18), torch.arange(24, 27)])  # groups of 12, 6 and 3 images
    dataset = GroupedDataset(tiny_dataset.images[keep], tiny_dataset.group_ids[keep], tiny_dataset.group_names)
    config = small_config(steps=3, size_exponent=1.0, joint_groups=3)
    sizes = dataset.group_sizes()
    expected = [config.steps_for(n, sum(sizes) / len(sizes)) for n in sizes]
    assert expected == [5, 3, 1]  # the largest group trains on after the others have dropped out
    together = GroupUnlearner(tiny_unet, tiny_scheduler, config).unlearn(dataset, progress=False)
    alone = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(steps=3, size_exponent=1.0)).unlearn(dataset, progress=False)
    assert [g.stats["steps"] for g in together.groups] == expected
    assert_close_adapters(alone, together)


def test_text_conditioned_groups_train_together(tiny_sd_dir):
    pipe = GUDAStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    dataset = make_sd_dataset(per_group=4)

    def run(joint_groups):
        config = UnlearningConfig(objective="anchor", lora={"rank": 2, "alpha": 2.0}, steps=3, forget_batch_size=2, retain_batch_size=2,
                                  eval_images=2, eval_draws=1, learning_rate=1e-2, joint_groups=joint_groups)
        return pipe.unlearn_groups(dataset, config=config, progress=False)

    alone, together = run(1), run(3)
    assert_close_adapters(alone, together)
    assert together.groups[0].stats["trained_with"] == ["green", "blue"]


class _OutputFedBack(UnlearningObjective):
    """Feeds the model's output back in as an input: a second call that depends on the first."""

    name = "test-output-fed-back"

    def forget_loss(self, batch):
        x_t = batch.schedule.add_noise(batch.forget_x0, batch.forget_noise, batch.forget_t)
        first = batch.predict(x_t, batch.forget_t)
        return batch.predict(first, batch.forget_t).pow(2).mean()


def test_an_objective_whose_inputs_depend_on_outputs_is_refused(tiny_unet, tiny_scheduler, tiny_dataset, monkeypatch):
    monkeypatch.setitem(objectives_base._REGISTRY, _OutputFedBack.name, _OutputFedBack)
    alone = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(objective=_OutputFedBack.name, objective_options={}))
    alone.unlearn(tiny_dataset, groups=[0], progress=False)  # alone it trains
    together = GroupUnlearner(tiny_unet, tiny_scheduler, small_config(objective=_OutputFedBack.name, objective_options={}, joint_groups=2))
    with pytest.raises(ConfigError, match="joint_groups=1"):
        together.unlearn(tiny_dataset, progress=False)
    assert not has_adapters(tiny_unet)


def test_joint_groups_must_be_positive_and_without_gradient_checkpointing():
    with pytest.raises(ConfigError, match="joint_groups must be >= 1"):
        UnlearningConfig(joint_groups=0)
    with pytest.raises(ConfigError, match="cannot be combined with gradient_checkpointing"):
        UnlearningConfig(joint_groups=2, gradient_checkpointing=True)
