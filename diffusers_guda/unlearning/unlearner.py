"""Train one LoRA adapter per group that unlearns it from the frozen base UNet (see
docs/method.md#unlearning-one-group).

The base UNet is never modified: each group's counterfactual is ``base + LoRA_k``, and the teacher
(the full model) is the same UNet run without adapters.
"""

from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..adapter_state import adapter_state, loaded_adapters, restore_adapter_state
from ..bundle import AdapterBundle, GroupRecord, adapter_file_for, unique_slugs
from ..data import GroupedDataset
from ..distributed import ProcessInfo, current_process
from ..elbo import ELBOConfig
from ..errors import ConfigError, UnlearningDivergedError
from ..hashing import derive_seed, unet_fingerprint
from ..lora import adapter_state_dict, peft_config_metadata
from ..models import is_conditional, with_adapter_support
from ..objectives import NoiseSchedule, get_objective
from .base_model import base_model_identity, base_model_record
from .batches import draw_batch
from .checkpoint import UnlearningCheckpoint
from .config import UnlearningConfig
from .evaluation import EvaluationSets, evaluation_sets, mean_losses
from .forwards import UNetForwards
from .joint import GroupRun, optimise_jointly
from .shared_draws import SharedDraws
from .training import optimise, run_statistics

GroupResult = tuple[dict[str, torch.Tensor], dict, dict]  # (state_dict, config_metadata, stats) of one adapter


class GroupUnlearner:
    """Trains the per-group adapters on one shared UNet and packs them into an :class:`AdapterBundle`.

    Args:
        unet: The full model's UNet (frozen; a ``UNet2DModel`` gets adapter support added), on the
            device to train on.
        scheduler: Its training scheduler (``alphas_cumprod``, ``prediction_type``).
        config: Unlearning settings (``autocast_dtype="auto"`` is resolved for the UNet's device).
        base_model_id: Name recorded in the bundle (a Hub id or a path); default: where the UNet was
            loaded from (the Hub repo, for a UNet from the Hub cache).
        base_model_revision: Revision recorded in the bundle; default: the commit of a UNet loaded
            from the Hub cache.
        encode_prompts: For a text-conditioned UNet: maps a list of prompts to the text embeddings
            ``[B, L, D]`` it is conditioned on (a pipeline's text encoder); the dataset then needs
            one prompt per image. Its images are the model's inputs (VAE latents for latent models).
        base_model_extra: Further fields recorded in the bundle's ``base_model`` (e.g. the VAE's
            scaling factor of a latent model).
        elbo_config: How the bundle's adapters are to be scored; recorded in the bundle, and used by
            ``attribute`` unless it is given another (default: :class:`ELBOConfig`'s defaults).
    """

    def __init__(
        self,
        unet,
        scheduler,
        config: UnlearningConfig | None = None,
        base_model_id: str | None = None,
        base_model_revision: str | None = None,
        encode_prompts: Callable[[list[str]], torch.Tensor] | None = None,
        base_model_extra: dict | None = None,
        elbo_config: ELBOConfig | None = None,
    ):
        self.base_model_id, self.base_model_revision = base_model_identity(unet, base_model_id, base_model_revision)
        self.unet = with_adapter_support(unet)
        self.elbo_config = elbo_config or ELBOConfig()
        self.conditional = is_conditional(self.unet)
        if self.conditional and encode_prompts is None:
            raise ConfigError(
                f"This {type(self.unet).__name__} is text-conditioned; pass encode_prompts (the pipeline's text "
                "encoder, as pipe.unlearn_groups does) so that each image is conditioned on its prompt."
            )
        self.encode_prompts = encode_prompts
        self.base_model_extra = dict(base_model_extra or {})
        self.unet.requires_grad_(False)
        self.scheduler = scheduler
        self.schedule = NoiseSchedule(scheduler)
        self.config = (config or UnlearningConfig()).for_device(next(self.unet.parameters()).device)
        if get_objective(self.config.objective, self.config.objective_options).needs_text and not self.conditional:
            raise ConfigError(
                f"The {self.config.objective} objective conditions on prompts, but this {type(self.unet).__name__} is "
                "unconditional; use an objective for unconditional models (e.g. retrack, their default)."
            )
        self.forwards = UNetForwards(self.unet, self.conditional, encode_prompts, self.config.autocast_dtype, self.schedule)
        self._fingerprint: str | None = None
        self._shared: SharedDraws | None = None

    @property
    def fingerprint(self) -> str:
        """:func:`~diffusers_guda.hashing.unet_fingerprint` of the base UNet (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = unet_fingerprint(self.unet)
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        """The device of the UNet's weights."""
        return self.forwards.device

    # -- one group ------------------------------------------------------------------------------

    def unlearn_group(self, dataset: GroupedDataset, group: int, adapter_name: str, progress: bool = True) -> GroupResult:
        """Train the adapter of ``group`` and remove it from the UNet again.

        The adapter depends on ``config.seed`` and the group alone. The UNet's adapter state (which
        adapters are loaded, active and enabled) is the same afterwards.

        Args:
            dataset: The grouped training set.
            group: The group's id in ``dataset``.
            adapter_name: The peft name the adapter is trained under.
            progress: Show a progress bar of the steps.

        Returns:
            ``(state_dict, config_metadata, stats)`` of the adapter, in diffusers' LoRA format.

        Raises:
            UnlearningDivergedError: if a loss becomes NaN or infinite.
        """
        run = self._prepare(dataset, group, adapter_name)
        with self._new_adapter(adapter_name, run.seed) as params:
            start = time.perf_counter()
            bar = tqdm(range(run.steps), desc=f"unlearn {run.name}", disable=not progress, leave=False, dynamic_ncols=True)
            curve = optimise(run.objective, run.next_batch, params, self.config, self.forwards.autocast, bar, run.name)
            return self._finish(run, curve, time.perf_counter() - start)

    def unlearn_jointly(self, dataset: GroupedDataset, groups: Sequence[int], adapter_names: Sequence[str],
                        progress: bool = True) -> list[GroupResult]:
        """Train the adapters of several groups in one loop, the rows of all of them in each forward.

        See docs/method.md#adapters-trained-together. Each group keeps its own seed, batches,
        optimiser and step count, so its adapter is :meth:`unlearn_group`'s up to float rounding.
        Each group's ``stats`` record the loop's wall time shared equally and the groups it was
        trained with. The UNet's adapter state is the same afterwards.

        Args:
            dataset: The grouped training set.
            groups: The groups' ids in ``dataset``.
            adapter_names: The peft name each adapter is trained under.
            progress: Show a progress bar of the steps.

        Returns:
            ``(state_dict, config_metadata, stats)`` of each group's adapter, in the order of ``groups``.

        Raises:
            UnlearningDivergedError: if a group's loss becomes NaN or infinite.
            ConfigError: if the objective's model inputs depend on model outputs (it cannot be batched this way).
        """
        runs = [self._prepare(dataset, g, name) for g, name in zip(groups, adapter_names)]
        with self._new_adapters(runs):
            start = time.perf_counter()
            names = ", ".join(r.name for r in runs)
            bar = tqdm(range(max(r.steps for r in runs)), desc=f"unlearn {names}", disable=not progress, leave=False, dynamic_ncols=True)
            curves = optimise_jointly(runs, self.forwards, self.config, self.forwards.autocast, bar)
            wall = (time.perf_counter() - start) / len(runs)
            return [self._finish(run, curve, wall, trained_with=[r.name for r in runs if r is not run]) for run, curve in zip(runs, curves)]

    def _prepare(self, dataset: GroupedDataset, group: int, adapter_name: str) -> GroupRun:
        """Everything a group's run needs before its adapter exists: seed, objective, steps, batches, the losses before."""
        cfg, name = self.config, dataset.group_names[group]
        seed = derive_seed("guda-unlearn", cfg.seed, group, name)
        generator = torch.Generator().manual_seed(seed)
        objective = get_objective(cfg.objective, cfg.objective_options)
        objective.setup(dataset, group, self.schedule)
        self.forwards.check_prompts(dataset)
        forget_idx, retain_idx = dataset.forget_indices(group), dataset.retain_indices(group)
        sizes = dataset.group_sizes()
        steps = cfg.steps_for(len(forget_idx), sum(sizes) / len(sizes))
        evaluation = evaluation_sets(dataset, group, forget_idx, retain_idx, cfg, self.schedule, self.forwards)
        before = self._evaluate(evaluation, adapter=None)
        next_batch = partial(draw_batch, dataset, group, forget_idx, retain_idx, generator, cfg, self.schedule, self.forwards,
                             self.forwards.teacher(), self._shared_draws(dataset))
        return GroupRun(name, adapter_name, seed, generator, objective, steps, next_batch, evaluation, before, group)

    def _shared_draws(self, dataset: GroupedDataset) -> SharedDraws | None:
        """The shared draws of ``dataset`` (kept while the unlearner serves that dataset), or ``None``."""
        cfg = self.config
        if cfg.shared_draws == 0:
            return None
        if self._shared is None or self._shared.dataset is not dataset:
            self._shared = SharedDraws(dataset, cfg.shared_draws, derive_seed("guda-shared-draws", cfg.seed), self.schedule,
                                       self.forwards, cfg.forget_batch_size + cfg.retain_batch_size, cfg.timestep_sampling)
        return self._shared

    def _finish(self, run: GroupRun, curve: list[dict[str, float]], wall: float, trained_with: list[str] | None = None) -> GroupResult:
        """A trained group's result: its losses after, its adapter's weights and config, its statistics."""
        cfg = self.config
        after = self._evaluate(run.evaluation, adapter=run.adapter_name)
        if not all(math.isfinite(v) for v in after.values()):
            raise UnlearningDivergedError(f"Unlearning group '{run.name}' produced non-finite outputs; lower the learning rate.")
        state = adapter_state_dict(self.unet, run.adapter_name)
        metadata = peft_config_metadata(self.unet, run.adapter_name)
        # teacher forwards count as passes too; with shared draws, those at the batch's own rows are the ones
        # the table computed while serving this group
        fb, rb = cfg.forget_batch_size, cfg.retain_batch_size
        passes_per_step = fb + rb + run.objective.teacher_passes(fb, rb)
        shared_rows = None
        if cfg.shared_draws:
            passes_per_step -= run.objective.row_teacher_passes(fb, rb)
            shared_rows = self._shared.computed_for.pop(run.group, 0)
        passes = run.steps * passes_per_step + (shared_rows or 0)
        stats = run_statistics(run.seed, run.steps, wall, passes, run.before, after, curve, trained_with, shared_rows)
        return state, metadata, stats

    @contextlib.contextmanager
    def _new_adapter(self, adapter_name: str, seed: int) -> Iterator[list[torch.nn.Parameter]]:
        """Add a fresh adapter, run the block with it active (yielding its trainable parameters), delete it."""
        unet = self.unet
        previous = adapter_state(unet)
        try:
            params = self._add_trainable(adapter_name, seed)
            with self.forwards.running(adapter_name), self._gradient_checkpointing():
                yield params
        finally:
            restore_adapter_state(unet, previous)  # first, so that the adapter is deleted while inactive
            if adapter_name in loaded_adapters(unet):
                unet.delete_adapters(adapter_name)

    @contextlib.contextmanager
    def _new_adapters(self, runs: list[GroupRun]) -> Iterator[None]:
        """Add a fresh adapter per run (its ``params`` set), run the block with all of them active, delete them."""
        unet = self.unet
        previous = adapter_state(unet)
        names = [r.adapter_name for r in runs]
        try:
            for run in runs:
                run.params = self._add_trainable(run.adapter_name, run.seed)
            # all active and enabled for the whole loop: peft keeps only active adapters trainable, and the
            # state each forward restores (a disabled one turns requires_grad off before the backward)
            unet.enable_adapters()
            unet.set_adapter(names)
            yield  # never with gradient checkpointing (UnlearningConfig refuses it with joint_groups > 1)
        finally:
            restore_adapter_state(unet, previous)
            added = [n for n in names if n in loaded_adapters(unet)]
            if added:
                unet.delete_adapters(added)

    def _add_trainable(self, adapter_name: str, seed: int) -> list[torch.nn.Parameter]:
        """Add a fresh adapter initialised from ``seed``; its parameters, in float32 and trainable."""
        torch.manual_seed(seed)  # peft initialises lora_A from the global generator
        self.unet.add_adapter(self.config.lora.to_peft(self.unet), adapter_name=adapter_name)
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
        for p in params:
            if p.dtype != torch.float32:  # a half-precision base: train the adapter in float32
                p.data = p.data.float()
            p.requires_grad_(True)
        return params

    @contextlib.contextmanager
    def _gradient_checkpointing(self) -> Iterator[None]:
        """Recompute the UNet's activations in the backward pass during the block, when the settings ask for it."""
        unet = self.unet
        if not self.config.gradient_checkpointing or unet.is_gradient_checkpointing:
            yield
            return
        if not getattr(unet, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(unet).__name__} does not support gradient checkpointing; set gradient_checkpointing=False.")
        unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            unet.disable_gradient_checkpointing()

    def _evaluate(self, sets: EvaluationSets, adapter: str | None) -> dict[str, float]:
        with self.forwards.running(adapter):
            return mean_losses(self.forwards, self.schedule, sets)

    # -- all groups -----------------------------------------------------------------------------

    def unlearn(
        self,
        dataset: GroupedDataset,
        groups: Sequence[int | str] | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        process: ProcessInfo | None = None,
    ) -> AdapterBundle:
        """Unlearn each group and return the bundle of adapters.

        Under ``torchrun`` or ``accelerate launch``, each process unlearns a contiguous share of the
        groups still to do and every process returns the complete bundle; a group's adapter does
        not depend on the process that trained it, so the bundle equals a one-process run's.

        Args:
            dataset: The grouped training set of the base model.
            groups: Group ids or names (default: all).
            checkpoint_dir: If given, each finished group is written there atomically and a rerun
                with the same settings (and any number of processes) skips it (resume after a crash
                or a kill; see docs/formats.md#checkpoints-and-resume).
            progress: Show progress bars (on the main process only).
            process: This process of a launch; default :func:`~diffusers_guda.distributed.current_process`
                (pass :data:`~diffusers_guda.distributed.SINGLE_PROCESS` to unlearn every group here).

        Returns:
            The bundle: the adapters, the base model's identity and fingerprint, the settings, the ELBO
            configuration (``elbo_config``) and the seeds.

        Raises:
            DistributedError: if the processes of a launch were given other data, settings or base model.
            CheckpointMismatchError: if ``checkpoint_dir`` holds groups unlearned with other settings, data or base model.
        """
        process = current_process() if process is None else process
        group_ids = [dataset.group_index(g) for g in (groups if groups is not None else range(dataset.num_groups))]
        slugs = unique_slugs(dataset.group_names)
        checkpoint = UnlearningCheckpoint(checkpoint_dir) if checkpoint_dir is not None else None
        run = self._run_record(dataset)  # hashes the whole dataset: once
        process.check_same((run, group_ids), "data, unlearning settings or base model")
        if checkpoint is not None:
            checkpoint.check_run(run)
        # what the main process finds finished, so that every process shards the same pending list
        finished = process.broadcast([gid for gid in group_ids if checkpoint is not None and checkpoint.is_finished(slugs[gid])])
        results = {gid: checkpoint.load(slugs[gid]) for gid in finished}
        mine = process.shard([gid for gid in group_ids if gid not in finished])
        trained = self._unlearn_groups(dataset, mine, slugs, checkpoint, progress, process)
        for part in process.gather(trained):
            results.update(part)
        return self._bundle(dataset, group_ids, slugs, results)

    def _unlearn_groups(
        self, dataset: GroupedDataset, group_ids: list[int], slugs: list[str], checkpoint: UnlearningCheckpoint | None,
        progress: bool, process: ProcessInfo,
    ) -> dict[int, GroupResult]:
        """Unlearn ``group_ids`` here, ``config.joint_groups`` at a time, checkpointing each."""
        trained = {}
        desc = f"groups (process 0 of {process.world_size})" if process.is_distributed else "groups"
        outer = tqdm(total=len(group_ids), desc=desc, disable=not (progress and process.is_main), dynamic_ncols=True)
        size, inner = self.config.joint_groups, progress and process.is_main
        for start in range(0, len(group_ids), size):
            chunk = group_ids[start : start + size]
            outer.set_postfix(group=", ".join(dataset.group_names[g] for g in chunk))
            names = [AdapterBundle.adapter_name(slugs[g]) for g in chunk]
            if size == 1:
                results = [self.unlearn_group(dataset, chunk[0], names[0], progress=inner)]
            else:
                results = self.unlearn_jointly(dataset, chunk, names, progress=inner)
            for gid, result in zip(chunk, results):
                trained[gid] = result
                if checkpoint is not None:
                    checkpoint.save(slugs[gid], *result)
            outer.update(len(chunk))
        outer.close()
        return trained

    def _bundle(self, dataset: GroupedDataset, group_ids: list[int], slugs: list[str], results: dict[int, GroupResult]) -> AdapterBundle:
        """The bundle of the groups ``group_ids``, in that order, from their results."""
        records, adapters, configs = [], {}, {}
        for gid in group_ids:
            slug = slugs[gid]
            adapters[slug], configs[slug], stats = results[gid]
            records.append(
                GroupRecord(
                    id=len(records),  # bundle ids are 0..K-1 even when only some groups are unlearned
                    name=dataset.group_names[gid],
                    slug=slug,
                    num_images=int((dataset.group_ids == gid).sum()),
                    adapter_file=adapter_file_for(slug),
                    stats=stats,
                )
            )
        objective = get_objective(self.config.objective, self.config.objective_options)
        return AdapterBundle(
            groups=records,
            adapters=adapters,
            adapter_configs=configs,
            lora=self.config.lora.to_dict(),
            base_model=base_model_record(
                self.unet, model_id=self.base_model_id, revision=self.base_model_revision, fingerprint=self.fingerprint,
                conditional=self.conditional, extra=self.base_model_extra,
            ),
            objective={"name": self.config.objective, "config": objective.config.to_dict()},
            elbo=self.elbo_config.to_dict(),
            seeds={"unlearning": self.config.seed, "elbo": self.elbo_config.seed},
            training={k: v for k, v in self.config.to_dict().items() if k not in ("objective", "objective_options", "lora")},
        )

    def _run_record(self, dataset: GroupedDataset) -> dict:
        """What a checkpoint's groups depend on: base model (with its VAE and conditioning settings, such as
        Flux's guidance), settings and data."""
        return {
            "fingerprint": self.fingerprint,
            "base_model": self.base_model_extra,
            "config": self.config.to_dict(),
            "groups": dataset.group_names,
            "group_sizes": dataset.group_sizes(),
            "data": dataset.content_digests(),
        }
