"""Run a UNet with one LoRA adapter merged into its weights, without touching the original weights.

An unmerged LoRA layer runs the base layer plus the low-rank branch on every forward; on a small
UNet the branch costs about as much as the layer itself (docs/method.md#scoring-strategies), and peft's wrappers
add per-forward Python overhead. :class:`MergedAdapterRunner` keeps a *plain* copy of the UNet
(no peft layers) whose tensors are the peft model's base weights, shared, not copied. To run
adapter k it points each targeted layer of the plain copy at a new tensor ``W + ΔW_k``, and points
it back at ``W`` afterwards: the shared base weights are never written, so the base model stays
bit-identical however many adapters are scored (peft's ``merge``/``unmerge`` adds and subtracts
``ΔW``, which does not give ``W`` back exactly in floating point).
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError
from .hashing import base_state_dict


def lora_layers(unet, adapter: str) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers of ``unet`` that hold ``adapter``, by module path."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def can_merge(unet, adapters) -> bool:
    """Whether every layer of every adapter is plain LoRA (no DoRA or other variant) with a weight."""
    for adapter in adapters:
        layers = lora_layers(unet, adapter)
        if not layers:
            return False
        for layer in layers.values():
            if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
                return False
            if not hasattr(layer.get_base_layer(), "weight"):
                return False
    return True


def plain_copy(unet) -> torch.nn.Module:
    """``unet`` without peft layers, holding the same base weight tensors (no copy where possible)."""
    state = base_state_dict(unet)
    try:
        with torch.device("meta"):  # no allocation for weights about to be replaced
            plain = type(unet).from_config(unet.config)
        plain.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in (*plain.parameters(), *plain.buffers())):
            raise RuntimeError("a tensor stayed on the meta device")
    except (RuntimeError, TypeError, ValueError):  # a model that cannot be built on the meta device
        plain = type(unet).from_config(unet.config).to(next(unet.parameters()).device, next(unet.parameters()).dtype)
        plain.load_state_dict(state, strict=True)
    return plain.eval().requires_grad_(False)


class MergedAdapterRunner:
    """Runs the base model or the base plus one adapter merged, on a plain copy of ``unet``.

    Merged weights are kept for reuse while they fit in ``cache_bytes`` (an adaptive walk merges every
    adapter once per round); adapters beyond it are merged again on each use.

    Args:
        unet: A UNet holding the adapters (peft layers).
        cache_bytes: Memory for kept merged weights (default 1 GiB; 0 keeps none).
    """

    def __init__(self, unet, cache_bytes: int = 1 << 30):
        self.unet = unet
        self.plain = plain_copy(unet)
        self._modules = dict(self.plain.named_modules())
        self._layers: dict[str, dict[str, torch.nn.Module]] = {}
        self._kept: dict[str, list[torch.Tensor]] = {}
        self._room = cache_bytes

    def _merged_weights(self, adapter: str) -> list[torch.Tensor]:
        if adapter in self._kept:
            return self._kept[adapter]
        if adapter not in self._layers:
            self._layers[adapter] = lora_layers(self.unet, adapter)
        layers = self._layers[adapter]
        if not layers:
            raise ConfigError(f"Adapter {adapter!r} is not loaded in the UNet.")
        with torch.no_grad():
            weights = []
            for name, layer in layers.items():
                base = self._modules[name].weight
                weights.append(base.data + layer.get_delta_weight(adapter).to(base.dtype))
        size = sum(w.numel() * w.element_size() for w in weights)
        if size <= self._room:
            self._kept[adapter], self._room = weights, self._room - size
        return weights

    @contextlib.contextmanager
    def merged(self, adapter: str | None):
        """Within the block, :attr:`plain` computes the base model (``None``) or the base plus ``adapter``.

        Raises:
            ConfigError: ``adapter`` is not loaded in the UNet.
        """
        if adapter is None:
            yield self.plain
            return
        weights = self._merged_weights(adapter)
        originals = []
        try:
            for name, merged in zip(self._layers[adapter], weights):
                weight = self._modules[name].weight
                originals.append((weight, weight.data))
                weight.data = merged
            yield self.plain
        finally:
            for weight, data in originals:
                weight.data = data
