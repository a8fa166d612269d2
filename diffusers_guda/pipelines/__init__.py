"""Pipelines with group attribution.

``GUDAStableDiffusionPipeline``, ``GUDAStableDiffusionXLPipeline``, ``GUDAStableDiffusion3Pipeline``,
``GUDAFluxPipeline`` and the pixel-space text-to-image pipelines are imported on first use: they need
``transformers`` (the ``sd`` extra), which the unconditional pipelines do not.
"""

from .attribution import attribute, load_guda_bundle, unlearn_groups, unload_guda_bundle
from .auto import GUDAAutoPipeline, pipeline_class_for, pipeline_family, read_model_index
from .components import denoiser
from .ddpm import GUDADDPMPipeline
from .mixin import GUDAPipelineMixin
from .model_inputs import model_dataset, model_inputs, to_model_images

_LAZY = {
    "GUDAStableDiffusionPipeline": "stable_diffusion",
    "GUDAStableDiffusionOutput": "stable_diffusion",
    "GUDAStableDiffusionXLPipeline": "stable_diffusion_xl",
    "GUDAStableDiffusionXLOutput": "stable_diffusion_xl",
    "GUDAStableDiffusion3Pipeline": "stable_diffusion_3",
    "GUDAStableDiffusion3Output": "stable_diffusion_3",
    "GUDAFluxPipeline": "flux",
    "GUDAFluxOutput": "flux",
    "GUDATextToImagePipeline": "text_to_image",
    "TextToImageDDPMPipeline": "text_to_image",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GUDAAutoPipeline",
    "GUDADDPMPipeline",
    "GUDAFluxOutput",
    "GUDAFluxPipeline",
    "GUDAPipelineMixin",
    "GUDAStableDiffusion3Output",
    "GUDAStableDiffusion3Pipeline",
    "GUDAStableDiffusionOutput",
    "GUDAStableDiffusionPipeline",
    "GUDAStableDiffusionXLOutput",
    "GUDAStableDiffusionXLPipeline",
    "GUDATextToImagePipeline",
    "TextToImageDDPMPipeline",
    "attribute",
    "denoiser",
    "load_guda_bundle",
    "model_dataset",
    "model_inputs",
    "pipeline_class_for",
    "pipeline_family",
    "read_model_index",
    "to_model_images",
    "unlearn_groups",
    "unload_guda_bundle",
]
