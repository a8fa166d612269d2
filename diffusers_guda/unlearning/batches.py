"""The random batch of each unlearning step: forget and retain images with their timesteps and noise."""

from __future__ import annotations

import torch

from ..data import GroupedDataset
from ..objectives import NoiseSchedule, UnlearningBatch
from .config import UnlearningConfig
from .forwards import Forward, UNetForwards
from .shared_draws import SharedDraws


def draw_batch(
    dataset: GroupedDataset,
    group: int,
    forget_idx: torch.Tensor,
    retain_idx: torch.Tensor,
    generator: torch.Generator,
    config: UnlearningConfig,
    schedule: NoiseSchedule,
    forwards: UNetForwards,
    teacher: Forward,
    shared: SharedDraws | None = None,
) -> UnlearningBatch:
    """Draw one step's batch from ``generator``.

    The draws come in a fixed order (forget images, retain images, then the forget timesteps and
    noise, then the retain ones), so a group's batches depend only on its seed. With ``shared``,
    each image's row is one of its shared draws instead (picked in the same order), and the batch's
    ``teacher_output`` looks the teacher's outputs up there.

    Args:
        dataset: The grouped training set.
        group: The group being unlearned.
        forget_idx: The indices of the group's images.
        retain_idx: The indices of the other images.
        generator: The group's generator.
        config: The unlearning settings (batch sizes).
        schedule: The noise schedule.
        forwards: The UNet's forwards: the batch's ``model``, and the text embeddings.
        teacher: The base model's forward.
        shared: The run's shared draws (``config.shared_draws``), or ``None`` for fresh draws.

    Returns:
        The batch, on the UNet's device.
    """
    device = forwards.device
    fi = forget_idx[torch.randint(0, len(forget_idx), (config.forget_batch_size,), generator=generator)]
    ri = retain_idx[torch.randint(0, len(retain_idx), (config.retain_batch_size,), generator=generator)]
    shape = dataset.image_shape
    if shared is None:
        fd = rd = None
        sampling = config.timestep_sampling
        ft, fn = schedule.draw_timesteps(len(fi), generator, sampling), torch.randn((len(fi), *shape), generator=generator)
        rt, rn = schedule.draw_timesteps(len(ri), generator, sampling), torch.randn((len(ri), *shape), generator=generator)
    else:
        fd, rd = shared.pick(fi, generator), shared.pick(ri, generator)
        (ft, fn), (rt, rn) = shared.rows(fi, fd), shared.rows(ri, rd)
    return UnlearningBatch(
        forget_x0=dataset.images[fi].to(device),
        forget_index=fi,
        forget_t=ft.to(device),
        forget_noise=fn.to(device),
        retain_x0=dataset.images[ri].to(device),
        retain_index=ri,
        retain_t=rt.to(device),
        retain_noise=rn.to(device),
        model=forwards,
        teacher=teacher,
        schedule=schedule,
        generator=generator,
        forget_cond=forwards.cond(dataset, fi),
        retain_cond=forwards.cond(dataset, ri),
        forget_prompts=[dataset.prompts[i] for i in fi.tolist()] if dataset.prompts is not None else None,
        retain_prompts=[dataset.prompts[i] for i in ri.tolist()] if dataset.prompts is not None else None,
        encode_prompts=forwards.encode_prompts,
        group=group,
        forget_draw=fd,
        retain_draw=rd,
        shared_draws=shared,
    )
