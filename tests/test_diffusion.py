"""Tests of diffusers_guda.diffusion: the forward process, prediction-type conversions, common random numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_guda.diffusion import (
    SCHEDULER_PREDICTION_TYPES,
    NoiseSchedule,
    check_prediction_type,
    common_noise,
    epsilon_from_output,
    epsilon_from_x0,
    noise_seed,
    prediction_target,
    x0_from_epsilon,
    x0_from_output,
)
from diffusers_guda.errors import ConfigError
from diffusers_guda.hashing import derive_seed


def _draws(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=generator)
    return x0, noise, torch.tensor([0, 10, 55, 99])


@pytest.mark.parametrize("prediction_type", SCHEDULER_PREDICTION_TYPES)
def test_the_target_read_back_gives_x0_and_the_noise(prediction_type):
    """A model that outputs its exact target predicts x0 and ε exactly (up to float32 rounding)."""
    schedule = NoiseSchedule(DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type))
    x0, noise, t = _draws()
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    a, s = schedule.coefficients(t, x0.dim(), x0.device)
    torch.testing.assert_close(x0_from_output(prediction_type, target, x_t, a, s), x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(schedule.to_epsilon(target, x_t, t), noise, rtol=0, atol=2e-4)
    assert torch.equal(epsilon_from_output(prediction_type, target, x_t, a, s), schedule.to_epsilon(target, x_t, t))
    assert torch.equal(prediction_target(prediction_type, x0, noise, a, s), target)


def test_targets_of_each_prediction_type():
    x0, noise, t = _draws(1)
    a, s = torch.full((4, 1, 1, 1), 0.6), torch.full((4, 1, 1, 1), 0.8)
    assert prediction_target("epsilon", x0, noise, a, s) is noise
    assert prediction_target("sample", x0, noise, a, s) is x0
    assert torch.equal(prediction_target("v_prediction", x0, noise, a, s), 0.6 * noise - 0.8 * x0)
    x_t = a * x0 + s * noise
    torch.testing.assert_close(x0_from_epsilon(noise, x_t, a, s), x0)
    torch.testing.assert_close(epsilon_from_x0(x0, x_t, a, s), noise)


@pytest.mark.parametrize("prediction_type", SCHEDULER_PREDICTION_TYPES)
def test_the_schedule_is_the_schedulers_own_forward_process(prediction_type):
    """add_noise and the v target are diffusers' own, bit for bit (training relies on it)."""
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    schedule = NoiseSchedule(scheduler)
    x0, noise, t = _draws(2)
    assert schedule.num_train_timesteps == 100 and schedule.prediction_type == prediction_type
    assert torch.equal(schedule.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t))
    expected = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    assert torch.equal(schedule.target(x0, noise, t), expected)


def test_coefficients_in_float64_then_rounded():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    single, double = NoiseSchedule(scheduler), NoiseSchedule(scheduler, dtype=torch.float64)
    abar = scheduler.alphas_cumprod.double()
    assert single.alphas.dtype == double.alphas.dtype == torch.float32
    assert torch.equal(double.alphas, abar.sqrt().float())
    assert torch.equal(double.sigmas, (1 - abar).sqrt().float())
    assert torch.equal(single.sigmas, (1 - scheduler.alphas_cumprod).sqrt())
    torch.testing.assert_close(single.alphas, double.alphas)  # the same schedule, to the last bits
    a, s = single.coefficients(torch.tensor([3, 700]), ndim=4, device="cpu")
    assert a.shape == s.shape == (2, 1, 1, 1) and torch.equal(a.flatten(), single.alphas[[3, 700]])
    flat, _ = single.coefficients(torch.tensor([3, 700]), ndim=1, device="cpu")
    assert flat.shape == (2,)


def test_flow_matching_schedule_is_the_schedulers_own_forward_process():
    """Step t is the training schedule's σ from the least noisy, shift included; x_t and the velocity
    target are diffusers' own (``scale_noise``, and ``noise - x0`` as its training scripts)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(28)  # a pipeline's sampling grid must not leak into the training schedule
    schedule = NoiseSchedule(scheduler)
    fresh = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert schedule.is_flow and schedule.prediction_type == "flow" and schedule.num_train_timesteps == 1000
    assert torch.equal(schedule.sigmas, fresh.sigmas.flip(0)) and torch.equal(schedule.alphas, 1 - fresh.sigmas.flip(0))
    x0, noise, t = _draws(3)
    t = torch.tensor([0, 10, 500, 999])
    timesteps = schedule.model_timesteps(t)
    torch.testing.assert_close(timesteps, fresh.timesteps.flip(0)[t])
    expected = torch.cat([fresh.scale_noise(x0[i : i + 1], timesteps[i : i + 1], noise[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), expected, rtol=0, atol=1e-6)
    assert torch.equal(schedule.target(x0, noise, t), noise - x0)
    x_t = schedule.add_noise(x0, noise, t)
    a, s = schedule.coefficients(t, x0.dim(), x0.device)
    torch.testing.assert_close(x0_from_output("flow", noise - x0, x_t, a, s), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(schedule.to_epsilon(noise - x0, x_t, t), noise, rtol=0, atol=1e-5)
    ddpm = NoiseSchedule(DDPMScheduler(num_train_timesteps=100))
    assert not ddpm.is_flow and torch.equal(ddpm.model_timesteps(t), t)


def test_a_scheduler_of_neither_kind_is_refused():
    with pytest.raises(ConfigError, match="neither a DDPM-family scheduler .* nor a flow-matching one"):
        NoiseSchedule(SimpleNamespace(config=SimpleNamespace()))


def test_unsupported_prediction_types_are_refused():
    assert check_prediction_type("v_prediction") == "v_prediction"
    with pytest.raises(ConfigError, match="prediction_type 'flow'"):
        check_prediction_type("flow")
    fake = SimpleNamespace(config=SimpleNamespace(prediction_type="flow"), alphas_cumprod=torch.linspace(0.99, 0.1, 10))
    with pytest.raises(ConfigError, match="prediction_type"):
        NoiseSchedule(fake)


def test_common_noise_is_a_function_of_seed_hash_t_and_draw():
    shape, timesteps, draws = (1, 4, 4), [10, 10, 20, 30], [0, 1, 0, 0]
    noise = common_noise(shape, seed=5, image_hash=123, timesteps=timesteps, draws=draws)
    assert noise.shape == (4, 1, 4, 4) and noise.dtype == torch.float32
    for row, (t, d) in enumerate(zip(timesteps, draws)):
        assert noise_seed(5, 123, t, d) == derive_seed("guda-elbo", 5, 123, t, d)
        assert torch.equal(noise[row], torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(5, 123, t, d))))
    # a row does not depend on the other rows asked for, nor on their order
    assert torch.equal(common_noise(shape, 5, 123, [30, 10], [0, 1]), noise[[3, 1]])
    assert not torch.equal(noise[0], noise[1])  # another draw
    assert not torch.equal(common_noise(shape, 6, 123, [10], [0])[0], noise[0])  # another seed
    assert not torch.equal(common_noise(shape, 5, 124, [10], [0])[0], noise[0])  # another image


def test_uniform_timesteps_are_torchs_randint_draws():
    """The default keeps every earlier run's draws: the same generator calls as before the option existed."""
    schedule = NoiseSchedule(DDPMScheduler(num_train_timesteps=100))
    drawn = schedule.draw_timesteps(7, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randint(0, 100, (7,), generator=torch.Generator().manual_seed(3)))


def test_log_snr_timesteps_cover_the_log_snr_range_evenly():
    """Each step's probability is its share of the log-SNR range, so low-noise steps are drawn more often than uniform."""
    schedule = NoiseSchedule(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    density = schedule.log_snr_density
    log_snr = 2 * (schedule.alphas.double().log() - schedule.sigmas.double().log())
    assert density.sum().item() == pytest.approx(1.0) and (density > 0).all()
    # the steps below t = 100 span log-SNR 9.2 -> 2.2 of 9.2 -> -10.1: about 0.36 of the draws, against 0.10 uniform
    expected = (log_snr[0] - log_snr[99]) / (log_snr[0] - log_snr[-1])
    assert density[:100].sum().item() == pytest.approx(expected.item(), abs=0.002)
    drawn = schedule.draw_timesteps(20_000, torch.Generator().manual_seed(0), "log_snr")
    assert drawn.dtype == torch.long and 0 <= int(drawn.min()) and int(drawn.max()) < 1000
    assert (drawn < 100).float().mean().item() == pytest.approx(density[:100].sum().item(), abs=0.015)
    again = schedule.draw_timesteps(20_000, torch.Generator().manual_seed(0), "log_snr")
    assert torch.equal(drawn, again)


def test_log_snr_timesteps_on_a_flow_matching_schedule():
    """σ = 1 (no signal, log-SNR -inf) is clipped to the log-SNR range, so its step is not drawn almost always."""
    schedule = NoiseSchedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    density = schedule.log_snr_density
    assert torch.isfinite(density).all() and density.sum().item() == pytest.approx(1.0)
    assert schedule.sigmas[-1] == 1 and density[-1].item() < 0.1


def test_unknown_timestep_sampling_is_refused():
    schedule = NoiseSchedule(DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(ConfigError, match="uniform"):
        schedule.draw_timesteps(3, torch.Generator(), "cosine")
