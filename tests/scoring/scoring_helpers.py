"""Helpers of the scoring tests: tiny UNets with LoRA adapters that change the model."""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig

from diffusers_guda import AttributionScorer, ELBOConfig, ELBOEstimator
from diffusers_guda.scoring.strategies import MergedStrategy

from conftest import with_random_adapters


def add_adapter(unet, name: str, seed: int | None) -> None:
    """A rank-2 adapter ``name``; with a ``seed`` its lora_B is random, so it changes the model."""
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["conv1", "conv2", "to_q"]), adapter_name=name)
    if seed is not None:  # make it non-identity
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if f"lora_B.{name}." in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1", "g2"), stride=7) -> AttributionScorer:
    """A scorer of the tiny UNet holding one random adapter per name (adapters left disabled)."""
    with_random_adapters(tiny_unet, names)
    return AttributionScorer(tiny_unet, ELBOEstimator(tiny_scheduler, ELBOConfig(stride=stride)), list(names), list(names))


def run_adapter_names_as_models(monkeypatch) -> None:
    """Make the "model" each adapter runs its name (``None``: the base), for designed ``packed_terms``.

    The tiny UNet's adapters are plain LoRA in float32, so ``strategy="auto"`` runs ``"merged"``.
    """
    monkeypatch.setattr(MergedStrategy, "model", lambda self, adapter: contextlib.nullcontext(adapter))
