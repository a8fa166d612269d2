"""Unlearning objectives (docs/method.md#objectives): a registry of forget/preserve losses."""

from ..diffusion import NoiseSchedule
from .anchor import Anchor, AnchorConfig, anchor_distribution, replace_phrases, strip_phrases
from .base import (
    ObjectiveConfig,
    UnlearningBatch,
    UnlearningObjective,
    available_objectives,
    get_objective,
    register_objective,
)
from .esd import ESD, ESDConfig
from .gradient_ascent import GradientAscent, GradientAscentConfig
from .retrack import ReTrack, ReTrackConfig, capped_offsets, neighbour_weights, pool_redirect, pool_weights, posterior_shift

__all__ = [
    "Anchor",
    "AnchorConfig",
    "ESD",
    "ESDConfig",
    "GradientAscent",
    "GradientAscentConfig",
    "NoiseSchedule",
    "ObjectiveConfig",
    "ReTrack",
    "ReTrackConfig",
    "UnlearningBatch",
    "UnlearningObjective",
    "anchor_distribution",
    "available_objectives",
    "capped_offsets",
    "get_objective",
    "neighbour_weights",
    "pool_redirect",
    "pool_weights",
    "posterior_shift",
    "register_objective",
    "replace_phrases",
    "strip_phrases",
]
