"""Content hashes: image hashes for common random numbers, base-model fingerprints."""

from __future__ import annotations

import hashlib
import json
import struct

import torch

_LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit patterns
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def image_content_hash(image: torch.Tensor) -> int:
    """A 63-bit hash of one image's float32 values and shape.

    Two images with the same pixels get the same hash wherever they sit in a batch, so the noise
    drawn for them (see :mod:`diffusers_guda.elbo`) does not depend on the batch.

    Args:
        image: One image (any shape, any dtype; hashed as float32 on the CPU).

    Returns:
        A non-negative int below ``2**63``.
    """
    return int.from_bytes(bytes.fromhex(image_content_digest(image))[:8], "little") >> 1


def image_content_digest(image: torch.Tensor) -> str:
    """The SHA-256 (64 hex digits) of one image's float32 values and shape; :func:`image_content_hash` is its first 63 bits.

    Args:
        image: One image (any shape, any dtype; hashed as float32 on the CPU).
    """
    image = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256()
    digest.update(struct.pack(f"<{image.dim()}q", *image.shape))
    digest.update(image.numpy().reshape(-1))  # the buffer itself: no copy of a large image
    return digest.hexdigest()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (unlike Python's salted ``hash``).

    Args:
        *parts: Ints and strings, e.g. ``("guda-unlearn", seed, group, name)``; their ``str`` forms are hashed.

    Returns:
        A non-negative int below ``2**63``, usable with ``torch.Generator().manual_seed``.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights, with peft's LoRA tensors removed and wrapper names undone.

    Args:
        model: A model, with or without peft LoRA layers.

    Returns:
        Its state dict as it would be without LoRA layers (the tensors themselves, not copies).
    """
    state = {}
    for key, value in model.state_dict().items():
        if any(marker in key for marker in _LORA_MARKERS):
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def unet_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the base weights (names, dtypes, shapes, values), ignoring LoRA adapters.

    The fingerprint identifies the exact weights an adapter bundle was trained against. It depends
    on the dtype the weights are held in: a model loaded in float16 has another fingerprint than the
    same model in float32.

    Args:
        model: The UNet (LoRA layers, if any, are ignored).

    Returns:
        The 64-digit hex digest.
    """
    digest = hashlib.sha256()
    _update_with_weights(digest, model)
    return digest.hexdigest()


def _update_with_weights(digest, model: torch.nn.Module) -> None:
    for key, value in sorted(base_state_dict(model).items()):
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(_tensor_bytes(value))


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over a model's config and its weights (as :func:`unet_fingerprint`), e.g. a VAE's.

    The config's public entries (not ``_name_or_path``, ``_diffusers_version``...) are hashed as sorted
    JSON, so the same model loaded from another path has the same fingerprint.

    Args:
        model: A diffusers model (its ``config``, if any, is included).

    Returns:
        The 64-digit hex digest.
    """
    config = {k: v for k, v in dict(getattr(model, "config", None) or {}).items() if not str(k).startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(type(model).__name__.encode())
    _update_with_weights(digest, model)
    return digest.hexdigest()
