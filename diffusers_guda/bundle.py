"""Adapter bundles: one LoRA adapter per group, a JSON manifest and a model card (DESIGN.md §2.2).

A bundle is a directory, laid out the same way on disk and on the Hub::

    guda_bundle.json                                   manifest: base model, groups, LoRA, objective...
    adapters/<slug>/pytorch_lora_weights.safetensors   diffusers' own LoRA file format, one per group
    README.md                                          model card

Adapter ``k`` is the base model with group ``k`` unlearned. Loading reads only JSON and safetensors,
validates the manifest and checks the base model's fingerprint before any adapter touches a UNet.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import tempfile
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import BaseModelMismatchError, BundleError, ConfigError
from .hashing import unet_fingerprint
from .io_utils import atomic_directory, write_json_atomic
from .lora import ADAPTER_WEIGHT_NAME, load_adapter_file, load_adapter_into, save_adapter_file

FORMAT_VERSION = 1
MANIFEST_NAME = "guda_bundle.json"
ADAPTERS_DIR = "adapters"
CARD_NAME = "README.md"
CARD_TAGS = ["data-attribution", "machine-unlearning", "guda", "lora"]
MAX_SLUG_LENGTH = 64

_HEX64 = re.compile(r"[0-9a-f]{64}")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_HUB_PATTERNS = [MANIFEST_NAME, CARD_NAME, f"{ADAPTERS_DIR}/**/*.safetensors"]
_STAT_COLUMNS = (("forget", "forget loss"), ("retain", "retain loss"))


def slugify(name: str, taken: set[str] | None = None) -> str:
    """Turn a group name into a safe, unique directory name.

    The slug is lowercase ASCII from ``[a-z0-9_-]``, starts and ends with a letter or digit, has at
    most 64 characters and is never empty (``"group"`` stands in for names with nothing usable), so it
    cannot contain path separators or ``..``. For example ``"../x"`` becomes ``"x"`` and ``"a/b"``
    becomes ``"a-b"``.

    Args:
        name: Any group name.
        taken: Slugs already in use. A clash gets a ``-2``, ``-3``... suffix, and the returned slug is
            added to ``taken``.

    Returns:
        The slug.
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", text).strip("-_")[:MAX_SLUG_LENGTH].strip("-_") or "group"
    if taken is not None:
        base, n = slug, 2
        while slug in taken:
            suffix = f"-{n}"
            slug = base[: MAX_SLUG_LENGTH - len(suffix)].rstrip("-_") + suffix
            n += 1
        taken.add(slug)
    return slug


def unique_slugs(names: list[str]) -> list[str]:
    """Slugs of ``names`` in order, made unique the way bundles do it."""
    taken: set[str] = set()
    return [slugify(name, taken) for name in names]


def adapter_file_for(slug: str) -> str:
    """The bundle-relative path of a group's adapter file."""
    return f"{ADAPTERS_DIR}/{slug}/{ADAPTER_WEIGHT_NAME}"


def is_local_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a local directory holding a bundle manifest."""
    try:
        return (Path(path) / MANIFEST_NAME).is_file()
    except (OSError, TypeError, ValueError):
        return False


@dataclass
class GroupRecord:
    """One group of the training set and its adapter.

    Args:
        id: Group index, ``0 .. K-1``.
        name: The user's group name (any string).
        slug: Sanitised name used as the adapter's directory (see :func:`slugify`).
        num_images: Number of training images in the group.
        adapter_file: Bundle-relative path of the adapter; defaults to
            ``adapters/<slug>/pytorch_lora_weights.safetensors``.
        stats: Free-form JSON statistics of the unlearning run. The model card shows
            ``forget_loss_before``/``forget_loss_after`` and ``retain_loss_before``/``retain_loss_after``.
    """

    id: int
    name: str
    slug: str
    num_images: int
    adapter_file: str = ""
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        self.adapter_file = self.adapter_file or adapter_file_for(self.slug)


class AdapterBundle:
    """The per-group LoRA adapters of one unlearning run, with everything needed to use them.

    Args:
        groups: One record per group, ids ``0 .. K-1``.
        adapters: Slug -> adapter state dict with ``unet.``-prefixed keys
            (:func:`~diffusers_guda.lora.adapter_state_dict`).
        adapter_configs: Slug -> peft config metadata with ``unet.``-prefixed keys
            (:func:`~diffusers_guda.lora.peft_config_metadata`).
        lora: The LoRA settings (``LoRASettings.to_dict()``).
        base_model: ``id``, ``revision``, ``fingerprint`` (sha256 of the UNet weights, see
            :func:`~diffusers_guda.hashing.unet_fingerprint`), ``class_name``, ``dtype`` and the like.
        objective: ``{"name": str, "config": dict}``.
        elbo: ELBO estimator settings, if any.
        seeds: Seeds used for unlearning and scoring.
        training: Run-level training statistics.
        source: Where the bundle was loaded from (set by :meth:`from_pretrained`, never saved).

    Raises:
        BundleError: if the groups, adapters and configs do not fit together.
    """

    def __init__(
        self,
        *,
        groups: list[GroupRecord],
        adapters: dict[str, dict[str, torch.Tensor]],
        adapter_configs: dict[str, dict],
        lora: dict,
        base_model: dict,
        objective: dict,
        elbo: dict | None = None,
        seeds: dict | None = None,
        training: dict | None = None,
        source: dict | None = None,
    ):
        self.groups = sorted(groups, key=lambda g: g.id)
        self.adapters = dict(adapters)
        self.adapter_configs = {slug: dict(cfg) for slug, cfg in adapter_configs.items()}
        self.lora = dict(lora)
        self.base_model = dict(base_model)
        self.objective = dict(objective)
        self.elbo, self.seeds, self.training = elbo, seeds, training
        self.source = source
        _check_groups([asdict(g) for g in self.groups], "the bundle")
        _check_base_model(self.base_model, "the bundle")
        for group in self.groups:
            if group.adapter_file != adapter_file_for(group.slug):
                raise BundleError(
                    f"Group {group.name!r} has adapter_file {group.adapter_file!r}; "
                    f"expected {adapter_file_for(group.slug)!r}."
                )
            if group.slug not in self.adapters or group.slug not in self.adapter_configs:
                raise BundleError(f"Group {group.name!r} (slug {group.slug!r}) has no adapter weights or config.")

    def __repr__(self) -> str:
        base = self.base_model.get("id")
        return f"AdapterBundle(num_groups={self.num_groups}, base={base!r}, groups={self.group_names!r})"

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def slugs(self) -> list[str]:
        return [g.slug for g in self.groups]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @staticmethod
    def adapter_name(slug: str) -> str:
        """The peft adapter name under which a group's adapter is loaded into a UNet."""
        return f"guda_{slug}"

    def adapter_path(self, slug: str) -> str:
        """The bundle-relative path of the adapter file of the group with this slug."""
        for g in self.groups:
            if g.slug == slug:
                return g.adapter_file
        raise ConfigError(f"Unknown slug {slug!r}; the bundle has slugs {self.slugs}.")

    def group(self, key: str | int) -> GroupRecord:
        """The group with this name, else this slug, else this id.

        Raises:
            ConfigError: if there is no such group.
        """
        for field_name in ("name", "slug", "id"):
            for g in self.groups:
                if type(key) is type(getattr(g, field_name)) and key == getattr(g, field_name):
                    return g
        raise ConfigError(f"Unknown group {key!r}; the bundle has groups {self.group_names}.")

    def to_manifest(self) -> dict:
        """The content of ``guda_bundle.json``."""
        return {
            "format_version": FORMAT_VERSION,
            "library": "diffusers-guda",
            "library_version": _library_version(),
            "software": {pkg: _version_of(pkg) for pkg in ("diffusers", "peft", "torch", "huggingface_hub")},
            "base_model": self.base_model,
            "groups": [asdict(g) for g in self.groups],
            "lora": self.lora,
            "objective": self.objective,
            "elbo": self.elbo,
            "seeds": self.seeds,
            "training": self.training,
        }

    # ----------------------------------------------------------------------------------- saving

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = True) -> Path:
        """Write the bundle to a directory, atomically.

        The bundle is written to a temporary directory beside ``save_directory`` and renamed into place
        only when complete, so an interrupted save leaves any previous bundle there untouched.

        Args:
            save_directory: Target directory.
            overwrite: Replace an existing directory at that path.

        Returns:
            The path of the saved bundle.
        """
        path = Path(save_directory)
        with atomic_directory(path, overwrite=overwrite) as tmp:
            self._write(tmp)
        return path

    def _write(self, directory: Path, repo_id: str | None = None) -> None:
        for group in self.groups:
            target = directory.joinpath(*PurePosixPath(group.adapter_file).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            save_adapter_file(target, self.adapters[group.slug], self.adapter_configs[group.slug])
        write_json_atomic(directory / MANIFEST_NAME, self.to_manifest())
        self.model_card(repo_id).save(str(directory / CARD_NAME))

    def model_card(self, repo_id: str | None = None) -> ModelCard:
        """The bundle's model card (``README.md``).

        Args:
            repo_id: The Hub repo or directory the bundle will live in, used in the usage snippets.
        """
        base_id = self.base_model.get("id")
        data = ModelCardData(
            base_model=base_id if _looks_like_hub_id(base_id) else None, library_name="diffusers", tags=list(CARD_TAGS)
        )
        return ModelCard(f"---\n{data.to_yaml()}\n---\n{self._card_body(repo_id)}")

    def _card_body(self, repo_id: str | None) -> str:
        ref = repo_id or (self.source or {}).get("repo_id") or "path/or/repo-id-of-this-bundle"
        base = self.base_model
        base_desc = f"`{base['id']}`" if base.get("id") else "an unnamed base model"
        details = [f"{k} `{base[k]}`" for k in ("revision", "dtype", "class_name") if base.get(k) is not None]
        targets = ", ".join(map(str, self.lora.get("target_modules", [])))
        lora_desc = f"rank {self.lora.get('rank')}, alpha {self.lora.get('alpha')}, on {targets}"
        rows = []
        for g in self.groups:
            cells = [str(g.id), _md(g.name), f"`{g.slug}`", str(g.num_images)]
            cells += [_before_after(g.stats, key) for key, _ in _STAT_COLUMNS]
            rows.append("| " + " | ".join(cells) + " |")
        header = "| id | group | slug | images | " + " | ".join(f"{t} (before → after)" for _, t in _STAT_COLUMNS)
        header += " |"
        first = self.groups[0]
        return f"""
# GUDA adapter bundle ({self.num_groups} groups)

Group data attribution by unlearning, made with diffusers-guda for the base UNet {base_desc}.

Each of the {self.num_groups} LoRA adapters in `adapters/<slug>/` is **the base model with one group of
its training data unlearned**. The attribution score of group *k* for an image *x* is

    score_k(x) = ELBO(x; base) - ELBO(x; base + adapter_k)

and a higher score means group *k* mattered more for *x*.

- Base model: {", ".join([base_desc, *details])}; UNet weight fingerprint (sha256)
  `{base['fingerprint']}`. The adapters only mean something on exactly these weights, and
  loading checks the fingerprint.
- Objective: `{self.objective.get('name')}`. LoRA: {lora_desc}.
- Everything else (objective settings, ELBO settings, seeds, statistics) is in `guda_bundle.json`.

## Groups

{header}
|{'---|' * (4 + len(_STAT_COLUMNS))}
{chr(10).join(rows)}

## Usage

```python
from diffusers_guda.bundle import AdapterBundle

bundle = AdapterBundle.from_pretrained("{ref}")
names = bundle.load_into(pipe.unet)   # refuses a UNet with other base weights
pipe.unet.set_adapter(names[0])       # the base model with group {first.name!r} unlearned
# or, with a GUDA pipeline: pipe.load_guda_bundle("{ref}")
```

Every adapter is a stock diffusers LoRA file, readable without diffusers-guda:

```python
{self._stock_loading(ref, first)}
```
{self._conditional_note()}"""

    def _stock_loading(self, ref: str, first: GroupRecord) -> str:
        name = self.adapter_name(first.slug)
        if self.base_model.get("latent") or self.base_model.get("conditional"):
            return (
                f'pipe.load_lora_weights("{ref}", weight_name="{first.adapter_file}", adapter_name="{name}")\n'
                f"# or: pipe.unet.load_lora_adapter(\"{ref}\", weight_name=\"{first.adapter_file}\", prefix=\"unet\")"
            )
        return (
            f'pipe.unet.load_lora_adapter(\n    "{ref}",\n    weight_name="{first.adapter_file}",\n'
            f'    prefix="unet",\n    adapter_name="{name}",\n)'
        )

    def _conditional_note(self) -> str:
        if not self.base_model.get("conditional"):
            return ""
        latent = " of the image's VAE latent (posterior mean x scaling factor)" if self.base_model.get("latent") else ""
        return (
            f"\nThe base is a text-to-image model: scores are conditional ELBOs{latent} given the image's "
            "prompt, so attribute each image with the prompt it was generated from "
            "(`pipe.attribute(images, prompts=...)` with `GUDAStableDiffusionPipeline`).\n"
        )

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
        expected_fingerprint: str | None = None,
    ) -> "AdapterBundle":
        """Load a bundle from a local directory or a Hub repo.

        Only ``guda_bundle.json``, ``README.md`` and ``adapters/**/*.safetensors`` are downloaded, into the
        Hub cache; a cached bundle loads offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).

        Args:
            pretrained_model_name_or_path: A bundle directory or a Hub repo id.
            revision: Branch, tag or commit on the Hub.
            cache_dir: Hub cache directory.
            local_files_only: Only use the local Hub cache.
            token: Hub token.
            endpoint: Hub endpoint; defaults to ``HF_ENDPOINT``.
            expected_fingerprint: Fingerprint of the base UNet the bundle must belong to.

        Returns:
            The bundle, with ``source`` set to ``{"path": ...}`` or ``{"repo_id": ..., "revision": <commit>}``.

        Raises:
            BundleError: if the bundle is malformed, incomplete or holds anything but JSON and safetensors.
            BaseModelMismatchError: if ``expected_fingerprint`` is not the bundle's base fingerprint.
        """
        location = str(pretrained_model_name_or_path)
        if Path(location).is_dir():
            root = Path(location)
            source, jail = {"path": str(root.resolve()), "revision": None}, root.resolve()
        elif Path(location).exists():
            raise BundleError(f"{location} is a file; pass the bundle directory that contains {MANIFEST_NAME}.")
        else:
            try:
                root = Path(
                    snapshot_download(
                        location, revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only),
                        token=token, endpoint=endpoint, allow_patterns=_HUB_PATTERNS,
                    )
                )
            except HFValidationError as exc:
                raise BundleError(
                    f"{location!r} is neither a bundle directory nor a valid Hub repo id ({exc})."
                ) from exc
            commit = root.name if root.parent.name == "snapshots" and _COMMIT_SHA.fullmatch(root.name) else None
            source, jail = {"repo_id": location, "revision": commit}, root.parent.parent.resolve()

        _refuse_unsafe_files(root)
        manifest_path = root / MANIFEST_NAME
        manifest = _read_manifest(manifest_path)
        _check_manifest(manifest, manifest_path)
        groups = [GroupRecord(**g) for g in manifest["groups"]]
        base = manifest["base_model"]
        if expected_fingerprint is not None and expected_fingerprint != base["fingerprint"]:
            raise _mismatch(base, expected_fingerprint, "the expected base model", source)

        adapters, configs = {}, {}
        for group in groups:
            path = _member(root, group, jail, manifest_path)
            adapters[group.slug], configs[group.slug] = load_adapter_file(path)
        return cls(
            groups=groups, adapters=adapters, adapter_configs=configs, lora=manifest["lora"], base_model=base,
            objective=manifest["objective"], elbo=manifest.get("elbo"), seeds=manifest.get("seeds"),
            training=manifest.get("training"), source=source,
        )

    # -------------------------------------------------------------------------------------- Hub

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload GUDA adapter bundle",
        create_pr: bool = False,
        endpoint: str | None = None,
    ) -> str:
        """Upload the bundle to a Hub model repo, creating the repo if needed.

        Adapter files in the repo that the bundle no longer has are deleted in the same commit.

        Args:
            repo_id: Target repo, ``"user/name"``.
            token: Hub token with write access.
            private: Visibility of a newly created repo.
            revision: Branch to push to (created if missing).
            commit_message: Commit message.
            create_pr: Open a pull request instead of pushing to the branch.
            endpoint: Hub endpoint; defaults to ``HF_ENDPOINT``.

        Returns:
            The URL of the commit (or of the pull request with ``create_pr=True``).
        """
        api = HfApi(endpoint=endpoint, token=token)
        repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="guda-bundle-") as tmp:
            folder = Path(tmp) / "bundle"
            folder.mkdir()
            self._write(folder, repo_id=repo_id)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                create_pr=create_pr, delete_patterns=[f"{ADAPTERS_DIR}/**"],
            )
        return info.pr_url if create_pr and info.pr_url else info.commit_url

    # ------------------------------------------------------------------------------------ UNets

    def check_base(self, unet: torch.nn.Module) -> None:
        """Check that ``unet`` holds the base weights the bundle was made for (LoRA layers ignored).

        Raises:
            BaseModelMismatchError: if the UNet's fingerprint differs from the bundle's.
        """
        fingerprint = unet_fingerprint(unet)
        if fingerprint != self.base_model["fingerprint"]:
            raise _mismatch(self.base_model, fingerprint, f"this {type(unet).__name__}", self.source)

    def load_into(
        self, unet: torch.nn.Module, *, groups: list[str] | None = None, check_base: bool = True
    ) -> list[str]:
        """Add the groups' adapters to ``unet`` as peft adapters named ``guda_<slug>``.

        An adapter already loaded under the same name is replaced. All adapters stay loaded and the
        last one is active; select one with ``unet.set_adapter(name)`` and switch them off with
        ``unet.disable_adapters()``.

        Args:
            unet: A UNet with diffusers' ``PeftAdapterMixin`` (e.g. ``UNet2DConditionModel`` or
                :class:`~diffusers_guda.models.GUDAUNet2DModel`).
            groups: Names, slugs or ids of the groups to load; all groups by default.
            check_base: Verify the base fingerprint first.

        Returns:
            The adapter names, in group order.

        Raises:
            BaseModelMismatchError: if ``check_base`` and ``unet`` is not the bundle's base model.
            ConfigError: for an unknown group.
            TypeError: if ``unet`` cannot take LoRA adapters.
        """
        if not hasattr(unet, "load_lora_adapter"):
            raise TypeError(
                f"{type(unet).__name__} cannot take LoRA adapters; use a UNet with diffusers' PeftAdapterMixin "
                "(see diffusers_guda.models.with_adapter_support)."
            )
        selected = self.groups if groups is None else [self.group(key) for key in groups]
        selected = sorted({g.id: g for g in selected}.values(), key=lambda g: g.id)
        if check_base:
            self.check_base(unet)
        names = []
        for group in selected:
            name = self.adapter_name(group.slug)
            if name in getattr(unet, "peft_config", {}):
                unet.delete_adapters(name)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                load_adapter_into(unet, name, self.adapters[group.slug], self.adapter_configs[group.slug])
            names.append(name)
        return names


# -------------------------------------------------------------------------------------- helpers


def _library_version() -> str | None:
    version = _version_of("diffusers-guda")
    return version or getattr(sys.modules.get("diffusers_guda"), "__version__", None)


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _looks_like_hub_id(name: Any) -> bool:
    if not isinstance(name, str) or not name or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _md(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _before_after(stats: dict, key: str) -> str:
    before, after = stats.get(f"{key}_loss_before"), stats.get(f"{key}_loss_after")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else "–"  # noqa: E731
    return "–" if before is None and after is None else f"{fmt(before)} → {fmt(after)}"


def _short(fingerprint: Any) -> str:
    return f"{str(fingerprint)[:12]}…"


def _mismatch(base: dict, actual: str, what: str, source: dict | None) -> BaseModelMismatchError:
    where = ""
    if source:
        where = f" ({source.get('repo_id') or source.get('path')})"
    return BaseModelMismatchError(
        f"The adapter bundle{where} was made for base model {base.get('id')!r} (dtype {base.get('dtype')}, "
        f"UNet fingerprint {_short(base.get('fingerprint'))}), but {what} has fingerprint {_short(actual)}. "
        "Its adapters only mean something on exactly those base weights. Load the bundle into the base model it "
        "was made for, in the same dtype (the fingerprint covers the dtype: float16 and float32 weights of one "
        "model differ), or re-run unlearning against this base model to make a bundle for it."
    )


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise BundleError(
            f"No {MANIFEST_NAME} at {path}: this is not a GUDA adapter bundle, or it is incomplete. "
            "Bundles are written by AdapterBundle.save_pretrained / push_to_hub; re-save or re-download it."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"Cannot read the bundle manifest {path}: {exc}. Re-download or re-save the bundle.") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"The bundle manifest {path} must hold a JSON object, not {type(manifest).__name__}.")
    return manifest


def _check_manifest(manifest: dict, path: Path) -> None:
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            hint = f"written by a newer diffusers-guda (format {version}); upgrade diffusers-guda to load it"
        else:
            hint = (
                f"written by an older or unknown diffusers-guda (format {version!r}); re-save it with this "
                "version, or load it with the version that wrote it"
            )
        raise BundleError(f"The bundle manifest {path} was {hint}. This version reads format {FORMAT_VERSION}.")
    for key, kind in (("groups", list), ("base_model", dict), ("lora", dict), ("objective", dict)):
        if not isinstance(manifest.get(key), kind):
            raise BundleError(
                f"The bundle manifest {path} needs '{key}' as a JSON {kind.__name__}; got {manifest.get(key)!r}."
            )
    for key in ("elbo", "seeds", "training"):
        if not isinstance(manifest.get(key), (dict, type(None))):
            raise BundleError(f"The bundle manifest {path} has a '{key}' that is not an object or null.")
    if not isinstance(manifest["objective"].get("name"), str):
        raise BundleError(f"The bundle manifest {path} has no objective name (objective.name must be a string).")
    _check_groups(manifest["groups"], f"The bundle manifest {path}")
    _check_base_model(manifest["base_model"], f"The bundle manifest {path}")


def _check_groups(groups: list, where: str) -> None:
    if not groups:
        raise BundleError(f"{where} has no groups.")
    fields = {"id": int, "name": str, "slug": str, "num_images": int, "adapter_file": str, "stats": dict}
    for g in groups:
        if not isinstance(g, dict):
            raise BundleError(f"{where} has a group entry that is not an object: {g!r}.")
        bad = [k for k, t in fields.items() if not isinstance(g.get(k), t) or isinstance(g.get(k), bool)]
        if bad or set(g) - set(fields):
            raise BundleError(
                f"{where} has a malformed group entry {g!r}: it needs exactly the fields {sorted(fields)} "
                f"(wrong or missing: {bad or sorted(set(g) - set(fields))})."
            )
        if not g["adapter_file"]:
            raise BundleError(f"{where}: group {g['name']!r} has an empty adapter_file.")
        if g["num_images"] < 0:
            raise BundleError(f"{where}: group {g['name']!r} has a negative image count.")
        if slugify(g["slug"]) != g["slug"]:
            raise BundleError(
                f"{where}: group {g['name']!r} has the unsafe slug {g['slug']!r} (slugs are [a-z0-9_-], "
                "no '/' or '..'; see diffusers_guda.bundle.slugify)."
            )
    ids, names, slugs = ([g[k] for g in groups] for k in ("id", "name", "slug"))
    if sorted(ids) != list(range(len(groups))):
        raise BundleError(f"{where}: group ids must be 0..{len(groups) - 1}, each once; got {ids}.")
    for label, values in (("names", names), ("slugs", slugs)):
        if len(set(values)) != len(values):
            raise BundleError(f"{where}: group {label} must be unique; got {values}.")


def _check_base_model(base: dict, where: str) -> None:
    fingerprint = base.get("fingerprint")
    if not isinstance(fingerprint, str) or not _HEX64.fullmatch(fingerprint):
        raise BundleError(f"{where}: base_model.fingerprint must be a 64-digit sha256 hex string; got {fingerprint!r}.")
    if not isinstance(base.get("id"), (str, type(None))):
        raise BundleError(f"{where}: base_model.id must be a string or null.")


def _refuse_unsafe_files(root: Path) -> None:
    adapters = root / ADAPTERS_DIR
    if not adapters.is_dir():
        return
    for path in sorted(adapters.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise BundleError(
                f"Refusing to load the bundle at {root}: {path.relative_to(root)} is a pickle-based file, which can "
                "run arbitrary code when loaded. Bundles hold adapters only as .safetensors; delete that file, or "
                "re-save the bundle with AdapterBundle.save_pretrained."
            )
        if path.suffix != ".safetensors" or not path.is_file():
            raise BundleError(
                f"Refusing to load the bundle at {root}: {path.relative_to(root)} is not a .safetensors file. The "
                f"{ADAPTERS_DIR}/ folder may hold only adapter .safetensors files; remove that entry."
            )


def _member(root: Path, group: GroupRecord, jail: Path, manifest_path: Path) -> Path:
    rel = group.adapter_file
    parts = PurePosixPath(rel).parts
    unsafe = (
        not rel or "\\" in rel or PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute()
        or PureWindowsPath(rel).drive or ".." in parts or parts[0] != ADAPTERS_DIR or not rel.endswith(".safetensors")
    )
    target = root.joinpath(*parts) if parts else root
    if not unsafe and not target.resolve().is_relative_to(jail):
        unsafe = True
    if unsafe:
        raise BundleError(
            f"The bundle manifest {manifest_path} gives group {group.name!r} the adapter file {rel!r}, which is not "
            f"a .safetensors file inside the bundle's {ADAPTERS_DIR}/ folder. Refusing to load it; the manifest may "
            f"have been tampered with (expected {adapter_file_for(group.slug)!r})."
        )
    if not target.is_file():
        raise BundleError(
            f"The bundle at {root} is incomplete: the adapter of group {group.name!r} ({rel}) is missing. "
            "Re-download or re-save the bundle."
        )
    return target
