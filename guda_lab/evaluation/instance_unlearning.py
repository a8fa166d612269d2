"""The instance-unlearning baseline (see docs/evaluation.md#baselines): per query, a copy of the UNet
ascends the query's denoising loss; a group's score is its training images' loss increase.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError, UnlearningDivergedError
from diffusers_guda.diffusion import NoiseSchedule

from .aggregation import check_queries, group_reduce
from .denoising import (
    DenoisingLossConfig,
    check_conditioning,
    denoising_loss,
    denoising_noise,
    progress_bar,
    resolve_timesteps,
    select_parameters,
)

OPTIMIZERS = ("sgd", "adam")

__all__ = ["InstanceUnlearningConfig", "OPTIMIZERS", "instance_unlearning_scores"]


@dataclass
class InstanceUnlearningConfig(DenoisingLossConfig):
    """Settings of the per-instance unlearning baseline (and the fields of :class:`DenoisingLossConfig`;
    ``param_filter`` selects the parameters that are updated).

    Args:
        steps: Gradient-ascent steps on the query's denoising loss.
        learning_rate: Step size.
        optimizer: ``"sgd"`` (plain gradient ascent, default) or ``"adam"``.
    """

    steps: int = field(default=5, metadata={"help": "Gradient-ascent steps on the query."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Step size."})
    optimizer: str = field(default="sgd", metadata={"help": "'sgd' or 'adam'."})

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 1:
            raise ConfigError("steps and num_draws must be >= 1.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")


@torch.no_grad()
def _losses(unet, schedule, images, rows, conditioning=None) -> torch.Tensor:
    return torch.tensor([float(denoising_loss(unet, schedule, images[i], rows[i], cond=None if conditioning is None else conditioning[i]))
                         for i in range(len(images))], dtype=torch.float64)


def instance_unlearning_scores(
    unet,
    scheduler,
    queries: torch.Tensor,
    dataset: GroupedDataset,
    config: InstanceUnlearningConfig | None = None,
    progress: bool = False,
    query_conditioning: torch.Tensor | None = None,
    train_conditioning: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-instance unlearning attribution, aggregated per group.

    For each query, a copy of the UNet takes ``config.steps`` gradient-*ascent* steps on the query's
    denoising loss (fixed noise draws); the score of training image ``i`` is its loss increase
    ``loss_after(x_i) - loss_before(x_i)`` on the same fixed draws, and ``score[n, k]`` sums
    (or averages) these over group ``k``. The original UNet is not modified.

    Args:
        unet: The base UNet (called through :func:`~diffusers_guda.models.denoise`).
        scheduler: Its noise scheduler, DDPM-family or flow-matching.
        queries: ``[N, C, H, W]`` like the training images.
        dataset: The training set.
        config: Baseline settings.
        progress: Show a progress bar over queries.
        query_conditioning: For a text-conditioned UNet: ``[N, L, D]`` embeddings of each query's prompt
            (the ascent is on the query's conditional loss).
        train_conditioning: For a text-conditioned UNet: ``[M, L, D]`` embeddings of each training image's prompt.

    Returns:
        Float64 tensor ``[N, K]``.
    """
    config = config or InstanceUnlearningConfig()
    check_queries(queries, dataset)
    check_conditioning(unet, query_conditioning, train_conditioning, len(queries), len(dataset))
    schedule = NoiseSchedule(scheduler)
    timesteps = resolve_timesteps(config.timesteps, scheduler)
    salt = "guda-instance-unlearning"
    train_rows = [denoising_noise(x, timesteps, config.num_draws, config.seed, salt) for x in dataset.images]
    was_training = unet.training
    unet.eval()
    try:
        before = _losses(unet, schedule, dataset.images, train_rows, train_conditioning)
    finally:
        unet.train(was_training)
    results = []
    for n in progress_bar(range(len(queries)), progress, "instance unlearning"):
        rows = denoising_noise(queries[n], timesteps, config.num_draws, config.seed, salt)
        cond = None if query_conditioning is None else query_conditioning[n]
        model = _ascended_copy(unet, schedule, queries[n], rows, cond, config)
        after = _losses(model, schedule, dataset.images, train_rows, train_conditioning)
        if not torch.isfinite(after).all():
            raise UnlearningDivergedError(
                f"Instance unlearning of query {n} gave non-finite losses; lower learning_rate "
                f"(now {config.learning_rate}) or steps (now {config.steps})."
            )
        del model
        results.append(group_reduce((after - before).unsqueeze(0), dataset.group_ids, dataset.num_groups, config.aggregate))
    return torch.cat(results)


def _ascended_copy(unet, schedule, query: torch.Tensor, rows, cond, config: InstanceUnlearningConfig):
    """A copy of ``unet`` after ``config.steps`` gradient-ascent steps on ``query``'s loss over ``rows``."""
    model = copy.deepcopy(unet).eval()
    selected = select_parameters(model, config.param_filter)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for _, p in selected]
    for p in params:
        p.requires_grad_(True)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    else:
        optimizer = torch.optim.SGD(params, lr=config.learning_rate)
    for _ in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        loss, x_in = denoising_loss(model, schedule, query, rows, with_input=True, cond=cond)
        grads = torch.autograd.grad(-loss, params + [x_in])[:-1]  # ascent
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    return model
