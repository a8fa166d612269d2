"""Tests of guda_lab.training: a stock DDPMPipeline directory, reproducibility, learning, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from diffusers_guda import GroupedDataset
from guda_lab import TrainConfig, train_base_model
from diffusers_guda.errors import ConfigError
from guda_lab.training import TRAIN_LOG_NAME


def tiny_config(**overrides) -> TrainConfig:
    values = dict(block_out_channels=(16, 32), norm_num_groups=8, num_train_timesteps=100, steps=20, batch_size=8, warmup_steps=2, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_trained_pipeline_loads_in_stock_diffusers(tiny_dataset, tmp_path):
    out = tmp_path / "base"
    config = tiny_config()
    returned = train_base_model(tiny_dataset, config, output_dir=out, progress=False)
    assert (out / "model_index.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"

    stock = DDPMPipeline.from_pretrained(out)
    assert type(stock) is DDPMPipeline
    assert type(stock.unet) is UNet2DModel
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert stock.scheduler.config.num_train_timesteps == 100
    assert stock.unet.config.sample_size == 8 and stock.unet.config.in_channels == 1
    saved, trained = stock.unet.state_dict(), returned.unet.state_dict()
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    assert not returned.unet.training

    log = json.loads((out / TRAIN_LOG_NAME).read_text())
    assert log["seed"] == 0
    assert log["config"] == config.to_dict()
    assert log["config"]["block_out_channels"] == [16, 32]
    assert log["num_images"] == len(tiny_dataset)
    assert log["groups"] == tiny_dataset.group_names
    assert len(log["loss_every_50_steps"]) == 1
    assert all(isinstance(v, float) and v > 0 for v in log["loss_every_50_steps"])
    assert log["final_loss"] > 0 and log["wall_s"] >= 0


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_dataset):
    a = train_base_model(tiny_dataset, tiny_config(steps=5), progress=False).unet.state_dict()
    b = train_base_model(tiny_dataset, tiny_config(steps=5), progress=False).unet.state_dict()
    c = train_base_model(tiny_dataset, tiny_config(steps=5, seed=1), progress=False).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_loss_decreases(tiny_dataset, monkeypatch):
    losses = []
    original = torch.nn.functional.mse_loss

    def recording_mse(*args, **kwargs):
        loss = original(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(torch.nn.functional, "mse_loss", recording_mse)
    train_base_model(tiny_dataset, tiny_config(steps=60, warmup_steps=5), progress=False)
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, (first, last)


def test_norm_groups_must_divide_channels():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        TrainConfig(block_out_channels=(16, 32), norm_num_groups=12)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(batch_size=0)])
def test_steps_and_batch_size_must_be_positive(kwargs):
    with pytest.raises(ConfigError):
        tiny_config(**kwargs)


def test_non_square_images_are_refused():
    with pytest.raises(ConfigError, match="square"):
        tiny_config().build_unet((1, 8, 6))
    dataset = GroupedDataset(torch.zeros(4, 1, 8, 6), torch.tensor([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(ConfigError, match="square"):
        train_base_model(dataset, tiny_config(), progress=False)


def test_image_size_must_be_divisible_by_the_levels():
    config = tiny_config(block_out_channels=(16, 32, 32))
    with pytest.raises(ConfigError, match="divisible"):
        config.build_unet((1, 6, 6))
    dataset = GroupedDataset(torch.zeros(4, 1, 6, 6), torch.tensor([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(ConfigError, match="divisible"):
        train_base_model(dataset, config, progress=False)
    assert config.build_unet((1, 8, 8)).config.sample_size == 8


def test_ema_weights_are_the_running_average(tiny_dataset, monkeypatch):
    """With ema_decay the saved weights are the average of the iterates, not the last iterate."""
    iterates = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        iterates.append([p.detach().clone() for p in self.param_groups[0]["params"]])
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    decay = 0.5
    trained = train_base_model(tiny_dataset, tiny_config(steps=6, ema_decay=decay), progress=False).unet
    torch.manual_seed(0)  # the average starts from the initial weights: rebuild them
    initial = tiny_config().build_unet(tiny_dataset.image_shape)
    average = [p.detach().clone() for p in initial.parameters()]
    for step, weights in enumerate(iterates):
        d = min(decay, (1 + step) / (10 + step))
        average = [a + (1 - d) * (w - a) for a, w in zip(average, weights)]
    assert all(torch.allclose(a, p, atol=1e-6) for a, p in zip(average, trained.parameters()))
    assert not all(torch.equal(w, p) for w, p in zip(iterates[-1], trained.parameters()))
    assert len(iterates) == 6


def test_ema_decay_must_be_below_one():
    with pytest.raises(ConfigError, match="ema_decay"):
        tiny_config(ema_decay=1.0)
