"""Baselines of DESIGN §1.3: similarity, gradient (TRAK/D-TRAK style) and instance unlearning.

Every baseline returns a float64 tensor ``[N_queries, K]`` in the orientation of GUDA's scores
(higher = group more important to the query). All are deterministic: the noise of the denoising
losses is a pure function of (seed, image content hash, t, draw), as in :mod:`diffusers_guda.elbo`,
and every image is evaluated alone, so a score does not depend on the batch it was computed in.

The UNet is called as ``unet(x_t, t).sample``; a text-conditioned UNet (``UNet2DConditionModel``) as
``unet(x_t, t, encoder_hidden_states=c).sample`` with ``c`` the embeddings of each image's own prompt:
the loss-based baselines take them as ``query_conditioning`` / ``train_conditioning`` (``[N, L, D]``).
The similarity baselines compare pixels (or ``feature_fn`` features) and ignore prompts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError, DataError, UnlearningDivergedError
from diffusers_guda.hashing import derive_seed, image_content_hash
from diffusers_guda.objectives.base import NoiseSchedule

AGGREGATES = ("sum", "mean")
OPTIMIZERS = ("sgd", "adam")
#: Rows of one seeded block of the random projection. Part of the projection's definition: changing
#: it changes the projection (and every gradient score).
PROJECTION_BLOCK_ROWS = 8192


# -- shared helpers ------------------------------------------------------------------------------


def _check_queries(queries: torch.Tensor, dataset: GroupedDataset) -> torch.Tensor:
    if not isinstance(queries, torch.Tensor):
        raise DataError(f"queries must be a torch.Tensor [N, C, H, W]; got {type(queries).__name__}.")
    expected = tuple(dataset.images.shape[1:])
    if queries.dim() != 4 or tuple(queries.shape[1:]) != expected:
        raise DataError(
            f"queries must have shape [N, {', '.join(map(str, expected))}] like the training images; "
            f"got {tuple(queries.shape)}. Resize/convert the queries to the dataset's [C, H, W]."
        )
    if queries.shape[0] == 0:
        raise DataError("queries is empty; pass at least one query image.")
    return queries


def _group_reduce(values: torch.Tensor, group_ids: torch.Tensor, num_groups: int, how: str) -> torch.Tensor:
    """Reduce ``values [N, M]`` over the training images of each group: ``[N, K]``."""
    values = values.to(torch.float64)
    index = group_ids.to(values.device)
    if how == "max":
        out = torch.full((values.shape[0], num_groups), -math.inf, dtype=torch.float64, device=values.device)
        return out.scatter_reduce(1, index.unsqueeze(0).expand_as(values), values, reduce="amax", include_self=True).cpu()
    out = torch.zeros((values.shape[0], num_groups), dtype=torch.float64, device=values.device)
    out.index_add_(1, index, values)
    if how == "mean":
        counts = torch.bincount(index, minlength=num_groups).to(torch.float64)
        out = out / counts.clamp_min(1)
    elif how != "sum":
        raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {how!r}.")
    return out.cpu()


# -- similarity ----------------------------------------------------------------------------------


def _features(images: torch.Tensor, feature_fn: Callable[[torch.Tensor], torch.Tensor] | None, batch_size: int) -> torch.Tensor:
    """Unit-norm float64 features ``[N, D]`` of ``images``, computed in batches."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if feature_fn is None:
            feats = batch.reshape(len(batch), -1)
        else:
            with torch.no_grad():
                feats = feature_fn(batch)
            if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != len(batch):
                shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
                raise ConfigError(
                    f"feature_fn must return a 2-D tensor [B, D] with one row per image; for a batch of "
                    f"{len(batch)} images it returned {shape}. Flatten or pool its output (e.g. "
                    "lambda x: model(x).flatten(1))."
                )
        feats = feats.detach().to("cpu", torch.float64)
        parts.append(torch.nn.functional.normalize(feats, dim=1, eps=1e-12))
    return torch.cat(parts)


def _cosines(queries, dataset, feature_fn, batch_size) -> torch.Tensor:
    _check_queries(queries, dataset)
    query_features = _features(queries, feature_fn, batch_size)
    train_features = _features(dataset.images, feature_fn, batch_size)
    if query_features.shape[1] != train_features.shape[1]:
        raise ConfigError(
            f"feature_fn gave {query_features.shape[1]} features for the queries but "
            f"{train_features.shape[1]} for the training images; it must have a fixed output size."
        )
    return query_features @ train_features.T  # [N, M]


def similarity_scores(
    queries: torch.Tensor,
    dataset: GroupedDataset,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean cosine similarity between each query and each training image of each group.

    ``score[n, k] = mean_{i in group k} cos(f(query_n), f(x_i))``, a mean over per-image cosines
    (not the cosine to a group prototype), as in the reference implementation.

    Args:
        queries: ``[N, C, H, W]`` with the training images' ``[C, H, W]`` (values in ``[-1, 1]``).
        dataset: The training set.
        feature_fn: Maps a batch of images ``[B, C, H, W]`` to features ``[B, D]``, e.g. a CLIP image
            model or a VAE encoder's latent mean (flattened). Default: the flattened pixels. Called
            under ``torch.no_grad()`` on CPU tensors; move them to its device inside if needed.
        batch_size: Images per ``feature_fn`` call (does not change the result).

    Returns:
        Float64 tensor ``[N, K]``.

    Raises:
        DataError: if the queries' shape does not match the training images.
        ConfigError: if ``feature_fn`` does not return ``[B, D]``.
    """
    cos = _cosines(queries, dataset, feature_fn, batch_size)
    return _group_reduce(cos, dataset.group_ids, dataset.num_groups, "mean")


def nearest_neighbour_scores(
    queries: torch.Tensor,
    dataset: GroupedDataset,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Largest cosine similarity between each query and the training images of each group.

    Same arguments and errors as :func:`similarity_scores`; returns a float64 tensor ``[N, K]``.
    """
    cos = _cosines(queries, dataset, feature_fn, batch_size)
    return _group_reduce(cos, dataset.group_ids, dataset.num_groups, "max")


# -- denoising losses with common random numbers -------------------------------------------------


def default_timesteps(num_train_timesteps: int, count: int = 10) -> tuple[int, ...]:
    """``count`` evenly spaced timesteps in ``[T/20, T)`` (duplicates removed)."""
    lo = num_train_timesteps // 20
    grid = torch.linspace(lo, num_train_timesteps - 1, count).round().long().unique()
    return tuple(int(t) for t in grid)


def _resolve_timesteps(timesteps: Sequence[int] | None, scheduler) -> torch.Tensor:
    T = len(scheduler.alphas_cumprod)
    steps = default_timesteps(T) if timesteps is None else tuple(int(t) for t in timesteps)
    if not steps or any(not 0 <= t < T for t in steps):
        raise ConfigError(f"timesteps must be a non-empty list of integers in [0, {T}); got {steps}.")
    return torch.tensor(steps, dtype=torch.long)


def _denoising_noise(image: torch.Tensor, timesteps: torch.Tensor, num_draws: int, seed: int, salt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(t, noise)`` of one image, t-major: the noise is a pure function of (salt, seed, hash, t, draw)."""
    image_hash = image_content_hash(image)
    row_t = timesteps.repeat_interleave(num_draws)
    noise = torch.empty((len(row_t), *image.shape), dtype=torch.float32)
    generator = torch.Generator()
    for i, t in enumerate(row_t.tolist()):
        generator.manual_seed(derive_seed(salt, seed, image_hash, t, i % num_draws))
        noise[i] = torch.randn(image.shape, generator=generator)
    return row_t, noise


def _denoising_loss(unet, schedule: NoiseSchedule, image: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], with_input: bool = False,
                    cond: torch.Tensor | None = None):
    """Mean squared error of the model's regression target over one image's (t, draw) rows.

    ``cond`` (``[L, D]``) is the image's text conditioning for a text-conditioned UNet.

    With ``with_input`` the noisy input is made to require gradients and ``(loss, x_t)`` is returned.
    Differentiating w.r.t. ``x_t`` as well is a workaround: on torch 2.13 CPU, ``autograd.grad`` w.r.t.
    a subset of a UNet's parameters (e.g. ``param_filter="up_blocks"``) was seen to segfault, and
    asking for the input's gradient too (so every node computes all its input gradients) avoids it.
    """
    param = next(unet.parameters())
    t, noise = rows
    x0 = image.to(torch.float32).unsqueeze(0).expand_as(noise)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    x_in = x_t.to(param.device, param.dtype)
    if with_input:
        x_in.requires_grad_(True)
    kwargs = {} if cond is None else {"encoder_hidden_states": cond.to(param.device, param.dtype).expand(len(t), *cond.shape[-2:])}
    output = unet(x_in, t.to(param.device), **kwargs).sample
    loss = torch.nn.functional.mse_loss(output.float(), target.to(output.device))
    return (loss, x_in) if with_input else loss


def _select_parameters(unet: torch.nn.Module, param_filter: str | None) -> list[tuple[str, torch.nn.Parameter]]:
    selected = [(n, p) for n, p in unet.named_parameters() if param_filter is None or param_filter in n]
    if not selected:
        raise ConfigError(f"param_filter {param_filter!r} matches no parameter of the UNet; use a substring of its parameter names.")
    return selected


class _GradientsOn:
    """Context: ``requires_grad`` True on the selected parameters, False elsewhere; restored on exit."""

    def __init__(self, unet: torch.nn.Module, selected: list[tuple[str, torch.nn.Parameter]]):
        self.unet = unet
        self.selected = {id(p) for _, p in selected}

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.unet.parameters()]
        self.was_training = self.unet.training
        self.unet.eval()
        for p in self.unet.parameters():
            p.requires_grad_(id(p) in self.selected)
        return self

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)
        self.unet.train(self.was_training)
        return False


def _check_conditioning(unet, query_conditioning, train_conditioning, num_queries: int, num_train: int):
    """Refuse conditioning missing for a text-conditioned UNet, given to an unconditional one, or miscounted."""
    from diffusers_guda.models import is_conditional

    given = query_conditioning is not None, train_conditioning is not None
    if is_conditional(unet) and not all(given):
        raise ConfigError("This UNet is text-conditioned: pass query_conditioning and train_conditioning, the text embeddings "
                          "[N, L, D] of each query's and each training image's prompt.")
    if not is_conditional(unet) and any(given):
        raise ConfigError("This UNet is unconditional; drop query_conditioning/train_conditioning.")
    for name, cond, n in (("query_conditioning", query_conditioning, num_queries), ("train_conditioning", train_conditioning, num_train)):
        if cond is not None and (cond.dim() != 3 or cond.shape[0] != n):
            raise ConfigError(f"{name} must be [{n}, L, D] (one embedding per image); got {tuple(cond.shape)}.")


def _progress(iterable, enabled: bool, desc: str):
    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True)


# -- gradient (TRAK / D-TRAK style) --------------------------------------------------------------


@dataclass
class DenoisingLossConfig:
    """Fields shared by the loss-based baselines: which denoising losses, over which parameters.

    Args:
        timesteps: Timesteps of the denoising loss; default 10 evenly spaced in ``[T/20, T)``.
        num_draws: Noise draws per timestep.
        seed: Seed of the noise draws (and of the gradient baseline's projection).
        param_filter: Only parameters whose name contains this substring (default: all parameters,
            whatever their ``requires_grad``).
        aggregate: ``"sum"`` (DESIGN §1.3) or ``"mean"`` of the per-image scores within a group.
    """

    timesteps: tuple[int, ...] | None = field(default=None, metadata={"help": "Loss timesteps (default 10 in [T/20, T))."})
    num_draws: int = field(default=1, metadata={"help": "Noise draws per timestep."})
    seed: int = field(default=0, metadata={"help": "Seed of the noise draws."})
    param_filter: str | None = field(default=None, metadata={"help": "Substring of parameter names to include."})
    aggregate: str = field(default="sum", metadata={"help": "'sum' or 'mean' over a group's images."})

    def __post_init__(self):
        if self.num_draws < 1:
            raise ConfigError("num_draws must be >= 1.")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}.")
        if self.timesteps is not None:
            self.timesteps = tuple(int(t) for t in self.timesteps)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GradientConfig(DenoisingLossConfig):
    """Settings of the gradient baseline (and the fields of :class:`DenoisingLossConfig`).

    Args:
        projection_dim: Dimension ``D`` of the random projection of the gradients.
        gradient_batch_size: Examples whose full gradients are held at once before they are
            projected together (memory: this × #parameters floats). Does not change the result
            beyond float rounding.
        normalize: Score with the cosine of the projected gradients instead of their inner product
            (removes the dominance of images with large gradient norms). Default off (DESIGN §1.3).
    """

    projection_dim: int = field(default=512, metadata={"help": "Dimension of the random projection."})
    gradient_batch_size: int = field(default=32, metadata={"help": "Examples projected together (memory)."})
    normalize: bool = field(default=False, metadata={"help": "Cosine of projected gradients instead of the inner product."})

    def __post_init__(self):
        super().__post_init__()
        if self.projection_dim < 1 or self.gradient_batch_size < 1:
            raise ConfigError("projection_dim, num_draws and gradient_batch_size must be >= 1.")


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


def projected_gradients(unet, scheduler, images: torch.Tensor, config: GradientConfig | None = None, progress: bool = False,
                        conditioning: torch.Tensor | None = None) -> torch.Tensor:
    """Randomly projected per-example gradients of the denoising loss, ``[N, D]`` float64.

    ``conditioning`` (``[N, L, D]``): each image's text embeddings, for a text-conditioned UNet.

    For each image, the loss is the regression-target MSE averaged over ``config.timesteps`` ×
    ``config.num_draws`` rows with common random numbers, differentiated w.r.t. the selected UNet
    parameters (flattened in ``named_parameters`` order) and multiplied by the projection of
    :func:`projection_blocks`. The UNet runs in eval mode; its weights, ``requires_grad`` flags and
    train/eval mode are left as they were.
    """
    config = config or GradientConfig()
    schedule = NoiseSchedule(scheduler)
    timesteps = _resolve_timesteps(config.timesteps, scheduler)
    selected = _select_parameters(unet, config.param_filter)
    names = [n for n, _ in selected]
    params = [p for _, p in selected]
    out = []
    with _GradientsOn(unet, selected):
        pending: list[list[torch.Tensor]] = []
        for i in _progress(range(len(images)), progress, "gradients"):
            rows = _denoising_noise(images[i], timesteps, config.num_draws, config.seed, "guda-gradient")
            cond = None if conditioning is None else conditioning[i]
            loss, x_in = _denoising_loss(unet, schedule, images[i], rows, with_input=True, cond=cond)
            pending.append([g.detach() for g in torch.autograd.grad(loss, params + [x_in])[:-1]])
            if len(pending) == config.gradient_batch_size or i == len(images) - 1:
                out.append(_project(pending, names, config.projection_dim, config.seed))
                pending = []
    return torch.cat(out) if out else torch.zeros((0, config.projection_dim), dtype=torch.float64)


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
        unet: The base UNet (called as ``unet(x_t, t).sample``); left unchanged.
        scheduler: Its noise scheduler (``alphas_cumprod``, ``prediction_type``).
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
    _check_queries(queries, dataset)
    _check_conditioning(unet, query_conditioning, train_conditioning, len(queries), len(dataset))
    query_grads = projected_gradients(unet, scheduler, queries, config, progress, query_conditioning)
    train_grads = projected_gradients(unet, scheduler, dataset.images, config, progress, train_conditioning)
    if config.normalize:
        query_grads = torch.nn.functional.normalize(query_grads, dim=1, eps=1e-30)
        train_grads = torch.nn.functional.normalize(train_grads, dim=1, eps=1e-30)
    return _group_reduce(query_grads @ train_grads.T, dataset.group_ids, dataset.num_groups, config.aggregate)


# -- instance unlearning -------------------------------------------------------------------------


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
    return torch.tensor([float(_denoising_loss(unet, schedule, images[i], rows[i], cond=None if conditioning is None else conditioning[i]))
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
        unet: The base UNet (called as ``unet(x_t, t).sample``).
        scheduler: Its noise scheduler.
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
    _check_queries(queries, dataset)
    _check_conditioning(unet, query_conditioning, train_conditioning, len(queries), len(dataset))
    schedule = NoiseSchedule(scheduler)
    timesteps = _resolve_timesteps(config.timesteps, scheduler)
    salt = "guda-instance-unlearning"
    train_rows = [_denoising_noise(x, timesteps, config.num_draws, config.seed, salt) for x in dataset.images]
    was_training = unet.training
    unet.eval()
    try:
        before = _losses(unet, schedule, dataset.images, train_rows, train_conditioning)
    finally:
        unet.train(was_training)
    results = []
    for n in _progress(range(len(queries)), progress, "instance unlearning"):
        model = copy.deepcopy(unet).eval()
        selected = _select_parameters(model, config.param_filter)
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for _, p in selected]
        for p in params:
            p.requires_grad_(True)
        if config.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        else:
            optimizer = torch.optim.SGD(params, lr=config.learning_rate)
        rows = _denoising_noise(queries[n], timesteps, config.num_draws, config.seed, salt)
        for _ in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            cond = None if query_conditioning is None else query_conditioning[n]
            loss, x_in = _denoising_loss(model, schedule, queries[n], rows, with_input=True, cond=cond)
            grads = torch.autograd.grad(-loss, params + [x_in])[:-1]  # ascent
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        after = _losses(model, schedule, dataset.images, train_rows, train_conditioning)
        if not torch.isfinite(after).all():
            raise UnlearningDivergedError(
                f"Instance unlearning of query {n} gave non-finite losses; lower learning_rate "
                f"(now {config.learning_rate}) or steps (now {config.steps})."
            )
        del model, optimizer
        results.append(_group_reduce((after - before).unsqueeze(0), dataset.group_ids, dataset.num_groups, config.aggregate))
    return torch.cat(results)


__all__ = [
    "DenoisingLossConfig",
    "GradientConfig",
    "InstanceUnlearningConfig",
    "PROJECTION_BLOCK_ROWS",
    "default_timesteps",
    "gradient_scores",
    "instance_unlearning_scores",
    "nearest_neighbour_scores",
    "projected_gradients",
    "projection_blocks",
    "similarity_scores",
]
