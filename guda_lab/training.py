"""Train the base diffusion model (``guda train``) and, with the same recipe, leave-one-group-out models.

The result is a stock ``DDPMPipeline`` directory: ``DDPMPipeline.from_pretrained(path)`` loads it
without diffusers-guda installed. A text-conditioned recipe (:mod:`diffusers_guda.text_model`) goes
through the same loop and gives a pixel-space text-to-image pipeline directory.

A recipe with ``"scheduler": "flow"`` trains a rectified-flow model instead (the noise process of
Stable Diffusion 3 and Flux, docs/method.md#flow-matching-models): its pipeline holds a
``FlowMatchEulerDiscreteScheduler``, whose Euler sampler the same pipeline classes run unchanged.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_guda.data import GroupedDataset
from diffusers_guda.diffusion import NoiseSchedule
from diffusers_guda.errors import ConfigError
from diffusers_guda.io_utils import atomic_directory
from diffusers_guda.models import denoise
from diffusers_guda.validation import check_types

from .training_checkpoint import TrainingCheckpoint, data_identity, partial_dir

TRAIN_LOG_NAME = "guda_train.json"
#: The noise processes a recipe's ``scheduler`` field names.
SCHEDULERS = ("ddpm", "flow")
#: The fields only one of them reads (``scheduler`` itself counts as flow's). :meth:`TrainConfig.to_dict`
#: leaves out the other one's, so a DDPM recipe records exactly what it recorded before flow matching existed.
SCHEDULER_FIELDS = {"ddpm": ("beta_schedule", "prediction_type"), "flow": ("scheduler", "shift")}


@dataclass
class TrainConfig:
    """Recipe of the base model: a small ``UNet2DModel`` with a DDPM scheduler, trained on ε-MSE, or
    with ``scheduler="flow"`` a rectified-flow model trained on the velocity ``ε - x0``.

    The defaults are the digits recipe (`digits-ddpm`, see docs/formats.md#recipes).
    """

    block_out_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata={"help": "Channels per UNet level."})
    layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per UNet level."})
    attention: bool = field(default=False, metadata={"help": "Use attention blocks at the lowest level."})
    norm_num_groups: int = field(default=32, metadata={"help": "GroupNorm groups (must divide every channel count)."})
    num_train_timesteps: int = field(default=1000, metadata={"help": "Diffusion steps T."})
    scheduler: str = field(default="ddpm", metadata={"help": "'ddpm' (DDPMScheduler) or 'flow' (FlowMatchEulerDiscreteScheduler)."})
    beta_schedule: str = field(default="linear", metadata={"help": "DDPM: diffusers beta schedule."})
    prediction_type: str = field(default="epsilon", metadata={"help": "DDPM: epsilon, v_prediction or sample."})
    shift: float = field(default=1.0, metadata={"help": "Flow: the scheduler's σ shift (1 = none; Stable Diffusion 3 uses 3)."})
    steps: int = field(default=4000, metadata={"help": "Optimiser steps."})
    batch_size: int = field(default=64, metadata={"help": "Images per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps before cosine decay."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    ema_decay: float = field(default=0.0, metadata={"help": "Keep an exponential moving average of the weights with this decay and save it (0 = off)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, batches and noise."})

    def __post_init__(self):
        check_types(self, ints=("layers_per_block", "norm_num_groups", "num_train_timesteps", "steps", "batch_size", "warmup_steps", "seed"),
                    reals=("learning_rate", "weight_decay", "ema_decay", "shift"))
        self.block_out_channels = tuple(self.block_out_channels)
        self._check_scheduler()
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry; {bad} do not.")

    def _check_scheduler(self) -> None:
        """Refuse an unknown scheduler, and a setting of the other scheduler changed from its default."""
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}.")
        if not self.shift > 0:
            raise ConfigError(f"shift must be > 0, got {self.shift}.")
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        other = "flow" if self.scheduler == "ddpm" else "ddpm"
        changed = [name for name in SCHEDULER_FIELDS[other] if name != "scheduler" and getattr(self, name) != defaults[name]]
        if changed:
            raise ConfigError(f"{changed} {'is a setting' if len(changed) == 1 else 'are settings'} of the {other} scheduler; "
                              f"this recipe trains with scheduler {self.scheduler!r}.")

    @property
    def is_flow(self) -> bool:
        """Whether this recipe trains a flow-matching model."""
        return self.scheduler == "flow"

    def _check_image_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(channels, size, levels)`` of a square image size the UNet's levels can halve."""
        channels, height, width = image_shape
        if height != width:
            raise ConfigError(f"Images must be square for the UNet; got {height}x{width}.")
        levels = len(self.block_out_channels)
        if height % (2 ** (levels - 1)):
            raise ConfigError(f"Image size {height} is not divisible by 2^{levels - 1} for {levels} UNet levels; use fewer levels or another size.")
        return channels, height, levels

    def build_unet(self, image_shape: tuple[int, int, int]) -> UNet2DModel:
        channels, height, levels = self._check_image_shape(image_shape)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if self.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        return UNet2DModel(
            sample_size=height,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=self.norm_num_groups,
        )

    def build_pipeline(self, image_shape: tuple[int, int, int]):
        """The untrained pipeline (here a ``DDPMPipeline``); seeds are set by the caller."""
        return DDPMPipeline(unet=self.build_unet(image_shape), scheduler=self.build_scheduler())

    def training_conditioning(self, pipeline, dataset: GroupedDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the UNet is conditioned on per training image: ``None`` for an unconditional model, else
        ``(table [P, L, D], index [N])`` (the conditioning of image ``i`` is ``table[index[i]]``)."""
        return None

    def build_scheduler(self) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
        if self.is_flow:
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=True,
        )

    def to_dict(self) -> dict:
        """The settings as JSON values, without the fields of the scheduler it does not use."""
        data = asdict(self)
        data["block_out_channels"] = list(self.block_out_channels)
        for name in SCHEDULER_FIELDS["flow" if self.scheduler == "ddpm" else "ddpm"]:
            del data[name]
        return data


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def trained_on(log: dict, dataset: GroupedDataset) -> bool:
    """Whether a model whose ``guda_train.json`` is ``log`` was trained on ``dataset``'s images and prompts.

    A log written before the data were recorded in it cannot be checked and counts as a match.
    """
    return "data" not in log or log["data"] == data_identity(dataset)


def train_base_model(
    dataset: GroupedDataset,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    description: str = "train",
    extra_log: dict | None = None,
    device: str | torch.device = "cpu",
    checkpoint_every: int | None = 100,
) -> DiffusionPipeline:
    """Train the recipe's model on every image of ``dataset``.

    A :class:`TrainConfig` trains a ``UNet2DModel`` + ``DDPMScheduler`` or ``FlowMatchEulerDiscreteScheduler`` (a ``DDPMPipeline``); a
    :class:`~diffusers_guda.text_model.TextTrainConfig` a text-conditioned pixel-space UNet on each
    image's prompt, with a frozen text encoder (a
    :class:`~diffusers_guda.pipelines.text_to_image.TextToImageDDPMPipeline`). Same loop, seeds and
    draws for both.

    Args:
        dataset: Training images (groups are ignored: the model sees all of them).
        config: Recipe; defaults to :class:`TrainConfig`.
        output_dir: If given, the pipeline is saved there atomically with ``save_pretrained``
            together with ``guda_train.json`` (recipe, seed, the data's digests, loss log, wall time).
        progress: Show a progress bar.
        description: Progress-bar label.
        extra_log: Extra fields for ``guda_train.json`` (e.g. the group left out).
        device: Where to train (``"cuda"`` on a GPU). Batches, noise and timesteps are drawn on the
            CPU generator, so every device sees the same draws; results still differ by floating point.
        checkpoint_every: With ``output_dir``, save the loop's state every this many steps in
            ``.<output_dir>-partial/`` beside it (:mod:`guda_lab.training_checkpoint`); a rerun of the
            same recipe on the same data continues from there to a bit-identical model, and the
            checkpoint is deleted once the model is saved. ``None``: no checkpoints.

    Returns:
        The trained pipeline (UNet in eval mode).
    """
    config = config or TrainConfig()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    pipeline = config.build_pipeline(dataset.image_shape)
    checkpoint = None
    data = data_identity(dataset) if output_dir is not None else None  # hashes every image: once, for checkpoint and log
    if output_dir is not None and checkpoint_every is not None:
        identity = {"config": config.to_dict(), **data, **(extra_log or {})}
        checkpoint = TrainingCheckpoint(partial_dir(output_dir), identity, every=checkpoint_every)
    losses, wall = _fit(pipeline, dataset, config, generator, device, progress, description, checkpoint)
    if output_dir is not None:
        log = {
            "config": config.to_dict(),
            "seed": config.seed,
            "num_images": len(dataset),
            "data": data,
            "groups": dataset.group_names,
            "wall_s": wall,
            "loss_every_50_steps": [sum(losses[i : i + 50]) / len(losses[i : i + 50]) for i in range(0, len(losses), 50)],
            "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            **(extra_log or {}),
        }
        with atomic_directory(output_dir, marker="model_index.json") as tmp:
            pipeline.save_pretrained(tmp)
            (tmp / TRAIN_LOG_NAME).write_text(json.dumps(log, indent=2) + "\n")
        if checkpoint is not None:
            checkpoint.remove()
    return pipeline


def _fit(pipeline, dataset: GroupedDataset, config: TrainConfig, generator, device, progress: bool, description: str,
         checkpoint: TrainingCheckpoint | None = None) -> tuple[list[float], float]:
    """Train ``pipeline.unet`` in place on ε-MSE (or its prediction type's target); return the loss of
    every step and the loop's wall time (with the time before a checkpoint it continued from).

    Each image's step ``t`` is uniform over the scheduler's ``T`` training steps: a DDPM timestep, or
    for flow matching one of the ``T`` training σ (uniform in σ without a shift, rectified flow's
    choice), given to the model as ``σ T`` as diffusers' pipelines do.
    """
    conditioning = config.training_conditioning(pipeline, dataset)
    if conditioning is not None:
        table, prompt_index = conditioning[0].to(device), conditioning[1]
    unet = pipeline.unet.to(device)
    # computed on the training device: the DDPM coefficients then match diffusers' add_noise bit for bit
    noise_schedule = NoiseSchedule(pipeline.scheduler, device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, config.steps, config.warmup_steps))
    images = dataset.images
    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params] if config.ema_decay > 0 else None
    first, losses, wall_before = (0, [], 0.0) if checkpoint is None else checkpoint.restore(params, ema, optimizer, schedule, generator)
    start = time.perf_counter()
    unet.train()
    bar = tqdm(range(first, config.steps), desc=description, disable=not progress, dynamic_ncols=True, initial=first, total=config.steps)
    for step in bar:
        idx = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), generator=generator)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        cond = None if conditioning is None else table[prompt_index[idx].to(device)]
        pred = denoise(unet, noise_schedule.add_noise(x0, noise, t), noise_schedule.model_timesteps(t), cond)
        loss = torch.nn.functional.mse_loss(pred, noise_schedule.target(x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            decay = min(config.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if checkpoint is not None and (step + 1) % checkpoint.every == 0 and step + 1 < config.steps:
            checkpoint.save(step + 1, params, ema, optimizer, schedule, generator, losses, wall_before + time.perf_counter() - start)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    unet.eval()
    return losses, wall_before + time.perf_counter() - start
