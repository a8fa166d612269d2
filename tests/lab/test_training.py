"""Tests of guda_lab.training: a stock DDPMPipeline directory, reproducibility, learning, config errors,
DDPM and flow-matching training loops."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from diffusers_guda import GroupedDataset
from guda_lab import TrainConfig, train_base_model
from diffusers_guda.errors import ConfigError
from guda_lab.training import TRAIN_LOG_NAME, cosine_with_warmup


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
    digests = tiny_dataset.content_digests()
    assert log["data"] == {"images": digests["images"], "prompts": None} and len(digests["images"]) == 64
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


def record_losses(monkeypatch) -> list[float]:
    """The list every training loss (``F.mse_loss``) is appended to while ``monkeypatch`` holds."""
    losses = []
    original = torch.nn.functional.mse_loss

    def recording_mse(*args, **kwargs):
        loss = original(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(torch.nn.functional, "mse_loss", recording_mse)
    return losses


def test_loss_decreases(tiny_dataset, monkeypatch):
    losses = record_losses(monkeypatch)
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


# -- flow matching (``scheduler="flow"``) and the unchanged DDPM path ------------------------------


def reference_fit(config: TrainConfig, dataset, noisy_input) -> dict:
    """The training loop written out by hand (no EMA): ``noisy_input(scheduler, x0, noise, t)`` gives the
    UNet's input, its time input and its regression target for a batch's integer steps ``t``."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    pipeline = config.build_pipeline(dataset.image_shape)
    unet = pipeline.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, config.steps, config.warmup_steps))
    unet.train()
    for _ in range(config.steps):
        idx = torch.randint(0, len(dataset.images), (config.batch_size,), generator=generator)
        x0 = dataset.images[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), generator=generator)
        x_t, timestep, target = noisy_input(pipeline.scheduler, x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(x_t, timestep).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr.step()
    return unet.state_dict()


def test_ddpm_training_is_diffusers_add_noise_at_integer_timesteps(tiny_dataset):
    """The DDPM path is what it was before flow matching: diffusers' ``add_noise`` at the integer timestep, ε target."""
    config = tiny_config(steps=4)
    trained = train_base_model(tiny_dataset, config, progress=False).unet.state_dict()
    expected = reference_fit(config, tiny_dataset, lambda s, x0, noise, t: (s.add_noise(x0, noise, t), t, noise))
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    assert set(config.to_dict()) == {"block_out_channels", "layers_per_block", "attention", "norm_num_groups", "num_train_timesteps",
                                     "beta_schedule", "prediction_type", "steps", "batch_size", "learning_rate", "warmup_steps",
                                     "weight_decay", "ema_decay", "seed"}  # the record of a DDPM recipe, unchanged


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_training_regresses_the_velocity_at_sigma_times_t(tiny_dataset, shift):
    """Step t is the scheduler's t-th training σ from the least noisy: x_t = (1 - σ) x0 + σ ε (diffusers'
    ``scale_noise``), the model sees σ T (the timesteps diffusers' pipelines pass) and regresses ε - x0."""
    config = tiny_config(steps=4, scheduler="flow", shift=shift)

    def flow_input(scheduler, x0, noise, t):
        timestep = scheduler.timesteps.flip(0)[t]  # ascending σ T
        return scheduler.scale_noise(x0, timestep, noise), timestep, noise - x0

    trained = train_base_model(tiny_dataset, config, progress=False).unet.state_dict()
    expected = reference_fit(config, tiny_dataset, flow_input)
    assert all(torch.equal(trained[k], expected[k]) for k in expected)


def test_flow_training_is_deterministic_and_learns(tiny_dataset):
    config = tiny_config(steps=60, warmup_steps=5, scheduler="flow")
    a = train_base_model(tiny_dataset, config, progress=False)
    b = train_base_model(tiny_dataset, config, progress=False).unet.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.unet.state_dict().items())
    with pytest.MonkeyPatch.context() as patch:
        losses = record_losses(patch)
        train_base_model(tiny_dataset, config, progress=False)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_flow_pipeline_reloads_in_stock_diffusers_and_samples(tiny_dataset, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = tiny_config(steps=3, scheduler="flow", shift=2.0)
    train_base_model(tiny_dataset, config, output_dir=tmp_path / "base", progress=False)
    stock = DDPMPipeline.from_pretrained(tmp_path / "base")
    assert type(stock.scheduler) is FlowMatchEulerDiscreteScheduler and stock.scheduler.config.shift == 2.0
    log = json.loads((tmp_path / "base" / TRAIN_LOG_NAME).read_text())
    assert log["config"] == config.to_dict() and log["config"]["scheduler"] == "flow"
    assert "prediction_type" not in log["config"] and "beta_schedule" not in log["config"]
    assert TrainConfig(**log["config"]) == config
    images = stock(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], num_inference_steps=4,
                   output_type="np").images
    again = stock(batch_size=1, generator=[torch.Generator().manual_seed(1)], num_inference_steps=4, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.allclose(images[1], again[0], atol=1e-5)  # each image's noise is its own
    assert not np.allclose(images[0], images[1], atol=1e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scheduler="ddim"), "scheduler must be one of"),
    (dict(shift=3.0), r"\['shift'\] is a setting of the flow scheduler"),
    (dict(scheduler="flow", prediction_type="v_prediction"), r"\['prediction_type'\] is a setting of the ddpm scheduler"),
    (dict(scheduler="flow", beta_schedule="squaredcos_cap_v2"), "beta_schedule"),
    (dict(scheduler="flow", shift=0.0), "shift must be > 0"),
])
def test_scheduler_settings_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(**kwargs)


class Killed(Exception):
    """Stands in for a kill in the middle of a training run."""


def kill_after_steps(monkeypatch, steps: int) -> None:
    """Make AdamW's step raise after ``steps`` optimiser steps (counted over the whole monkeypatch)."""
    real_step, done = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        if len(done) == steps:
            raise Killed
        done.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_killed_training_continues_from_its_checkpoint_to_the_same_model(tiny_dataset, tmp_path, monkeypatch, ema_decay):
    config = tiny_config(steps=12, ema_decay=ema_decay)
    whole = train_base_model(tiny_dataset, config, output_dir=tmp_path / "whole", progress=False, checkpoint_every=4)
    out, partial = tmp_path / "resumed", tmp_path / ".resumed-partial"
    with monkeypatch.context() as patch:
        kill_after_steps(patch, 10)
        with pytest.raises(Killed):
            train_base_model(tiny_dataset, config, output_dir=out, progress=False, checkpoint_every=4)
    assert json.loads((partial / "state.json").read_text())["step"] == 8 and not out.exists()

    steps = record_losses(monkeypatch)
    resumed = train_base_model(tiny_dataset, config, output_dir=out, progress=False, checkpoint_every=4)
    assert len(steps) == 4  # steps 8 to 11, not 12 again
    expected, got = whole.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    logs = [json.loads((d / TRAIN_LOG_NAME).read_text()) for d in (tmp_path / "whole", out)]
    assert logs[0]["final_loss"] == logs[1]["final_loss"] and logs[0]["loss_every_50_steps"] == logs[1]["loss_every_50_steps"]
    assert not partial.exists() and not (tmp_path / ".whole-partial").exists()


def test_a_checkpoint_of_other_settings_or_data_is_not_continued(tiny_dataset, tmp_path, monkeypatch):
    config = tiny_config(steps=8)
    with monkeypatch.context() as patch:
        kill_after_steps(patch, 6)
        with pytest.raises(Killed):
            train_base_model(tiny_dataset, config, output_dir=tmp_path / "base", progress=False, checkpoint_every=4)
    fewer = GroupedDataset(tiny_dataset.images[:-1], tiny_dataset.group_ids[:-1], tiny_dataset.group_names)
    for other_config, data in ((tiny_config(steps=8, learning_rate=1e-3), tiny_dataset), (config, fewer)):
        fresh = train_base_model(data, other_config, progress=False)
        shutil.copytree(tmp_path / ".base-partial", tmp_path / ".other-partial", dirs_exist_ok=True)
        with monkeypatch.context() as patch:
            steps = record_losses(patch)
            other = train_base_model(data, other_config, output_dir=tmp_path / "other", progress=False, checkpoint_every=4)
        assert len(steps) == 8  # from step 0
        expected, got = fresh.unet.state_dict(), other.unet.state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
