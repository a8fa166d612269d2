"""Pipelines with group attribution.

``GUDAStableDiffusionPipeline`` is imported on first use: it needs ``transformers`` (the ``sd`` extra),
which the pixel-space pipelines do not.
"""

from .attribution import attribute, load_guda_bundle, model_inputs, to_model_images, unlearn_groups
from .ddpm import GUDADDPMPipeline
from .mixin import GUDAPipelineMixin

_LAZY = {"GUDAStableDiffusionPipeline", "GUDAStableDiffusionOutput"}


def __getattr__(name):
    if name in _LAZY:
        from . import stable_diffusion

        return getattr(stable_diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GUDADDPMPipeline",
    "GUDAPipelineMixin",
    "GUDAStableDiffusionOutput",
    "GUDAStableDiffusionPipeline",
    "attribute",
    "load_guda_bundle",
    "model_inputs",
    "to_model_images",
    "unlearn_groups",
]
