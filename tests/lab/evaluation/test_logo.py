"""Leave-one-group-out training and LOGO attributions on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline

from diffusers_guda import ELBOConfig
from diffusers_guda.cli import main
from diffusers_guda.errors import ConfigError
from diffusers_guda.locks import OutputLock
from guda_lab import TrainConfig
from guda_lab.evaluation import logo
from guda_lab.training import TRAIN_LOG_NAME

TINY = TrainConfig(block_out_channels=(16, 32), norm_num_groups=8, num_train_timesteps=100, steps=4, batch_size=8, warmup_steps=1)


def test_one_model_per_group_without_that_group(tiny_dataset, tmp_path):
    paths = logo.train_logo_models(tiny_dataset, TINY, tmp_path, progress=False, log=lambda *_: None)
    assert list(paths) == ["left", "middle", "right"]
    for name, path in paths.items():
        assert path == tmp_path / "seed_0" / name
        record = json.loads((path / TRAIN_LOG_NAME).read_text())
        assert record["excluded_group"] == name
        assert record["num_images"] == 24 and name not in record["groups"]
        assert type(DDPMPipeline.from_pretrained(path).unet).__name__ == "UNet2DModel"


def test_rerun_skips_finished_groups_and_another_seed_is_separate(tiny_dataset, tmp_path, monkeypatch):
    logo.train_logo_models(tiny_dataset, TINY, tmp_path, groups=["middle"], progress=False, log=lambda *_: None)
    calls = []
    real = logo.train_base_model
    monkeypatch.setattr(logo, "train_base_model", lambda *a, **k: calls.append(k["description"]) or real(*a, **k))
    messages = []
    logo.train_logo_models(tiny_dataset, TINY, tmp_path, progress=False, log=messages.append)
    assert calls == ["LOGO without left", "LOGO without right"]
    assert any("reusing" in m and "middle" in m for m in messages)
    logo.train_logo_models(tiny_dataset, TINY, tmp_path, groups=[0], seed=1, progress=False, log=lambda *_: None)
    assert (tmp_path / "seed_1" / "left" / TRAIN_LOG_NAME).is_file()
    assert not (tmp_path / "seed_1" / "middle").exists()


def test_a_group_finished_meanwhile_by_another_run_is_not_trained_again(tiny_dataset, tmp_path, monkeypatch):
    calls = []
    real = logo.train_base_model

    def train_and_finish_right_in_another_shell(*args, **kwargs):
        calls.append(kwargs["description"])
        if len(calls) == 1:  # while `left` trains, another `guda logo --groups right` finishes `right`
            right = tiny_dataset.group_index("right")
            real(tiny_dataset.without_group(right), TINY, output_dir=tmp_path / "seed_0" / "right", progress=False,
                 extra_log={logo.EXCLUDED_KEY: "right"})
        return real(*args, **kwargs)

    monkeypatch.setattr(logo, "train_base_model", train_and_finish_right_in_another_shell)
    logo.train_logo_models(tiny_dataset, TINY, tmp_path, groups=["left", "right"], progress=False, log=lambda *_: None)
    assert calls == ["LOGO without left"]
    assert (tmp_path / "seed_0" / "right" / TRAIN_LOG_NAME).is_file()


@pytest.mark.parametrize("other_run_finishes", [True, False])
def test_a_model_another_run_is_training_is_waited_for(tiny_dataset, tmp_path, monkeypatch, other_run_finishes):
    other_run = OutputLock(tmp_path / "seed_0" / "left", command="guda logo").acquire()  # e.g. `guda logo` in another shell
    calls, messages = [], []
    real = logo.train_base_model

    def train_while_the_other_run_ends(*args, **kwargs):
        calls.append(kwargs["description"])
        if other_run.held:  # the other run finishes `left` (or stops short of it) while this run trains its first model
            if other_run_finishes:
                left = tiny_dataset.group_index("left")
                real(tiny_dataset.without_group(left), TINY, output_dir=tmp_path / "seed_0" / "left", progress=False,
                     extra_log={logo.EXCLUDED_KEY: "left"})
            other_run.release()
        return real(*args, **kwargs)

    monkeypatch.setattr(logo, "train_base_model", train_while_the_other_run_ends)
    paths = logo.train_logo_models(tiny_dataset, TINY, tmp_path, progress=False, log=messages.append)
    trained_here = ["LOGO without middle", "LOGO without right"] + ([] if other_run_finishes else ["LOGO without left"])
    assert calls == trained_here
    assert messages == ["LOGO without 'left': another run is training it; waiting for it"]
    assert all((path / TRAIN_LOG_NAME).is_file() for path in paths.values())
    assert sorted(p.name for p in (tmp_path / "seed_0").iterdir()) == ["left", "middle", "right"]  # no lock left behind


def test_a_directory_from_other_settings_is_refused(tiny_dataset, tmp_path):
    logo.train_logo_models(tiny_dataset, TINY, tmp_path, groups=[0], progress=False, log=lambda *_: None)
    before = (tmp_path / "seed_0" / "left" / TRAIN_LOG_NAME).read_bytes()
    other = TrainConfig(**{**TINY.to_dict(), "steps": 5})
    with pytest.raises(ConfigError, match="other settings"):
        logo.train_logo_models(tiny_dataset, other, tmp_path, groups=[0], progress=False)
    assert (tmp_path / "seed_0" / "left" / TRAIN_LOG_NAME).read_bytes() == before


def test_a_model_trained_on_other_images_is_refused(tiny_dataset, tmp_path):
    logo.train_logo_models(tiny_dataset, TINY, tmp_path, groups=[0], progress=False, log=lambda *_: None)
    path = tmp_path / "seed_0" / "left"
    before = (path / TRAIN_LOG_NAME).read_bytes()
    changed = tiny_dataset.with_images(tiny_dataset.images.flip(-1))  # the same groups, other pixels
    with pytest.raises(ConfigError, match="other images or prompts than this dataset's without 'left'"):
        logo.train_logo_models(changed, TINY, tmp_path, groups=[0], progress=False)
    assert (path / TRAIN_LOG_NAME).read_bytes() == before
    # a change inside the left-out group leaves the model's own training set as it was: it is reused
    images = tiny_dataset.images.clone()
    images[tiny_dataset.forget_indices(0)] *= -1
    messages = []
    logo.train_logo_models(tiny_dataset.with_images(images), TINY, tmp_path, groups=[0], progress=False, log=messages.append)
    assert messages == [f"LOGO without 'left': reusing {path}"]


def test_logo_attribution_uses_shared_draws(tiny_dataset, tmp_path):
    paths = logo.train_logo_models(tiny_dataset, TINY, tmp_path, progress=False, log=lambda *_: None)
    pipes = {name: DDPMPipeline.from_pretrained(path) for name, path in paths.items()}
    full = pipes["middle"].unet  # a stand-in full model: its own LOGO score must be exactly 0
    images = tiny_dataset.images[::6]
    result = logo.logo_attribution(full, {n: p.unet for n, p in pipes.items()}, pipes["left"].scheduler, images, ELBOConfig(stride=10), progress=False)
    assert result.scores.shape == (len(images), 3) and result.groups == ["left", "middle", "right"]
    assert torch.equal(result.scores[:, 1], torch.zeros(len(images)))
    assert torch.isfinite(result.scores).all() and (result.scores[:, 0] != 0).all()
    again = logo.logo_attribution(full, {n: p.unet for n, p in pipes.items()}, pipes["left"].scheduler, images.flip(0), ELBOConfig(stride=10), batch_size=1, progress=False)
    assert torch.equal(again.scores.flip(0), result.scores)


def test_cli_logo(tmp_path, tiny_recipe):
    code = main(["logo", "--recipe", str(tiny_recipe), "--out", str(tmp_path / "logo"), "--groups", "3", "7", "--steps", "2", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "logo" / "seed_0").iterdir()) == ["3", "7"]
