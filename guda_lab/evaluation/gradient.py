"""The gradient baseline (TRAK / D-TRAK style; see docs/evaluation.md#baselines): randomly projected
per-example gradients of the denoising loss, their inner products summed per group.

Also the home of the projected per-example gradients that the kernel baselines (:mod:`.kernel`:
D-TRAK, DAS) build on: gradients of a scalar *output function* of the model's output (the denoising
loss, the mean squared output or the mean output) times one fixed random projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError
from diffusers_guda.hashing import derive_seed
from diffusers_guda.diffusion import NoiseSchedule

from .aggregation import check_queries, group_reduce
from .denoising import (
    DenoisingLossConfig,
    GradientsOn,
    check_conditioning,
    denoising_noise,
    denoising_output,
    progress_bar,
    resolve_timesteps,
    select_parameters,
)

#: Rows of one seeded block of the random projection. Part of the projection's definition: changing
#: it changes the projection (and every gradient score).
PROJECTION_BLOCK_ROWS = 8192

__all__ = [
    "GradientConfig",
    "OUTPUT_FUNCTIONS",
    "PROJECTION_BLOCK_ROWS",
    "ProjectionConfig",
    "gradient_scores",
    "projected_gradients",
    "query_and_train_features",
    "projected_output_gradients",
    "projection_blocks",
]

#: Scalar output functions ``f(output, target)`` of one image's model output over its (t, draw) rows
#: (the mean runs over rows and pixels) whose parameter gradients are projected: the denoising loss
#: (``gradient``, TRAK), the mean squared output (D-TRAK's best, its ``mean-squared-l2-norm``) and the
#: mean output (DAS's output compressed to one dimension).
OUTPUT_FUNCTIONS = {
    "loss": lambda output, target: torch.nn.functional.mse_loss(output, target),
    "squared_norm": lambda output, target: output.pow(2).mean(),
    "mean": lambda output, target: output.mean(),
}


@dataclass
class ProjectionConfig(DenoisingLossConfig):
    """Fields of the baselines built on projected per-example gradients (and of :class:`DenoisingLossConfig`).

    Args:
        projection_dim: Dimension ``D`` of the random projection of the gradients.
        gradient_batch_size: Examples whose full gradients are held at once before they are
            projected together (memory: this × #parameters floats). Does not change the result
            beyond float rounding.
    """

    projection_dim: int = field(default=512, metadata={"help": "Dimension of the random projection."})
    gradient_batch_size: int = field(default=32, metadata={"help": "Examples projected together (memory)."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("projection_dim", "gradient_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")


@dataclass
class GradientConfig(ProjectionConfig):
    """Settings of the gradient baseline (and the fields of :class:`ProjectionConfig`).

    Args:
        normalize: Score with the cosine of the projected gradients instead of their inner product
            (removes the dominance of images with large gradient norms). Default off (docs/evaluation.md#baselines).
    """

    normalize: bool = field(default=False, metadata={"help": "Cosine of projected gradients instead of the inner product."})


def projection_blocks(name: str, numel: int, dim: int, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The rows of the random projection that belong to parameter ``name``, block by block.

    The projection of a parameter with ``numel`` entries is a ``[numel, dim]`` Gaussian matrix
    scaled by ``1/sqrt(dim)``; rows ``[b*R, (b+1)*R)`` (``R = PROJECTION_BLOCK_ROWS``) are drawn from
    a CPU generator seeded by ``derive_seed("guda-projection", seed, name, b)``. The dense projection
    of all parameters is the concatenation of these blocks in parameter order; it is never built.

    Yields:
        ``(first_row, block)`` with ``block`` float32 ``[rows, dim]``.
    """
    generator = torch.Generator()
    scale = 1.0 / math.sqrt(dim)
    for b, start in enumerate(range(0, numel, PROJECTION_BLOCK_ROWS)):
        rows = min(PROJECTION_BLOCK_ROWS, numel - start)
        generator.manual_seed(derive_seed("guda-projection", seed, name, b))
        yield start, torch.randn((rows, dim), generator=generator) * scale


def _project(grads: list[list[torch.Tensor]], names: list[str], dim: int, seed: int) -> torch.Tensor:
    """Project per-example gradients: ``grads[i][j]`` is example i's gradient of parameter j. ``[B, D]`` float64."""
    device = grads[0][0].device
    out = torch.zeros((len(grads), dim), dtype=torch.float64, device=device)
    for j, name in enumerate(names):
        # float64 products: a row's result then does not depend on how many rows share the matmul
        flat = torch.stack([g[j].reshape(-1) for g in grads]).to(torch.float64)  # [B, numel]
        for start, block in projection_blocks(name, flat.shape[1], dim, seed):
            out += flat[:, start : start + len(block)] @ block.to(device, torch.float64)
    return out.cpu()


def projected_output_gradients(unet, scheduler, images: torch.Tensor, config: ProjectionConfig, output_function: str = "loss",
                               progress: bool = False, conditioning: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly projected per-example gradients of an output function, and each image's denoising loss.

    For each image, ``f = OUTPUT_FUNCTIONS[output_function]`` of the model's output over
    ``config.timesteps`` × ``config.num_draws`` rows with common random numbers (the same noise for
    every output function) is differentiated w.r.t. the selected UNet parameters (flattened in
    ``named_parameters`` order) and multiplied by the projection of :func:`projection_blocks`. The
    UNet runs in eval mode; its weights, ``requires_grad`` flags and train/eval mode are left as they were.

    Args:
        unet: The UNet (called through :func:`~diffusers_guda.models.denoise`).
        scheduler: Its noise scheduler, DDPM-family or flow-matching.
        images: ``[N, C, H, W]``.
        config: Timesteps, draws, seed, parameters and projection.
        output_function: A key of :data:`OUTPUT_FUNCTIONS`.
        progress: Show a progress bar.
        conditioning: ``[N, L, D]``: each image's text embeddings, for a text-conditioned UNet.

    Returns:
        ``(features, losses)``: float64 ``[N, D]`` and the denoising loss (MSE of the regression
        target over the same rows) of each image, float64 ``[N]``.
    """
    if output_function not in OUTPUT_FUNCTIONS:
        raise ConfigError(f"output_function must be one of {sorted(OUTPUT_FUNCTIONS)}, got {output_function!r}.")
    f = OUTPUT_FUNCTIONS[output_function]
    schedule = NoiseSchedule(scheduler)
    timesteps = resolve_timesteps(config.timesteps, scheduler)
    selected = select_parameters(unet, config.param_filter)
    names = [n for n, _ in selected]
    params = [p for _, p in selected]
    out, losses = [], []
    with GradientsOn(unet, selected):
        pending: list[list[torch.Tensor]] = []
        for i in progress_bar(range(len(images)), progress, "gradients"):
            rows = denoising_noise(images[i], timesteps, config.num_draws, config.seed, "guda-gradient")
            cond = None if conditioning is None else conditioning[i]
            output, target, x_in = denoising_output(unet, schedule, images[i], rows, with_input=True, cond=cond)
            value = f(output, target)
            # the input's gradient too: see denoising_loss
            pending.append([g.detach() for g in torch.autograd.grad(value, params + [x_in])[:-1]])
            losses.append(float(value.detach()) if output_function == "loss" else float(torch.nn.functional.mse_loss(output.detach(), target)))
            if len(pending) == config.gradient_batch_size or i == len(images) - 1:
                out.append(_project(pending, names, config.projection_dim, config.seed))
                pending = []
    features = torch.cat(out) if out else torch.zeros((0, config.projection_dim), dtype=torch.float64)
    return features, torch.tensor(losses, dtype=torch.float64)


def projected_gradients(unet, scheduler, images: torch.Tensor, config: ProjectionConfig | None = None, progress: bool = False,
                        conditioning: torch.Tensor | None = None) -> torch.Tensor:
    """Randomly projected per-example gradients of the denoising loss, ``[N, D]`` float64.

    ``conditioning`` (``[N, L, D]``): each image's text embeddings, for a text-conditioned UNet.

    For each image, the loss is the regression-target MSE averaged over ``config.timesteps`` ×
    ``config.num_draws`` rows with common random numbers, differentiated w.r.t. the selected UNet
    parameters and projected: :func:`projected_output_gradients` with ``output_function="loss"``.
    """
    return projected_output_gradients(unet, scheduler, images, config or GradientConfig(), "loss", progress, conditioning)[0]


def query_and_train_features(unet, scheduler, queries: torch.Tensor, dataset: GroupedDataset, config: ProjectionConfig,
                             output_function: str, progress: bool, query_conditioning: torch.Tensor | None,
                             train_conditioning: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked inputs' :func:`projected_output_gradients`: ``(query features [N, D], training features [M, D],
    training images' denoising losses [M])``, the inputs of every projected-gradient baseline."""
    check_queries(queries, dataset)
    check_conditioning(unet, query_conditioning, train_conditioning, len(queries), len(dataset))
    query, _ = projected_output_gradients(unet, scheduler, queries, config, output_function, progress, query_conditioning)
    train, losses = projected_output_gradients(unet, scheduler, dataset.images, config, output_function, progress, train_conditioning)
    return query, train, losses


def gradient_scores(unet, scheduler, queries: torch.Tensor, dataset: GroupedDataset, config: GradientConfig | None = None, progress: bool = False,
                    query_conditioning: torch.Tensor | None = None, train_conditioning: torch.Tensor | None = None) -> torch.Tensor:
    """TRAK/D-TRAK-style gradient attribution, summed per group.

    ``score[n, k] = sum_{i in group k} <P g(query_n), P g(x_i)>`` where ``g`` is the gradient of the
    denoising loss w.r.t. the UNet parameters (see :func:`projected_gradients`) and ``P`` a fixed
    random Gaussian projection to ``config.projection_dim`` dimensions.

    This is the *TracIn / grad-dot* simplification with random projection: TRAK's inverse of the
    projected-gradient kernel ``(Φ^T Φ)^{-1}`` and its ensembling over model checkpoints are
    omitted. Positive = the query's loss and the group's losses descend together.

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
    config = config or GradientConfig()
    query_grads, train_grads, _ = query_and_train_features(unet, scheduler, queries, dataset, config, "loss", progress,
                                                           query_conditioning, train_conditioning)
    if config.normalize:
        query_grads = torch.nn.functional.normalize(query_grads, dim=1, eps=1e-30)
        train_grads = torch.nn.functional.normalize(train_grads, dim=1, eps=1e-30)
    return group_reduce(query_grads @ train_grads.T, dataset.group_ids, dataset.num_groups, config.aggregate)
