"""Bounded gradient ascent: minus the clamped per-sample MSE, no gradient once a sample hits max_loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_guda.errors import ConfigError
from diffusers_guda.objectives import GradientAscent, GradientAscentConfig, NoiseSchedule, UnlearningBatch, get_objective


def _batch(schedule, model, x0, noise, t):
    n = len(t)
    return UnlearningBatch(
        forget_x0=x0,
        forget_index=torch.arange(n),
        forget_t=t,
        forget_noise=noise,
        retain_x0=x0,
        retain_index=torch.arange(n),
        retain_t=t,
        retain_noise=noise,
        model=model,
        teacher=lambda x_t, tt: pytest.fail("gradient ascent does not use the teacher"),
        schedule=schedule,
        generator=torch.Generator().manual_seed(0),
    )


class OffsetModel(torch.nn.Module):
    """Predicts the exact target of its prediction type plus a learnable per-sample offset."""

    def __init__(self, schedule, x0, noise, t, offsets):
        super().__init__()
        self.schedule, self.x0, self.noise, self.t = schedule, x0, noise, t
        self.offset = torch.nn.Parameter(torch.as_tensor(offsets, dtype=torch.float32).view(-1, 1, 1, 1))

    def forward(self, x_t, t):
        assert torch.equal(t, self.t)
        torch.testing.assert_close(x_t, self.schedule.add_noise(self.x0, self.noise, self.t))
        return self.schedule.target(self.x0, self.noise, self.t) + self.offset.expand_as(x_t)


def _setup(prediction_type="epsilon", offsets=(0.1, 0.5, 2.0, 3.0), seed=0):
    schedule = NoiseSchedule(DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(seed)
    n = len(offsets)
    x0 = torch.rand((n, 1, 8, 8), generator=generator) * 2 - 1
    noise = torch.randn((n, 1, 8, 8), generator=generator)
    t = torch.randint(1, 100, (n,), generator=generator)
    model = OffsetModel(schedule, x0, noise, t, offsets)
    return schedule, model, _batch(schedule, model, x0, noise, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_forget_loss_is_minus_clamped_mse(prediction_type):
    offsets = (0.1, 0.5, 2.0, 3.0)  # per-sample MSE = offset^2: 0.01, 0.25, 4, 9
    _, model, batch = _setup(prediction_type, offsets)
    objective = GradientAscent(max_loss=1.0)
    loss = objective.forget_loss(batch)
    expected = -torch.tensor([o**2 for o in offsets]).clamp(max=1.0).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    unbounded = GradientAscent(max_loss=100.0).forget_loss(batch)
    torch.testing.assert_close(unbounded.detach(), -torch.tensor([o**2 for o in offsets]).mean(), rtol=1e-4, atol=1e-5)


def test_gradient_only_below_max_loss():
    offsets = (0.1, 0.5, 2.0, 3.0)
    _, model, batch = _setup("epsilon", offsets)
    GradientAscent(max_loss=1.0).forget_loss(batch).backward()
    grad = model.offset.grad.flatten()
    # d/d o_i of -(1/n) sum_i o_i^2  =  -2 o_i / n  below the cap, 0 at or above it
    torch.testing.assert_close(grad[:2], torch.tensor([-2 * 0.1 / 4, -2 * 0.5 / 4]), rtol=1e-4, atol=1e-7)
    assert torch.equal(grad[2:], torch.zeros(2))


def test_no_gradient_at_or_above_max_loss():
    # every sample at (offset 1 => MSE exactly 1.0) or above the cap: ascent has stopped
    _, model, batch = _setup("epsilon", (1.0, 1.5, 4.0))
    loss = GradientAscent(max_loss=1.0).forget_loss(batch)
    assert float(loss.detach()) == -1.0
    loss.backward()
    assert model.offset.grad is None or torch.equal(model.offset.grad, torch.zeros_like(model.offset))


def test_total_loss_and_config():
    _, model, batch = _setup("epsilon", (0.1, 0.2))
    objective = get_objective("gradient_ascent", {"max_loss": 0.5, "forget_weight": 2.0, "preserve_weight": 3.0})
    assert isinstance(objective, GradientAscent) and objective.config.max_loss == 0.5
    total, parts = objective.loss(batch)
    assert parts["forget"] < 0 and parts["preserve"] >= 0
    torch.testing.assert_close(float(total.detach()), 3.0 * parts["preserve"] + 2.0 * parts["forget"], rtol=1e-5, atol=1e-7)
    assert GradientAscent(GradientAscentConfig(max_loss=2.0)).config.max_loss == 2.0
    with pytest.raises(ConfigError):
        get_objective("gradient_ascent", {"kl_cap": 1.0})


def test_nan_loss_stays_nan():
    """A diverged model must still show up as a non-finite loss (the unlearner stops on it)."""
    _, model, batch = _setup("epsilon", (0.1, 0.2))
    with torch.no_grad():
        model.offset[0] = float("nan")
    assert torch.isnan(GradientAscent(max_loss=1.0).forget_loss(batch))
