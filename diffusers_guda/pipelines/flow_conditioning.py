"""Text conditioning of the flow-matching pipelines, Stable Diffusion 3 and Flux (docs/formats.md#conditioning-settings).

Both encode a prompt through the pipeline's own ``encode_prompt``, without classifier-free guidance,
one prompt at a time (so an embedding never depends on the batch), kept in float32 on CPU:

* Stable Diffusion 3: ``{"encoder_hidden_states": [1, 77 + L, 4096], "pooled_projections": [1, 2048]}``
  for the real model: CLIP-L's and CLIP-G's penultimate hidden states side by side, zero-padded to
  T5's width and followed by T5-XXL's ``L`` tokens, and both CLIP encoders' pooled embeddings.
* Flux: ``{"encoder_hidden_states": [1, L, 4096], "pooled_projections": [1, 768]}``: T5-XXL's tokens
  and CLIP-L's pooled embedding; a guidance-distilled transformer (FLUX.1-dev,
  ``guidance_embeds=True``) also takes ``"guidance"`` ``[B]``, the guidance scale it was distilled to
  follow. It is part of the model's input, so the ELBO depends on it.

What the conditioning depends on besides the prompt is a setting a bundle records in its
``base_model`` (:func:`conditioning_settings`), so that unlearning and scoring condition alike:
``max_sequence_length`` (T5 tokens per prompt, padding included; the pipeline's default) and, for
Flux, ``guidance`` (:data:`FLUX_DEFAULT_GUIDANCE` by default; ``None`` for a transformer without
guidance embedding).
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
from diffusers import FluxTransformer2DModel

from ..errors import ConfigError
from ..models import is_flow_transformer
from ..validation import is_kind
from .components import denoiser

FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, what FLUX.1-dev generates with
MAX_SEQUENCE_LENGTH_LIMIT = 512  # the most T5 tokens StableDiffusion3Pipeline and FluxPipeline accept
POOLED = "pooled_projections"  # the conditioning entry of both transformers' pooled text embedding


def is_guidance_distilled(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a Flux transformer that takes the guidance scale as an input (FLUX.1-dev)."""
    return isinstance(model, FluxTransformer2DModel) and bool(model.config.guidance_embeds)


def default_max_sequence_length(pipe) -> int:
    """The T5 tokens per prompt of ``pipe.encode_prompt``'s default (256 for Stable Diffusion 3, 512 for Flux)."""
    return int(inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default)


def conditioning_settings(pipe, *, guidance: float | None = None, max_sequence_length: int | None = None) -> dict:
    """The conditioning settings a bundle made on ``pipe`` records in its ``base_model`` (empty for a UNet pipeline).

    Args:
        pipe: A pipeline.
        guidance: Flux with a guidance-distilled transformer: the guidance scale its forwards take
            (default :data:`FLUX_DEFAULT_GUIDANCE`). Refused for any other model.
        max_sequence_length: Stable Diffusion 3 and Flux: T5 tokens per prompt (default: the
            pipeline's ``encode_prompt`` default). Refused for a UNet pipeline.

    Returns:
        ``{}`` for a UNet pipeline, ``{"max_sequence_length": n}`` for Stable Diffusion 3, and
        ``{"max_sequence_length": n, "guidance": g}`` for Flux (``g`` is ``None`` without guidance embedding).

    Raises:
        ConfigError: a setting the pipeline's model does not take, or a value of the wrong kind.
    """
    model = denoiser(pipe)
    name = type(model).__name__
    if not is_flow_transformer(model):
        given = [k for k, v in (("guidance", guidance), ("max_sequence_length", max_sequence_length)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to Stable Diffusion 3 and Flux; this {type(pipe).__name__}'s {name} takes "
                              "neither: drop them.")
        return {}
    settings = {"max_sequence_length": _check_length(default_max_sequence_length(pipe) if max_sequence_length is None
                                                     else max_sequence_length)}
    if not isinstance(model, FluxTransformer2DModel):
        if guidance is not None:
            raise ConfigError(f"This {name} has no guidance embedding (guidance={guidance!r}): classifier-free guidance shapes "
                              "the sample, not the score; drop guidance.")
        return settings
    if not is_guidance_distilled(model):
        if guidance is not None:
            raise ConfigError(f"This {name} is not guidance-distilled (guidance_embeds=False, like FLUX.1-schnell), so it takes no "
                              f"guidance value; drop guidance={guidance!r}.")
        return {**settings, "guidance": None}
    return {**settings, "guidance": _check_guidance(FLUX_DEFAULT_GUIDANCE if guidance is None else guidance)}


def recorded_settings(pipe, bundle, *, guidance: float | None = None) -> dict:
    """The conditioning settings ``bundle`` is scored with on ``pipe``: the ones it records.

    Args:
        pipe: The pipeline the bundle is loaded into.
        bundle: The :class:`~diffusers_guda.AdapterBundle`.
        guidance: Flux: a guidance scale the caller expects; refused unless it is the recorded one.

    Raises:
        ConfigError: a guidance-distilled transformer and a bundle that records no guidance, or a
            ``guidance`` that differs from the recorded one.
    """
    model = denoiser(pipe)
    if not is_flow_transformer(model):
        return conditioning_settings(pipe, guidance=guidance)  # {}, or refuses the guidance
    base = bundle.base_model
    settings = {"max_sequence_length": _check_length(base.get("max_sequence_length") or default_max_sequence_length(pipe))}
    if not isinstance(model, FluxTransformer2DModel):
        conditioning_settings(pipe, guidance=guidance)  # refuses a guidance
        return settings
    recorded = base.get("guidance")
    if is_guidance_distilled(model) and recorded is None:
        raise ConfigError(
            "This bundle records no guidance, but this FluxTransformer2DModel is guidance-distilled and its scores depend on the "
            f"guidance it is given; re-run unlearning with an explicit guidance (unlearn_groups(..., guidance={FLUX_DEFAULT_GUIDANCE}))."
        )
    if guidance is not None:
        conditioning_settings(pipe, guidance=guidance)  # refuses guidance for a transformer without guidance embedding
        if float(guidance) != float(recorded):
            raise ConfigError(f"This bundle was unlearned with guidance {recorded}, and scores are only comparable with the same "
                              f"value; drop guidance={guidance!r} (the bundle's is used) or unlearn a bundle with guidance={guidance!r}.")
    return {**settings, "guidance": None if recorded is None else _check_guidance(recorded)}


def _check_length(value) -> int:
    if not is_kind(value, int) or not 1 <= value <= MAX_SEQUENCE_LENGTH_LIMIT:
        raise ConfigError(f"max_sequence_length must be an integer from 1 to {MAX_SEQUENCE_LENGTH_LIMIT} (T5 tokens per prompt), "
                          f"got {value!r}.")
    return int(value)


def _check_guidance(value) -> float:
    if not is_kind(value, float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"guidance must be a finite number >= 0 (FluxPipeline's guidance_scale, e.g. {FLUX_DEFAULT_GUIDANCE}), "
                          f"got {value!r}.")
    return float(value)


class SD3PromptEncoder:
    """The prompt conditioning of a ``StableDiffusion3Pipeline``, through its own ``encode_prompt`` (no guidance).

    Args:
        pipe: A ``StableDiffusion3Pipeline`` (a missing T5 encoder gives zeros, as the pipeline's own encoding does).
        max_sequence_length: T5 tokens per prompt.
    """

    def __init__(self, pipe, max_sequence_length: int):
        self.pipe, self.max_sequence_length = pipe, max_sequence_length
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt, None, None, device=self.pipe._execution_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    @torch.no_grad()
    def encode_one(self, prompt: str) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": [1, L, D], "pooled_projections": [1, P]}`` of one prompt, float32 on CPU."""
        if prompt not in self._cache:
            embeds, pooled = self._encode(prompt)
            self._cache[prompt] = {"encoder_hidden_states": embeds.to("cpu", torch.float32), POOLED: pooled.to("cpu", torch.float32)}
        return self._cache[prompt]

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The prompts' conditioning, batch-first (``[B, L, D]`` and ``[B, P]``)."""
        encoded = [self.encode_one(p) for p in prompts]
        return {key: torch.cat([e[key] for e in encoded]) for key in ("encoder_hidden_states", POOLED)}


class FluxPromptEncoder(SD3PromptEncoder):
    """The prompt conditioning of a ``FluxPipeline``, through its own ``encode_prompt``, and its guidance.

    Args:
        pipe: A ``FluxPipeline``.
        max_sequence_length: T5 tokens per prompt.
        guidance: The guidance scale a guidance-distilled transformer takes (``None`` for one without).
    """

    def __init__(self, pipe, max_sequence_length: int, guidance: float | None):
        super().__init__(pipe, max_sequence_length)
        self.guidance = guidance

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt, None, device=self.pipe._execution_device, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled

    def image_conditions(self, sample_shape: Sequence[int], n: int, size_conditions=None) -> dict[str, torch.Tensor]:
        """``{"guidance": [n]}`` (float32), the same for every image; ``{}`` without guidance embedding.

        ``sample_shape`` and ``size_conditions`` (SDXL's) are not used: Flux takes no size conditions.
        """
        return {} if self.guidance is None else {"guidance": torch.full((n,), self.guidance, dtype=torch.float32)}


def flow_prompt_encoder(pipe, settings: dict):
    """A fresh :class:`SD3PromptEncoder` or :class:`FluxPromptEncoder` of ``pipe`` with ``settings`` (see :func:`conditioning_settings`)."""
    if isinstance(denoiser(pipe), FluxTransformer2DModel):
        return FluxPromptEncoder(pipe, settings["max_sequence_length"], settings.get("guidance"))
    return SD3PromptEncoder(pipe, settings["max_sequence_length"])
