"""The :class:`AdapterBundle`: one unlearning LoRA adapter per group with everything needed to use
them, saved to and loaded from a directory or a Hub repo (see docs/formats.md#adapter-bundles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard

from ..errors import BaseModelMismatchError, ConfigError
from ..hashing import unet_fingerprint
from ..io_utils import atomic_directory
from ..lora import load_adapter_into
from .card import model_card
from .files import read_adapters, read_bundle_manifest, write_bundle
from .hub import locate_bundle, upload_bundle
from .layout import MANIFEST_NAME
from .manifest import GroupRecord, build_manifest, check_contents


class AdapterBundle:
    """The per-group LoRA adapters of one unlearning run, with everything needed to use them.

    Adapter ``k`` is the base model with group ``k`` unlearned. Loading reads only JSON and
    safetensors, validates the manifest and checks the base model's fingerprint before any adapter
    touches a UNet.

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
        check_contents(self.groups, self.adapters, self.adapter_configs, self.base_model)

    def __repr__(self) -> str:
        base = self.base_model.get("id")
        return f"AdapterBundle(num_groups={self.num_groups}, base={base!r}, groups={self.group_names!r})"

    @property
    def group_names(self) -> list[str]:
        """The group names, in group order."""
        return [g.name for g in self.groups]

    @property
    def slugs(self) -> list[str]:
        """The group slugs (adapter directory names), in group order."""
        return [g.slug for g in self.groups]

    @property
    def num_groups(self) -> int:
        """The number of groups (and adapters)."""
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
        """The content of ``guda_bundle.json`` (see docs/formats.md#manifest)."""
        return build_manifest(self)

    def model_card(self, repo_id: str | None = None) -> ModelCard:
        """The bundle's model card (``README.md``).

        Args:
            repo_id: The Hub repo or directory the bundle will live in, used in the usage snippets.
        """
        return model_card(self, repo_id)

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = True) -> Path:
        """Write the bundle to a directory, atomically.

        The bundle is written to a temporary directory beside ``save_directory`` and renamed into place
        only when complete, so an interrupted save leaves any previous bundle there untouched.

        Args:
            save_directory: Target directory.
            overwrite: Replace an existing bundle at that path.

        Returns:
            The path of the saved bundle.

        Raises:
            ConfigError: if ``save_directory`` is a non-empty folder that is not a bundle (it is kept).
        """
        path = Path(save_directory)
        with atomic_directory(path, overwrite=overwrite, marker=MANIFEST_NAME) as tmp:
            write_bundle(self, tmp)
        return path

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
        root, source, jail = locate_bundle(
            str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, token=token, endpoint=endpoint,
        )
        manifest = read_bundle_manifest(root)
        base = manifest["base_model"]
        if expected_fingerprint is not None and expected_fingerprint != base["fingerprint"]:
            raise _mismatch(base, expected_fingerprint, "the expected base model", source)
        groups = [GroupRecord(**g) for g in manifest["groups"]]
        adapters, configs = read_adapters(root, groups, jail)
        return cls(
            groups=groups, adapters=adapters, adapter_configs=configs, lora=manifest["lora"], base_model=base,
            objective=manifest["objective"], elbo=manifest.get("elbo"), seeds=manifest.get("seeds"),
            training=manifest.get("training"), source=source,
        )

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
        return upload_bundle(
            lambda folder, repo: write_bundle(self, folder, repo), repo_id, token=token, private=private,
            revision=revision, commit_message=commit_message, create_pr=create_pr, endpoint=endpoint,
        )

    def check_base(self, unet: torch.nn.Module) -> None:
        """Check that ``unet`` holds the base weights the bundle was made for (LoRA layers ignored).

        Raises:
            BaseModelMismatchError: if the UNet's fingerprint differs from the bundle's.
        """
        fingerprint = unet_fingerprint(unet)
        if fingerprint != self.base_model["fingerprint"]:
            raise _mismatch(self.base_model, fingerprint, f"this {type(unet).__name__}", self.source)

    def load_into(self, unet: torch.nn.Module, *, groups: list[str] | None = None, check_base: bool = True) -> list[str]:
        """Add the groups' adapters to ``unet`` as peft adapters named ``guda_<slug>``.

        An adapter already loaded under the same name is replaced. All adapters stay loaded and the
        last one is active; whether adapters are enabled is left as it was. Run the UNet with one of
        them (or as the base model) with :func:`~diffusers_guda.adapter_state.use_adapters`, or select
        one with ``unet.set_adapter(name)``.

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
        names = [self.adapter_name(group.slug) for group in selected]
        for name, group in zip(names, selected):
            load_adapter_into(unet, name, self.adapters[group.slug], self.adapter_configs[group.slug])
        return names


def _mismatch(base: dict, actual: str, what: str, source: dict | None) -> BaseModelMismatchError:
    where = f" ({source.get('repo_id') or source.get('path')})" if source else ""
    return BaseModelMismatchError(
        f"The adapter bundle{where} was made for base model {base.get('id')!r} (dtype {base.get('dtype')}, "
        f"UNet fingerprint {_short(base.get('fingerprint'))}), but {what} has fingerprint {_short(actual)}. "
        "Its adapters only mean something on exactly those base weights. Load the bundle into the base model it "
        "was made for, in the same dtype (the fingerprint covers the dtype: float16 and float32 weights of one "
        "model differ), or re-run unlearning against this base model to make a bundle for it."
    )


def _short(fingerprint: Any) -> str:
    return f"{str(fingerprint)[:12]}…"
