"""diffusers_guda.lora: the adapter file format."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load_file

from diffusers_guda.lora import LORA_METADATA_KEY, load_adapter_file, save_adapter_file


def test_equal_adapters_are_equal_files(tmp_path):
    """The header is canonical JSON (sorted keys), so equal tensors and metadata give equal bytes."""
    state = {"unet.down.lora_B.weight": torch.randn(4, 2), "unet.down.lora_A.weight": torch.randn(2, 4)}
    config = {"unet.r": 2, "unet.lora_alpha": 2.0, "unet.target_modules": ["down"]}
    paths = [tmp_path / f"{i}.safetensors" for i in range(8)]
    for path in paths:
        save_adapter_file(path, state, config)
    data = paths[0].read_bytes()
    assert all(p.read_bytes() == data for p in paths[1:])
    size = struct.unpack("<Q", data[:8])[0]
    assert size % 8 == 0
    header = data[8 : 8 + size].rstrip(b" ")
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    # still an ordinary safetensors file with diffusers' LoRA metadata
    loaded, metadata = load_adapter_file(paths[0])
    assert metadata == config and json.loads(json.loads(header)["__metadata__"][LORA_METADATA_KEY]) == config
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and load_file(paths[0]).keys() == state.keys()
