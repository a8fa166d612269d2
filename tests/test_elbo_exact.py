"""Both ELBO estimators against exact likelihoods, and the flow-matching estimator's grid and invariances.

For Gaussian data ``x0 ~ N(m, diag(s²))`` the optimal noise, velocity and clean-sample predictors are
linear in ``x_t`` and known in closed form, and so is ``log p(x0)``. Two such "models" A and B with
exact predictors must give an ELBO difference that approaches ``log p_A(x0) - log p_B(x0)`` as the
grid is refined (docs/method.md#checking-the-estimators-against-exact-likelihoods).

Every term is a quadratic in the noise with independent dimensions, so two rows per grid point with
ε = +1 and ε = -1 in every dimension give its exact mean over ε: the checks below measure the
estimators' quadrature and truncation, free of Monte Carlo noise.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from diffusers_guda import ELBOConfig, ELBOEstimator
from diffusers_guda.elbo import flow_logsnr
from diffusers_guda.errors import ConfigError

SHAPE = (1, 2, 2)
X0 = torch.tensor([0.5, -0.1, 0.2, 0.8]).view(SHAPE)
MEAN_A, STD_A = torch.full(SHAPE, 0.3, dtype=torch.float64), torch.full(SHAPE, 0.5, dtype=torch.float64)
MEAN_B = torch.tensor([0.1, -0.2, 0.0, 0.4], dtype=torch.float64).view(SHAPE)
STD_B = torch.tensor([0.7, 0.4, 0.6, 0.9], dtype=torch.float64).view(SHAPE)


class GaussianDenoiser(torch.nn.Module):
    """The exact predictor of Gaussian data: ε for a DDPM schedule (``alphas_cumprod`` given), else the velocity.

    Called like a diffusers model, ``model(x_t, timestep).sample``; a flow model's timestep is ``σ · T``.
    """

    def __init__(self, mean, std, alphas_cumprod=None, num_train_timesteps: int = 1000):
        super().__init__()
        self.mean, self.var, self.alphas_cumprod, self.T = mean, std**2, alphas_cumprod, num_train_timesteps
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the estimator a device and a dtype

    def forward(self, x_t, timestep):
        x = x_t.double()
        if self.alphas_cumprod is None:
            s = (timestep.double() / self.T).view(-1, 1, 1, 1)
            a = 1 - s
        else:
            abar = self.alphas_cumprod.double()[timestep].view(-1, 1, 1, 1)
            a, s = abar.sqrt(), (1 - abar).sqrt()
        gain = 1 / (a * a * self.var + s * s)  # x_t ~ N(a m, a² v + s²)
        x0 = self.mean + a * self.var * gain * (x - a * self.mean)  # E[x0 | x_t]
        eps = s * gain * (x - a * self.mean)  # E[ε | x_t]
        return SimpleNamespace(sample=(eps if self.alphas_cumprod is not None else eps - x0).float())


def _log_likelihood_gap() -> float:
    def log_p(mean, std):
        x = X0.double()
        return (-0.5 * ((x - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum().item()

    return log_p(MEAN_A, STD_A) - log_p(MEAN_B, STD_B)


def _elbo_gap(estimator: ELBOEstimator, model_a, model_b) -> float:
    """``ELBO_A(x0) - ELBO_B(x0)`` with the exact mean over the noise (antithetic ±1 rows)."""
    assert estimator.config.num_draws == 2
    noise = torch.ones(estimator.num_rows, *SHAPE)
    noise[1::2] = -1
    return estimator.scale * (estimator.terms(model_b, X0, noise) - estimator.terms(model_a, X0, noise)).mean().item()


def test_flow_estimator_approaches_the_exact_log_likelihood_difference():
    exact = _log_likelihood_gap()
    a, b = GaussianDenoiser(MEAN_A, STD_A), GaussianDenoiser(MEAN_B, STD_B)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # shift moves training and sampling, not the bound
    errors = []
    for grid_size, sigma_min in [(25, 0.02), (None, None), (400, 0.001), (2000, 1e-4)]:
        estimator = ELBOEstimator(scheduler, ELBOConfig(grid_size=grid_size, sigma_min=sigma_min, num_draws=2))
        errors.append(abs(_elbo_gap(estimator, a, b) - exact))
    assert errors == sorted(errors, reverse=True)  # each refinement is closer
    assert errors[1] < 5e-5  # the default grid (100 points, σ in [0.005, 0.995]): measured 1.9e-5 nats of 0.312
    assert errors[-1] < 1e-6


def test_ddpm_estimator_approaches_the_exact_log_likelihood_difference():
    """The DDPM bound is a discrete-time one: with exact predictors its gap to log p shrinks like 1/T."""
    exact = _log_likelihood_gap()

    def gap(scheduler, **grid):
        abar = scheduler.alphas_cumprod
        estimator = ELBOEstimator(scheduler, ELBOConfig(num_draws=2, **grid))
        return abs(_elbo_gap(estimator, GaussianDenoiser(MEAN_A, STD_A, abar), GaussianDenoiser(MEAN_B, STD_B, abar)) - exact)

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    coarse, default, full = gap(scheduler, stride=100), gap(scheduler), gap(scheduler, stride=1, t_min=0)
    assert coarse > default > full
    assert default < 0.01  # measured 0.0072 nats of 0.312 (stride 10, t from 10)
    finer = DDPMScheduler(num_train_timesteps=4000, beta_start=0.0001 / 4, beta_end=0.02 / 4)  # the same process, 4x the steps
    assert gap(finer, stride=1, t_min=0) < full / 3  # measured 0.0050 -> 0.0013


def test_flow_estimator_with_its_own_noise_agrees_within_its_standard_error():
    exact = _log_likelihood_gap()
    estimator = ELBOEstimator(FlowMatchEulerDiscreteScheduler(), ELBOConfig(num_draws=64))
    noise = estimator.noise(X0)
    diff = estimator.terms(GaussianDenoiser(MEAN_B, STD_B), X0, noise) - estimator.terms(GaussianDenoiser(MEAN_A, STD_A), X0, noise)
    mean = estimator.scale * diff.mean().item()
    stderr = estimator.scale * diff.std().item() / math.sqrt(len(diff))
    assert abs(mean - exact) < 4 * stderr and stderr < 0.1


# -- the flow grid --------------------------------------------------------------------------------


def test_flow_grid_is_uniform_in_log_snr_between_sigma_min_and_sigma_max():
    estimator = ELBOEstimator(FlowMatchEulerDiscreteScheduler(), ELBOConfig(grid_size=8, sigma_min=0.01, sigma_max=0.9, num_draws=3))
    logsnr = 2 * torch.log((1 - estimator.sigmas) / estimator.sigmas)
    steps = logsnr[:-1] - logsnr[1:]
    top, bottom = flow_logsnr(0.01), flow_logsnr(0.9)
    torch.testing.assert_close(steps, torch.full((7,), (top - bottom) / 8, dtype=torch.float64))
    torch.testing.assert_close(logsnr[0], torch.tensor(top - (top - bottom) / 16, dtype=torch.float64))  # midpoints
    assert estimator.scale == pytest.approx(top - bottom)
    assert torch.equal(estimator.timesteps, torch.arange(8)) and estimator.num_rows == 24
    assert estimator.grid_description() == {"sigmas": [float(estimator.sigmas[0]), float(estimator.sigmas[-1]), 8]}
    default = ELBOEstimator(FlowMatchEulerDiscreteScheduler(), ELBOConfig())
    assert len(default.sigmas) == 100 and 0.005 < float(default.sigmas[0]) < float(default.sigmas[-1]) < 0.995


def test_flow_terms_by_hand():
    """Each row is ½ (1 - σ)² ‖v - v̂‖² at x_σ = (1 - σ) x0 + σ ε, the model seeing σ · T; 'simple' is the ε-MSE."""
    seen = []

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_t, timestep):
            seen.append((x_t.clone(), timestep.clone()))
            return SimpleNamespace(sample=torch.full_like(x_t, 0.25))

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    estimator = ELBOEstimator(scheduler, ELBOConfig(grid_size=5))
    noise = estimator.noise(X0)
    sigma = estimator.sigmas.float().view(-1, 1, 1, 1)
    terms = estimator.terms(Constant(), X0, noise)
    expected = 0.5 * (1 - sigma.flatten()) ** 2 * ((noise - X0) - 0.25).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(terms, expected)
    x_t, timestep = seen[0]
    torch.testing.assert_close(x_t, (1 - sigma) * X0 + sigma * noise)
    torch.testing.assert_close(timestep, (estimator.sigmas * 1000).float())
    simple = ELBOEstimator(scheduler, ELBOConfig(grid_size=5, weighting="simple")).terms(Constant(), X0, noise)
    eps_hat = x_t + (1 - sigma) * 0.25
    torch.testing.assert_close(simple, (noise - eps_hat).flatten(1).pow(2).mean(1))


@pytest.mark.parametrize(
    "kwargs, wrong",
    [({"stride": 10}, "stride, t_min and t_max"), ({"t_min": 3}, "stride, t_min and t_max")],
)
def test_ddpm_grid_settings_are_refused_for_a_flow_model(kwargs, wrong):
    with pytest.raises(ConfigError, match=f"{wrong} set the timestep grid of a DDPM-family model"):
        ELBOEstimator(FlowMatchEulerDiscreteScheduler(), ELBOConfig(**kwargs))


@pytest.mark.parametrize("kwargs", [{"grid_size": 10}, {"sigma_min": 0.01}, {"sigma_max": 0.9}])
def test_flow_grid_settings_are_refused_for_a_ddpm_model(kwargs):
    with pytest.raises(ConfigError, match="grid of a flow-matching model; this is a DDPM-family model"):
        ELBOEstimator(DDPMScheduler(num_train_timesteps=100), ELBOConfig(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [{"grid_size": 0}, {"sigma_min": 0.0}, {"sigma_min": 0.6}, {"sigma_max": 1.0}, {"sigma_min": 0.3, "sigma_max": 0.2}, {"sigma_min": "0.1"}],
)
def test_invalid_flow_grid_settings(kwargs):
    with pytest.raises(ConfigError):
        ELBOConfig(**kwargs)


# -- scores of a flow transformer do not depend on the batch --------------------------------------


def _tiny_sd3_transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
    ).eval()


def test_flow_transformer_terms_do_not_depend_on_chunking_packing_or_order():
    transformer = _tiny_sd3_transformer()
    estimator = ELBOEstimator(FlowMatchEulerDiscreteScheduler(shift=3.0), ELBOConfig(grid_size=6, num_draws=2, rows_per_forward=4))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 4, 8, 8, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(3, 5, 16, generator=generator), "pooled_projections": torch.randn(3, 8, generator=generator)}
    own = []
    for i in range(3):
        kwargs = {k: v[i : i + 1] for k, v in cond.items()}
        own.append(estimator.terms(transformer, images[i], estimator.noise(images[i]), unet_kwargs=kwargs))
    order = torch.tensor([2, 0, 1])
    image_index = order.repeat_interleave(estimator.num_rows)
    rows = torch.arange(estimator.num_rows).repeat(3)
    noise = torch.cat([estimator.noise(images[i]) for i in order.tolist()])
    packed = estimator.packed_terms(transformer, images, image_index, rows, noise, unet_kwargs=cond)
    for position, i in enumerate(order.tolist()):
        assert torch.equal(packed[position * estimator.num_rows : (position + 1) * estimator.num_rows], own[i])
