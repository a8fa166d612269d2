"""Where things lie in a bundle directory, the same on disk and on the Hub (see docs/formats.md#adapter-bundles)::

    guda_bundle.json                                   manifest: base model, groups, LoRA, objective...
    adapters/<slug>/pytorch_lora_weights.safetensors   diffusers' own LoRA file format, one per group
    README.md                                          model card
"""

from __future__ import annotations

from pathlib import Path

from ..lora import ADAPTER_WEIGHT_NAME

MANIFEST_NAME = "guda_bundle.json"
ADAPTERS_DIR = "adapters"
CARD_NAME = "README.md"
# everything a bundle consists of; downloads fetch nothing else
BUNDLE_FILE_PATTERNS = (MANIFEST_NAME, CARD_NAME, f"{ADAPTERS_DIR}/**/*.safetensors")


def adapter_file_for(slug: str) -> str:
    """The bundle-relative path of a group's adapter file.

    Args:
        slug: The group's slug (see :func:`~diffusers_guda.bundle.slugify`).

    Returns:
        ``adapters/<slug>/pytorch_lora_weights.safetensors``.
    """
    return f"{ADAPTERS_DIR}/{slug}/{ADAPTER_WEIGHT_NAME}"


def is_local_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a local directory holding a bundle manifest.

    Args:
        path: Any path (or something that is not one: the answer is then ``False``).
    """
    try:
        return (Path(path) / MANIFEST_NAME).is_file()
    except (OSError, TypeError, ValueError):
        return False
