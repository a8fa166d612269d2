"""Attribution scores: ELBO differences between the full model and each group's counterfactual.

``score[n, k] = ELBO(x_n; full) - ELBO(x_n; full + LoRA_k)`` (higher: removing group k makes x_n
less likely, so k mattered more). The full model is the UNet with adapters disabled; the adapters are
switched on the one UNet, and every model sees the same (t, noise) draws per image.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .elbo import ELBOEstimator
from .errors import ConfigError
from .hashing import derive_seed


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


STRATEGIES = ("swap", "mixed")
BASE_ROWS = "__base__"  # peft's adapter name for rows that take no adapter


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

    def score(
        self,
        images: torch.Tensor,
        batch_size: int = 16,
        unet_kwargs: Sequence[dict] | None = None,
        progress: bool = True,
        metadata: dict | None = None,
        strategy: str = "swap",
        adaptive_z: float | None = None,
        adaptive_block: int = 10,
    ) -> AttributionResult:
        """Score ``images`` against every group.

        Args:
            images: ``[N, C, H, W]`` clean samples in the model's input space.
            batch_size: Images per adapter switch (``"swap"``); speed only.
            unet_kwargs: Optional per-image UNet inputs.
            progress: Show a progress bar.
            metadata: Extra fields recorded in the result.
            strategy: ``"swap"`` switches the active adapter on the one UNet (see
                :func:`score_models`); ``"mixed"`` runs the base and all K adapters in one forward per
                row chunk with a different adapter per row (peft's mixed adapter batches). The two
                agree to float32 reordering (~1e-6 nats); within a strategy scores do not depend on
                the batch. The strategy used is recorded in ``metadata["strategy"]``.
            adaptive_z: If set, each query walks its (t, draw) rows in a fixed pseudo-random order
                (a function of the ELBO seed and the image's content) in blocks, and stops once the
                top group's lead over the runner-up exceeds ``adaptive_z`` standard errors of their
                paired difference, or the grid is exhausted. The rows used per query are recorded
                in ``metadata["rows_used"]``. ``None`` (default) scores the full grid exactly.
            adaptive_block: Rows per block of the adaptive walk (also the minimum before stopping).
        """
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if adaptive_z is not None and (adaptive_z <= 0 or adaptive_block < 2):
            raise ConfigError("adaptive_z must be > 0 and adaptive_block >= 2.")
        unet = self.unet
        was_training = unet.training
        previous = _adapter_state(unet)
        unet.eval()
        metadata = {**(metadata or {}), "strategy": strategy}
        try:
            if adaptive_z is not None:
                metadata.update(adaptive_z=adaptive_z, adaptive_block=adaptive_block)
            if adaptive_z is not None or strategy == "mixed":
                return self._score_per_image(images, unet_kwargs, progress, metadata, strategy, adaptive_z, adaptive_block)

            def select(adapter):
                def run():
                    _switch(unet, adapter)
                    return unet

                return run

            return score_models(
                self.estimator, select(None), [select(a) for a in self.adapter_names], self.groups, images,
                batch_size=batch_size, unet_kwargs=unet_kwargs, progress=progress, metadata=metadata,
            )
        finally:
            _restore(unet, previous)  # leave the adapters as they were (e.g. disabled for generation)
            unet.train(was_training)

    def _all_terms(self, image, noise, rows, kwargs, strategy) -> torch.Tensor:
        """``[K + 1, len(rows)]`` terms of the base (row 0) and every adapter on the given rows."""
        est, unet = self.estimator, self.unet
        if strategy == "mixed":
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
        out = []
        for adapter in (None, *self.adapter_names):
            _switch(unet, adapter)
            out.append(est.terms(unet, image, noise, rows=rows, unet_kwargs=kwargs))
        return torch.stack(out)

    @torch.no_grad()
    def _score_per_image(self, images, unet_kwargs, progress, metadata, strategy, z, block) -> AttributionResult:
        """All models on one image at a time: the full grid in order, or (``z`` set) an adaptive walk."""
        est = self.estimator
        n, k, r = images.shape[0], len(self.groups), est.num_rows
        hashes = est.image_hashes(images)
        scores, stderr, neg_elbo = torch.zeros(n, k), torch.zeros(n, k), torch.zeros(n)
        rows_used = []
        desc = "attribute (adaptive)" if z is not None else f"attribute ({strategy})"
        for i in tqdm(range(n), desc=desc, disable=not progress, dynamic_ncols=True, unit="img"):
            if z is None:
                order, step = torch.arange(r), r
            else:
                seed = derive_seed("guda-order", est.config.seed, hashes[i])
                order, step = torch.randperm(r, generator=torch.Generator().manual_seed(seed)), block
            kwargs = unet_kwargs[i] if unet_kwargs is not None else None
            parts = []
            for start in range(0, r, step):
                rows = order[start : start + step]
                parts.append(self._all_terms(images[i], est.noise(images[i], hashes[i], rows=rows), rows, kwargs, strategy))
                terms = torch.cat(parts, dim=1)
                diff = terms[1:] - terms[0]
                if z is not None and k > 1 and terms.shape[1] < r:
                    top, second = torch.topk(diff.mean(1), 2).indices.tolist()
                    lead = diff[top] - diff[second]
                    if lead.mean() > z * lead.std() / math.sqrt(lead.numel()):
                        break
            rows_used.append(int(terms.shape[1]))
            neg_elbo[i] = est.scale * terms[0].mean()
            scores[i], stderr[i] = _mean_and_stderr(diff, est.scale)
        if z is not None:
            metadata["rows_used"] = rows_used
        return AttributionResult(scores, stderr, list(self.groups), neg_elbo, hashes, _metadata(est, metadata))
