"""Recipes: the recommended settings of one model family, as named JSON files.

A recipe holds how groups are unlearned (an :class:`UnlearningConfig`) and scored (an
:class:`ELBOConfig`) for one setting, e.g. ``sd-styles`` for style or artist groups of a fine-tuned
Stable Diffusion. The files live in the repository's ``adapters/`` folder and are installed as this
package's own data (``diffusers_guda.recipe_data``). :func:`default_recipe` maps each GUDA pipeline
family to its recipe; ``pipe.unlearn_groups``, ``pipe.attribute``, the CLI and the examples all go
through it. The ``train`` and ``queries`` sections are read by the lab (toy base models and generated
queries) and kept here as plain dicts. The format is described in ``docs/formats.md#recipes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

from .elbo import ELBOConfig
from .errors import ConfigError
from .lora import LoRASettings
from .unlearning import UnlearningConfig

DEFAULT_RECIPE = "digits-ddpm"
RECIPE_PACKAGE = "diffusers_guda.recipe_data"

# The recommended recipe of each pipeline family, by pipeline class name: the GUDA pipelines inherit
# the entry of the diffusers class they extend, and a stock pipeline passed to the functional API
# (``diffusers_guda.unlearn_groups(pipe, ...)``) finds its own. The one table that says which
# settings a family gets.
FAMILY_RECIPES = {
    "StableDiffusionPipeline": "sd-styles",
    "StableDiffusionXLPipeline": "sdxl-styles",
    "StableDiffusion3Pipeline": "sd3-styles",
    "FluxPipeline": "flux-styles",
    "TextToImageDDPMPipeline": "digits-styles",
    "DDPMPipeline": "digits-ddpm",
    "DDIMPipeline": "digits-ddpm",
}

_SECTIONS = {"train": None, "unlearning": UnlearningConfig, "elbo": ELBOConfig, "queries": None}


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(Path(p.name).stem for p in resources.files(RECIPE_PACKAGE).iterdir() if p.name.endswith(".json"))


def default_recipe(pipe) -> "Recipe":
    """The recommended recipe of ``pipe``'s family (a pipeline or a pipeline class).

    Raises:
        ConfigError: for a pipeline class no recipe is known for.
    """
    cls = pipe if isinstance(pipe, type) else type(pipe)
    for klass in cls.__mro__:
        if klass.__name__ in FAMILY_RECIPES:
            return Recipe.load(FAMILY_RECIPES[klass.__name__])
    raise ConfigError(
        f"No recipe is known for {cls.__name__}; pass recipe= (one of {available_recipes()} or a JSON path) or config=."
    )


@dataclass
class Recipe:
    """A named setting: how to unlearn groups and score images (and, for the lab, how to train a toy base).

    Args:
        name: The recipe's name.
        description: What the recipe is for.
        unlearning: The unlearning settings.
        elbo: The ELBO estimator's settings; bundles made with the recipe record them.
        train: The lab's base-model training section (``None``: the base is trained elsewhere).
        queries: The lab's query-generation settings.
    """

    name: str
    description: str = ""
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    elbo: ELBOConfig = field(default_factory=ELBOConfig)
    train: dict | None = None
    queries: dict = field(default_factory=dict)

    @classmethod
    def load(cls, name_or_path: "str | Path | Recipe" = DEFAULT_RECIPE) -> "Recipe":
        """Load a shipped recipe by name (see :func:`available_recipes`) or a recipe JSON file by path.

        Raises:
            ConfigError: an unknown name, or a file that is not a valid recipe.
        """
        if isinstance(name_or_path, Recipe):
            return name_or_path
        if not isinstance(name_or_path, (str, Path)):
            raise ConfigError(
                f"recipe must be a recipe name ({', '.join(available_recipes())}), a JSON path or a Recipe, not {name_or_path!r}."
            )
        path = Path(name_or_path)
        if path.is_file():
            text = path.read_text()
        else:
            shipped = resources.files(RECIPE_PACKAGE) / f"{name_or_path}.json"
            if not shipped.is_file():
                raise ConfigError(
                    f"Unknown recipe {str(name_or_path)!r}; known recipes: {available_recipes()}. Or pass a path to a recipe JSON file."
                )
            text = shipped.read_text()
        try:
            data = json.loads(text)
            _check_layout(data, path)
            return cls(
                name=data.get("name", path.stem),
                description=data.get("description", ""),
                unlearning=UnlearningConfig(**data.get("unlearning", {})),
                elbo=ELBOConfig(**data.get("elbo", {})),
                train=dict(data["train"]) if "train" in data else None,
                queries=dict(data.get("queries", {})),
            )
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"Recipe {path} is invalid: {exc}.") from exc

    def unlearning_with(self, **settings) -> UnlearningConfig:
        """The recipe's unlearning settings with ``settings`` overriding them.

        Args:
            **settings: Any :class:`UnlearningConfig` field (``steps``, ``learning_rate``, ``seed``...),
                ``batch_size`` (forget and retain batch alike), ``lora_rank`` and ``lora_alpha`` (alpha
                follows a new rank unless given), ``objective`` (another objective starts from its own
                defaults, not this recipe's options), ``objective_options`` (merged into the recipe's)
                and any option of the objective by name (e.g. ``num_neighbors=10``).

        Raises:
            ConfigError: a setting that is neither a field nor an option of the objective.
        """
        base = self.unlearning
        objective = settings.pop("objective", None) or base.objective
        options = dict(base.objective_options) if objective == base.objective else {}
        options.update(settings.pop("objective_options", None) or {})
        rank, alpha = settings.pop("lora_rank", None), settings.pop("lora_alpha", None)
        lora = base.lora
        if rank is not None or alpha is not None:
            new_rank = lora.rank if rank is None else rank
            new_alpha = alpha if alpha is not None else (lora.alpha if rank is None else new_rank)
            lora = LoRASettings(rank=new_rank, alpha=float(new_alpha), target_modules=lora.target_modules)
        batch_size = settings.pop("batch_size", None)
        if batch_size is not None:
            settings.update(forget_batch_size=batch_size, retain_batch_size=batch_size)
        known = {f.name for f in fields(UnlearningConfig)} - {"objective", "objective_options", "lora"}
        options.update({k: settings.pop(k) for k in list(settings) if k not in known})
        return replace(base, objective=objective, objective_options=options, lora=lora, **settings)

    def to_dict(self) -> dict:
        data = {"name": self.name, "description": self.description, "unlearning": self.unlearning.to_dict(), "elbo": self.elbo.to_dict()}
        if self.train is not None:
            data["train"] = dict(self.train)
        return {**data, "queries": self.queries}


def _check_layout(data, path: Path) -> None:
    """Refuse a recipe that is not an object of known sections with known fields (a typo would be ignored)."""
    if not isinstance(data, dict):
        raise ConfigError(f"Recipe {path} must hold a JSON object, not {type(data).__name__}; see adapters/{DEFAULT_RECIPE}.json.")
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            raise ConfigError(f"Recipe {path}: '{key}' must be a string, got {data[key]!r}.")
    unknown = sorted(set(data) - {"name", "description", *_SECTIONS})
    if unknown:
        raise ConfigError(f"Recipe {path} has unknown field(s) {unknown}; known: {sorted(['name', 'description', *_SECTIONS])}.")
    for key, config_class in _SECTIONS.items():
        section = data.get(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f"Recipe {path}: '{key}' must be a JSON object, got {section!r}.")
        known = {f.name for f in fields(config_class)} if config_class is not None else set(section)
        if set(section) - known:
            raise ConfigError(f"Recipe {path}: '{key}' has unknown field(s) {sorted(set(section) - known)}; known: {sorted(known)}.")
