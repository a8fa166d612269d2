"""The objective registry and the shared preserve term."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_guda import available_objectives, get_objective, register_objective
from diffusers_guda.errors import ConfigError, GUDAError
from diffusers_guda.objectives import NoiseSchedule, ObjectiveConfig, UnlearningBatch, UnlearningObjective
from diffusers_guda.objectives import base


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so test objectives do not leak into other tests."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    return base._REGISTRY


def test_builtin_objectives_are_registered():
    names = available_objectives()
    assert "retrack" in names and "gradient_ascent" in names
    assert names == sorted(names)


def test_unknown_objective_lists_available():
    with pytest.raises(ConfigError) as info:
        get_objective("nope")
    message = str(info.value)
    assert "nope" in message
    for name in available_objectives():
        assert name in message
    assert isinstance(info.value, GUDAError)


@dataclass
class _ScaleConfig(ObjectiveConfig):
    scale: float = field(default=1.0)


def test_register_new_objective(registry):
    @register_objective
    class Scaled(UnlearningObjective):
        name = "test_scaled"
        config_class = _ScaleConfig

        def forget_loss(self, batch):
            return torch.tensor(self.config.scale)

    assert "test_scaled" in available_objectives()
    objective = get_objective("test_scaled", {"scale": 3.0})
    assert isinstance(objective, Scaled) and objective.config.scale == 3.0
    assert isinstance(get_objective("test_scaled"), Scaled)
    assert get_objective("test_scaled", _ScaleConfig(scale=2.0)).config.scale == 2.0
    assert register_objective(Scaled) is Scaled  # registering the same class again is harmless
    with pytest.raises(ConfigError, match="test_scaled"):

        @register_objective
        class Other(UnlearningObjective):
            name = "test_scaled"

    assert registry["test_scaled"] is Scaled
    with pytest.raises(ConfigError, match="retrack"):

        @register_objective
        class Clash(UnlearningObjective):
            name = "retrack"


def test_registry_fixture_isolated():
    assert "test_scaled" not in available_objectives()


def _batch(schedule, model, teacher, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = 4
    x0 = torch.rand((n, 1, 8, 8), generator=generator) * 2 - 1
    noise = torch.randn((n, 1, 8, 8), generator=generator)
    t = torch.randint(1, 100, (n,), generator=generator)
    return UnlearningBatch(x0, torch.arange(n), t, noise, x0, torch.arange(n), t, noise, model, teacher, schedule, generator)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_preserve_mse_vs_distill(prediction_type):
    schedule = NoiseSchedule(DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type))
    weight = torch.nn.Parameter(torch.tensor(0.3))
    model = lambda x_t, t: weight * x_t  # noqa: E731
    teacher = lambda x_t, t: (0.3 * x_t).detach()  # noqa: E731  (the same function)
    batch = _batch(schedule, model, teacher)

    mse = get_objective("gradient_ascent", {"preserve": "mse"}).preserve_loss(batch)
    x_t = schedule.add_noise(batch.retain_x0, batch.retain_noise, batch.retain_t)
    a, s = schedule.coefficients(batch.retain_t, 4, "cpu")
    target = batch.retain_noise if prediction_type == "epsilon" else a * batch.retain_noise - s * batch.retain_x0
    torch.testing.assert_close(mse.detach(), ((0.3 * x_t - target) ** 2).mean(), rtol=1e-5, atol=1e-7)
    assert float(mse.detach()) > 1e-3

    distill = get_objective("retrack", {"preserve": "distill"}).preserve_loss(batch)
    assert float(distill.detach()) == 0.0  # model == teacher
    other = _batch(schedule, model, lambda x_t, t: 0.5 * x_t)
    distill_other = get_objective("retrack", {"preserve": "distill"}).preserve_loss(other)
    x_t = schedule.add_noise(other.retain_x0, other.retain_noise, other.retain_t)
    torch.testing.assert_close(distill_other.detach(), ((0.2 * x_t) ** 2).mean(), rtol=1e-5, atol=1e-7)
    distill_other.backward()
    assert weight.grad is not None and float(weight.grad) != 0.0


def test_objective_config_errors():
    with pytest.raises(ConfigError):
        ObjectiveConfig(preserve="kl")
    with pytest.raises(ConfigError, match="preserve must be one of"):  # retrack's own preserve mode only
        get_objective("gradient_ascent", {"preserve": "teacher_posterior"})
    with pytest.raises(ConfigError, match="no option"):
        get_objective("gradient_ascent", {"typo": 1})
