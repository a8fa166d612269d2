"""The resume directory of an unlearning run (see docs/formats.md#checkpoints-and-resume)::

    DIR/run.json                                    what the groups depend on
    DIR/<slug>/pytorch_lora_weights.safetensors     the group's adapter
    DIR/<slug>/stats.json                           its unlearning statistics (the manifest's ``stats``)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..bundle import unique_slugs
from ..errors import CheckpointMismatchError
from ..io_utils import atomic_directory, write_json_atomic
from ..lora import ADAPTER_WEIGHT_NAME, load_adapter_file, save_adapter_file

STATS_NAME = "stats.json"
RUN_NAME = "run.json"


class UnlearningCheckpoint:
    """The finished groups of an unlearning run, kept on disk so that a rerun skips them.

    Each group directory is written atomically, and a group counts as finished only when both of
    its files are there. Several processes may use one checkpoint at once.

    Args:
        directory: The checkpoint directory (created when needed).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"UnlearningCheckpoint({str(self.directory)!r})"

    def check_run(self, run: dict) -> None:
        """Record what the groups depend on, or check that it matches what is recorded.

        Args:
            run: A JSON-able record of what the groups depend on: the base model's fingerprint, the
                unlearning settings, the group names and sizes.

        Raises:
            CheckpointMismatchError: if the checkpoint holds groups unlearned with another record.
        """
        marker = self.directory / RUN_NAME
        if marker.exists():
            previous = json.loads(marker.read_text())
            if previous != json.loads(json.dumps(run)):
                raise CheckpointMismatchError(
                    f"{self.directory} holds groups unlearned with other settings, data or base model. "
                    "Delete it, or rerun with the settings it was started with."
                )
        else:
            # several processes may get here at once: each writes the same content, atomically
            write_json_atomic(marker, run)

    def finished_groups(self, group_names: list[str]) -> list[str]:
        """The names among ``group_names`` (a dataset's groups, in order) whose adapters are finished here."""
        return [name for name, slug in zip(group_names, unique_slugs(group_names)) if self.is_finished(slug)]

    def is_finished(self, slug: str) -> bool:
        """Whether the group with this slug is finished (both its files are there)."""
        # both files: a kill while the checkpoint of a finished run is deleted can leave either alone
        done = self.directory / slug
        return (done / STATS_NAME).is_file() and (done / ADAPTER_WEIGHT_NAME).is_file()

    def load(self, slug: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """A finished group's ``(state_dict, config_metadata, stats)``.

        Raises:
            BundleError: if its adapter file is corrupted.
        """
        done = self.directory / slug
        state, metadata = load_adapter_file(done / ADAPTER_WEIGHT_NAME)
        return state, metadata, json.loads((done / STATS_NAME).read_text())

    def save(self, slug: str, state: dict[str, torch.Tensor], metadata: dict, stats: dict) -> None:
        """Write a finished group's adapter and statistics, atomically."""
        with atomic_directory(self.directory / slug) as tmp:
            save_adapter_file(tmp / ADAPTER_WEIGHT_NAME, state, metadata)
            write_json_atomic(tmp / STATS_NAME, stats)
