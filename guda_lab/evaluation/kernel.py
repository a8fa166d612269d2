"""The kernel baselines D-TRAK and DAS (docs/evaluation.md#baselines): projected per-example gradients
of an output function of the model (:func:`~.gradient.projected_output_gradients`) whitened by the
damped inverse of the training features' kernel, ``(ΦᵀΦ + λI)⁻¹``, as in TRAK.

* **D-TRAK** (Zheng, Pang, Du, Jiang, Lin, *Intriguing Properties of Data Attribution on Diffusion
  Models*, ICLR 2024; github.com/sail-sg/D-TRAK): TRAK's score ``φ(x)ᵀ(ΦᵀΦ + λI)⁻¹φ(xᵢ)`` with
  TRAK's residual term replaced by the identity, where ``φ`` is the random projection of the
  gradient of an output function averaged over timesteps. The paper's best output function is the
  squared ℓ2 norm of the model output (the repository's ``mean-squared-l2-norm``: the mean over
  pixels of ``ε̂_θ(x_t, t)²``), used for the training images and the queries alike.
* **DAS** (Lin, Tao, Dong, Xu, *Diffusion Attribution Score: Evaluating Training Data Influence in
  Diffusion Models*, ICLR 2025; github.com/Jinxu-Lin/DAS): the change of the model's *output* (the
  KL divergence of the reverse steps, ``∝ ‖ε̂_θ(x_t, t) − ε̂_θ∖ᵢ(x_t, t)‖²``) when image ``i`` is
  left out, with the output linearised in the parameters, the parameter change from one Newton step
  on the linearised training objective and the Sherman–Morrison formula:
  ``ε̂_θ∖ᵢ(x) − ε̂_θ(x) ≈ φ(x)ᵀ(ΦᵀΦ + λI)⁻¹φ(xᵢ) rᵢ / (1 − hᵢ)``, ``hᵢ = φ(xᵢ)ᵀ(ΦᵀΦ + λI)⁻¹φ(xᵢ)``.
  To make it tractable the output is compressed to one dimension, its mean over pixels (the
  authors' code runs DAS on its ``mean`` output function), and the Jacobian is randomly projected,
  so ``φ`` is the projected gradient of the mean output and the residual ``rᵢ`` is compressed to its
  root mean square ``√(denoising loss)``, as the authors' code weights images. The score is the
  squared change.

λ is ``damping`` × the mean eigenvalue of ``ΦᵀΦ`` (``trace / D``), so one setting suits any gradient
scale; both papers pick an absolute λ on a grid by their validation LDS. Group score: the sum over
the group's images (both papers score single images; ``aggregate="mean"`` averages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError

from .aggregation import group_reduce
from .gradient import OUTPUT_FUNCTIONS, ProjectionConfig, query_and_train_features

__all__ = ["DASConfig", "DTRAKConfig", "KernelConfig", "das_scores", "dtrak_scores", "kernel_solve"]


@dataclass
class KernelConfig(ProjectionConfig):
    """Fields of the kernel baselines (and of :class:`~.gradient.ProjectionConfig`).

    Args:
        damping: λ of ``(ΦᵀΦ + λI)⁻¹`` relative to the mean eigenvalue of ``ΦᵀΦ``:
            ``λ = damping · trace(ΦᵀΦ) / D``. ``0`` uses the pseudo-inverse (TRAK without damping).
    """

    damping: float = field(default=0.01, metadata={"help": "Kernel damping λ relative to the mean eigenvalue of ΦᵀΦ (trace/D); 0: pseudo-inverse."})

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise ConfigError(f"damping must be a finite number >= 0 (λ = damping × trace(ΦᵀΦ)/D), got {self.damping!r}.")
        self.damping = float(self.damping)


@dataclass
class DTRAKConfig(KernelConfig):
    """Settings of the D-TRAK baseline (and the fields of :class:`KernelConfig`).

    Args:
        output_function: The function of the model output whose gradients are the features:
            ``"squared_norm"`` (the paper's best, default), ``"loss"`` (the denoising loss: TRAK) or
            ``"mean"``; a key of :data:`~.gradient.OUTPUT_FUNCTIONS`.
    """

    output_function: str = field(default="squared_norm", metadata={"help": "'squared_norm' (D-TRAK), 'loss' (TRAK) or 'mean'."})

    def __post_init__(self):
        super().__post_init__()
        if self.output_function not in OUTPUT_FUNCTIONS:
            raise ConfigError(f"output_function must be one of {sorted(OUTPUT_FUNCTIONS)}, got {self.output_function!r}.")


@dataclass
class DASConfig(KernelConfig):
    """Settings of the DAS baseline (and the fields of :class:`KernelConfig`).

    Args:
        leverage: Divide by ``1 − hᵢ`` (the Sherman–Morrison leave-one-out correction). Off: the
            plain Newton step.
    """

    leverage: bool = field(default=True, metadata={"help": "Sherman-Morrison leave-one-out factor 1/(1 - h_i)."})


def kernel_solve(train: torch.Tensor, damping: float) -> torch.Tensor:
    """``(ΦᵀΦ + λI)⁻¹Φᵀ``, float64 ``[D, M]``, for the training features ``Φ = train`` (``[M, D]``).

    ``λ = damping · trace(ΦᵀΦ) / D``; ``damping = 0`` uses the pseudo-inverse of ``ΦᵀΦ``.
    """
    phi = train.to(torch.float64)
    kernel = phi.T @ phi
    if damping == 0:
        return torch.linalg.pinv(kernel, hermitian=True) @ phi.T
    lam = damping * float(kernel.diagonal().mean())
    if lam == 0:  # all features zero: nothing to whiten
        return phi.T.clone()
    eye = torch.eye(kernel.shape[0], dtype=torch.float64)
    return torch.linalg.solve(kernel + lam * eye, phi.T)


def dtrak_scores(unet, scheduler, queries: torch.Tensor, dataset: GroupedDataset, config: DTRAKConfig | None = None, progress: bool = False,
                 query_conditioning: torch.Tensor | None = None, train_conditioning: torch.Tensor | None = None) -> torch.Tensor:
    """D-TRAK attribution, summed per group.

    ``score[n, k] = sum_{i in group k} φ(query_n)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_i)`` where ``φ`` is the projected
    gradient (:func:`~.gradient.projected_output_gradients`) of ``config.output_function`` of the model
    output over the timesteps and draws, ``Φ`` the training images' ``φ`` stacked ``[M, D]`` and
    ``λ = config.damping · trace(ΦᵀΦ)/D``. Positive: the query's output function moves with the image's.

    Args:
        unet: The base UNet (called through :func:`~diffusers_guda.models.denoise`); left unchanged.
        scheduler: Its noise scheduler, DDPM-family or flow-matching.
        queries: ``[N, C, H, W]`` like the training images.
        dataset: The training set.
        config: Baseline settings.
        progress: Show progress bars.
        query_conditioning: For a text-conditioned UNet: ``[N, L, D]`` embeddings of each query's prompt.
        train_conditioning: For a text-conditioned UNet: ``[M, L, D]`` embeddings of each training image's prompt.

    Returns:
        Float64 tensor ``[N, K]``.
    """
    config = config or DTRAKConfig()
    query, train, _ = query_and_train_features(unet, scheduler, queries, dataset, config, config.output_function, progress,
                                               query_conditioning, train_conditioning)
    per_image = query @ kernel_solve(train, config.damping)
    return group_reduce(per_image, dataset.group_ids, dataset.num_groups, config.aggregate)


def das_scores(unet, scheduler, queries: torch.Tensor, dataset: GroupedDataset, config: DASConfig | None = None, progress: bool = False,
               query_conditioning: torch.Tensor | None = None, train_conditioning: torch.Tensor | None = None) -> torch.Tensor:
    """DAS attribution (the squared linearised change of the model output), summed per group.

    ``score[n, k] = sum_{i in group k} (φ(query_n)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_i) · r_i / (1 − h_i))²`` where
    ``φ`` is the projected gradient of the mean model output over the timesteps and draws (the
    projected Jacobian of the output compressed to one dimension), ``r_i`` the root mean squared
    residual of image ``i`` (``√`` of its denoising loss on the same rows) and
    ``h_i = φ(x_i)ᵀ(ΦᵀΦ + λI)⁻¹φ(x_i)`` its leverage (``h_i = 0`` with ``config.leverage`` off).
    Arguments as :func:`dtrak_scores`'.

    Returns:
        Float64 tensor ``[N, K]``, every entry ``>= 0``.
    """
    config = config or DASConfig()
    query, train, losses = query_and_train_features(unet, scheduler, queries, dataset, config, "mean", progress,
                                                    query_conditioning, train_conditioning)
    solved = kernel_solve(train, config.damping)  # [D, M]
    weight = losses.clamp_min(0).sqrt()
    if config.leverage:
        leverage = (train * solved.T).sum(1)
        weight = weight / (1 - leverage).clamp_min(1e-12)
    per_image = (query @ solved * weight).square()
    return group_reduce(per_image, dataset.group_ids, dataset.num_groups, config.aggregate)
