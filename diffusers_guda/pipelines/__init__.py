"""Pipelines with group attribution."""

from .attribution import attribute, load_guda_bundle, to_model_images, unlearn_groups
from .ddpm import GUDADDPMPipeline
from .mixin import GUDAPipelineMixin

__all__ = ["GUDADDPMPipeline", "GUDAPipelineMixin", "attribute", "load_guda_bundle", "to_model_images", "unlearn_groups"]
