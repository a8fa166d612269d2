"""The loss before and after unlearning a group, on fixed images and (t, noise) draws never used for
training (the ``*_loss_before``/``*_loss_after`` statistics of docs/formats.md#manifest)."""

from __future__ import annotations

import torch

from ..data import GroupedDataset
from ..hashing import derive_seed
from ..models import Conditioning, map_conditioning
from ..objectives import NoiseSchedule
from .config import UnlearningConfig
from .forwards import UNetForwards

EvaluationSets = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning | None]]


def evaluation_sets(
    dataset: GroupedDataset,
    group: int,
    forget_idx: torch.Tensor,
    retain_idx: torch.Tensor,
    config: UnlearningConfig,
    schedule: NoiseSchedule,
    forwards: UNetForwards,
) -> EvaluationSets:
    """Fixed forget and retain images with their (t, noise) draws, the same for every run of ``group``.

    Args:
        dataset: The grouped training set.
        group: The group being unlearned.
        forget_idx: Its images' indices.
        retain_idx: The other images' indices.
        config: The unlearning settings (``seed``, ``eval_images``, ``eval_draws``).
        schedule: The noise schedule.
        forwards: The UNet's forwards (for the text embeddings of conditional UNets).

    Returns:
        ``{"forget": (x0, t, noise, cond), "retain": (...)}`` on the CPU, ``eval_draws`` rows per image.
    """
    generator = torch.Generator().manual_seed(derive_seed("guda-eval", config.seed, group))
    sets = {}
    for name, idx in (("forget", forget_idx), ("retain", retain_idx)):
        chosen = idx[torch.randperm(len(idx), generator=generator)[: config.eval_images]]
        x0 = dataset.images[chosen].repeat_interleave(config.eval_draws, dim=0)
        t = torch.randint(0, schedule.num_train_timesteps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        cond = forwards.cond(dataset, chosen.repeat_interleave(config.eval_draws))
        sets[name] = (x0, t, noise, map_conditioning(cond, torch.Tensor.cpu))
    return sets


@torch.no_grad()
def mean_losses(forwards: UNetForwards, schedule: NoiseSchedule, sets: EvaluationSets, chunk: int = 256) -> dict[str, float]:
    """The mean squared error of the UNet's prediction on each set, as the UNet is set up now.

    Args:
        forwards: The UNet's forwards.
        schedule: The noise schedule (noising and the prediction target).
        sets: From :func:`evaluation_sets`.
        chunk: Rows per forward.

    Returns:
        ``{"forget": float, "retain": float}``.
    """
    device = forwards.device
    out = {}
    for name, (x0, t, noise, cond) in sets.items():
        total = 0.0
        for s in range(0, len(x0), chunk):
            x, tt, n = x0[s : s + chunk].to(device), t[s : s + chunk].to(device), noise[s : s + chunk].to(device)
            rows = map_conditioning(cond, lambda v: v[s : s + chunk])
            pred = forwards(schedule.add_noise(x, n, tt), tt, rows).float()
            total += (pred - schedule.target(x, n, tt)).pow(2).mean(dim=tuple(range(1, x.dim()))).sum().item()
        out[name] = total / len(x0)
    return out
