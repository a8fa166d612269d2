"""Adapter bundles: one LoRA adapter per group, a JSON manifest and a model card
(see docs/formats.md#adapter-bundles).

A bundle is a directory, laid out the same way on disk and on the Hub::

    guda_bundle.json                                   manifest: base model, groups, LoRA, objective...
    adapters/<slug>/pytorch_lora_weights.safetensors   diffusers' own LoRA file format, one per group
    README.md                                          model card

Adapter ``k`` is the base model with group ``k`` unlearned. Loading reads only JSON and safetensors,
validates the manifest and checks the base model's fingerprint before any adapter touches a UNet.

The modules: :mod:`.adapter_bundle` (the :class:`AdapterBundle`), :mod:`.manifest` (group records,
manifest content and validation), :mod:`.files` (writing and safely reading a bundle directory),
:mod:`.card` (model card), :mod:`.hub` (local directories and Hub repos), :mod:`.layout` (file
names) and :mod:`.slugs` (group names as directory names).
"""

from .adapter_bundle import AdapterBundle
from .card import CARD_TAGS
from .layout import ADAPTERS_DIR, CARD_NAME, MANIFEST_NAME, adapter_file_for, is_local_bundle
from .manifest import FORMAT_VERSION, GroupRecord
from .slugs import MAX_SLUG_LENGTH, slugify, unique_slugs

__all__ = [
    "ADAPTERS_DIR",
    "AdapterBundle",
    "CARD_NAME",
    "CARD_TAGS",
    "FORMAT_VERSION",
    "GroupRecord",
    "MANIFEST_NAME",
    "MAX_SLUG_LENGTH",
    "adapter_file_for",
    "is_local_bundle",
    "slugify",
    "unique_slugs",
]
