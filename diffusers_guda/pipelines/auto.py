"""``GUDAAutoPipeline``: the right GUDA pipeline class for any supported pipeline directory or Hub id.

The class is chosen from the ``_class_name`` of the model's ``model_index.json`` (read alone, before
any weights), the way diffusers' auto pipelines choose theirs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..errors import ConfigError, GUDAError

# the GUDA pipeline that loads each pipeline class a model_index.json may name
SUPPORTED_PIPELINES = {
    "DDPMPipeline": "GUDADDPMPipeline",
    "DDIMPipeline": "GUDADDPMPipeline",  # the same components: a UNet2DModel and a DDPM-family scheduler
    "GUDADDPMPipeline": "GUDADDPMPipeline",
    "StableDiffusionPipeline": "GUDAStableDiffusionPipeline",
    "GUDAStableDiffusionPipeline": "GUDAStableDiffusionPipeline",
    "StableDiffusionXLPipeline": "GUDAStableDiffusionXLPipeline",
    "GUDAStableDiffusionXLPipeline": "GUDAStableDiffusionXLPipeline",
    "TextToImageDDPMPipeline": "GUDATextToImagePipeline",
    "GUDATextToImagePipeline": "GUDATextToImagePipeline",
    "StableDiffusion3Pipeline": "GUDAStableDiffusion3Pipeline",
    "GUDAStableDiffusion3Pipeline": "GUDAStableDiffusion3Pipeline",
    "FluxPipeline": "GUDAFluxPipeline",
    "GUDAFluxPipeline": "GUDAFluxPipeline",
}

# the family of each GUDA pipeline: a bundle records its base's, and loads only into a pipeline of that family
PIPELINE_FAMILIES = {
    "GUDADDPMPipeline": "ddpm",
    "GUDAStableDiffusionPipeline": "stable-diffusion",
    "GUDAStableDiffusionXLPipeline": "stable-diffusion-xl",
    "GUDATextToImagePipeline": "text-to-image",
    "GUDAStableDiffusion3Pipeline": "stable-diffusion-3",
    "GUDAFluxPipeline": "flux",
}


def pipeline_family(pipe) -> str | None:
    """The family (``"stable-diffusion"``, ``"stable-diffusion-xl"``, ``"stable-diffusion-3"``, ``"flux"``...) of a
    pipeline, pipeline class or class name.

    A pipeline or class belongs to the family of the first supported class in its MRO (so a stock
    ``StableDiffusionXLPipeline`` and a ``GUDAStableDiffusionXLPipeline`` share one); ``None`` if none is.
    """
    if isinstance(pipe, str):
        names = [pipe]
    else:
        names = [klass.__name__ for klass in (pipe if isinstance(pipe, type) else type(pipe)).__mro__]
    return next((PIPELINE_FAMILIES[SUPPORTED_PIPELINES[n]] for n in names if n in SUPPORTED_PIPELINES), None)


def family_pipeline(family: str) -> str:
    """The GUDA pipeline class name of ``family`` (the inverse of :data:`PIPELINE_FAMILIES`)."""
    return next((name for name, f in PIPELINE_FAMILIES.items() if f == family), family)


def _cannot_load(spec: str, reason: str) -> GUDAError:
    return GUDAError(
        f"Cannot load the base pipeline {spec!r} ({reason}). Pass a directory written by `guda train` (or by the "
        "save_pretrained of a DDPMPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline or "
        "FluxPipeline), or a Hub id (with HF_HUB_OFFLINE=1: one in the local cache)."
    )


def read_model_index(spec: str | Path, revision: str | None = None) -> dict:
    """The ``model_index.json`` of the pipeline directory or Hub id ``spec``.

    A Hub id is read from the local cache first, else downloaded like any ``from_pretrained`` (unless
    ``HF_HUB_OFFLINE=1``).

    Args:
        spec: A pipeline directory or Hub id.
        revision: A Hub id's branch, tag or commit.

    Raises:
        GUDAError: ``spec`` is neither a pipeline directory nor a reachable or cached Hub id (naming why:
            no such repo or revision, offline and not cached...), or its ``model_index.json`` is unreadable.
    """
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from ..bundle.hub import hub_error_reason

    spec, name, path = str(spec), DiffusionPipeline.config_name, None
    if Path(spec).is_dir():
        path = Path(spec) / name
    elif spec.count("/") == 1 and not Path(spec).exists():  # looks like a Hub id "owner/name"
        try:
            cached = try_to_load_from_cache(spec, name, revision=revision)
            path = Path(cached if isinstance(cached, str) else hf_hub_download(spec, name, revision=revision))
        except Exception as exc:  # not a valid Hub id, not on the Hub, or offline and not cached
            reason = hub_error_reason(exc, spec, revision=revision)
            if reason is not None:
                at = f" at revision {revision!r}" if revision else ""
                raise GUDAError(f"Cannot load the base pipeline {spec!r}{at}: {reason}.") from exc
            if not isinstance(exc, (OSError, ValueError)):
                raise
    if path is None or not path.is_file():
        where = "no such directory, nor a Hub id this machine can reach or has cached" if not Path(spec).is_dir() else f"no {name} in it"
        raise _cannot_load(spec, where)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _cannot_load(spec, f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise _cannot_load(spec, f"{path} names no pipeline _class_name")
    return index


def pipeline_class_for(spec: str | Path, revision: str | None = None) -> type:
    """The GUDA pipeline class that loads ``spec`` (read from its ``model_index.json``, no weights).

    ``revision`` is a Hub id's branch, tag or commit.

    Raises:
        GUDAError: ``spec`` cannot be read (see :func:`read_model_index`).
        ConfigError: its pipeline class is not supported, or needs ``transformers`` and it is missing.
    """
    from .. import pipelines

    name = read_model_index(spec, revision)["_class_name"]
    if name not in SUPPORTED_PIPELINES:
        supported = ("DDPMPipeline, DDIMPipeline, StableDiffusionPipeline (Stable Diffusion 1.x/2.x), StableDiffusionXLPipeline "
                     "(SDXL), StableDiffusion3Pipeline (Stable Diffusion 3/3.5), FluxPipeline (FLUX.1) and TextToImageDDPMPipeline")
        raise ConfigError(f"The base {str(spec)!r} is a {name}, which guda does not support yet; it supports {supported}.")
    try:
        return getattr(pipelines, SUPPORTED_PIPELINES[name])
    except ImportError as exc:  # the text-conditioned pipelines need transformers
        raise ConfigError(
            f"The base {str(spec)!r} needs {SUPPORTED_PIPELINES[name]}, which needs transformers ({exc}); pip install 'diffusers-guda[sd]'."
        ) from exc


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_only_weights(directory: str | Path) -> list[str]:
    """The pickle-based weight files of the components of a pipeline directory that have no safetensors weights.

    Args:
        directory: A pipeline directory (with ``model_index.json``).

    Returns:
        Their paths relative to ``directory``, sorted; empty when every component has safetensors weights.
    """
    directory, found = Path(directory), []
    for component in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [p for p in component.rglob("*") if p.is_file()]
        if not any(p.suffix == ".safetensors" for p in files):
            found += [p.relative_to(directory).as_posix() for p in files if p.suffix.lower() in PICKLE_WEIGHT_SUFFIXES]
    return sorted(found)


def _pickle_only(spec: str, example: str | None) -> ConfigError:
    what = f" ({example})" if example else ""
    return ConfigError(
        f"The base {spec!r} has only pickle-based weights{what}, which can run code when loaded; guda loads safetensors only. "
        "Convert the model to safetensors (load it and save_pretrained it), or, if you trust its source, opt in with "
        "--allow-pickle-weights (Python: use_safetensors=False)."
    )


class GUDAAutoPipeline:
    """Loads any supported pipeline as its GUDA pipeline class.

    Example:
        ```py
        >>> from diffusers_guda import GUDAAutoPipeline
        >>> pipe = GUDAAutoPipeline.from_pretrained("path/to/fine-tuned-sd15")  # a GUDAStableDiffusionPipeline
        >>> bundle = pipe.unlearn_groups(dataset)  # the recipe of its family
        ```
    """

    def __init__(self, *args, **kwargs):
        raise EnvironmentError("GUDAAutoPipeline is not instantiated; use GUDAAutoPipeline.from_pretrained(...) or from_pipe(...).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):
        """Load ``pretrained_model_name_or_path`` with the GUDA pipeline class of its family.

        Weights are read from safetensors files only (``use_safetensors=True``): a model that has only
        pickle-based weights (``.bin``, which can run code when loaded) is refused unless the caller
        trusts it and passes ``use_safetensors=False`` (or ``None``: safetensors where there are some).

        Args:
            pretrained_model_name_or_path: A pipeline directory or Hub id.
            **kwargs: ``from_pretrained`` arguments (``torch_dtype``, ``revision``, ``use_safetensors``...).
                Stable Diffusion is loaded without its safety checker unless ``safety_checker`` is given.

        Raises:
            GUDAError: one line, when the model cannot be found or read, or its family is not supported.
            ConfigError: the model has only pickle-based weights and ``use_safetensors`` is ``True``.
        """
        spec = str(pretrained_model_name_or_path)
        kwargs.setdefault("use_safetensors", True)
        pipeline_class = pipeline_class_for(spec, kwargs.get("revision"))
        if kwargs["use_safetensors"] and Path(spec).is_dir():
            pickled = pickle_only_weights(spec)
            if pickled:
                raise _pickle_only(spec, pickled[0])
        if pipeline_class.__name__ == "GUDAStableDiffusionPipeline" and "safety_checker" not in kwargs:
            kwargs.update(safety_checker=None, requires_safety_checker=False)  # attribution never needs it
        try:
            with warnings.catch_warnings():
                # diffusers >= 0.42 renames torch_dtype to dtype (with a FutureWarning); older ones know only torch_dtype
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                return pipeline_class.from_pretrained(spec, **kwargs)
        except (OSError, ValueError) as exc:
            message = str(exc).strip()
            if kwargs["use_safetensors"] and "safetensors" in message:  # a Hub model without safetensors weights
                raise _pickle_only(spec, None) from exc
            raise _cannot_load(spec, message.splitlines()[0] if message else type(exc).__name__) from exc

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """The GUDA pipeline of ``pipe``'s family, sharing its components (no copy).

        Raises:
            ConfigError: ``pipe``'s class is not supported.
        """
        from .. import pipelines

        name = type(pipe).__name__
        if name not in SUPPORTED_PIPELINES:
            raise ConfigError(f"{name} is not supported; guda supports {sorted(set(SUPPORTED_PIPELINES))}.")
        return getattr(pipelines, SUPPORTED_PIPELINES[name]).from_pipe(pipe, **kwargs)
