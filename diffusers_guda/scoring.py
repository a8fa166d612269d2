"""Attribution scores: ELBO differences between the full model and each group's counterfactual.

``score[n, k] = ELBO(x_n; full) - ELBO(x_n; full + LoRA_k)`` (higher: removing group k makes x_n
less likely, so k mattered more). The full model is the UNet with adapters disabled; the adapters are
switched on the one UNet, and every model sees the same (t, noise) draws per image.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .distributed import ProcessInfo, current_process
from .elbo import ELBOEstimator
from .errors import ConfigError
from .hashing import derive_seed
from .merging import MergedAdapterRunner, can_merge


@dataclass
class AttributionResult:
    """Scores of N query images against K groups.

    Attributes:
        scores: ``[N, K]`` ELBO differences in nats (higher = the group mattered more).
        stderr: ``[N, K]`` standard errors of the scores (spread of the paired per-(t, draw)
            differences over the grid).
        groups: The K group names.
        neg_elbo: ``[N]`` the full model's -ELBO estimate (without L_T and L_0), in nats.
        image_hashes: Content hash of each query (the key of its common random numbers).
        metadata: ELBO settings, seeds, bundle source and revision.
    """

    scores: torch.Tensor
    stderr: torch.Tensor
    groups: list[str]
    neg_elbo: torch.Tensor
    image_hashes: list[int] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.scores.shape[0]

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        """Per query, the ``k`` highest-scoring groups as ``(name, score)``, best first."""
        k = min(k, len(self.groups))
        values, idx = torch.topk(self.scores, k, dim=1)
        return [[(self.groups[j], float(v)) for v, j in zip(vs.tolist(), js.tolist())] for vs, js in zip(values, idx)]

    def top_groups(self) -> list[str]:
        return [row[0][0] for row in self.top(1)]

    def to_dict(self) -> dict:
        return {
            "groups": self.groups,
            "scores": self.scores.tolist(),
            "stderr": self.stderr.tolist(),
            "neg_elbo": self.neg_elbo.tolist(),
            "top_group": self.top_groups(),
            "image_hashes": [str(h) for h in self.image_hashes],
            "metadata": self.metadata,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def plot(self, path: str | Path, images: torch.Tensor | None = None, max_queries: int = 8, top_k: int | None = None):
        """Bar chart of each query's group scores with ±2 standard errors (and the query image).

        Args:
            path: PNG file to write.
            images: Optional query images ``[N, C, H, W]`` in [-1, 1] to show beside the bars.
            max_queries: How many queries (the first ones) to draw.
            top_k: Show only the k best groups per query (default all).

        Returns:
            The matplotlib figure.
        """
        from .plotting import plot_attribution_bars

        return plot_attribution_bars(self, path, images=images, max_queries=max_queries, top_k=top_k)


def _adapter_state(unet) -> tuple[list[str], bool] | None:
    """The active adapters and whether adapters are disabled, read from the first LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            active = module.active_adapter
            return ([active] if isinstance(active, str) else list(active)), bool(module.disable_adapters)
    return None


def _restore(unet, state: tuple[list[str], bool] | None) -> None:
    if state is None or not getattr(unet, "peft_config", None):
        return
    active, disabled = state
    active = [a for a in active if a in unet.peft_config]
    if active:
        unet.set_adapter(active)
    if disabled:
        unet.disable_adapters()
    else:
        unet.enable_adapters()


STRATEGIES = ("auto", "merged", "swap", "mixed")
BASE_ROWS = "__base__"  # peft's adapter name for rows that take no adapter
ADAPTIVE_FORWARD_BLOCKS = 8  # adaptive forwards hold this many blocks of rows (fixed, so bits do not depend on the batch)


@contextlib.contextmanager
def adapter_per_row(unet, names: Sequence[str]):
    """Run the next forwards with adapter ``names[i]`` on row ``i`` (peft's mixed adapter batches).

    diffusers' UNets do not pass ``adapter_names`` down to the LoRA layers, so a forward pre-hook on
    every LoRA layer injects it. Callers validate the names: peft treats an unknown name as the base.
    """
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = list(names)
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _switch(unet, adapter: str | None) -> None:
    if adapter is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(adapter)


def _mean_and_stderr(diff: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and standard error from the paired per-row differences (over the last dimension)."""
    r = diff.shape[-1]
    stderr = scale * diff.std(dim=-1) / math.sqrt(r) if r > 1 else torch.full(diff.shape[:-1], float("nan"))
    return scale * diff.mean(dim=-1), stderr


def _metadata(est: ELBOEstimator, extra: dict | None) -> dict:
    meta = {"elbo": est.config.to_dict(), "num_rows": est.num_rows, "timesteps": [int(est.timesteps[0]), int(est.timesteps[-1]), len(est.timesteps)]}
    meta.update(extra or {})
    return meta


@torch.no_grad()
def score_models(
    estimator: ELBOEstimator,
    reference: Callable[[], torch.nn.Module],
    counterfactuals: Sequence[Callable[[], torch.nn.Module]],
    groups: Sequence[str],
    images: torch.Tensor,
    batch_size: int = 16,
    unet_kwargs: Sequence[dict] | None = None,
    progress: bool = True,
    metadata: dict | None = None,
) -> AttributionResult:
    """``score[n, k] = ELBO(x_n; reference) - ELBO(x_n; counterfactual_k)`` with shared draws.

    Args:
        estimator: The ELBO estimator (grid, common random numbers).
        reference: Returns the full model, ready to run (e.g. after disabling adapters).
        counterfactuals: One per group; each returns that group's counterfactual model (an adapter
            switched on, or a separately trained leave-one-group-out model).
        groups: Group names, in the order of ``counterfactuals``.
        images: ``[N, C, H, W]`` clean samples in the model's input space.
        batch_size: Images evaluated per model switch. It changes speed only: each image's rows are
            always evaluated alone, so scores do not depend on it.
        unet_kwargs: Optional per-image UNet inputs (e.g. text embeddings ``[1, L, D]``).
        progress: Show a progress bar.
        metadata: Extra fields recorded in the result.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    if len(counterfactuals) != len(groups):
        raise ConfigError("There must be one counterfactual model per group.")
    est = estimator
    n, k, r = images.shape[0], len(groups), est.num_rows
    hashes = est.image_hashes(images)
    scores, stderr = torch.zeros(n, k), torch.zeros(n, k)
    neg_elbo = torch.zeros(n)
    with tqdm(total=n * (k + 1), desc="attribute", disable=not progress, dynamic_ncols=True, unit="img·model") as bar:
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            noise = {i: est.noise(images[i], hashes[i]) for i in idx}
            kwargs = {i: (unet_kwargs[i] if unet_kwargs is not None else None) for i in idx}
            model = reference()
            base = {i: est.terms(model, images[i], noise[i], unet_kwargs=kwargs[i]) for i in idx}
            bar.update(len(idx))
            for i in idx:
                neg_elbo[i] = est.scale * base[i].mean()
            for j, select in enumerate(counterfactuals):
                model = select()
                for i in idx:
                    diff = est.terms(model, images[i], noise[i], unet_kwargs=kwargs[i]) - base[i]
                    scores[i, j], stderr[i, j] = _mean_and_stderr(diff, est.scale)
                bar.update(len(idx))
    return AttributionResult(scores, stderr, list(groups), neg_elbo, hashes, _metadata(est, metadata))


class AttributionScorer:
    """Computes :class:`AttributionResult` for a UNet holding one adapter per group.

    Args:
        unet: UNet with the group adapters loaded (names in ``adapter_names``).
        estimator: The ELBO estimator (grid, common random numbers).
        adapter_names: peft adapter name of each group, in group order.
        groups: Group names, in the same order.
    """

    def __init__(self, unet, estimator: ELBOEstimator, adapter_names: Sequence[str], groups: Sequence[str]):
        loaded = set(getattr(unet, "peft_config", {}) or {})
        missing = [a for a in adapter_names if a not in loaded]
        if missing:
            raise ConfigError(f"Adapters {missing} are not loaded in the UNet; load the bundle first (pipe.load_guda_bundle).")
        if len(adapter_names) != len(groups):
            raise ConfigError("adapter_names and groups must have the same length.")
        self.unet = unet
        self.estimator = estimator
        self.adapter_names = list(adapter_names)
        self.groups = list(groups)
        self._runner = None

    def score(
        self,
        images: torch.Tensor,
        batch_size: int = 64,
        unet_kwargs: Sequence[dict] | None = None,
        progress: bool = True,
        metadata: dict | None = None,
        strategy: str = "auto",
        adaptive_z: float | None = None,
        adaptive_block: int = 8,
        process: ProcessInfo | None = None,
    ) -> AttributionResult:
        """Score ``images`` against every group.

        Args:
            images: ``[N, C, H, W]`` clean samples in the model's input space.
            batch_size: Images whose rows are packed into shared forwards; speed and memory only.
            unet_kwargs: Optional per-image UNet inputs (each value ``[1, ...]``).
            progress: Show a progress bar.
            metadata: Extra fields recorded in the result.
            strategy: How the K + 1 models are run; the one used is recorded in
                ``metadata["strategy"]``. ``"merged"``: each adapter in turn is merged into the
                weights (so its forward costs the base model's) and the rows of ``batch_size`` images
                share fixed-size forwards. ``"swap"``: the same with the LoRA branch switched on
                instead of merged (for adapters that cannot be merged). ``"mixed"``: the base and all
                adapters in one forward per row chunk, a different adapter per row (peft's mixed
                adapter batches; full grid only). ``"auto"`` (default): ``"merged"`` when every
                adapter layer is plain LoRA and the UNet runs in float32 without autocast, else
                ``"swap"`` (in half precision ``W + ΔW`` rounds most of a small ``ΔW`` away). Strategies agree to float32 rounding
                (~1e-6 relative); within one, a score does not depend on the batch.
            adaptive_z: If set, each query walks its grid in stratified blocks: the (t, draw) rows
                are cut into ``adaptive_block`` contiguous timestep ranges, and each block takes one
                row from every range in a fixed pseudo-random order (a function of the ELBO seed and
                the image's content). From the second block on, a group whose gap to the current
                leader exceeds ``adaptive_z`` standard errors of their paired block estimates is
                dropped (its score is the mean of its block estimates) until the leader's estimate falls
                below that score, when it comes back and walks the blocks it missed; the query stops when one
                group is left (the top group leads the runner-up by ``adaptive_z`` standard errors)
                or the grid is exhausted (then the scores are the full-grid ones). Rows used per query
                and group are recorded in ``metadata["rows_used"]``. ``None`` (default): the full grid.
            adaptive_block: Rows per block (timestep ranges) of the adaptive walk. Adaptive forwards
                hold ``min(rows_per_forward, 8 * adaptive_block)`` rows.
            process: This process of a ``torchrun``/``accelerate launch`` run; default
                :func:`~diffusers_guda.distributed.current_process`. Each process scores a contiguous
                share of ``images`` and every process returns the complete result, bit-identical to a
                one-process run's (an image's scores do not depend on its companions). The number
                of processes is recorded in ``metadata["world_size"]``.

        Raises:
            DistributedError: if the processes of a launch were given other images or settings.
        """
        process = current_process() if process is None else process
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if adaptive_z is not None and (adaptive_z <= 0 or adaptive_block < 2):
            raise ConfigError("adaptive_z must be > 0 and adaptive_block >= 2.")
        if adaptive_z is not None and strategy == "mixed":
            raise ConfigError("adaptive_z needs strategy 'auto', 'merged' or 'swap' (mixed batches run every adapter on every row).")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if strategy == "auto":
            # merging adds a small ΔW to W; in half precision (weights or autocast) W + ΔW rounds most
            # of ΔW away, while the unmerged LoRA branch keeps it: merge only in full precision
            full_precision = next(self.unet.parameters()).dtype == torch.float32 and self.estimator.config.autocast_dtype is None
            strategy = "merged" if full_precision and can_merge(self.unet, self.adapter_names) else "swap"
        unet = self.unet
        was_training = unet.training
        previous = _adapter_state(unet)
        unet.eval()
        metadata = {**(metadata or {}), "strategy": strategy, "world_size": process.world_size}
        if adaptive_z is not None:
            metadata.update(adaptive_z=adaptive_z, adaptive_block=adaptive_block)
        if process.is_distributed:
            process.check_same(
                (self.estimator.image_hashes(images), self.estimator.config.to_dict(), self.groups, strategy, adaptive_z, adaptive_block),
                "query images or scoring settings",
            )
        start, stop = process.shard_bounds(images.shape[0])
        images = images[start:stop]
        unet_kwargs = None if unet_kwargs is None else list(unet_kwargs)[start:stop]
        progress = progress and process.is_main
        try:
            if images.shape[0] == 0:  # more processes than images
                result = self._empty_result(metadata, adaptive_z is not None)
            elif strategy == "mixed":
                result = self._score_mixed(images, unet_kwargs, progress, metadata)
            else:
                result = self._score_packed(images, batch_size, unet_kwargs, progress, metadata, strategy, adaptive_z, adaptive_block)
            return _concatenate(process.gather(result)) if process.is_distributed else result
        finally:
            self._runner = None  # its merged weights are this call's: the adapters may change before the next
            _restore(unet, previous)  # leave the adapters as they were (e.g. disabled for generation)
            unet.train(was_training)

    def _catch_up(self, i, groups, step, strategy, walk, base, diffs, blocks, rows_of) -> None:
        """Give dropped ``groups`` of image ``i`` the rounds they missed, up to round ``step``."""
        for j in groups:
            missed = range(len(diffs[j]), step + 1)
            rows = torch.cat([walk[0][m] for m in missed])
            with self._model(self.adapter_names[j], strategy) as unet:
                terms = rows_of(self.adapter_names[j], unet, [i], {i: rows})[i]
            for m, t in zip(missed, terms.split([len(walk[0][m]) for m in missed])):
                diffs[j].append(t - base[m])
                if walk[1][m] is not None:
                    blocks[j].append((walk[1][m] * diffs[j][-1]).sum())

    def _empty_result(self, metadata: dict, adaptive: bool) -> AttributionResult:
        k = len(self.groups)
        metadata = {**metadata, "row_forwards": 0, **({"rows_used": []} if adaptive else {})}
        return AttributionResult(torch.zeros(0, k), torch.zeros(0, k), list(self.groups), torch.zeros(0), [], _metadata(self.estimator, metadata))

    def _model(self, adapter: str | None, strategy: str):
        """Context in which the UNet computes the base (``None``) or the base plus ``adapter``."""
        if strategy == "merged":
            if self._runner is None:  # built once per call: a plain copy sharing the base weights
                self._runner = MergedAdapterRunner(self.unet)
            return self._runner.merged(adapter)
        _switch(self.unet, adapter)
        return contextlib.nullcontext(self.unet)

    @torch.no_grad()
    def _score_packed(self, images, batch_size, unet_kwargs, progress, metadata, strategy, z, block) -> AttributionResult:
        """Model by model over ``batch_size`` images at a time: the full grid, or an adaptive walk."""
        est = self.estimator
        n, k, r = images.shape[0], len(self.groups), est.num_rows
        hashes = est.image_hashes(images)
        scores, stderr, neg_elbo = torch.zeros(n, k), torch.zeros(n, k), torch.zeros(n)
        rows_used = torch.zeros(n, k, dtype=torch.long)
        evaluated = 0  # rows through the UNet (padding repeats excluded)
        desc = f"attribute ({strategy}{', adaptive' if z is not None else ''})"
        with tqdm(total=n, desc=desc, disable=not progress, dynamic_ncols=True, unit="img") as bar:
            for first in range(0, n, batch_size):
                ids = list(range(first, min(n, first + batch_size)))
                kwargs = None
                if unet_kwargs is not None:
                    kwargs = {key: torch.cat([unet_kwargs[i][key] for i in ids]) for key in unet_kwargs[ids[0]]}
                if z is None:
                    walks = {i: ([torch.arange(r)], [None]) for i in ids}
                    forward_rows = est.config.rows_per_forward
                else:
                    walks = {i: _stratified_walk(r, block, derive_seed("guda-order", est.config.seed, hashes[i])) for i in ids}
                    # rounds hand each model few rows; room left in a forward is filled with later blocks
                    forward_rows = min(est.config.rows_per_forward, ADAPTIVE_FORWARD_BLOCKS * block)
                base = {i: [] for i in ids}
                diffs = {i: [[] for _ in range(k)] for i in ids}
                blocks = {i: [[] for _ in range(k + 1)] for i in ids}  # stratified block estimates; index k: the base
                alive = {i: list(range(k)) for i in ids}
                rows_of = _RowTerms(est, images, ids, hashes, kwargs, forward_rows)
                active, step = list(ids), 0
                while active:
                    rows = {i: walks[i][0][step] for i in active}
                    # adaptive walks fill each round's last forward with rows of later blocks (kept for later rounds)
                    later = (lambda i, s=step: walks[i][0][s + 1 :]) if z is not None else None
                    with self._model(None, strategy) as unet:
                        base_terms = rows_of(None, unet, active, rows, later)
                    for i in active:
                        base[i].append(base_terms[i])
                    for j, adapter in enumerate(self.adapter_names):
                        who = [i for i in active if j in alive[i]]
                        if not who:
                            continue
                        with self._model(adapter, strategy) as unet:
                            terms = rows_of(adapter, unet, who, rows, later)
                        for i in who:
                            diffs[i][j].append(terms[i] - base_terms[i])
                    still = []
                    for i in active:
                        weights = walks[i][1][step]
                        if weights is not None:  # a complete block: one row from every stratum
                            blocks[i][k].append((weights * base[i][-1]).sum())
                            for j in alive[i]:
                                blocks[i][j].append((weights * diffs[i][j][-1]).sum())
                            if len(blocks[i][k]) >= 2:
                                alive[i] = _survivors(alive[i], [torch.stack(blocks[i][j]) for j in alive[i]], z)
                                # a dropped group whose (frozen) estimate now beats the leader's comes back:
                                # its missed blocks are computed and the groups compared again, so the
                                # top group is always one that walked as far as the query did
                                means = [torch.stack(b).mean() for b in blocks[i][:k]]
                                back = [j for j in range(k) if j not in alive[i] and means[j] >= max(means[a] for a in alive[i])]
                                if back:
                                    self._catch_up(i, back, step, strategy, walks[i], base[i], diffs[i], blocks[i], rows_of)
                                    alive[i] = sorted(alive[i] + back)
                                    alive[i] = _survivors(alive[i], [torch.stack(blocks[i][j]) for j in alive[i]], z)
                        if step + 1 < len(walks[i][0]) and len(alive[i]) > 1:
                            still.append(i)
                        else:
                            bar.update(1)
                    active, step = still, step + 1
                evaluated += rows_of.evaluated
                for i in ids:
                    base_rows = torch.cat(base[i])
                    neg_elbo[i] = est.scale * (base_rows.mean() if len(base_rows) == r else torch.stack(blocks[i][k]).mean())
                    for j in range(k):
                        d = torch.cat(diffs[i][j])
                        rows_used[i, j] = len(d)
                        # the whole grid: its plain mean; a group dropped early: the mean of its stratified blocks
                        sample = d if len(d) == r else torch.stack(blocks[i][j])
                        scores[i, j], stderr[i, j] = _mean_and_stderr(sample, est.scale)
        metadata["row_forwards"] = evaluated
        if z is not None:
            metadata["rows_used"] = rows_used.tolist()
        return AttributionResult(scores, stderr, list(self.groups), neg_elbo, hashes, _metadata(est, metadata))

    def _all_terms(self, image, noise, rows, kwargs) -> torch.Tensor:
        """``[K + 1, len(rows)]`` terms of the base (row 0) and every adapter, one forward per chunk."""
        est, unet = self.estimator, self.unet
        if BASE_ROWS in self.adapter_names:
            raise ConfigError(f"An adapter may not be named {BASE_ROWS!r}: peft reserves it for rows without adapter.")
        names = [BASE_ROWS, *self.adapter_names]
        row_names = [name for name in names for _ in range(len(rows))]
        tiled = noise.repeat(len(names), *[1] * image.dim())
        unet.enable_adapters()
        return est.terms(
            unet, image, tiled, rows=rows.repeat(len(names)), unet_kwargs=kwargs,
            rows_per_forward=est.config.rows_per_forward * len(names),
            forward_context=lambda start, stop: adapter_per_row(unet, row_names[start:stop]),
        ).view(len(names), len(rows))

    @torch.no_grad()
    def _score_mixed(self, images, unet_kwargs, progress, metadata) -> AttributionResult:
        """All models on one image at a time, one adapter per row (the full grid)."""
        est = self.estimator
        n, k, r = images.shape[0], len(self.groups), est.num_rows
        hashes = est.image_hashes(images)
        scores, stderr, neg_elbo = torch.zeros(n, k), torch.zeros(n, k), torch.zeros(n)
        rows = torch.arange(r)
        for i in tqdm(range(n), desc="attribute (mixed)", disable=not progress, dynamic_ncols=True, unit="img"):
            kwargs = unet_kwargs[i] if unet_kwargs is not None else None
            terms = self._all_terms(images[i], est.noise(images[i], hashes[i]), rows, kwargs)
            neg_elbo[i] = est.scale * terms[0].mean()
            scores[i], stderr[i] = _mean_and_stderr(terms[1:] - terms[0], est.scale)
        metadata["row_forwards"] = n * r * (k + 1)
        return AttributionResult(scores, stderr, list(self.groups), neg_elbo, hashes, _metadata(est, metadata))


def _concatenate(parts: Sequence[AttributionResult]) -> AttributionResult:
    """The results of consecutive shards of the queries as one result (counters summed)."""
    metadata = dict(parts[0].metadata)
    metadata["row_forwards"] = sum(p.metadata["row_forwards"] for p in parts)
    if "rows_used" in metadata:
        metadata["rows_used"] = [row for p in parts for row in p.metadata["rows_used"]]
    return AttributionResult(
        torch.cat([p.scores for p in parts]),
        torch.cat([p.stderr for p in parts]),
        list(parts[0].groups),
        torch.cat([p.neg_elbo for p in parts]),
        [h for p in parts for h in p.image_hashes],
        metadata,
    )


class _RowTerms:
    """Terms of (image, row) items under each model of one batch of images, computed once.

    Items are packed into forwards of exactly ``forward_rows`` rows. Because a row's term does not
    depend on the other rows of its forward, the room left in a round's last forward can be filled
    with rows the same model needs in later rounds of an adaptive walk: they come out bit-identical
    to computing them later, and a model whose group is dropped first wastes them as it would waste
    the padding.
    """

    def __init__(self, estimator: ELBOEstimator, images, ids, hashes, kwargs, forward_rows: int):
        self.est, self.forward_rows, self.kwargs = estimator, forward_rows, kwargs
        self.images = images[ids[0] : ids[-1] + 1]
        self.local = {i: p for p, i in enumerate(ids)}
        self.hashes = hashes
        self.done: dict = {}  # model -> {(image, row): term}
        self._noise: dict = {}  # (image, row) -> noise, shared by every model
        self.evaluated = 0

    def _noise_of(self, items) -> torch.Tensor:
        missing = {}
        for i, r in items:
            if (i, r) not in self._noise:
                missing.setdefault(i, []).append(r)
        for i, rows in missing.items():
            fresh = self.est.noise(self.images[self.local[i]], self.hashes[i], rows=torch.tensor(rows))
            self._noise.update(zip(((i, r) for r in rows), fresh))
        return torch.stack([self._noise[item] for item in items])

    def __call__(self, model, unet, who, rows, later=None) -> dict[int, torch.Tensor]:
        """``{image: terms of rows[image]}`` under ``unet`` (the base when ``model`` is None)."""
        done = self.done.setdefault(model, {})
        items = [(i, r) for i in who for r in rows[i].tolist() if (i, r) not in done]
        if later is not None and items:  # fill the last forward with rows of later blocks
            spare = ((i, r) for i in who for block in later(i) for r in block.tolist() if (i, r) not in done)
            items += itertools.islice(spare, -len(items) % self.forward_rows)
        if items:
            index = torch.tensor([self.local[i] for i, _ in items])
            row_ids = torch.tensor([r for _, r in items])
            terms = self.est.packed_terms(unet, self.images, index, row_ids, self._noise_of(items), self.kwargs, self.forward_rows)
            done.update(zip(items, terms.tolist()))
            self.evaluated += len(items)
        return {i: torch.tensor([done[(i, r)] for r in rows[i].tolist()], dtype=torch.float32) for i in who}


def _stratified_walk(num_rows: int, strata: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """An adaptive walk over the grid: blocks holding one row from each of ``strata`` timestep ranges.

    The t-major grid is cut into ``strata`` contiguous ranges; each range is shuffled (``seed``) and
    block ``j`` takes the ``j``-th row of every range. A complete block's weighted sum
    ``Σ (range size / num_rows) · d_row`` is an unbiased estimate of the grid mean whose variance
    excludes the large differences between timesteps, so few blocks separate the groups.

    Returns:
        The blocks (row ids) and, per block, the rows' weights (``None`` for the last, incomplete blocks).
    """
    generator = torch.Generator().manual_seed(seed)
    ranges = [part[torch.randperm(len(part), generator=generator)] for part in torch.arange(num_rows).tensor_split(strata)]
    blocks, weights = [], []
    for j in range(max(len(part) for part in ranges)):
        members = [part for part in ranges if j < len(part)]
        blocks.append(torch.stack([part[j] for part in members]))
        complete = len(members) == len(ranges)
        weights.append(torch.tensor([len(part) / num_rows for part in members]) if complete else None)
    return blocks, weights


def _survivors(alive: list[int], estimates: list[torch.Tensor], z: float) -> list[int]:
    """The groups still in contention: those whose gap to the leader is within ``z`` standard errors.

    ``estimates[a]`` holds group ``alive[a]``'s block estimates of its score difference, on the same
    blocks for every group still alive, so gaps are paired.
    """
    if len(alive) < 2:
        return alive
    d = torch.stack(estimates)
    leader = int(d.mean(1).argmax())
    gaps = d[leader] - d
    bound = z * gaps.std(dim=1) / math.sqrt(d.shape[1])
    return [g for a, g in enumerate(alive) if a == leader or not gaps[a].mean() > bound[a]]
