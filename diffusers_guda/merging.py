"""Run a UNet with one LoRA adapter merged into its weights, and restore them bit for bit.

An unmerged LoRA layer runs the base layer plus the low-rank branch on every forward; on a small
UNet the branch costs about as much as the layer itself (DESIGN notes, peft API notes §9). Merging
``W' = W + ΔW`` once per adapter makes each adapter's forward cost the base model's. peft's own
``merge``/``unmerge`` adds and then subtracts ``ΔW``, which does not give ``W`` back exactly in
floating point; here the merged weight is a new tensor and the original tensor object is put back,
so the base model is untouched however many adapters are scored.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError


def lora_layers(unet, adapter: str) -> list:
    """The peft LoRA layers of ``unet`` that hold ``adapter``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def can_merge(unet, adapters) -> bool:
    """Whether every layer of every adapter is plain LoRA (no DoRA or other variant) and mergeable."""
    for adapter in adapters:
        layers = lora_layers(unet, adapter)
        if not layers:
            return False
        for layer in layers:
            if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
                return False
            if not hasattr(layer.get_base_layer(), "weight"):
                return False
    return True


@contextlib.contextmanager
def merged_adapter(unet, adapter: str | None):
    """Within the block, ``unet`` computes the base model plus ``adapter`` (``None``: the base).

    The LoRA branches are disabled and each targeted base weight is replaced by ``W + ΔW``; on exit
    the original weight tensors are restored (the same objects, so bit-identical) and the adapter
    state is left disabled. Callers restore the caller's adapter state afterwards.

    Raises:
        ConfigError: ``adapter`` is not loaded in ``unet``.
    """
    unet.disable_adapters()
    if adapter is None:
        yield unet
        return
    layers = lora_layers(unet, adapter)
    if not layers:
        raise ConfigError(f"Adapter {adapter!r} is not loaded in the UNet.")
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                originals.append((weight, weight.data))
                weight.data = weight.data + layer.get_delta_weight(adapter).to(weight.dtype)
        yield unet
    finally:
        for weight, data in originals:
            weight.data = data
