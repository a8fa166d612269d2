"""The loss-based baselines on a flow-matching model: its velocity loss at the model time σ T, on the training σ grid."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import small_dataset, unchanged, weights
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_guda.errors import ConfigError
from guda_lab.evaluation.denoising import default_timesteps, denoising_loss, denoising_noise, resolve_timesteps
from guda_lab.evaluation.gradient import GradientConfig, gradient_scores
from guda_lab.evaluation.instance_unlearning import InstanceUnlearningConfig, instance_unlearning_scores
from diffusers_guda.diffusion import NoiseSchedule


@pytest.fixture
def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0)


def test_timesteps_are_steps_of_the_flow_training_grid(flow_scheduler):
    assert resolve_timesteps(None, flow_scheduler).tolist() == list(default_timesteps(100))
    with pytest.raises(ConfigError, match=r"\[0, 100\)"):
        resolve_timesteps((100,), flow_scheduler)


def test_flow_loss_is_the_velocity_error_at_sigma_times_t(tiny_unet, tiny_dataset, flow_scheduler):
    """Written out with the scheduler's own sigmas: step t is the t-th training σ from the least noisy."""
    image = tiny_dataset.images[0]
    t, noise = denoising_noise(image, torch.tensor([5, 60, 99]), 2, 0, "salt")
    sigma = flow_scheduler.sigmas.flip(0)[t].view(-1, 1, 1, 1)  # ascending: 1/T ... 1, shifted
    x_t = (1 - sigma) * image + sigma * noise
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(tiny_unet(x_t, sigma.flatten() * 100).sample, noise - image)
        loss = denoising_loss(tiny_unet, NoiseSchedule(flow_scheduler), image, (t, noise))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sigma.flatten()[-1] == 1  # the noisiest training step is pure noise


def test_gradient_and_instance_unlearning_score_a_flow_model(tiny_unet, tiny_dataset, flow_scheduler):
    data = small_dataset(tiny_dataset)
    queries = tiny_dataset.images[-2:]
    before = weights(tiny_unet)
    grad = GradientConfig(timesteps=(20, 90), projection_dim=16)
    scores = gradient_scores(tiny_unet, flow_scheduler, queries, data, grad)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all() and scores.abs().sum() > 0
    assert torch.equal(scores, gradient_scores(tiny_unet, flow_scheduler, queries, data, grad))
    inst = InstanceUnlearningConfig(timesteps=(20, 90), steps=2, learning_rate=1e-2)
    lifted = instance_unlearning_scores(tiny_unet, flow_scheduler, queries, data, inst)
    assert lifted.shape == (2, 3) and torch.isfinite(lifted).all() and lifted.sum() > 0  # ascent raises the losses
    assert unchanged(tiny_unet, before)
