"""diffusers-guda: which group of training data made this generated image?

Group attribution for diffusers models by unlearning (GUDA, arXiv 2601.22651): one LoRA adapter per
group approximates the model retrained without that group, and a group's score for an image is the
ELBO difference between the full model and that counterfactual.
"""

# diffusers resolves a saved pipeline's custom component class by checking it against the base
# classes exported at the top level of the package that defines it (here GUDAUNet2DModel).
from diffusers import ModelMixin, SchedulerMixin  # noqa: F401

from .bundle import AdapterBundle, GroupRecord
from .data import GroupedDataset, load_digits
from .elbo import ELBOConfig, ELBOEstimator
from .errors import (
    BaseModelMismatchError,
    BundleError,
    CheckpointMismatchError,
    ConfigError,
    DataError,
    DistributedError,
    GUDAError,
    OutputError,
    OutputLockedError,
    ScoringError,
    UnlearningDivergedError,
)
from .latent_cache import LatentCache
from .lazy_data import LazyGroupedDataset
from .lora import LoRASettings
from .models import GUDAUNet2DModel
from .objectives import available_objectives, get_objective, register_objective
from .pipelines import (
    GUDAAutoPipeline,
    GUDADDPMPipeline,
    GUDAPipelineMixin,
    attribute,
    load_guda_bundle,
    unlearn_groups,
    unload_guda_bundle,
)
from .recipes import Recipe, available_recipes, default_recipe
from .scoring import AttributionResult, AttributionScorer
from .unlearning import GroupUnlearner, UnlearningConfig

__version__ = "0.1.0"


def __getattr__(name):
    # the text-to-image pipelines need transformers (the `sd` extra): imported on first use
    if name in ("GUDAStableDiffusionPipeline", "GUDAStableDiffusionXLPipeline", "GUDAStableDiffusion3Pipeline", "GUDAFluxPipeline"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AdapterBundle",
    "AttributionResult",
    "AttributionScorer",
    "BaseModelMismatchError",
    "BundleError",
    "CheckpointMismatchError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "ELBOConfig",
    "ELBOEstimator",
    "GUDAAutoPipeline",
    "GUDADDPMPipeline",
    "GUDAError",
    "GUDAFluxPipeline",
    "GUDAPipelineMixin",
    "GUDAStableDiffusion3Pipeline",
    "GUDAStableDiffusionPipeline",
    "GUDAStableDiffusionXLPipeline",
    "GUDAUNet2DModel",
    "GroupRecord",
    "GroupUnlearner",
    "GroupedDataset",
    "LatentCache",
    "LazyGroupedDataset",
    "LoRASettings",
    "OutputError",
    "OutputLockedError",
    "Recipe",
    "ScoringError",
    "UnlearningConfig",
    "UnlearningDivergedError",
    "attribute",
    "available_objectives",
    "available_recipes",
    "default_recipe",
    "get_objective",
    "load_digits",
    "load_guda_bundle",
    "register_objective",
    "unlearn_groups",
    "unload_guda_bundle",
]
