"""How the scorer runs the full model and each adapter: the scoring strategies
(docs/method.md#scoring-strategies).

A strategy only decides how a model is run: :meth:`model` is a context yielding the callable model
for the base (``None``) or one adapter, and :meth:`per_row` (mixed batches only) one yielding the
UNet with a different adapter on each row. What is computed on the models is the scorer's.
"""

from __future__ import annotations

from typing import ContextManager, Sequence

import torch

from ..adapter_state import use_adapters
from ..elbo import ELBOEstimator
from ..errors import ConfigError
from ..merging import MergedAdapterRunner, can_merge

STRATEGIES = ("auto", "merged", "swap", "mixed")


class ModelStrategy:
    """Runs the models of one scoring call on ``unet``, the UNet holding the adapters."""

    name: str

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    def model(self, adapter: str | None) -> ContextManager[torch.nn.Module]:
        """A context yielding the callable model: the base (``None``) or the base plus ``adapter``."""
        raise NotImplementedError


class SwapStrategy(ModelStrategy):
    """Each adapter's LoRA branch switched on in turn on the one UNet (``"swap"``)."""

    name = "swap"

    def model(self, adapter: str | None) -> ContextManager[torch.nn.Module]:
        """Within the block, the UNet computes the base (``None``) or the base plus ``adapter``."""
        return use_adapters(self.unet, adapter)


class MergedStrategy(ModelStrategy):
    """Each adapter merged in turn into a plain copy of the UNet sharing its base weights (``"merged"``).

    The copy is made on first use and belongs to this strategy object: the adapters may change
    before the next scoring call.
    """

    name = "merged"

    def __init__(self, unet: torch.nn.Module):
        super().__init__(unet)
        self._runner: MergedAdapterRunner | None = None

    def model(self, adapter: str | None) -> ContextManager[torch.nn.Module]:
        """Within the block, the plain copy computes the base (``None``) or the base plus ``adapter`` merged."""
        if self._runner is None:
            self._runner = MergedAdapterRunner(self.unet)
        return self._runner.merged(adapter)


class MixedStrategy(SwapStrategy):
    """The base and all adapters in one forward, a different adapter per row (``"mixed"``)."""

    name = "mixed"

    def per_row(self, adapters: Sequence[str | None]) -> ContextManager[torch.nn.Module]:
        """Within the block, row ``i`` of every forward runs ``adapters[i]`` (``None``: the base)."""
        return use_adapters(self.unet, adapters)


def resolve_strategy(strategy: str, unet: torch.nn.Module, adapter_names: Sequence[str], estimator: ELBOEstimator) -> str:
    """The strategy a scoring call runs: ``strategy`` itself, or what ``"auto"`` picks.

    ``"auto"`` merges only in full precision: in half precision (weights or autocast) ``W + ΔW``
    rounds most of a small ``ΔW`` away, while the unmerged LoRA branch keeps it.

    Raises:
        ConfigError: an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy != "auto":
        return strategy
    full_precision = next(unet.parameters()).dtype == torch.float32 and estimator.config.autocast_dtype is None
    return "merged" if full_precision and can_merge(unet, adapter_names) else "swap"


def make_strategy(strategy: str, unet: torch.nn.Module) -> ModelStrategy:
    """The object running the models of a resolved ``strategy`` (``"merged"``, ``"swap"`` or ``"mixed"``)."""
    return {"merged": MergedStrategy, "swap": SwapStrategy, "mixed": MixedStrategy}[strategy](unet)
