"""Leave-one-group-out (LOGO) ground truth: the base recipe retrained once without each group.

``LOGOA_k(x) = ELBO(x; full) - ELBO(x; trained without group k)``, computed with the same ELBO
draws as GUDA's scores. Each LOGO model is a pipeline directory of the base recipe (a stock
``DDPMPipeline``, or a text-to-image pipeline for a text-conditioned recipe),
``<out>/seed_<seed>/<slug>/``, written atomically under its own lock; a rerun keeps and skips
finished groups, and runs in several shells share the models between them.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from diffusers_guda.bundle import unique_slugs
from diffusers_guda.data import GroupedDataset
from diffusers_guda.distributed import ProcessInfo, current_process
from diffusers_guda.elbo import ELBOConfig, ELBOEstimator
from diffusers_guda.errors import ConfigError, OutputLockedError
from diffusers_guda.locks import OutputLock
from diffusers_guda.scoring import AttributionResult, score_models

from ..training import TRAIN_LOG_NAME, TrainConfig, train_base_model, trained_on

EXCLUDED_KEY = "excluded_group"


def logo_model_dir(output_dir: str | Path, seed: int, slug: str) -> Path:
    """Where the LOGO model of the group with ``slug`` and training ``seed`` lives."""
    return Path(output_dir) / f"seed_{seed}" / slug


def _finished(path: Path, config: TrainConfig, dataset: GroupedDataset, gid: int) -> bool:
    log = path / TRAIN_LOG_NAME
    if not log.is_file():
        return False
    recorded, group = json.loads(log.read_text()), dataset.group_names[gid]
    if recorded.get("config") != config.to_dict() or recorded.get(EXCLUDED_KEY) != group:
        raise ConfigError(
            f"{path} holds a LOGO model trained with other settings or for another group. "
            "Delete it or choose another output directory."
        )
    if not trained_on(recorded, dataset.without_group(gid)):
        raise ConfigError(
            f"{path} holds a LOGO model trained on other images or prompts than this dataset's without {group!r}. "
            "Delete it or choose another output directory."
        )
    return True


def _train_unless_taken(dataset: GroupedDataset, gid: int, config: TrainConfig, path: Path, wait: float, progress: bool, device) -> bool:
    """Train the LOGO model of group ``gid`` under its lock, unless it is finished by then.

    Returns ``False`` when another run still held the lock after ``wait`` seconds (it is training that model).
    """
    name = dataset.group_names[gid]
    try:
        lock = OutputLock(path, command=f"LOGO without {name}", timeout=wait).acquire()
    except OutputLockedError as exc:
        if exc.remote:
            raise
        return False
    with lock:
        if not _finished(path, config, dataset, gid):  # e.g. finished meanwhile by `guda logo --groups` in another shell
            train_base_model(dataset.without_group(gid), config, output_dir=path, progress=progress, description=f"LOGO without {name}",
                             extra_log={EXCLUDED_KEY: name}, device=device)
    return True


def train_logo_models(
    dataset: GroupedDataset,
    config: TrainConfig,
    output_dir: str | Path,
    groups: Sequence[int | str] | None = None,
    seed: int | None = None,
    progress: bool = True,
    log=print,
    process: ProcessInfo | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Path]:
    """Train one model per group on all the other groups, with the base model's recipe.

    Under ``torchrun`` or ``accelerate launch``, each process trains a contiguous share of the
    models still to train; a model does not depend on the process that trained it. Each model is
    trained under its own lock (``<slug>.lock`` beside it), so separate runs can share one
    ``output_dir``: a model another run is training is left to it, waited for at the end, and
    trained here only if that run stopped before finishing it.

    Args:
        dataset: The full training set.
        config: The base model's recipe (the same steps, schedule and seed for every LOGO model).
        output_dir: Root of the LOGO models.
        groups: Group ids or names to leave out (default: all).
        seed: Training seed; default the recipe's (seed A). Another seed gives the LOGO noise floor.
        progress: Show progress bars (on the main process only).
        log: Where to report skipped groups (on the main process only).
        process: This process of a launch; default :func:`~diffusers_guda.distributed.current_process`.
        device: Where to train (see :func:`~diffusers_guda.training.train_base_model`); default the
            process's device (its GPU under a launch on GPUs, else the CPU).

    Returns:
        Group name -> pipeline directory, in group order (on every process, once all are written).
    """
    process = current_process() if process is None else process
    config = replace(config, seed=config.seed if seed is None else seed)
    slugs = unique_slugs(dataset.group_names)
    group_ids = [dataset.group_index(g) for g in (groups if groups is not None else range(dataset.num_groups))]
    paths = {dataset.group_names[gid]: logo_model_dir(output_dir, config.seed, slugs[gid]) for gid in group_ids}
    process.check_same((config.to_dict(), dataset.group_names, dataset.group_sizes(), group_ids), "data or LOGO settings")
    # every process checks the existing models (so all raise alike); the main process's view is the one used
    finished = process.broadcast([gid for gid in group_ids if _finished(paths[dataset.group_names[gid]], config, dataset, gid)])
    for gid in group_ids:
        if gid in finished and process.is_main:
            log(f"LOGO without {dataset.group_names[gid]!r}: reusing {paths[dataset.group_names[gid]]}")
    device, show = process.device if device is None else device, progress and process.is_main
    taken = []  # models another run is training
    for gid in process.shard([gid for gid in group_ids if gid not in finished]):
        if not _train_unless_taken(dataset, gid, config, paths[dataset.group_names[gid]], 0, show, device):
            taken.append(gid)
    for gid in taken:  # another run is training these: wait for it, and train what it leaves unfinished
        if process.is_main:
            log(f"LOGO without {dataset.group_names[gid]!r}: another run is training it; waiting for it")
        _train_unless_taken(dataset, gid, config, paths[dataset.group_names[gid]], math.inf, show, device)
    process.barrier()
    return paths


def logo_attribution(
    full_unet: torch.nn.Module,
    logo_unets: dict[str, torch.nn.Module],
    scheduler,
    images: torch.Tensor,
    elbo_config: ELBOConfig | None = None,
    batch_size: int = 16,
    progress: bool = True,
    unet_kwargs: list[dict] | None = None,
) -> AttributionResult:
    """LOGO attributions of ``images``: the full model against each group's LOGO model, same draws.

    ``unet_kwargs``: per-image UNet inputs (e.g. ``{"encoder_hidden_states": [1, L, D]}``, the
    embeddings of each image's prompt for a text-conditioned model), the same for every model.
    """
    if not logo_unets:
        raise ConfigError("No LOGO models given.")
    estimator = ELBOEstimator(scheduler, elbo_config)
    models = [m.eval() for m in logo_unets.values()]
    return score_models(
        estimator, lambda: full_unet.eval(), [lambda m=m: m for m in models], list(logo_unets), images,
        batch_size=batch_size, progress=progress, metadata={"reference": "logo"}, unet_kwargs=unet_kwargs,
    )
