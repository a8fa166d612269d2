"""The scoring engine: :class:`AttributionScorer` runs the full model and each group's adapter on
the same rows of every query (docs/method.md#common-random-numbers) and turns the paired differences
into scores. Its strategy (:mod:`.strategies`) only decides how a model is run; the walk of a query
over its grid (:mod:`.adaptive`) decides which rows each model runs on.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..adapter_state import check_loaded
from ..distributed import ProcessInfo, current_process
from ..elbo import ELBOEstimator
from ..errors import BatchTooLargeError, ConfigError
from ..hashing import derive_seed
from .adaptive import ADAPTIVE_BLOCK, ADAPTIVE_FORWARD_ROWS, ADAPTIVE_HEAD, AdaptiveSettings, QueryWalk
from .result import AttributionResult, concatenate_results, mean_and_stderr, scoring_metadata
from .rows import RowTerms
from .strategies import MixedStrategy, ModelStrategy, make_strategy, resolve_strategy


class AttributionScorer:
    """Computes :class:`AttributionResult` for a UNet holding one adapter per group.

    Args:
        unet: UNet with the group adapters loaded (names in ``adapter_names``).
        estimator: The ELBO estimator (grid, common random numbers).
        adapter_names: peft adapter name of each group, in group order.
        groups: Group names, in the same order.

    Raises:
        ConfigError: an adapter that is not loaded, or as many names as groups.
    """

    def __init__(self, unet, estimator: ELBOEstimator, adapter_names: Sequence[str], groups: Sequence[str]):
        check_loaded(unet, adapter_names)
        if len(adapter_names) != len(groups):
            raise ConfigError("adapter_names and groups must have the same length.")
        self.unet = unet
        self.estimator = estimator
        self.adapter_names = list(adapter_names)
        self.groups = list(groups)

    def score(
        self,
        images: torch.Tensor,
        batch_size: int = 64,
        unet_kwargs: Sequence[dict] | None = None,
        progress: bool = True,
        metadata: dict | None = None,
        strategy: str = "auto",
        adaptive_z: float | None = None,
        adaptive_block: int = ADAPTIVE_BLOCK,
        adaptive_head: float = ADAPTIVE_HEAD,
        process: ProcessInfo | None = None,
    ) -> AttributionResult:
        """Score ``images`` against every group; the UNet keeps its adapter state and mode.

        Args:
            images: ``[N, C, H, W]`` clean samples in the model's input space.
            batch_size: Images whose rows are packed into shared forwards; speed and memory only.
            unet_kwargs: Optional per-image UNet inputs (each value ``[1, ...]``).
            progress: Show a progress bar.
            metadata: Extra fields recorded in the result.
            strategy: How the K + 1 models are run (docs/method.md#scoring-strategies), recorded in
                ``metadata["strategy"]``: ``"merged"`` (each adapter merged in turn into a plain copy
                sharing the base weights), ``"swap"`` (each LoRA branch switched on in turn),
                ``"mixed"`` (all models in one forward, an adapter per row; full grid only) or
                ``"auto"`` (default: ``"merged"`` for plain LoRA adapters on a float32 UNet without
                autocast, else ``"swap"``). Strategies agree to float32 rounding; within one, a score
                does not depend on the batch.
            adaptive_z: If set, each query walks its grid's least-noisy rows, then stratified blocks,
                and drops groups trailing the leader by more than ``adaptive_z`` standard errors of the
                paired block estimates; one the leader falls below comes back (docs/method.md#the-adaptive-walk).
                Rows used per query and group: ``metadata["rows_used"]``. ``None`` (default): the full grid.
            adaptive_block: Rows per block (timestep ranges) of the adaptive walk. Adaptive forwards
                hold ``min(rows_per_forward, 64)`` rows.
            adaptive_head: Share of the grid, least noisy first, that every model walks before the
                blocks (the rows with the largest ELBO weights, taken exactly); 0 walks blocks only.
            process: This process of a launch (default :func:`~diffusers_guda.distributed.current_process`):
                each process scores a contiguous share of ``images`` and returns the complete result,
                bit-identical to a one-process run's (``metadata["world_size"]`` processes).

        Raises:
            ConfigError: an unknown strategy, invalid adaptive settings or batch size.
            BatchTooLargeError: if a forward of ``rows_per_forward`` rows does not fit in the device's memory.
            DistributedError: if the processes of a launch were given other images or settings.
        """
        process = current_process() if process is None else process
        strategy = resolve_strategy(strategy, self.unet, self.adapter_names, self.estimator)
        _check_settings(strategy, adaptive_z, adaptive_block, adaptive_head, batch_size)
        recorded = {"adaptive_z": adaptive_z, "adaptive_block": adaptive_block, "adaptive_head": adaptive_head} if adaptive_z is not None else {}
        metadata = {**(metadata or {}), "strategy": strategy, "world_size": process.world_size, **recorded}
        if process.is_distributed:
            settings = (self.estimator.config.to_dict(), self.groups, strategy, adaptive_z, adaptive_block, adaptive_head)
            process.check_same((self.estimator.image_hashes(images), *settings), "query images or scoring settings")
        start, stop = process.shard_bounds(images.shape[0])
        unet_kwargs = None if unet_kwargs is None else list(unet_kwargs)[start:stop]
        was_training = self.unet.training
        self.unet.eval()
        try:
            models = make_strategy(strategy, self.unet)
            head = math.ceil(adaptive_head * self.estimator.num_rows)
            adaptive = None if adaptive_z is None else AdaptiveSettings(adaptive_z, adaptive_block, head)
            result = self._score_shard(images[start:stop], batch_size, unet_kwargs, progress and process.is_main, metadata, models, adaptive)
        except torch.cuda.OutOfMemoryError as exc:
            rows = self.estimator.config.rows_per_forward
            raise BatchTooLargeError(
                f"Scoring ran out of device memory at {rows} rows per UNet forward; lower it, e.g. "
                f"elbo_config=ELBOConfig(..., rows_per_forward={max(1, rows // 2)}) (scores then agree to float rounding), or load "
                "the base in bfloat16."
            ) from exc
        finally:
            self.unet.train(was_training)
        return concatenate_results(process.gather(result)) if process.is_distributed else result

    def _score_shard(self, images, batch_size, unet_kwargs, progress, metadata, models: ModelStrategy,
                     adaptive: AdaptiveSettings | None) -> AttributionResult:
        if images.shape[0] == 0:  # more processes than images
            k = len(self.groups)
            metadata = {**metadata, "row_forwards": 0, **({"rows_used": []} if adaptive is not None else {})}
            return AttributionResult(torch.zeros(0, k), torch.zeros(0, k), list(self.groups), torch.zeros(0), [],
                                     scoring_metadata(self.estimator, metadata))
        if isinstance(models, MixedStrategy):
            return self._score_mixed(images, unet_kwargs, progress, metadata, models)
        return self._score_packed(images, batch_size, unet_kwargs, progress, metadata, models, adaptive)

    @torch.no_grad()
    def _score_packed(self, images, batch_size, unet_kwargs, progress, metadata, models: ModelStrategy,
                      adaptive: AdaptiveSettings | None) -> AttributionResult:
        """Model by model over ``batch_size`` images at a time: the full grid, or an adaptive walk."""
        est = self.estimator
        n, k = images.shape[0], len(self.groups)
        hashes = est.image_hashes(images)
        scores, stderr, neg_elbo = torch.zeros(n, k), torch.zeros(n, k), torch.zeros(n)
        rows_used = torch.zeros(n, k, dtype=torch.long)
        evaluated = 0  # rows through the UNet (padding repeats excluded)
        # rounds of an adaptive walk hand each model few rows; room left in a forward is filled with later blocks
        forward_rows = est.config.rows_per_forward if adaptive is None else min(est.config.rows_per_forward, ADAPTIVE_FORWARD_ROWS)
        desc = f"attribute ({models.name}{', adaptive' if adaptive is not None else ''})"
        with tqdm(total=n, desc=desc, disable=not progress, dynamic_ncols=True, unit="img") as bar:
            for first in range(0, n, batch_size):
                ids = list(range(first, min(n, first + batch_size)))
                walks = {i: self._walk(hashes[i], adaptive) for i in ids}
                rows_of = RowTerms(est, images, ids, hashes, _batch_kwargs(unet_kwargs, ids), forward_rows)
                self._walk_batch(walks, rows_of, models, adaptive=adaptive is not None, bar=bar)
                evaluated += rows_of.evaluated
                for i in ids:
                    neg_elbo[i], group_scores, used = walks[i].result(est.num_rows, est.scale)
                    rows_used[i] = torch.tensor(used)
                    for j, (score, error) in enumerate(group_scores):
                        scores[i, j], stderr[i, j] = score, error
        metadata["row_forwards"] = evaluated
        if adaptive is not None:
            metadata["rows_used"] = rows_used.tolist()
        return AttributionResult(scores, stderr, list(self.groups), neg_elbo, hashes, scoring_metadata(est, metadata))

    def _walk(self, image_hash: int, adaptive: AdaptiveSettings | None) -> QueryWalk:
        est, k = self.estimator, len(self.groups)
        if adaptive is None:
            return QueryWalk.full_grid(est.num_rows, k)
        return adaptive.walk(est.num_rows, k, derive_seed("guda-order", est.config.seed, image_hash))

    def _walk_batch(self, walks: dict[int, QueryWalk], rows_of: RowTerms, models: ModelStrategy, adaptive: bool, bar) -> None:
        """Walk a batch of queries round by round, each round running every model still needed once."""
        active, step = list(walks), 0
        while active:
            rows = {i: walks[i].blocks[step] for i in active}
            # adaptive walks fill each round's last forward with rows of later blocks (kept for later rounds)
            later = (lambda i, s=step: walks[i].later(s)) if adaptive else None
            with models.model(None) as unet:
                base = rows_of(None, unet, active, rows, later)
            terms = {i: {} for i in active}
            for j, adapter in enumerate(self.adapter_names):
                who = [i for i in active if j in walks[i].alive]
                if who:
                    with models.model(adapter) as unet:
                        for i, group_terms in rows_of(adapter, unet, who, rows, later).items():
                            terms[i][j] = group_terms
            still = []
            for i in active:
                back = walks[i].record(step, base[i], terms[i])
                if back:
                    self._catch_up(i, walks[i], back, step, rows_of, models)
                    walks[i].readmit(back)
                if walks[i].goes_on(step):
                    still.append(i)
                else:
                    bar.update(1)
            active, step = still, step + 1

    def _catch_up(self, i: int, walk: QueryWalk, groups: list[int], step: int, rows_of: RowTerms, models: ModelStrategy) -> None:
        """Give dropped ``groups`` of image ``i`` the rounds they missed, up to round ``step``."""
        for j in groups:
            rounds = walk.missed(j, step)
            rows = torch.cat([walk.blocks[m] for m in rounds])
            with models.model(self.adapter_names[j]) as unet:
                terms = rows_of(self.adapter_names[j], unet, [i], {i: rows})[i]
            walk.catch_up(j, rounds, terms)

    @torch.no_grad()
    def _score_mixed(self, images, unet_kwargs, progress, metadata, models: MixedStrategy) -> AttributionResult:
        """All models on one image at a time, one adapter per row (the full grid)."""
        est = self.estimator
        n, k, r = images.shape[0], len(self.groups), est.num_rows
        hashes = est.image_hashes(images)
        scores, stderr, neg_elbo = torch.zeros(n, k), torch.zeros(n, k), torch.zeros(n)
        names = [None, *self.adapter_names]
        row_names = [name for name in names for _ in range(r)]
        rows = torch.arange(r).repeat(len(names))
        for i in tqdm(range(n), desc="attribute (mixed)", disable=not progress, dynamic_ncols=True, unit="img"):
            tiled = est.noise(images[i], hashes[i]).repeat(len(names), *[1] * images[i].dim())
            terms = est.terms(
                self.unet, images[i], tiled, rows=rows, unet_kwargs=unet_kwargs[i] if unet_kwargs is not None else None,
                rows_per_forward=est.config.rows_per_forward * len(names),
                forward_context=lambda start, stop: models.per_row(row_names[start:stop]),
            ).view(len(names), r)
            neg_elbo[i] = est.scale * terms[0].mean()
            scores[i], stderr[i] = mean_and_stderr(terms[1:] - terms[0], est.scale)
        metadata["row_forwards"] = n * r * (k + 1)
        return AttributionResult(scores, stderr, list(self.groups), neg_elbo, hashes, scoring_metadata(est, metadata))


def _check_settings(strategy: str, adaptive_z: float | None, adaptive_block: int, adaptive_head: float, batch_size: int) -> None:
    if adaptive_z is not None and (not math.isfinite(adaptive_z) or adaptive_z <= 0 or adaptive_block < 2):
        raise ConfigError(f"adaptive_z must be a finite number > 0 and adaptive_block >= 2; got {adaptive_z} and {adaptive_block}.")
    if not 0 <= adaptive_head < 1:
        raise ConfigError(f"adaptive_head is a share of the grid, 0 <= adaptive_head < 1 (e.g. {ADAPTIVE_HEAD}); got {adaptive_head}.")
    if adaptive_z is not None and strategy == "mixed":
        raise ConfigError("adaptive_z needs strategy 'auto', 'merged' or 'swap' (mixed batches run every adapter on every row).")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")


def _batch_kwargs(unet_kwargs: Sequence[dict] | None, ids: list[int]) -> dict | None:
    """The UNet inputs of images ``ids`` concatenated along dim 0."""
    if unet_kwargs is None:
        return None
    return {key: torch.cat([unet_kwargs[i][key] for i in ids]) for key in unet_kwargs[ids[0]]}
