"""Helpers of the denoising-loss baseline tests: a smaller training set and a UNet's weights before and after."""

from __future__ import annotations

import torch

from diffusers_guda import GroupedDataset


def small_dataset(tiny_dataset: GroupedDataset, per_group: int = 3) -> GroupedDataset:
    keep = torch.cat([torch.nonzero(tiny_dataset.group_ids == g).flatten()[:per_group] for g in range(3)])
    return GroupedDataset(tiny_dataset.images[keep], tiny_dataset.group_ids[keep], tiny_dataset.group_names)


def weights(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def unchanged(unet, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
