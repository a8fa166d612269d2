"""The methods an evaluation scores on one base model: LOGO (seed A and seed B), GUDA and the
baselines. For each: the settings that key its cached scores, its cost in sample passes (see
docs/evaluation.md#cost) and the computation of its ``[N, K]`` scores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusers_guda.data import GroupedDataset
from diffusers_guda.diffusion import training_scheduler
from diffusers_guda.elbo import ELBOConfig, ELBOEstimator
from diffusers_guda.recipes import Recipe

from .denoising import resolve_timesteps
from .gradient import GradientConfig, gradient_scores
from .instance_unlearning import InstanceUnlearningConfig, instance_unlearning_scores
from .kernel import DASConfig, DTRAKConfig, das_scores, dtrak_scores
from .logo import logo_attribution
from .report import CEILING, REFERENCE
from .similarity import nearest_neighbour_scores, similarity_scores

#: The methods ``guda evaluate --methods`` accepts (LOGO seed A and seed B always run).
METHODS = ("guda", "similarity", "nearest_neighbour", "gradient", "instance_unlearning", "dtrak", "das")
PIXELS = {"features": "pixels"}
NO_PASSES = {"forwards": 0, "backwards": 0, "note": "pixel cosines, no UNet passes"}


def model_classes(conditional: bool):
    """(pipeline class, UNet class) of the base and LOGO models."""
    if conditional:
        from diffusers import UNet2DConditionModel

        from diffusers_guda.pipelines.text_to_image import GUDATextToImagePipeline

        return GUDATextToImagePipeline, UNet2DConditionModel
    from diffusers import UNet2DModel

    from diffusers_guda.pipelines import GUDADDPMPipeline

    return GUDADDPMPipeline, UNet2DModel


class MethodScorer:
    """Scores one query set with every method, on the base model in ``base_dir``.

    Args:
        base_dir: The base pipeline directory.
        pipe: The base pipeline, with the GUDA bundle loaded.
        dataset: The grouped training set.
        recipe: The evaluation's recipe (its ELBO settings score GUDA, and LOGO unless ``reference_elbo`` is given).
        train: The base model's training config (part of LOGO's settings).
        logo: ``{REFERENCE: (seed, {group: model dir}), CEILING: ...}``, the LOGO models of each seed
            (the attribute ``logo`` may be set later: only the LOGO methods read it).
        queries: ``[N, C, H, W]`` query images.
        prompts: The queries' prompts (text-conditioned models), else ``None``.
        gradient_config: Settings of the gradient baseline.
        instance_config: Settings of the instance-unlearning baseline.
        progress: Show progress bars.
        dtrak_config: Settings of the D-TRAK baseline (default ``DTRAKConfig()``).
        das_config: Settings of the DAS baseline (default ``DASConfig()``).
        reference_elbo: ELBO settings of the LOGO models' scores (default: the recipe's).
    """

    def __init__(self, base_dir: Path, pipe, dataset: GroupedDataset, recipe: Recipe, train, logo: dict,
                 queries: torch.Tensor, prompts: list[str] | None, gradient_config: GradientConfig,
                 instance_config: InstanceUnlearningConfig, progress: bool, dtrak_config: DTRAKConfig | None = None,
                 das_config: DASConfig | None = None, reference_elbo: ELBOConfig | None = None):
        self.pipe, self.dataset, self.recipe, self.train, self.logo = pipe, dataset, recipe, train, logo
        self.queries, self.prompts, self.progress = queries, prompts, progress
        self.gradient_config, self.instance_config = gradient_config, instance_config
        self.dtrak_config, self.das_config = dtrak_config or DTRAKConfig(), das_config or DASConfig()
        self.unet_class = model_classes(prompts is not None)[1]
        self.scheduler = training_scheduler(pipe.scheduler)  # DDPM-family or flow-matching, at its training schedule
        self.full_unet = self.unet_class.from_pretrained(base_dir, subfolder="unet").eval()
        self.conditioning = _Conditioning(pipe, dataset, prompts) if prompts is not None else None
        self.reference_elbo = reference_elbo or recipe.elbo
        self.elbo_rows = ELBOEstimator(self.scheduler, recipe.elbo).num_rows
        self.reference_rows = ELBOEstimator(self.scheduler, self.reference_elbo).num_rows
        self.configs = {"gradient": gradient_config, "instance_unlearning": instance_config, "dtrak": self.dtrak_config, "das": self.das_config}
        self.rows = {m: len(resolve_timesteps(c.timesteps, self.scheduler)) * c.num_draws for m, c in self.configs.items()}

    def settings(self, method: str) -> dict:
        """What a method's scores depend on besides the queries, groups and base: part of their cache key."""
        if method in (REFERENCE, CEILING):
            seed, models = self.logo[method]
            key = {"elbo": self.reference_elbo.to_dict(), "train": self.train.to_dict(), "seed": seed}
            return key if len(models) == self.dataset.num_groups else {**key, "logo_groups": list(models)}
        if method == "guda":
            return {"elbo": self.recipe.elbo.to_dict(), "unlearning": self.recipe.unlearning.to_dict()}
        if method in ("similarity", "nearest_neighbour"):
            return dict(PIXELS)
        return self.configs[method].to_dict()

    def passes(self, method: str) -> dict:
        """A method's sample passes: ``forwards``, ``backwards`` and, where approximate, a ``note``."""
        n, n_train, k = len(self.queries), len(self.dataset), self.dataset.num_groups
        if method in (REFERENCE, CEILING):
            return {"forwards": n * self.reference_rows * (len(self.logo[method][1]) + 1), "backwards": 0}
        if method == "guda":
            return {"forwards": n * self.elbo_rows * (k + 1), "backwards": 0}
        if method in ("similarity", "nearest_neighbour"):
            return dict(NO_PASSES)
        if method in ("gradient", "dtrak", "das"):
            rows = self.rows[method]
            return {"forwards": (n + n_train) * rows, "backwards": (n + n_train) * rows,
                    "note": "approximate: (queries + training images) x loss rows; projection"
                            + (" and kernel inverse" if method != "gradient" else "") + " not counted"}
        rows, steps = self.rows[method], self.instance_config.steps
        return {"forwards": n_train * rows + n * (steps * rows + n_train * rows), "backwards": n * steps * rows,
                "note": "approximate: training losses before, per query ascent steps and training losses after"}

    def compute(self, method: str) -> torch.Tensor:
        """The method's scores ``[N, K]``."""
        queries, dataset, progress = self.queries, self.dataset, self.progress
        if method in (REFERENCE, CEILING):
            unets = {name: self.unet_class.from_pretrained(p, subfolder="unet").eval() for name, p in self.logo[method][1].items()}
            kwargs = self.conditioning.query_kwargs() if self.conditioning else None
            return logo_attribution(self.full_unet, unets, self.scheduler, queries, self.reference_elbo, progress=progress, unet_kwargs=kwargs).scores
        if method == "guda":
            # the bundle may be reused from a run whose recipe had other ELBO settings
            return self.pipe.attribute(queries, prompts=self.prompts, elbo_config=self.recipe.elbo, progress=progress).scores
        if method == "similarity":
            return similarity_scores(queries, dataset)
        if method == "nearest_neighbour":
            return nearest_neighbour_scores(queries, dataset)
        cond = self.conditioning.baseline_kwargs() if self.conditioning else {}
        if method == "gradient":
            return gradient_scores(self.full_unet, self.scheduler, queries, dataset, self.gradient_config, progress=progress, **cond)
        if method in ("dtrak", "das"):
            score = dtrak_scores if method == "dtrak" else das_scores
            return score(self.full_unet, self.scheduler, queries, dataset, self.configs[method], progress=progress, **cond)
        return instance_unlearning_scores(self.full_unet, self.scheduler, queries, dataset, self.instance_config, progress=progress, **cond)


class _Conditioning:
    """Text embeddings of the queries' and training images' prompts, through the base pipeline's encoder.

    The full model and every LOGO model share the recipe's frozen text encoder (built from its own
    seed, see :mod:`guda_lab.text_model`), so one encoder conditions them all.
    """

    def __init__(self, pipe, dataset: GroupedDataset, prompts: list[str]):
        from diffusers_guda.pipelines.conditioning import prompt_encoder

        self.encode, self.dataset, self.prompts = prompt_encoder(pipe), dataset, prompts
        self._train = None

    def query_kwargs(self) -> list[dict]:
        return [{"encoder_hidden_states": e[None]} for e in self.encode(self.prompts)]

    def baseline_kwargs(self) -> dict:
        if self._train is None:
            self._train = self.encode(self.dataset.prompts)
        return {"query_conditioning": self.encode(self.prompts), "train_conditioning": self._train}
