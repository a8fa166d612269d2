"""The instance-unlearning baseline (docs/evaluation.md#baselines): per-query ascent, training losses after."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import small_dataset, unchanged, weights

from diffusers_guda import GroupedDataset
from diffusers_guda.errors import ConfigError, DataError
from guda_lab.evaluation.instance_unlearning import InstanceUnlearningConfig, instance_unlearning_scores


def test_instance_unlearning_shape_determinism_and_model_untouched(tiny_unet, tiny_scheduler, tiny_dataset):
    data = small_dataset(tiny_dataset, 2)
    queries = tiny_dataset.images[[0, 30]]
    flags = {n: p.requires_grad for n, p in tiny_unet.named_parameters()}
    state = weights(tiny_unet)
    config = InstanceUnlearningConfig(steps=2, learning_rate=1e-2, timesteps=(20, 60))
    first = instance_unlearning_scores(tiny_unet, tiny_scheduler, queries, data, config)
    assert first.shape == (2, 3) and first.dtype == torch.float64 and torch.isfinite(first).all()
    assert (first != 0).any()
    assert torch.equal(first, instance_unlearning_scores(tiny_unet, tiny_scheduler, queries, data, config))
    assert unchanged(tiny_unet, state)
    assert flags == {n: p.requires_grad for n, p in tiny_unet.named_parameters()}
    tiny_unet.train()
    assert torch.equal(first, instance_unlearning_scores(tiny_unet, tiny_scheduler, queries, data, config))
    assert tiny_unet.training and unchanged(tiny_unet, state)
    tiny_unet.eval()
    # ascent on the query raises the query's own loss: a training copy of it increases most in its group
    self_data = GroupedDataset(torch.cat([queries[:1], data.images[2:]]), torch.cat([torch.tensor([0]), data.group_ids[2:]]), data.group_names)
    mean = instance_unlearning_scores(tiny_unet, tiny_scheduler, queries[:1], self_data, InstanceUnlearningConfig(steps=2, learning_rate=1e-2, timesteps=(20, 60), aggregate="mean"))
    assert mean[0, 0] > 0
    with pytest.raises(DataError):
        instance_unlearning_scores(tiny_unet, tiny_scheduler, torch.zeros(1, 1, 4, 4), data, config)


def test_instance_unlearning_adam_runs(tiny_unet, tiny_scheduler, tiny_dataset):
    data = small_dataset(tiny_dataset, 1)
    scores = instance_unlearning_scores(
        tiny_unet, tiny_scheduler, tiny_dataset.images[:1], data, InstanceUnlearningConfig(steps=1, optimizer="adam", timesteps=(50,), param_filter="up_blocks")
    )
    assert scores.shape == (1, 3) and torch.isfinite(scores).all()


@pytest.mark.parametrize(
    "kwargs",
    [dict(steps=0), dict(learning_rate=0.0), dict(optimizer="lbfgs"), dict(aggregate="max")],
)
def test_instance_unlearning_config_errors(kwargs):
    with pytest.raises(ConfigError):
        InstanceUnlearningConfig(**kwargs)
