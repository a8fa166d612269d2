"""Generating and attributing in one call: what the latent text-to-image pipelines' ``__call__`` share.

With ``return_attribution=True`` a pipeline generates with its parent's ``__call__`` in
``output_type="pt"`` (the decoded images before quantisation), scores those images, each with its
own prompt, then converts them to the output type asked for (docs/method.md#latent-and-text-conditioned-models).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

from ..errors import ConfigError


def attribution_call_arguments(pipe, parent_call, args: tuple, kwargs: dict) -> tuple[dict, str, bool]:
    """The arguments of a generation to be attributed, checked before anything is generated.

    Args:
        pipe: The pipeline (it must hold a bundle).
        parent_call: The parent pipeline's bound ``__call__``.
        args: Positional arguments of the call.
        kwargs: Keyword arguments of the call.

    Returns:
        ``(arguments, output_type, return_dict)``: every argument by name, without ``output_type``
        and ``return_dict``, which are returned apart.

    Raises:
        ConfigError: no loaded bundle, or ``output_type="latent"``.
    """
    if pipe.guda_bundle is None:
        raise ConfigError("return_attribution=True needs a GUDA bundle; call pipe.load_guda_bundle(path_or_repo_id) first.")
    arguments = dict(inspect.signature(parent_call).bind(*args, **kwargs).arguments)
    arguments.update(arguments.pop("kwargs", {}) or {})
    output_type = arguments.pop("output_type", "pil")
    return_dict = arguments.pop("return_dict", True)
    if output_type not in ("pil", "np", "pt"):
        raise ConfigError(f"return_attribution=True needs output_type 'pil', 'np' or 'pt', not {output_type!r} (latents are not images).")
    return arguments, output_type, return_dict


def prompts_per_image(arguments: dict) -> list[str] | None:
    """The prompt of each generated image (``prompt`` repeated ``num_images_per_prompt`` times), or ``None``."""
    prompt = arguments.get("prompt")
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [p for p in prompts for _ in range(arguments.get("num_images_per_prompt") or 1)]


def convert_images(pipe, images, output_type: str):
    """Images ``[B, 3, H, W]`` in [0, 1] (``output_type="pt"``) as ``output_type`` (``"pt"``, ``"np"`` or ``"pil"``)."""
    if output_type == "pt":
        return images
    images = pipe.image_processor.pt_to_numpy(images)
    return pipe.image_processor.numpy_to_pil(images) if output_type == "pil" else images


def prompt_query(arguments: dict, *, pooled: bool = False, other_prompts: Sequence[str] = ()) -> dict:
    """The prompt conditioning each generated image is scored with, as :meth:`attribute` keyword arguments.

    ``{"prompts": [...]}`` (:func:`prompts_per_image`), else the call's ``prompt_embeds`` (and
    ``pooled_prompt_embeds``) repeated ``num_images_per_prompt`` times.

    Args:
        arguments: The call's arguments (see :func:`attribution_call_arguments`).
        pooled: Whether the model also takes pooled text embeddings (SDXL, Stable Diffusion 3, Flux).
        other_prompts: The call's per-encoder prompts (``prompt_2``...), refused: each image is scored
            with its one prompt in every text encoder.

    Raises:
        ConfigError: another encoder's prompt, or neither a prompt nor (all) its embeddings.
    """
    given = [name for name in other_prompts if arguments.get(name) is not None]
    if given:
        raise ConfigError(
            f"return_attribution=True scores each image with its prompt in every text encoder; drop {', '.join(given)}, or pass "
            f"prompt_embeds and pooled_prompt_embeds from pipe.encode_prompt(prompt, {', '.join(other_prompts)})."
        )
    prompts = prompts_per_image(arguments)
    if prompts is not None:
        return {"prompts": prompts}
    per_prompt = arguments.get("num_images_per_prompt") or 1
    names = ("prompt_embeds", "pooled_prompt_embeds") if pooled else ("prompt_embeds",)
    if any(arguments.get(name) is None for name in names):
        what = "prompt, or prompt_embeds with pooled_prompt_embeds" if pooled else "prompt or prompt_embeds"
        raise ConfigError(f"Pass {what}: attribution conditions each image on its prompt.")
    return {name: arguments[name].repeat_interleave(per_prompt, dim=0) for name in names}


def generate_and_attribute(pipe, parent_call: Callable, args: tuple, kwargs: dict, attribution_kwargs: dict | None, *,
                           pooled: bool = False, other_prompts: Sequence[str] = (), image_query: Callable | None = None):
    """Generate with ``parent_call`` and score the images; everything is checked before generating.

    Args:
        pipe: The pipeline (it must hold a bundle).
        parent_call: The parent pipeline's bound ``__call__``.
        args: Positional arguments of the call.
        kwargs: Keyword arguments of the call (without ``return_attribution``).
        attribution_kwargs: Keyword arguments of :meth:`attribute`.
        pooled: See :func:`prompt_query`.
        other_prompts: See :func:`prompt_query`.
        image_query: ``(arguments, images) -> dict`` of further :meth:`attribute` arguments that
            depend on the generated images (SDXL's size conditions).

    Returns:
        ``(output, images, attribution, return_dict)``: the parent's output in ``output_type="pt"``,
        its images converted to the ``output_type`` asked for, their :class:`AttributionResult`, and
        whether a dict was asked for.
    """
    arguments, output_type, return_dict = attribution_call_arguments(pipe, parent_call, args, kwargs)
    query = prompt_query(arguments, pooled=pooled, other_prompts=other_prompts)
    out = parent_call(**arguments, output_type="pt", return_dict=True)
    images = out.images  # [B, 3, H, W] in [0, 1], not quantised
    if image_query is not None:
        query.update(image_query(arguments, images))
    result = pipe.attribute(images * 2.0 - 1.0, **query, **(attribution_kwargs or {}))
    return out, convert_images(pipe, images, output_type), result, return_dict
