"""LoRA settings and the diffusers LoRA file format used for every group's adapter.

An adapter file is exactly what a pipeline's ``save_lora_weights`` writes: tensor keys prefixed with
the denoiser's name (``unet.`` for a UNet, ``transformer.`` for Stable Diffusion 3's or Flux's
transformer; :func:`lora_prefix`), and the peft ``LoraConfig`` stored as JSON in the safetensors
metadata under ``lora_adapter_metadata`` (its keys prefixed the same way). Stock diffusers therefore
reads it with ``pipe.load_lora_weights(...)`` or ``model.load_lora_adapter(..., prefix="unet")``
(``prefix="transformer"``).
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from .errors import BundleError, ConfigError
from .validation import is_kind

LORA_METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet"
TRANSFORMER_PREFIX = "transformer"
ADAPTER_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

DEFAULT_TARGET_MODULES = ("conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoRASettings:
    """Shape of each group's LoRA adapter.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / rank``.
        target_modules: Module-name suffixes to wrap. The default covers ResNet convolutions, the
            time-embedding projection and attention projections of diffusers UNets; names absent
            from a model (e.g. attention in an attention-free UNet) are skipped.
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (scale = alpha / rank)."})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES, metadata={"help": "Module-name suffixes to adapt."}
    )

    def __post_init__(self):
        if not is_kind(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {self.rank!r}.")
        if not is_kind(self.alpha, float) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}.")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"LoRA target_modules must be a non-empty list of module names, got {targets!r}.")
        self.target_modules = tuple(targets)

    def to_peft(self, model: torch.nn.Module | None = None) -> LoraConfig:
        """The peft ``LoraConfig``; with ``model``, restricted to the target names it contains.

        Raises:
            ConfigError: if ``model`` contains none of the target modules.
        """
        targets = list(self.target_modules)
        if model is not None:
            names = {name for name, _ in model.named_modules()}
            targets = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
            if not targets:
                raise ConfigError(
                    f"None of the LoRA target modules {list(self.target_modules)} exist in "
                    f"{type(model).__name__}; pass target_modules that name its layers."
                )
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=targets,
            init_lora_weights=True,
        )

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (as recorded in a bundle's ``lora`` field)."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LoRASettings":
        """The settings of a dict written by :meth:`to_dict` (a recipe's or a manifest's ``lora``).

        Raises:
            ConfigError: not a dict, unknown fields, or a value of the wrong type.
        """
        known = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise ConfigError(f"lora must be a JSON object such as {{\"rank\": 8, \"alpha\": 8}}, got {data!r}.")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"lora has unknown field(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)


def lora_prefix(model: torch.nn.Module | str) -> str:
    """The key prefix of a denoiser's LoRA weights in diffusers' files: ``"transformer"`` for a
    transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``), else ``"unet"``.

    Args:
        model: The denoiser, or its class name (as a bundle's ``base_model.class_name`` records it).
    """
    name = model if isinstance(model, str) else type(model).__name__
    return TRANSFORMER_PREFIX if "Transformer" in name else UNET_PREFIX


def adapter_state_dict(unet: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors in diffusers' key format, prefixed with ``unet.`` (``transformer.``), copied to CPU.

    Args:
        unet: The denoiser holding the adapter.
        adapter_name: The peft adapter name.

    Returns:
        Key -> contiguous CPU copy of the tensor.
    """
    prefix = lora_prefix(unet)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def peft_config_metadata(unet: torch.nn.Module, adapter_name: str) -> dict:
    """The adapter's ``LoraConfig`` as a JSON-able dict with ``unet.``- (``transformer.``-) prefixed keys (diffusers' layout).

    Args:
        unet: The denoiser holding the adapter.
        adapter_name: The peft adapter name.
    """
    prefix = lora_prefix(unet)
    config = unet.peft_config[adapter_name].to_dict()
    out = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        out[f"{prefix}.{key}"] = value
    return out


def save_adapter_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config_metadata: dict) -> None:
    """Write one adapter as a diffusers LoRA safetensors file.

    Args:
        path: The ``.safetensors`` file to write.
        state_dict: The adapter's tensors (:func:`adapter_state_dict`).
        config_metadata: Its config (:func:`peft_config_metadata`), stored as JSON in the file's metadata.
    """
    metadata = {"format": "pt", LORA_METADATA_KEY: json.dumps(config_metadata, indent=2, sort_keys=True, default=list)}
    Path(path).write_bytes(canonical_safetensors(save(state_dict, metadata=metadata)))


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file with its JSON header written in sorted key order.

    safetensors writes the metadata in hash order, which varies from run to run; with a canonical
    header, equal tensors and metadata give equal bytes, so artifacts can be compared by hash.
    """
    size = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensor data stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(header)) + header + data[8 + size :]


def load_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter file written by :func:`save_adapter_file`; refuse anything but safetensors.

    Returns:
        ``(state_dict, config_metadata)``.

    Raises:
        BundleError: if the file is not a readable safetensors file, lacks the LoRA metadata, or holds
            integer or non-finite weights.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BundleError(f"Refusing to read {path}: adapters are only loaded from .safetensors files.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(
            f"Adapter file {path} is corrupted or not a safetensors file ({exc}). "
            "Re-download the bundle or re-run `guda unlearn` for this group."
        ) from exc
    if LORA_METADATA_KEY not in metadata:
        raise BundleError(f"Adapter file {path} has no '{LORA_METADATA_KEY}' metadata; it was not written by diffusers-guda or diffusers.")
    try:
        config = json.loads(metadata[LORA_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise BundleError(f"Adapter file {path} has unreadable LoRA metadata: {exc}.") from exc
    prefixes = {k.partition(".")[0] for k in state}
    bad = [k for k in state if k.partition(".")[0] not in (UNET_PREFIX, TRANSFORMER_PREFIX) or "lora_" not in k]
    if bad or len(prefixes) > 1:
        example = bad[0] if bad else sorted(state)[0]
        raise BundleError(f"Adapter file {path} holds tensors that are not the LoRA weights of one UNet or transformer (e.g. {example!r}).")
    _check_values(path, state)
    return state, config


def _check_values(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse integer or non-finite adapter weights: they would score 0 or NaN without a word."""
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise BundleError(f"Adapter file {path}: {key} holds {tensor.dtype} values, not floating point; the file was altered. "
                              "Re-download the bundle or re-run `guda unlearn` for this group.")
        if not torch.isfinite(tensor).all():
            raise BundleError(f"Adapter file {path}: {key} holds NaN or infinite values; the file is corrupted. "
                              "Re-download the bundle or re-run `guda unlearn` for this group.")


def load_adapter_into(unet: torch.nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], config_metadata: dict) -> None:
    """Add ``state_dict`` to ``unet`` as adapter ``adapter_name`` through diffusers' own loader.

    An adapter already loaded under ``adapter_name`` is replaced. Loading leaves whether adapters are
    enabled as it was, and makes the new adapter the active one (diffusers' behaviour).

    Args:
        unet: A UNet or transformer with diffusers' ``PeftAdapterMixin``.
        adapter_name: The peft adapter name to load it under.
        state_dict: The adapter's tensors, keys prefixed with ``unet.`` or ``transformer.`` as fits
            ``unet`` (:func:`lora_prefix`; :func:`load_adapter_file`).
        config_metadata: Its ``LoraConfig`` metadata, keys prefixed the same way.

    Raises:
        BundleError: if a tensor names a layer the UNet does not have or has a shape that does not fit it
            (an adapter made for another architecture), before anything is added to or removed from the UNet.
    """
    _check_fits(unet, adapter_name, state_dict, config_metadata)
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(adapter_name)
    with warnings.catch_warnings():
        # peft warns whenever a model that already holds adapters gets another one
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.load_lora_adapter(
            dict(state_dict), adapter_name=adapter_name, prefix=lora_prefix(unet), metadata=dict(config_metadata)
        )


def _check_fits(unet: torch.nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], config_metadata: dict) -> None:
    """Refuse LoRA tensors whose layer is missing from ``unet`` or whose shape does not fit that layer."""
    modules, prefix = dict(unet.named_modules()), lora_prefix(unet)
    rank = None if config_metadata.get(f"{prefix}.rank_pattern") else config_metadata.get(f"{prefix}.r")
    for key, tensor in state_dict.items():
        if not key.startswith(f"{prefix}."):
            raise BundleError(
                f"Adapter {adapter_name!r} does not fit this {type(unet).__name__}: its weights are a {key.partition('.')[0]}'s "
                f"(e.g. {key!r}), not a {prefix}'s. Load it into a pipeline of the base model it was made for."
            )
        layer_name, _, param = key.removeprefix(f"{prefix}.").partition(".lora_")
        layer = modules.get(layer_name)
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        shape = tuple(tensor.shape)
        if weight is None:
            problem = f"{key} names no layer of this model"
        elif param.startswith(("A.", "B.")):
            is_a = param.startswith("A.")
            r = rank or (shape[0] if is_a else shape[1] if len(shape) > 1 else 0)
            expected = (r, *weight.shape[1:]) if is_a else (weight.shape[0], r, *(1,) * (weight.dim() - 2))
            if shape == expected:
                continue
            problem = f"{key} has shape {shape}, but this model's layer needs {expected}"
        else:
            continue
        raise BundleError(
            f"Adapter {adapter_name!r} does not fit this {type(unet).__name__}: {problem}. It was made for another "
            "model architecture (or the file was altered); re-run `guda unlearn` against this base model."
        )
