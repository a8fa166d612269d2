"""The ELBO estimator shared by every score (docs/method.md#the-elbo-estimator).

For a DDPM-family model, ``-ELBO(x0) = L_T + sum_t L_{t-1} + L_0``. We estimate the middle sum on a
deterministic timestep grid with the Gaussian KL between the true posterior ``q(x_{t-1} | x_t, x0)``
and the model's posterior, both with the fixed variance ``beta_tilde_t``:

    KL_t = c_t^2 * ||x0 - x0_hat||^2 / (2 * beta_tilde_t),   c_t = sqrt(abar_{t-1}) * beta_t / (1 - abar_t)

summed over dimensions, in nats. ``x0_hat`` is recovered from the model output for any
``prediction_type`` (:func:`~diffusers_guda.diffusion.x0_from_output`) and is not clamped.
``-ELBO ~ T * mean_{t, draw} KL_t``. The prior term ``L_T`` and the decoder term ``L_0`` are left
out on purpose (the grid starts at ``t_min > 0``).

Every model compared sees the same ``(t, noise)`` rows of an image: the common random numbers of
:func:`~diffusers_guda.diffusion.common_noise` (docs/method.md#common-random-numbers).
:meth:`ELBOEstimator.terms` evaluates one image's rows in forwards of a fixed chunking;
:meth:`ELBOEstimator.packed_terms` packs rows of many images into forwards of one fixed size
(padding the last), and a row's output does not depend on the other rows of a forward of that size
(per-sample layers only; the tests check it on CPU), so either way a score is bit-identical whatever
the batch it was computed in.

For a flow-matching model (``x_σ = (1 - σ) x0 + σ ε``, velocity ``v = ε - x0``) the bound is the
continuous-time one, ``-ELBO = ½ ∫ (1 - σ)² E‖v - v̂‖² dλ`` over the log-SNR
``λ = 2 log((1 - σ)/σ)`` (docs/method.md#flow-matching-models). We estimate it with the midpoint rule
on a grid uniform in ``λ`` between ``sigma_max`` and ``sigma_min``: each row's term is
``½ (1 - σ)² ‖v - v̂‖²`` and ``-ELBO ~ (λ_max - λ_min) * mean_{grid, draw} term``; the parts outside
the grid do not depend on the model beyond a vanishing tail.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch

import math

from .diffusion import NoiseSchedule, common_noise, epsilon_from_x0, x0_from_output
from .errors import ConfigError
from .hashing import image_content_hash
from .models import denoise
from .validation import check_types

WEIGHTINGS = ("kl", "simple")
FLOW_GRID_SIZE = 100
FLOW_SIGMA_MIN = 0.005


@dataclass
class ELBOConfig:
    """Settings of the ELBO estimator.

    ``stride``, ``t_min`` and ``t_max`` set the timestep grid of a DDPM-family model; ``grid_size``,
    ``sigma_min`` and ``sigma_max`` the σ grid of a flow-matching one (each is refused for the other).

    Args:
        stride: Grid spacing; default ``T // 100``.
        t_min: First grid timestep; default ``stride``.
        t_max: Grid end (exclusive); default ``T``.
        grid_size: Flow matching: points of the σ grid, uniform in log-SNR; default 100.
        sigma_min: Flow matching: the grid's smallest σ (the bound's weight diverges at 0); default 0.005.
        sigma_max: Flow matching: the grid's largest σ; default ``1 - sigma_min``.
        num_draws: Noise draws per (image, t).
        seed: Seed of the common random numbers.
        weighting: ``"kl"`` (the variational bound, default) or ``"simple"`` (plain ε-MSE per t).
        rows_per_forward: Rows of one image per UNet forward. A fixed chunking is what makes scores
            independent of the batch they are computed in; lower it to save memory on big models.
        autocast_dtype: ``"bfloat16"`` or ``"float16"`` to run the UNet under autocast (CUDA).
    """

    stride: int | None = field(default=None, metadata={"help": "Grid spacing (default T // 100)."})
    t_min: int | None = field(default=None, metadata={"help": "First timestep (default stride)."})
    t_max: int | None = field(default=None, metadata={"help": "Grid end, exclusive (default T)."})
    grid_size: int | None = field(default=None, metadata={"help": "Flow matching: σ grid points, uniform in log-SNR (default 100)."})
    sigma_min: float | None = field(default=None, metadata={"help": "Flow matching: smallest σ of the grid (default 0.005)."})
    sigma_max: float | None = field(default=None, metadata={"help": "Flow matching: largest σ of the grid (default 1 - sigma_min)."})
    num_draws: int = field(default=1, metadata={"help": "Noise draws per (image, t)."})
    seed: int = field(default=0, metadata={"help": "Seed of the common random numbers."})
    weighting: str = field(default="kl", metadata={"help": "'kl' (variational bound) or 'simple' (ε-MSE)."})
    rows_per_forward: int = field(default=128, metadata={"help": "Rows per UNet forward (memory)."})
    autocast_dtype: str | None = field(default=None, metadata={"help": "bfloat16/float16 autocast, or None."})

    def __post_init__(self):
        check_types(self, ints=("stride", "t_min", "t_max", "grid_size", "num_draws", "seed", "rows_per_forward"),
                    reals=("sigma_min", "sigma_max"))
        if self.t_min is not None and self.t_min < 0:
            raise ConfigError(f"t_min must be >= 0, got {self.t_min}.")
        if self.t_min is not None and self.t_max is not None and self.t_min >= self.t_max:
            raise ConfigError(f"t_min must be below t_max, got t_min={self.t_min}, t_max={self.t_max}.")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"stride must be >= 1 (or None for T // 100), got {self.stride}.")
        if self.num_draws < 1 or self.rows_per_forward < 1:
            raise ConfigError("num_draws and rows_per_forward must be >= 1.")
        if self.grid_size is not None and self.grid_size < 1:
            raise ConfigError(f"grid_size must be >= 1 (or None for {FLOW_GRID_SIZE}), got {self.grid_size}.")
        sigma_min = FLOW_SIGMA_MIN if self.sigma_min is None else self.sigma_min
        sigma_max = 1 - sigma_min if self.sigma_max is None else self.sigma_max
        if not 0 < sigma_min < sigma_max < 1:
            raise ConfigError(f"Need 0 < sigma_min < sigma_max < 1; got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


class ELBOEstimator:
    """Per-(grid point, draw) terms of the ELBO, with common random numbers.

    Args:
        scheduler: A DDPM-family scheduler with ``alphas_cumprod`` and ``betas`` (its
            ``prediction_type`` decides how the model output is read), or a flow-matching scheduler
            (``FlowMatchEulerDiscreteScheduler``; the model predicts the velocity ``ε - x0``).
        config: Estimator settings.

    Attributes:
        schedule: The scheduler's :class:`~diffusers_guda.diffusion.NoiseSchedule`, its coefficients
            computed in float64.
        timesteps: The grid: timesteps ``t`` (DDPM), or indices of the σ grid (flow; ``sigmas`` gives
            their σ). ``row_timesteps`` and ``row_draws`` give each row's ``(grid point, draw)``.
        sigmas: Flow matching: ``[G]`` float64 σ of each grid point, from the least noisy; ``None`` for DDPM.

    Raises:
        ConfigError: an unsupported ``prediction_type``, a grid outside ``[0, T)``, or grid settings
            of the other kind of model.
    """

    def __init__(self, scheduler, config: ELBOConfig | None = None):
        self.config = config or ELBOConfig()
        # float64 coefficients rounded to float32: 1 - abar_t stays exact where abar_t is small
        self.schedule = NoiseSchedule(scheduler, dtype=torch.float64)
        self.prediction_type = self.schedule.prediction_type
        self.num_train_timesteps = self.schedule.num_train_timesteps
        if self.schedule.is_flow:
            self._flow_grid()
        else:
            self._ddpm_grid(scheduler)
        # rows of one image: all (grid point, draw) pairs, grid-major
        self.row_timesteps = self.timesteps.repeat_interleave(self.config.num_draws)
        self.row_draws = torch.arange(self.config.num_draws).repeat(len(self.timesteps))

    def _ddpm_grid(self, scheduler) -> None:
        c, T = self.config, self.num_train_timesteps
        if (c.grid_size, c.sigma_min, c.sigma_max) != (None, None, None):
            raise ConfigError("grid_size, sigma_min and sigma_max set the grid of a flow-matching model; this is a DDPM-family "
                              "model: set stride, t_min and t_max instead.")
        stride = c.stride or max(1, T // 100)
        t_min = stride if c.t_min is None else c.t_min
        t_max = T if c.t_max is None else c.t_max
        if not 0 <= t_min < t_max <= T:
            raise ConfigError(f"Need 0 <= t_min < t_max <= T={T}; got t_min={t_min}, t_max={t_max}.")
        self.timesteps = torch.arange(t_min, t_max, stride, dtype=torch.long)
        self.sigmas = None
        self._alpha, self._sigma = self.schedule.alphas, self.schedule.sigmas  # indexed by t
        self._weight = _kl_weights(scheduler)
        self._model_time = None
        self._scale = float(T)

    def _flow_grid(self) -> None:
        c = self.config
        if (c.stride, c.t_min, c.t_max) != (None, None, None):
            raise ConfigError("stride, t_min and t_max set the timestep grid of a DDPM-family model; this is a flow-matching "
                              "model: set grid_size, sigma_min and sigma_max instead.")
        size = c.grid_size or FLOW_GRID_SIZE
        sigma_min = FLOW_SIGMA_MIN if c.sigma_min is None else c.sigma_min
        sigma_max = 1 - sigma_min if c.sigma_max is None else c.sigma_max
        top, bottom = flow_logsnr(sigma_min), flow_logsnr(sigma_max)
        width = (top - bottom) / size
        logsnr = top - (torch.arange(size, dtype=torch.float64) + 0.5) * width  # midpoints, least noisy first
        self.sigmas = torch.sigmoid(-logsnr / 2)  # λ = 2 log((1 - σ)/σ)
        self.timesteps = torch.arange(size, dtype=torch.long)
        self._alpha, self._sigma = (1 - self.sigmas).to(torch.float32), self.sigmas.to(torch.float32)  # indexed by grid point
        self._weight = (0.5 * (1 - self.sigmas) ** 2).to(torch.float32)  # ½ (1 - σ)² per unit of λ
        self._model_time = (self.sigmas * self.num_train_timesteps).to(torch.float32)
        self._scale = top - bottom

    def grid_description(self) -> dict:
        """The grid as recorded with scores: ``{"timesteps": [first, last, count]}`` (DDPM) or
        ``{"sigmas": [smallest, largest, count]}`` (flow)."""
        if self.sigmas is None:
            return {"timesteps": [int(self.timesteps[0]), int(self.timesteps[-1]), len(self.timesteps)]}
        return {"sigmas": [float(self.sigmas[0]), float(self.sigmas[-1]), len(self.sigmas)]}

    @property
    def num_rows(self) -> int:
        """(t, draw) pairs per image."""
        return len(self.row_timesteps)

    @property
    def scale(self) -> float:
        """Factor turning a mean over rows into the estimate: ``T`` (the sum over T timesteps) or the
        log-SNR width of the flow grid (the integral over λ)."""
        return self._scale

    def image_hashes(self, images: torch.Tensor) -> list[int]:
        """The content hash of each image of ``images`` ``[N, ...]`` (the key of its common random numbers)."""
        return [image_content_hash(image) for image in images]

    def noise(self, image: torch.Tensor, image_hash: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The noise of one image's rows ``[R, *image.shape]``, a pure function of (seed, hash, t, draw).

        Args:
            image: One clean sample (its content hash keys the noise unless ``image_hash`` is given).
            image_hash: Its content hash, if already known.
            rows: Which rows (default all).
        """
        image_hash = image_content_hash(image) if image_hash is None else image_hash
        rows = torch.arange(self.num_rows) if rows is None else rows
        return common_noise(image.shape, self.config.seed, image_hash, self.row_timesteps[rows].tolist(), self.row_draws[rows].tolist())

    def _autocast(self, device: torch.device):
        if self.config.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.config.autocast_dtype))

    @torch.no_grad()
    def terms(
        self,
        unet: torch.nn.Module,
        image: torch.Tensor,
        noise: torch.Tensor,
        rows: torch.Tensor | None = None,
        unet_kwargs: dict | None = None,
        rows_per_forward: int | None = None,
        forward_context=None,
    ) -> torch.Tensor:
        """Per-row terms (KL_t in nats, or ε-MSE) of one image under ``unet``.

        Args:
            unet: Denoiser called as ``unet(x_t, t, **unet_kwargs).sample``.
            image: One clean sample ``x0`` ``[C, H, W]`` (pixels or latents).
            noise: Its noise from :meth:`noise`, ``[R, C, H, W]``.
            rows: Which rows (default all) the noise belongs to.
            unet_kwargs: The image's conditioning, a flat dict of ``[1, ...]`` tensors (e.g.
                ``encoder_hidden_states`` ``[1, L, D]``; see :func:`~diffusers_guda.models.unet_call_kwargs`),
                broadcast to every row.
            rows_per_forward: Chunk size overriding the config's (used by batched multi-model scoring).
            forward_context: ``(start, stop) -> context manager`` entered around the forward of rows
                ``start:stop`` (used to select an adapter per row).

        Returns:
            Float32 tensor ``[R]``.
        """
        rows = torch.arange(self.num_rows) if rows is None else rows
        t_all = self.row_timesteps[rows]
        out = torch.empty(len(rows), dtype=torch.float32)
        chunk = rows_per_forward or self.config.rows_per_forward
        x0 = image.to(torch.float32).unsqueeze(0)
        for start in range(0, len(rows), chunk):
            stop = min(len(rows), start + chunk)
            context = forward_context(start, stop) if forward_context else contextlib.nullcontext()
            with context:
                out[start:stop] = self._forward_terms(unet, x0, noise[start:stop], t_all[start:stop], unet_kwargs)
        return out

    @torch.no_grad()
    def packed_terms(
        self,
        unet: torch.nn.Module,
        images: torch.Tensor,
        image_index: torch.Tensor,
        rows: torch.Tensor,
        noise: torch.Tensor,
        unet_kwargs: dict | None = None,
        rows_per_forward: int | None = None,
    ) -> torch.Tensor:
        """Terms of many (image, row) items under ``unet``, packed across images.

        Every forward holds exactly ``rows_per_forward`` rows (the last one padded with repeats), and
        a row's output does not depend on the other rows of its forward, so each term is
        bit-identical whatever the batch, the order or the other images it is computed with.

        Args:
            unet: Denoiser called as ``unet(x_t, t, **unet_kwargs).sample``.
            images: ``[N, C, H, W]`` clean samples.
            image_index: ``[M]`` image of each item.
            rows: ``[M]`` row (a (t, draw) pair) of each item.
            noise: ``[M, C, H, W]`` each item's noise (from :meth:`noise`).
            unet_kwargs: The images' conditioning, a flat dict with one entry per image along dim 0 (``[N, ...]``).
            rows_per_forward: Forward size overriding the config's (the same for every call that
                must give comparable bits).

        Returns:
            Float32 tensor ``[M]``.
        """
        m, chunk = len(rows), rows_per_forward or self.config.rows_per_forward
        out = torch.empty(m, dtype=torch.float32)
        images = images.to(torch.float32)
        for start in range(0, m, chunk):
            stop = min(m, start + chunk)
            take = torch.arange(start, start + chunk).clamp(max=stop - 1)  # pad with the last item
            idx = image_index[take]
            kwargs = {k: v[idx] for k, v in (unet_kwargs or {}).items()}
            terms = self._forward_terms(unet, images[idx], noise[take], self.row_timesteps[rows[take]], kwargs, per_row_kwargs=True)
            out[start:stop] = terms[: stop - start]
        return out

    def _forward_terms(self, unet, x0, eps, t, unet_kwargs=None, per_row_kwargs=False) -> torch.Tensor:
        """One model forward: the terms of rows at grid points ``t`` with clean samples ``x0`` (``[B]`` or ``[1]`` broadcast)."""
        device = next(unet.parameters()).device
        eps = eps.to(torch.float32)
        shape = [-1, *[1] * (eps.dim() - 1)]
        a, s = self._alpha[t].view(shape), self._sigma[t].view(shape)
        x0 = x0.expand_as(eps)
        x_t = a * x0 + s * eps
        if not per_row_kwargs:
            unet_kwargs = {k: v.expand(len(t), *v.shape[1:]) for k, v in (unet_kwargs or {}).items()}
        timesteps = t if self._model_time is None else self._model_time[t]
        with self._autocast(device):
            output = denoise(unet, x_t, timesteps.to(device), unet_kwargs or None)
        output = output.to("cpu", torch.float32)
        if self.schedule.is_flow:
            error = (eps - x0) - output  # v - v̂; ε - ε̂ = (1 - σ)(v - v̂)
            if self.config.weighting == "kl":
                return self._weight[t] * error.flatten(1).pow(2).sum(1)
            return (a * error).flatten(1).pow(2).mean(1)
        x0_hat = x0_from_output(self.prediction_type, output, x_t, a, s)
        if self.config.weighting == "kl":
            return self._weight[t] * (x0 - x0_hat).flatten(1).pow(2).sum(1)
        eps_hat = epsilon_from_x0(x0_hat, x_t, a, s)
        return (eps - eps_hat).flatten(1).pow(2).mean(1)


def flow_logsnr(sigma: float) -> float:
    """The log signal-to-noise ratio ``2 log((1 - σ)/σ)`` of a flow-matching model at ``σ``."""
    return 2 * math.log((1 - sigma) / sigma)


def _kl_weights(scheduler) -> torch.Tensor:
    """``[T]`` float32 ``c_t^2 / (2 beta_tilde_t)``, computed in float64 (``beta_tilde_0 := beta_tilde_1``)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    betas = scheduler.betas.to(torch.float64)
    # from a float64 cumprod of the betas: the scheduler's float32 alphas_cumprod loses ~5e-4
    # relative precision in 1 - abar_t at the smallest t
    abar64 = torch.cumprod(1 - betas, 0)
    if not torch.allclose(abar64, alphas_cumprod, rtol=1e-4, atol=1e-6):  # a scheduler that edits abar
        abar64 = alphas_cumprod
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar64[:-1]])
    beta_tilde = betas * (1 - prev) / (1 - abar64)
    beta_tilde[0] = beta_tilde[1]
    coef = prev.sqrt() * betas / (1 - abar64)
    return (coef**2 / (2 * beta_tilde)).to(torch.float32)
