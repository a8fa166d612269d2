"""The lab's reading of a recipe's ``train`` section: the toy base model's training config."""

from __future__ import annotations

from dataclasses import fields

from diffusers_guda.errors import ConfigError
from diffusers_guda.recipes import DEFAULT_RECIPE, Recipe

from .text_model import train_config_class
from .training import TrainConfig


def training_config(recipe: Recipe, command: str) -> TrainConfig:
    """The base-model training config of ``recipe`` (a :class:`TextTrainConfig` for ``"conditioning": "text"``).

    Raises:
        ConfigError: the recipe has no ``train`` section (it unlearns a base trained elsewhere), or the
            section names unknown fields.
    """
    if recipe.train is None:
        raise ConfigError(
            f"Recipe {recipe.name!r} has no train section: it unlearns and scores a base model trained elsewhere, so "
            f"`guda {command}` cannot use it. Use it with guda unlearn/attribute, or pass a recipe with a train section "
            f"(e.g. --recipe {DEFAULT_RECIPE})."
        )
    config_class = train_config_class(recipe.train)
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(recipe.train) - known)
    if unknown:
        raise ConfigError(f"Recipe {recipe.name!r}: 'train' has unknown field(s) {unknown}; known: {sorted(known)}.")
    try:
        return config_class(**recipe.train)
    except TypeError as exc:
        raise ConfigError(f"Recipe {recipe.name!r}: invalid 'train' section: {exc}.") from exc
