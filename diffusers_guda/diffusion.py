"""The diffusion math shared by scoring, unlearning and training.

* The forward process ``x_t = α_t x0 + σ_t ε`` (:class:`NoiseSchedule`): ``α_t = sqrt(abar_t)``,
  ``σ_t = sqrt(1 - abar_t)`` for a DDPM-family scheduler, and ``α = 1 - σ`` for a flow-matching one
  (``FlowMatchEulerDiscreteScheduler``: Stable Diffusion 3, Flux), whose model predicts the
  velocity ``v = ε - x0`` (prediction type ``"flow"``; docs/method.md#flow-matching-models).
* What a model output means for each ``prediction_type``: the regression target
  (:func:`prediction_target`) and the clean sample or the noise read back from an output
  (:func:`x0_from_output`, :func:`epsilon_from_output`); see docs/method.md#the-elbo-estimator.
* The common random numbers: the noise of one (image, t, draw) row is a pure function of the
  seed, the image's content hash, t and the draw (:func:`common_noise`); see
  docs/method.md#common-random-numbers.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .errors import ConfigError
from .hashing import derive_seed

SCHEDULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # a DDPM-family scheduler's config.prediction_type
# how a model output is read: ``"flow"`` is the velocity ``ε - x0`` a flow-matching model predicts
PREDICTION_TYPES = (*SCHEDULER_PREDICTION_TYPES, "flow")
TIMESTEP_SAMPLINGS = ("uniform", "log_snr")  # how training rows draw their step (NoiseSchedule.draw_timesteps)
LOG_SNR_RANGE = 20.0  # log-SNR beyond ±20 counts as ±20 in the log-SNR density: the data or the noise alone


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` itself if a DDPM-family scheduler may have it (:data:`SCHEDULER_PREDICTION_TYPES`).

    Raises:
        ConfigError: for any other prediction type.
    """
    if prediction_type not in SCHEDULER_PREDICTION_TYPES:
        raise ConfigError(f"Unsupported prediction_type {prediction_type!r}.")
    return prediction_type


def prediction_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, sqrt_abar: torch.Tensor,
                      sqrt_one_minus_abar: torch.Tensor) -> torch.Tensor:
    """What a model of ``prediction_type`` regresses on: ``ε``, ``v = sqrt(abar) ε - sqrt(1 - abar) x0``,
    ``x0``, or the flow velocity ``ε - x0``.

    Args:
        prediction_type: One of :data:`PREDICTION_TYPES`.
        x0: Clean samples.
        noise: Their noise ``ε``.
        sqrt_abar: The signal coefficient ``α_t`` (``sqrt(abar_t)``; ``1 - σ`` for flow), broadcastable to ``x0``.
        sqrt_one_minus_abar: The noise coefficient ``σ_t`` (``sqrt(1 - abar_t)``; ``σ`` for flow), broadcastable to ``x0``.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return sqrt_abar * noise - sqrt_one_minus_abar * x0
    if prediction_type == "flow":
        return noise - x0
    return x0


def x0_from_epsilon(epsilon: torch.Tensor, x_t: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor) -> torch.Tensor:
    """The clean sample ``(x_t - sqrt(1 - abar) ε) / sqrt(abar)`` that ``x_t`` and ``ε`` imply."""
    return (x_t - sqrt_one_minus_abar * epsilon) / sqrt_abar


def epsilon_from_x0(x0: torch.Tensor, x_t: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor) -> torch.Tensor:
    """The noise ``(x_t - sqrt(abar) x0) / sqrt(1 - abar)`` that ``x_t`` and ``x0`` imply."""
    return (x_t - sqrt_abar * x0) / sqrt_one_minus_abar


def x0_from_output(prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, sqrt_abar: torch.Tensor,
                   sqrt_one_minus_abar: torch.Tensor) -> torch.Tensor:
    """The clean sample ``x̂0`` a model output predicts at ``x_t`` (not clamped).

    Args:
        prediction_type: One of :data:`PREDICTION_TYPES`.
        output: The raw model output.
        x_t: The noisy input it was computed on.
        sqrt_abar: The signal coefficient ``α_t``, broadcastable to ``x_t`` (see :func:`prediction_target`).
        sqrt_one_minus_abar: The noise coefficient ``σ_t``, broadcastable to ``x_t``.
    """
    if prediction_type == "epsilon":
        return x0_from_epsilon(output, x_t, sqrt_abar, sqrt_one_minus_abar)
    if prediction_type == "v_prediction":
        return sqrt_abar * x_t - sqrt_one_minus_abar * output
    if prediction_type == "flow":  # x_t = (1 - σ) x0 + σ ε and v = ε - x0 give x0 = x_t - σ v
        return x_t - sqrt_one_minus_abar * output
    return output


def epsilon_from_output(prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, sqrt_abar: torch.Tensor,
                        sqrt_one_minus_abar: torch.Tensor) -> torch.Tensor:
    """The noise ``ε̂`` a model output predicts at ``x_t``. Arguments as in :func:`x0_from_output`."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return sqrt_one_minus_abar * x_t + sqrt_abar * output
    if prediction_type == "flow":  # ε = x_t + (1 - σ) v
        return x_t + sqrt_abar * output
    return epsilon_from_x0(output, x_t, sqrt_abar, sqrt_one_minus_abar)


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching scheduler (``FlowMatchEulerDiscreteScheduler`` and its kin)."""
    return not hasattr(scheduler, "alphas_cumprod") and type(scheduler).__name__.startswith("FlowMatch")


def training_scheduler(scheduler):
    """A fresh scheduler with ``scheduler``'s training noise schedule, for scoring and unlearning.

    A pipeline's scheduler may be a sampler (DDIM, PNDM...) of a DDPM schedule, or a flow-matching
    scheduler whose ``set_timesteps`` has moved its sigmas to a sampling grid; a DDPM-family one becomes
    a ``DDPMScheduler`` of the same config, a flow-matching one is re-created from its config.

    Raises:
        ConfigError: for a scheduler that is neither.
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if hasattr(scheduler, "alphas_cumprod"):
        return DDPMScheduler.from_config(scheduler.config)
    if is_flow_matching(scheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    raise ConfigError(
        f"{type(scheduler).__name__} is neither a DDPM-family scheduler (alphas_cumprod) nor a flow-matching one "
        "(FlowMatchEulerDiscreteScheduler); GUDA needs one of these to define the forward process."
    )


class NoiseSchedule:
    """The forward process ``x_t = α_t x0 + σ_t ε`` of a scheduler, indexed by integer training steps ``t``.

    For a DDPM-family scheduler ``α_t = sqrt(abar_t)``, ``σ_t = sqrt(1 - abar_t)``, and the model
    output is read by its ``prediction_type``. For a flow-matching scheduler (prediction type
    ``"flow"``) step ``t`` has the ``σ`` its training schedule visits ``T - 1 - t``-th (so ``t`` grows
    with the noise, ``shift`` included), ``α_t = 1 - σ_t``, and the model predicts ``ε - x0``; the
    model's time input is ``σ_t * T``, as diffusers' pipelines and training scripts pass it.

    Args:
        scheduler: A scheduler with ``alphas_cumprod`` and ``config.prediction_type``, or a
            flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``; its training sigmas are
            those of a fresh scheduler of its config).
        dtype: Precision ``α_t`` and ``σ_t`` are computed in before they are stored in float32
            (float64 keeps ``1 - abar_t`` exact where ``abar_t`` is small).
        device: Where they are computed and kept. CPU and CUDA square roots may differ in the last
            bit, so a loop that must match diffusers' own ``add_noise``/``get_velocity`` on a device
            computes them there.

    Attributes:
        alphas: ``[T]`` float32 signal coefficients ``α_t``.
        sigmas: ``[T]`` float32 noise coefficients ``σ_t``.
        prediction_type: How the model output is read (``"flow"`` for a flow-matching scheduler).
        num_train_timesteps: ``T``.

    Raises:
        ConfigError: for a ``prediction_type`` other than epsilon, v_prediction or sample, or a
            scheduler that is neither DDPM-family nor flow-matching.
    """

    def __init__(self, scheduler, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if hasattr(scheduler, "alphas_cumprod"):
            self.prediction_type = check_prediction_type(scheduler.config.prediction_type)
            abar = scheduler.alphas_cumprod.to(device, dtype)
            self.alphas = abar.sqrt().to(torch.float32)
            self.sigmas = (1 - abar).sqrt().to(torch.float32)
            self._model_timesteps = None
        else:
            sigmas = training_scheduler(scheduler).sigmas.flip(0).to(device, dtype)  # ascending: t grows with the noise
            self.prediction_type = "flow"
            self.alphas = (1 - sigmas).to(torch.float32)
            self.sigmas = sigmas.to(torch.float32)
            self._model_timesteps = (sigmas * len(sigmas)).to(torch.float32)
        self.num_train_timesteps = len(self.alphas)

    @property
    def is_flow(self) -> bool:
        """Whether this is a flow-matching schedule."""
        return self.prediction_type == "flow"

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input at steps ``t``: ``t`` itself (DDPM), or ``σ_t * T`` in float32 (flow)."""
        if self._model_timesteps is None:
            return t
        return self._model_timesteps[t.cpu()].to(t.device)

    def coefficients(self, t: torch.Tensor, ndim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``α_t`` and ``σ_t`` of steps ``t`` ``[B]``, shaped ``[B, 1, ...]`` to broadcast against
        ``ndim``-dimensional samples, on ``device``."""
        shape = (-1,) + (1,) * (ndim - 1)
        t = t.cpu()
        return self.alphas[t].view(shape).to(device), self.sigmas[t].view(shape).to(device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = α_t x0 + σ_t noise``."""
        a, s = self.coefficients(t, x0.dim(), x0.device)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the model's ``prediction_type`` (see :func:`prediction_target`)."""
        if self.prediction_type in ("epsilon", "flow"):  # no coefficients needed
            return prediction_target(self.prediction_type, x0, noise, None, None)
        return prediction_target(self.prediction_type, x0, noise, *self.coefficients(t, x0.dim(), x0.device))

    def draw_timesteps(self, n: int, generator: torch.Generator, sampling: str = "uniform") -> torch.Tensor:
        """``n`` training steps ``[n]`` (int64, CPU) drawn from ``generator``.

        Args:
            n: How many.
            generator: The CPU generator to draw from.
            sampling: ``"uniform"`` over the ``T`` steps, or ``"log_snr"``: uniform in the log
                signal-to-noise ratio ``2 log(α_t / σ_t)``, each step drawn with the share of the
                log-SNR range it covers (docs/method.md#unlearning-timesteps). On the digits' linear
                DDPM schedule that draws t < 100 3.6 times as often as uniform steps do.
        """
        if sampling == "uniform":
            return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        if sampling != "log_snr":
            raise ConfigError(f"timestep sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}.")
        return torch.multinomial(self.log_snr_density, n, replacement=True, generator=generator)

    @functools.cached_property
    def log_snr_density(self) -> torch.Tensor:
        """``[T]`` float64 probabilities of :meth:`draw_timesteps`' ``"log_snr"``: each step's share of
        the log-SNR range (clipped to ``±LOG_SNR_RANGE``), from the midpoints to its neighbours' log-SNR."""
        log_snr = 2 * (self.alphas.double().clamp_min(1e-300).log() - self.sigmas.double().clamp_min(1e-300).log())
        log_snr = log_snr.clamp(-LOG_SNR_RANGE, LOG_SNR_RANGE)
        edges = torch.cat([log_snr[:1], (log_snr[1:] + log_snr[:-1]) / 2, log_snr[-1:]])  # midpoints between steps
        widths = edges[:-1] - edges[1:]
        if len(widths) < 2 or not (widths >= 0).all() or widths.sum() <= 0:
            raise ConfigError("timestep sampling 'log_snr' needs a schedule whose log-SNR falls with t; use 'uniform'.")
        return widths / widths.sum()

    def to_epsilon(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Read a model output as a noise prediction ε̂ (see :func:`epsilon_from_output`)."""
        if self.prediction_type == "epsilon":  # no coefficients needed
            return output
        return epsilon_from_output(self.prediction_type, output, x_t, *self.coefficients(t, x_t.dim(), x_t.device))


def noise_seed(seed: int, image_hash: int, t: int, draw: int) -> int:
    """The seed of the noise of row ``(t, draw)`` of the image with content hash ``image_hash``."""
    return derive_seed("guda-elbo", seed, image_hash, t, draw)


def common_noise(shape: Sequence[int], seed: int, image_hash: int, timesteps: Sequence[int], draws: Sequence[int]) -> torch.Tensor:
    """The common random numbers of one image's rows, ``[R, *shape]`` float32 on the CPU.

    Row ``i`` is ``randn(shape)`` seeded by :func:`noise_seed` of ``(seed, image_hash, timesteps[i],
    draws[i])``: it does not depend on the batch, the other rows or the process that draws it.

    Args:
        shape: Shape of the image (pixels or latents).
        seed: Seed of the common random numbers (``ELBOConfig.seed``).
        image_hash: The image's content hash (:func:`~diffusers_guda.hashing.image_content_hash`).
        timesteps: ``t`` of each row.
        draws: Draw index of each row.
    """
    out = torch.empty((len(timesteps), *shape), dtype=torch.float32)
    generator = torch.Generator()
    for i, (t, d) in enumerate(zip(timesteps, draws)):
        generator.manual_seed(noise_seed(seed, image_hash, int(t), int(d)))
        out[i] = torch.randn(tuple(shape), generator=generator)
    return out
