"""Train one LoRA adapter per group that unlearns it from the frozen base UNet (DESIGN §1.2).

The base UNet is never modified: each group's counterfactual is ``base + LoRA_k``, and the teacher
(the full model) is the same UNet with its adapters disabled.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .bundle import AdapterBundle, GroupRecord, unique_slugs
from .data import GroupedDataset
from .distributed import ProcessInfo, current_process
from .elbo import ELBOConfig
from .errors import ConfigError, DataError, UnlearningDivergedError
from .hashing import derive_seed, unet_fingerprint
from .io_utils import atomic_directory, write_json_atomic
from .lora import ADAPTER_WEIGHT_NAME, LoRASettings, adapter_state_dict, load_adapter_file, peft_config_metadata, save_adapter_file
from .models import is_conditional, with_adapter_support
from .objectives import NoiseSchedule, UnlearningBatch, get_objective

STATS_NAME = "stats.json"
RUN_NAME = "run.json"


@dataclass
class UnlearningConfig:
    """How each group's adapter is trained.

    Args:
        objective: Registered objective name (``retrack``, ``gradient_ascent``...).
        objective_options: Options of that objective's config (e.g. ``{"num_neighbors": 10}``).
        lora: Adapter shape.
        steps: Optimiser steps per group (of the mean group size, when ``size_exponent`` is not 0).
        size_exponent: Scales each group's steps with its size: a group of ``n`` images gets
            ``max(1, round(steps * (n / mean group size) ** size_exponent))`` steps. Retraining
            without a large group moves the model more than without a small one; 0 gives every
            group ``steps``.
        learning_rate: AdamW learning rate (constant).
        forget_batch_size: Forget images per step.
        retain_batch_size: Retain images per step.
        max_grad_norm: Gradient clipping; ``None`` disables it.
        seed: Base seed; each group's seed is derived from it and the group, so a group's adapter
            does not depend on which other groups are trained, in which order or process.
        eval_images: Forget and retain images (each) on which the loss before/after is measured.
        eval_draws: Fixed (t, noise) draws per evaluation image.
    """

    objective: str = field(default="retrack", metadata={"help": "Registered objective name."})
    objective_options: dict = field(default_factory=dict, metadata={"help": "Options of the objective."})
    lora: LoRASettings = field(default_factory=LoRASettings, metadata={"help": "Adapter shape."})
    steps: int = field(default=40, metadata={"help": "Optimiser steps per group."})
    size_exponent: float = field(default=0.0, metadata={"help": "Steps scale as (group size / mean size) ** size_exponent."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate."})
    forget_batch_size: int = field(default=64, metadata={"help": "Forget images per step."})
    retain_batch_size: int = field(default=64, metadata={"help": "Retain images per step."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=0, metadata={"help": "Base seed."})
    eval_images: int = field(default=256, metadata={"help": "Images per evaluation set."})
    eval_draws: int = field(default=4, metadata={"help": "Fixed draws per evaluation image."})
    autocast_dtype: str | None = field(default=None, metadata={"help": "bfloat16/float16 autocast of the forwards (CUDA), or None."})

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRASettings.from_dict(self.lora)
        if self.steps < 1 or self.forget_batch_size < 1 or self.retain_batch_size < 1:
            raise ConfigError("steps and batch sizes must be >= 1.")
        if not self.size_exponent >= 0:
            raise ConfigError(f"size_exponent must be >= 0, got {self.size_exponent}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}.")
        get_objective(self.objective, self.objective_options)  # validate name and options early

    def steps_for(self, group_size: int, mean_group_size: float) -> int:
        """Optimiser steps of a group of ``group_size`` images (see ``size_exponent``)."""
        if self.size_exponent == 0:
            return self.steps
        return max(1, round(self.steps * (group_size / mean_group_size) ** self.size_exponent))

    def describe_steps(self) -> str:
        """The step budget in words, for logs: ``"40 steps each"`` or ``"120 steps at the mean group size, ∝ size^1"``."""
        if self.size_exponent == 0:
            return f"{self.steps} steps each"
        return f"{self.steps} steps at the mean group size, ∝ size^{self.size_exponent:g}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lora"] = self.lora.to_dict()
        return data


class GroupUnlearner:
    """Trains the per-group adapters on one shared UNet and packs them into an :class:`AdapterBundle`.

    Args:
        unet: The full model's UNet (frozen; a ``UNet2DModel`` gets adapter support added).
        scheduler: Its training scheduler (``alphas_cumprod``, ``prediction_type``).
        config: Unlearning settings.
        base_model_id: Name recorded in the bundle (a Hub id or a path).
        base_model_revision: Revision recorded in the bundle.
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
        self.config = config or UnlearningConfig()
        if get_objective(self.config.objective, self.config.objective_options).needs_text and not self.conditional:
            raise ConfigError(
                f"The {self.config.objective} objective conditions on prompts, but this {type(self.unet).__name__} is "
                "unconditional; use an objective for unconditional models (e.g. retrack, their default)."
            )
        self.base_model_id = base_model_id
        self.base_model_revision = base_model_revision
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = unet_fingerprint(self.unet)
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # -- one group ------------------------------------------------------------------------------

    def unlearn_group(self, dataset: GroupedDataset, group: int, adapter_name: str, progress: bool = True) -> tuple[dict, dict, dict]:
        """Train the adapter of ``group`` and remove it from the UNet again.

        Returns:
            ``(state_dict, config_metadata, stats)`` of the adapter, in diffusers' LoRA format.

        Raises:
            UnlearningDivergedError: if a loss becomes NaN or infinite.
        """
        cfg = self.config
        unet, device = self.unet, self.device
        seed = derive_seed("guda-unlearn", cfg.seed, group, dataset.group_names[group])
        generator = torch.Generator().manual_seed(seed)
        objective = get_objective(cfg.objective, cfg.objective_options)
        objective.setup(dataset, group, self.schedule)
        self._check_prompts(dataset)
        forget_idx, retain_idx = dataset.forget_indices(group), dataset.retain_indices(group)
        sizes = dataset.group_sizes()
        steps = cfg.steps_for(len(forget_idx), sum(sizes) / len(sizes))
        evaluation = self._evaluation_sets(dataset, group, forget_idx, retain_idx)
        before = self._evaluate(evaluation, adapter=None)

        torch.manual_seed(seed)  # peft initialises lora_A from the global generator
        unet.add_adapter(cfg.lora.to_peft(unet), adapter_name=adapter_name)
        try:
            params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
            for p in params:
                if p.dtype != torch.float32:  # a half-precision base: train the adapter in float32
                    p.data = p.data.float()
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
            model, teacher = self._callables(adapter_name)
            start = time.perf_counter()
            curve = []
            bar = tqdm(range(steps), desc=f"unlearn {dataset.group_names[group]}", disable=not progress, leave=False, dynamic_ncols=True)
            for step in bar:
                batch = self._batch(dataset, forget_idx, retain_idx, generator, model, teacher)
                batch.group = group
                with self._autocast():
                    loss, parts = objective.loss(batch)
                if not math.isfinite(loss.item()):
                    raise UnlearningDivergedError(
                        f"Unlearning group '{dataset.group_names[group]}' diverged at step {step} (loss {loss.item()}). "
                        f"Lower the learning rate (now {cfg.learning_rate:g}, e.g. --lr {cfg.learning_rate / 10:g}); "
                        "finished groups are kept."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                curve.append(parts)
                if step % 10 == 0:
                    bar.set_postfix(forget=f"{parts['forget']:.4f}", preserve=f"{parts['preserve']:.4f}")
            wall = time.perf_counter() - start
            after = self._evaluate(evaluation, adapter=adapter_name)
            if not all(math.isfinite(v) for v in after.values()):
                raise UnlearningDivergedError(
                    f"Unlearning group '{dataset.group_names[group]}' produced non-finite outputs; lower the learning rate."
                )
            state = adapter_state_dict(unet, adapter_name)
            metadata = peft_config_metadata(unet, adapter_name)
        finally:
            unet.delete_adapters(adapter_name)
        # teacher forwards count as passes too
        passes_per_step = cfg.forget_batch_size + cfg.retain_batch_size + objective.teacher_passes(cfg.forget_batch_size, cfg.retain_batch_size)
        stats = {
            "seed": seed,
            "steps": steps,
            "wall_s": round(wall, 3),
            "sample_passes": steps * passes_per_step,
            "forget_loss_before": before["forget"],
            "forget_loss_after": after["forget"],
            "retain_loss_before": before["retain"],
            "retain_loss_after": after["retain"],
            "forget_loss_change": after["forget"] / before["forget"] - 1.0,
            "retain_loss_change": after["retain"] / before["retain"] - 1.0,
            "curve_first": curve[0],
            "curve_last": {k: sum(c[k] for c in curve[-10:]) / len(curve[-10:]) for k in curve[-1]},
        }
        return state, metadata, stats

    def _autocast(self):
        if self.config.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.config.autocast_dtype))

    def _check_prompts(self, dataset: GroupedDataset) -> None:
        if self.conditional and dataset.prompts is None:
            raise DataError(
                "This UNet is text-conditioned, but the dataset has no prompts. Give every image its caption "
                "(metadata.jsonl with a 'text' field, or GroupedDataset(..., prompts=[...]))."
            )

    def _cond(self, dataset: GroupedDataset, index: torch.Tensor) -> torch.Tensor | None:
        """Text embeddings of the images ``index`` (their own prompts), or ``None`` for unconditional UNets."""
        if not self.conditional:
            return None
        return self.encode_prompts([dataset.prompts[i] for i in index.tolist()]).to(self.device)

    def _unet_inputs(self, cond) -> dict:
        if cond is None:
            if self.conditional:
                raise ConfigError("This UNet is text-conditioned; the objective must pass the text embeddings (cond).")
            return {}
        return {"encoder_hidden_states": cond.to(self.device, self.unet.dtype)}

    def _callables(self, adapter_name: str):
        unet = self.unet

        def model(x_t, t, cond=None):
            return unet(x_t.to(unet.dtype), t, **self._unet_inputs(cond)).sample

        @torch.no_grad()
        def teacher(x_t, t, cond=None):
            unet.disable_adapters()
            try:
                return unet(x_t.to(unet.dtype), t, **self._unet_inputs(cond)).sample
            finally:
                unet.enable_adapters()
                unet.set_adapter(adapter_name)

        return model, teacher

    def _batch(self, dataset, forget_idx, retain_idx, generator, model, teacher) -> UnlearningBatch:
        cfg, T, device = self.config, self.schedule.num_train_timesteps, self.device
        fi = forget_idx[torch.randint(0, len(forget_idx), (cfg.forget_batch_size,), generator=generator)]
        ri = retain_idx[torch.randint(0, len(retain_idx), (cfg.retain_batch_size,), generator=generator)]
        shape = dataset.image_shape
        return UnlearningBatch(
            forget_x0=dataset.images[fi].to(device),
            forget_index=fi,
            forget_t=torch.randint(0, T, (len(fi),), generator=generator).to(device),
            forget_noise=torch.randn((len(fi), *shape), generator=generator).to(device),
            retain_x0=dataset.images[ri].to(device),
            retain_index=ri,
            retain_t=torch.randint(0, T, (len(ri),), generator=generator).to(device),
            retain_noise=torch.randn((len(ri), *shape), generator=generator).to(device),
            model=model,
            teacher=teacher,
            schedule=self.schedule,
            generator=generator,
            forget_cond=self._cond(dataset, fi),
            retain_cond=self._cond(dataset, ri),
            forget_prompts=[dataset.prompts[i] for i in fi.tolist()] if dataset.prompts is not None else None,
            retain_prompts=[dataset.prompts[i] for i in ri.tolist()] if dataset.prompts is not None else None,
            encode_prompts=self.encode_prompts,
        )

    def _evaluation_sets(self, dataset, group, forget_idx, retain_idx) -> dict:
        """Fixed images and (t, noise) draws, never used for training, for the before/after losses."""
        cfg = self.config
        generator = torch.Generator().manual_seed(derive_seed("guda-eval", cfg.seed, group))
        sets = {}
        for name, idx in (("forget", forget_idx), ("retain", retain_idx)):
            chosen = idx[torch.randperm(len(idx), generator=generator)[: cfg.eval_images]]
            x0 = dataset.images[chosen].repeat_interleave(cfg.eval_draws, dim=0)
            t = torch.randint(0, self.schedule.num_train_timesteps, (len(x0),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            cond = self._cond(dataset, chosen.repeat_interleave(cfg.eval_draws))
            sets[name] = (x0, t, noise, None if cond is None else cond.cpu())
        return sets

    @torch.no_grad()
    def _evaluate(self, sets: dict, adapter: str | None, chunk: int = 256) -> dict[str, float]:
        unet, device = self.unet, self.device
        if adapter is None and getattr(unet, "peft_config", None):
            unet.disable_adapters()
        try:
            out = {}
            for name, (x0, t, noise, cond) in sets.items():
                total = 0.0
                for s in range(0, len(x0), chunk):
                    x, tt, n = x0[s : s + chunk].to(device), t[s : s + chunk].to(device), noise[s : s + chunk].to(device)
                    inputs = self._unet_inputs(None if cond is None else cond[s : s + chunk])
                    pred = unet(self.schedule.add_noise(x, n, tt).to(unet.dtype), tt, **inputs).sample.float()
                    total += (pred - self.schedule.target(x, n, tt)).pow(2).mean(dim=tuple(range(1, x.dim()))).sum().item()
                out[name] = total / len(x0)
            return out
        finally:
            if adapter is None and getattr(unet, "peft_config", None):
                unet.enable_adapters()

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
                or a kill).
            progress: Show progress bars (on the main process only).
            process: This process of a launch; default :func:`~diffusers_guda.distributed.current_process`
                (pass :data:`~diffusers_guda.distributed.SINGLE_PROCESS` to unlearn every group here).

        Raises:
            DistributedError: if the processes of a launch were given other data, settings or base model.
        """
        process = current_process() if process is None else process
        group_ids = [dataset.group_index(g) for g in (groups if groups is not None else range(dataset.num_groups))]
        slugs = unique_slugs(dataset.group_names)
        checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
        process.check_same((self._run_record(dataset), group_ids), "data, unlearning settings or base model")
        if checkpoint is not None:
            self._check_checkpoint(checkpoint, dataset)
        # what the main process finds finished, so that every process shards the same pending list
        finished = process.broadcast([gid for gid in group_ids if checkpoint is not None and _is_finished(checkpoint / slugs[gid])])
        results = {gid: _load_finished(checkpoint / slugs[gid]) for gid in finished}
        mine = process.shard([gid for gid in group_ids if gid not in finished])
        trained = {}
        desc = f"groups (process 0 of {process.world_size})" if process.is_distributed else "groups"
        outer = tqdm(mine, desc=desc, disable=not (progress and process.is_main), dynamic_ncols=True)
        for gid in outer:
            slug = slugs[gid]
            outer.set_postfix(group=dataset.group_names[gid])
            trained[gid] = self.unlearn_group(dataset, gid, AdapterBundle.adapter_name(slug), progress=progress and process.is_main)
            if checkpoint is not None:
                state, metadata, stats = trained[gid]
                with atomic_directory(checkpoint / slug) as tmp:
                    save_adapter_file(tmp / ADAPTER_WEIGHT_NAME, state, metadata)
                    write_json_atomic(tmp / STATS_NAME, stats)
        for part in process.gather(trained):
            results.update(part)
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
                    adapter_file=f"adapters/{slug}/{ADAPTER_WEIGHT_NAME}",
                    stats=stats,
                )
            )
        return AdapterBundle(
            groups=records,
            adapters=adapters,
            adapter_configs=configs,
            lora=self.config.lora.to_dict(),
            base_model=self._base_model_record(),
            objective={"name": self.config.objective, "config": get_objective(self.config.objective, self.config.objective_options).config.to_dict()},
            elbo=self.elbo_config.to_dict(),
            seeds={"unlearning": self.config.seed, "elbo": self.elbo_config.seed},
            training={k: v for k, v in self.config.to_dict().items() if k not in ("objective", "objective_options", "lora")},
        )

    def _base_model_record(self) -> dict:
        unet = self.unet
        return {
            "id": self.base_model_id,
            "revision": self.base_model_revision,
            "fingerprint": self.fingerprint,
            "class_name": type(unet).__name__,
            "dtype": str(unet.dtype).replace("torch.", ""),
            "sample_size": unet.config.sample_size,
            "in_channels": unet.config.in_channels,
            "conditional": self.conditional,
            **self.base_model_extra,
        }

    def _run_record(self, dataset: GroupedDataset) -> dict:
        """What a checkpoint's groups depend on: base model, settings and data."""
        return {
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "groups": dataset.group_names,
            "group_sizes": dataset.group_sizes(),
        }

    def _check_checkpoint(self, checkpoint: Path, dataset: GroupedDataset) -> None:
        # several processes may run this at once: the marker is written atomically, with one content
        run = self._run_record(dataset)
        marker = checkpoint / RUN_NAME
        if marker.exists():
            previous = json.loads(marker.read_text())
            if previous != json.loads(json.dumps(run)):
                raise ConfigError(
                    f"{checkpoint} holds groups unlearned with other settings, data or base model. "
                    "Delete it, or rerun with the settings it was started with."
                )
        else:
            write_json_atomic(marker, run)


def _is_finished(done: Path) -> bool:
    # both files: a kill while the checkpoint of a finished run is deleted can leave either alone
    return (done / STATS_NAME).is_file() and (done / ADAPTER_WEIGHT_NAME).is_file()


def _load_finished(done: Path) -> tuple[dict, dict, dict]:
    state, metadata = load_adapter_file(done / ADAPTER_WEIGHT_NAME)
    return state, metadata, json.loads((done / STATS_NAME).read_text())
