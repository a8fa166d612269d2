"""Denoising losses shared by the loss-based baselines: timesteps and common random numbers."""

from __future__ import annotations

import pytest
import torch

from diffusers_guda.errors import ConfigError
from guda_lab.evaluation.denoising import default_timesteps, denoising_noise, resolve_timesteps


def test_default_timesteps():
    steps = default_timesteps(100)
    assert len(steps) == 10 and steps[0] == 5 and steps[-1] == 99 and list(steps) == sorted(set(steps))


def test_resolve_timesteps_defaults_and_range(tiny_scheduler):
    assert resolve_timesteps(None, tiny_scheduler).tolist() == list(default_timesteps(100))
    assert resolve_timesteps((0, 99), tiny_scheduler).tolist() == [0, 99]
    for bad in ((), (100,), (-1, 5)):
        with pytest.raises(ConfigError, match="timesteps"):
            resolve_timesteps(bad, tiny_scheduler)


def test_denoising_noise_is_a_function_of_the_image_content(tiny_dataset):
    image, other = tiny_dataset.images[0], tiny_dataset.images[1]
    timesteps = torch.tensor([10, 50])
    t, noise = denoising_noise(image, timesteps, 2, 0, "salt")
    assert t.tolist() == [10, 10, 50, 50] and noise.shape == (4, *image.shape)  # t-major rows
    same_t, same = denoising_noise(image.clone(), timesteps, 2, 0, "salt")
    assert torch.equal(t, same_t) and torch.equal(noise, same)
    assert not torch.equal(noise[0], noise[1])  # the draws of one t differ
    for args in ((other, timesteps, 2, 0, "salt"), (image, timesteps, 2, 1, "salt"), (image, timesteps, 2, 0, "pepper")):
        assert not torch.equal(denoising_noise(*args)[1], noise)
