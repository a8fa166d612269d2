"""Finished stages of the demo and the evaluation, found in their output directory and reused: the
base model (same training config, same images), the adapter bundle (same base, same unlearning
settings), and the record of the data an evaluation directory was made from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from diffusers_guda.bundle import MANIFEST_NAME, AdapterBundle
from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import BundleError, CheckpointMismatchError, ConfigError
from diffusers_guda.io_utils import write_json_atomic
from diffusers_guda.objectives import get_objective
from diffusers_guda.recipes import Recipe
from diffusers_guda.unlearning import UnlearningCheckpoint

from .training import TRAIN_LOG_NAME, TrainConfig, trained_on

#: Where the finished groups of an unfinished bundle wait, next to ``bundle/``.
PARTIAL_BUNDLE = ".bundle-partial"
#: The record of the data an evaluation directory was made from.
DATA_RECORD = "data.json"


def data_record(dataset: GroupedDataset) -> dict:
    """What an evaluation's stages depend on in ``dataset``: its digests (:meth:`GroupedDataset.content_digests`) and group names."""
    return {**dataset.content_digests(), "groups": list(dataset.group_names)}


def check_data_record(out_dir: Path, dataset: GroupedDataset) -> None:
    """Refuse an output directory made from other data; record the data of a new one.

    Every finished stage in ``out_dir`` (base, adapters, LOGO models, queries, scores) is reused on a
    rerun, so a rerun on changed images, prompts or groups would mix results of two datasets. A
    directory made before the record existed is trusted and gets one.

    Raises:
        ConfigError: if ``out_dir`` was made from other images, prompts or groups (nothing is written).
    """
    path, record = out_dir / DATA_RECORD, data_record(dataset)
    if not path.is_file():
        write_json_atomic(path, record)
        return
    recorded = json.loads(path.read_text())
    if recorded == record:
        return
    if any(recorded.get(key) != record[key] for key in ("images", "prompts")):
        raise ConfigError(f"{out_dir} was made from other images or prompts than these (or from these in another order); "
                          "choose another --out, or delete that directory to start over.")
    raise ConfigError(f"{out_dir} was made with other groups of these images; choose another --out (copy its base/, queries/ and "
                      "queries.json into it to reuse the base model and the queries), or delete that directory to start over.")


def reusable_base(path: Path, train: TrainConfig, dataset: GroupedDataset) -> bool:
    """Whether ``path`` holds a base model trained with ``train`` on ``dataset``'s images and prompts."""
    log = path / TRAIN_LOG_NAME
    if not log.is_file():
        return False
    recorded = json.loads(log.read_text())
    return recorded.get("config") == train.to_dict() and trained_on(recorded, dataset)


def reusable_bundle(path: Path, fingerprint: str, recipe: Recipe, device: torch.device | str) -> AdapterBundle | None:
    """The bundle at ``path`` if it was unlearned from this base with ``recipe.unlearning`` as run on
    ``device`` (where ``"auto"`` settings resolve), else ``None``.

    The ELBO settings are not compared: a reused bundle may record other ones than ``recipe.elbo``,
    so its scores are computed with ``elbo_config=recipe.elbo``.
    """
    if not (path / MANIFEST_NAME).is_file():
        return None
    try:
        bundle = AdapterBundle.from_pretrained(path, expected_fingerprint=fingerprint)
    except BundleError:
        return None
    wanted = recipe.unlearning.for_device(device)
    objective = get_objective(wanted.objective, wanted.objective_options)
    # a bundle made before a setting existed was made with that setting's default
    try:
        made = get_objective(bundle.objective["name"], bundle.objective["config"]).config.to_dict()
    except (ConfigError, KeyError, TypeError):  # an objective or setting this version does not know
        return None
    same = bundle.objective["name"] == wanted.objective and made == objective.config.to_dict() and bundle.lora == wanted.lora.to_dict()
    defaults = type(wanted)().to_dict()
    same = same and all(bundle.training.get(k, defaults[k]) == v for k, v in wanted.to_dict().items()
                        if k not in ("objective", "objective_options", "lora"))
    return bundle if same else None


def unlearn_bundle(pipe, dataset: GroupedDataset, recipe: Recipe, out_dir: Path, *, progress: bool = True,
                   log=print) -> tuple[AdapterBundle, list[str]]:
    """Unlearn every group of ``dataset`` with ``recipe`` from the base at ``out_dir/base`` and save the
    bundle to ``out_dir/bundle`` (it records ``recipe.elbo``); ``(bundle, names of the groups resumed)``.

    The finished groups wait in ``out_dir/.bundle-partial`` meanwhile, and an interrupted run resumes
    from them. Groups left there by a run with other settings, data or base model are deleted first
    (and ``log`` says so): they are this directory's own leftovers, not a user's.
    """
    partial = out_dir / PARTIAL_BUNDLE
    resumed = UnlearningCheckpoint(partial).finished_groups(dataset.group_names)

    def run():
        return pipe.unlearn_groups(dataset, recipe=recipe, checkpoint_dir=partial, base_model_id=str(out_dir / "base"), progress=progress)

    try:
        bundle = run()
    except CheckpointMismatchError:  # raised before any group is trained
        log(f"deleting {partial}: its groups were unlearned with other settings, data or base model")
        shutil.rmtree(partial)
        resumed = []
        bundle = run()
    bundle.save_pretrained(out_dir / "bundle")
    shutil.rmtree(partial, ignore_errors=True)
    return bundle, resumed
