"""Recipes: named JSON files in the repository's ``adapters/`` folder, one per supported setting.

A recipe holds the base-model training config (a :class:`TrainConfig`, or a
:class:`~diffusers_guda.text_model.TextTrainConfig` when its ``train`` section has
``"conditioning": "text"``), the unlearning config, the ELBO config and the query settings of one
setting (e.g. ``digits-ddpm``, ``digits-styles``). Source checkouts read ``adapters/`` beside the
package; wheels install the same files under ``<prefix>/share/diffusers-guda/adapters``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from .elbo import ELBOConfig
from .errors import ConfigError
from .text_model import train_config_class
from .training import TrainConfig
from .unlearning import UnlearningConfig

DEFAULT_RECIPE = "digits-ddpm"
_SECTIONS = {"train": TrainConfig, "unlearning": UnlearningConfig, "elbo": ELBOConfig, "queries": None}


def recipe_dirs() -> list[Path]:
    return [
        Path(__file__).resolve().parent.parent / "adapters",
        Path(sys.prefix) / "share" / "diffusers-guda" / "adapters",
    ]


@dataclass
class Recipe:
    """A named setting: how to train the base model, unlearn groups, score and make queries."""

    name: str
    description: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    elbo: ELBOConfig = field(default_factory=ELBOConfig)
    queries: dict = field(default_factory=dict)
    has_train: bool = True  # False for a recipe without a train section (it unlearns a base trained elsewhere)

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_RECIPE) -> "Recipe":
        """Load a recipe by name (``adapters/<name>.json``) or from a JSON file path."""
        path = Path(name_or_path)
        if not path.is_file():
            candidates = [d / f"{name_or_path}.json" for d in recipe_dirs()]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                known = sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.json")})
                raise ConfigError(f"Unknown recipe {name_or_path!r}; known recipes: {known}. Or pass a path to a recipe JSON file.")
        try:
            data = json.loads(path.read_text())
            _check_layout(data, path)
            return cls(
                name=data.get("name", path.stem),
                description=data.get("description", ""),
                train=train_config_class(data.get("train", {}))(**data.get("train", {})),
                unlearning=UnlearningConfig(**data.get("unlearning", {})),
                elbo=ELBOConfig(**data.get("elbo", {})),
                queries=dict(data.get("queries", {})),
                has_train="train" in data,
            )
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"Recipe {path} is invalid: {exc}.") from exc

    def require_train(self, command: str) -> None:
        """Refuse to train a base model from a recipe that has no ``train`` section.

        Raises:
            ConfigError: naming the recipe and what to do instead.
        """
        if not self.has_train:
            raise ConfigError(
                f"Recipe {self.name!r} has no train section: it unlearns and scores a base model trained elsewhere, so "
                f"`guda {command}` cannot use it. Use it with guda unlearn/attribute, or pass a recipe with a train section "
                f"(e.g. --recipe {DEFAULT_RECIPE})."
            )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "train": self.train.to_dict(),
            "unlearning": self.unlearning.to_dict(),
            "elbo": self.elbo.to_dict(),
            "queries": self.queries,
        }


def _check_layout(data, path: Path) -> None:
    """Refuse a recipe that is not an object of known sections with known fields (a typo would be ignored)."""
    if not isinstance(data, dict):
        raise ConfigError(f"Recipe {path} must hold a JSON object, not {type(data).__name__}; see adapters/{DEFAULT_RECIPE}.json.")
    unknown = sorted(set(data) - {"name", "description", *_SECTIONS})
    if unknown:
        raise ConfigError(f"Recipe {path} has unknown field(s) {unknown}; known: {sorted(['name', 'description', *_SECTIONS])}.")
    for key, config_class in _SECTIONS.items():
        section = data.get(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f"Recipe {path}: '{key}' must be a JSON object, got {section!r}.")
        if key == "train":
            config_class = train_config_class(section)
        known = {f.name for f in fields(config_class)} if config_class is not None else set(section)
        if set(section) - known:
            raise ConfigError(f"Recipe {path}: '{key}' has unknown field(s) {sorted(set(section) - known)}; known: {sorted(known)}.")
