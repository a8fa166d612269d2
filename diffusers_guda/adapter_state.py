"""Which adapters a UNet runs with: the base model, one group's adapter, or one adapter per row.

Every part of the package that switches adapters (scoring, unlearning's teacher and loss
evaluation, the pipeline after a bundle is loaded) goes through this module: :func:`use_adapters` restores the UNet's
previous adapter state on exit, so a pipeline keeps generating with the full model whatever ran
before; :func:`switch_adapters` is the lasting switch (e.g. to the full model after loading).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from .errors import ConfigError

BASE_ROWS = "__base__"  # peft's adapter name for rows of a mixed batch that take no adapter


def loaded_adapters(unet) -> list[str]:
    """Names of the adapters loaded in ``unet`` (empty for a UNet without any)."""
    return list(getattr(unet, "peft_config", None) or {})


def adapter_state(unet) -> tuple[list[str], bool] | None:
    """The active adapters and whether adapters are disabled (``None`` for a UNet without LoRA layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            active = module.active_adapter
            return ([active] if isinstance(active, str) else list(active)), bool(module.disable_adapters)
    return None


def restore_adapter_state(unet, state: tuple[list[str], bool] | None) -> None:
    """Put back a state read by :func:`adapter_state` (adapters deleted since are skipped)."""
    if state is None or not loaded_adapters(unet):
        return
    active, disabled = state
    active = [a for a in active if a in unet.peft_config]
    if active:
        unet.set_adapter(active)
    if disabled:
        unet.disable_adapters()
    else:
        unet.enable_adapters()


def check_loaded(unet, names: Sequence[str | None]) -> None:
    """Refuse adapter ``names`` (``None``: the base model) that are not loaded in ``unet``.

    Raises:
        ConfigError: naming the adapters that are missing.
    """
    # peft runs an unknown name as the base model without a word: refuse it here
    loaded = set(loaded_adapters(unet))
    missing = sorted({n for n in names if n is not None and n not in loaded})
    if missing:
        raise ConfigError(f"Adapters {missing} are not loaded in the UNet; load the bundle first (pipe.load_guda_bundle).")


def switch_adapters(unet: torch.nn.Module, adapter: str | None) -> None:
    """Leave ``unet`` running as the base model (``None``) or as the base plus ``adapter``.

    The switch lasts until the next one; prefer :func:`use_adapters`, which undoes it on exit.

    Raises:
        ConfigError: ``adapter`` is not loaded in the UNet.
    """
    check_loaded(unet, [adapter])
    if adapter is None:
        # LoRA layers whose adapters were all deleted compute the base model already (and diffusers
        # refuses to disable adapters when none is loaded)
        if loaded_adapters(unet):
            unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(adapter)


@contextlib.contextmanager
def _per_row(unet, names: Sequence[str | None]) -> Iterator[None]:
    """peft's mixed adapter batches: diffusers' UNets do not pass ``adapter_names`` down to the LoRA
    layers, so a forward pre-hook on every LoRA layer injects it."""
    from peft.tuners.lora import LoraLayer

    if BASE_ROWS in loaded_adapters(unet):
        raise ConfigError(f"An adapter may not be named {BASE_ROWS!r}: peft reserves it for rows without adapter.")
    row_names = [BASE_ROWS if n is None else n for n in names]

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = row_names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def use_adapters(unet: torch.nn.Module, adapters: str | None | Sequence[str | None]) -> Iterator[torch.nn.Module]:
    """Run ``unet`` as the base model, as one adapter, or with one adapter per row, then restore its state.

    Args:
        unet: A UNet that may hold peft LoRA adapters.
        adapters: ``None`` for the base model (adapters disabled), an adapter name for the base plus
            that adapter, or a sequence with one adapter name (or ``None``) per row of every forward
            in the block.

    Yields:
        ``unet`` itself.

    Raises:
        ConfigError: a name that is not loaded in the UNet.
    """
    previous = adapter_state(unet)
    per_row = adapters is not None and not isinstance(adapters, str)
    names = list(adapters) if per_row else [adapters]
    check_loaded(unet, names)
    try:
        if per_row:
            unet.enable_adapters()
        else:
            switch_adapters(unet, adapters)
        with _per_row(unet, names) if per_row else contextlib.nullcontext():
            yield unet
    finally:
        restore_adapter_state(unet, previous)
