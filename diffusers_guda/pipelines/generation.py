"""Generating and attributing in one call: what the latent text-to-image pipelines' ``__call__`` share.

With ``return_attribution=True`` a pipeline generates with its parent's ``__call__`` in
``output_type="pt"`` (the decoded images before quantisation), scores those images, then converts
them to the output type asked for (docs/method.md#latent-and-text-conditioned-models).
"""

from __future__ import annotations

import inspect

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
