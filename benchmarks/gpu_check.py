"""GPU check: unlearning and attribution cost at Stable Diffusion 1.5, SDXL, SD3-medium and Flux size, through the library's API.

Builds each pipeline from its configuration in code (random weights; nothing is downloaded):

* ``sd15``: SD 1.5's 860 M-parameter UNet, its VAE and a CLIP ViT-L text encoder (512 x 512 images,
  4 x 64 x 64 latents);
* ``sdxl``: SDXL's 2.6 B-parameter UNet, its VAE and both text encoders (1024 x 1024, 4 x 128 x 128);
* ``sd3``: SD3-medium's 2.0 B-parameter flow-matching transformer, a 16-channel VAE, CLIP-L, CLIP-G and
  T5-XXL (1024 x 1024, 16 x 128 x 128 latents);
* ``flux``: FLUX.1-dev's 11.9 B-parameter transformer (guidance-distilled), a 16-channel VAE, CLIP-L
  and T5-XXL (1024 x 1024, 16 x 128 x 128 latents in 2 x 2 patches).

The tokenizers are the small offline ones of :mod:`diffusers_guda.testing`, padded to 77 tokens for
CLIP and to the recipe's T5 length, so the text encoders do their full work. The base weights are held in ``--weights-dtype``
(bfloat16 by default on CUDA); adapters train in float32 under the recipe's autocast. Measured, per
model and in this order, each written to ``--out`` the moment it is measured:

* ``unlearning``: ``pipe.unlearn_groups`` of one group with the family's recipe (``sd-styles``,
  ``sdxl-styles``, ``sd3-styles``, ``flux-styles``) at its batch size for ``--steps`` steps: seconds per step, the run's fixed cost
  (loss evaluations before and after), peak memory, and the projected time of one group with the
  recipe's full step count;
* ``joint_unlearning``: four groups unlearned one after the other and together (``joint_groups=4``,
  without gradient checkpointing): seconds per group-step of the training loops, the ratio, peak memory
  (or what did not fit);
* ``elbo_rows_per_s``: scoring throughput at K = 16 groups (one row = one image at one (t, draw) under
  one model): the bare denoiser forward at the same batch and dtype, and the ``merged``, ``swap`` and
  ``mixed`` strategies through :class:`~diffusers_guda.AttributionScorer`, with the ratio of each to
  the bare forward; which strategy ``"auto"`` picks for this precision, and whether it is the fastest
  one measured;
* ``attribute_one_image``: seconds for ``pipe.attribute`` of one image (VAE and text encoding
  included) against 16 groups, on the full grid and with adaptive draws.

Needs torch, diffusers, peft, transformers, safetensors and this package importable (``PYTHONPATH=.``).
Not yet run on a GPU; SD 1.5 and SDXL are estimated at 6 minutes on one H100/H200, SD3 and Flux at
about as much again (building T5-XXL and Flux's transformer dominates). ``--tiny`` runs the tiny offline
pipelines on CPU::

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json
    PYTHONPATH=. python benchmarks/gpu_check.py --models sd3 flux --out gpu_check_flow.json
    PYTHONPATH=. python benchmarks/gpu_check.py --tiny --device cpu --threads 2 --out /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from diffusers_guda import AttributionScorer, GroupedDataset, Recipe
from diffusers_guda.diffusion import NoiseSchedule, training_scheduler
from diffusers_guda.elbo import ELBOConfig, ELBOEstimator
from diffusers_guda.errors import BatchTooLargeError
from diffusers_guda.io_utils import write_json_atomic
from diffusers_guda.models import denoise
from diffusers_guda.pipelines import (
    GUDAFluxPipeline,
    GUDAStableDiffusion3Pipeline,
    GUDAStableDiffusionPipeline,
    GUDAStableDiffusionXLPipeline,
    model_inputs,
)
from diffusers_guda.pipelines.components import denoiser
from diffusers_guda.scoring.strategies import resolve_strategy
from diffusers_guda.testing import (
    tiny_clip_tokenizer,
    tiny_flux,
    tiny_stable_diffusion,
    tiny_stable_diffusion_3,
    tiny_stable_diffusion_xl,
    tiny_t5_tokenizer,
)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLOW_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, relative_attention_num_buckets=32, relative_attention_max_distance=128)
FLOW_MODELS = ("sd3", "flux")
RECIPES = {"sd15": "sd-styles", "sdxl": "sdxl-styles", "sd3": "sd3-styles", "flux": "flux-styles"}
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
WORDS = ("a", "photo", "of", "lighthouse", "at", "dusk", "in", "style", "painting", "portrait")
GROUPS = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``fn`` (synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_gib(device: torch.device, reset: bool = True) -> float | None:
    if device.type != "cuda":
        return None
    value = torch.cuda.max_memory_allocated(device) / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return round(value, 2)


class Results:
    """The measurements so far, rewritten to ``path`` after each one (a cut-off run keeps what it measured)."""

    def __init__(self, path: str | None, header: dict):
        self.path, self.data = path, dict(header)
        self.write()

    def record(self, model: str, key: str, value) -> None:
        self.data.setdefault(model, {})[key] = value
        print(f"[{model}] {key}: {json.dumps(value)}", flush=True)
        self.write()

    def write(self) -> None:
        if self.path:
            write_json_atomic(self.path, self.data)


def build_pipeline(model: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """The GUDA pipeline of ``model`` (``"sd15"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``) with random weights, on ``device`` in ``dtype``."""
    if tiny:
        builder, cls = {
            "sd15": (tiny_stable_diffusion, GUDAStableDiffusionPipeline), "sdxl": (tiny_stable_diffusion_xl, GUDAStableDiffusionXLPipeline),
            "sd3": (tiny_stable_diffusion_3, GUDAStableDiffusion3Pipeline), "flux": (tiny_flux, GUDAFluxPipeline),
        }[model]
        return builder(words=WORDS, pipeline_class=cls).to(device, dtype)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer(WORDS, max_length=77)
    text = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device(device):
        if model == "sd15":
            parts = dict(
                unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD_VAE, sample_size=512, scaling_factor=0.18215),
                text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **text)), tokenizer=tokenizer,
                scheduler=DDPMScheduler(**SD_SCHEDULE, clip_sample=False), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            pipe = GUDAStableDiffusionPipeline(**parts)
        elif model == "sdxl":
            parts = dict(
                unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025),
                text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **text)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **text)),
                tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler(**SD_SCHEDULE),
            )
            pipe = GUDAStableDiffusionXLPipeline(**parts)
        elif model == "sd3":
            parts = dict(
                transformer=SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER),
                vae=AutoencoderKL(**FLOW_VAE, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **text)), tokenizer=tokenizer,
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **text)), tokenizer_2=tokenizer,
                text_encoder_3=T5EncoderModel(T5Config(**T5_XXL)), tokenizer_3=tiny_t5_tokenizer(WORDS),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            )
            pipe = GUDAStableDiffusion3Pipeline(**parts)
        else:
            parts = dict(
                transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
                vae=AutoencoderKL(**FLOW_VAE, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159),
                text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **text)), tokenizer=tokenizer,
                text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)), tokenizer_2=tiny_t5_tokenizer(WORDS),
                scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=256, max_image_seq_len=4096, shift=3.0),
            )
            pipe = GUDAFluxPipeline(**parts)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_size(pipe) -> int:
    """The pixel size the model is built for: its VAE's sample size (``FluxPipeline``'s default size is fixed at 1024)."""
    size = pipe.vae.config.sample_size
    return size[0] if isinstance(size, (list, tuple)) else size


def random_dataset(pipe, per_group: int, generator: torch.Generator) -> GroupedDataset:
    """``GROUPS`` groups of ``per_group`` random images at the pipeline's resolution, one caption each."""
    size = image_size(pipe)
    n = GROUPS * per_group
    images = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
    ids = torch.arange(n) // per_group
    names = [f"style{k:02d}" for k in range(GROUPS)]
    prompts = [f"a photo of a lighthouse at dusk in style{k:02d}" for k in ids.tolist()]
    return GroupedDataset(images, ids, names, prompts=prompts)


def measure(model: str, args, device: torch.device, results: Results) -> None:
    dtype = getattr(torch, args.weights_dtype)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    pipe = build_pipeline(model, args.tiny, device, dtype)
    sync(device)
    recipe = Recipe.load(RECIPES[model])
    generator = torch.Generator().manual_seed(args.seed)
    dataset = random_dataset(pipe, per_group=2, generator=generator)
    results.record(model, "model", {
        "denoiser_parameters": sum(p.numel() for p in denoiser(pipe).parameters()),
        "image_size": list(dataset.image_shape[1:]),
        "latent_shape": list(pipe.encode_latents(dataset.images[:1].to(device, dtype)).shape[1:]),
        "weights_dtype": args.weights_dtype, "recipe": recipe.name, "build_s": round(time.perf_counter() - t0, 1),
    })

    # -- unlearning one group at the recipe's batch (again with gradient checkpointing if it does not fit) ----
    for checkpointing in sorted({recipe.unlearning.gradient_checkpointing, True}):
        try:
            results.record(model, "unlearning", time_unlearning(pipe, dataset, recipe, args, device, checkpointing))
            break
        except BatchTooLargeError as exc:
            results.record(model, "unlearning_does_not_fit" + ("_with_checkpointing" if checkpointing else ""), str(exc))
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # -- four groups one after the other against trained together (joint_groups=4), without checkpointing ---
    try:
        results.record(model, "joint_unlearning", time_joint_unlearning(pipe, dataset, recipe, args, device))
    except BatchTooLargeError as exc:
        results.record(model, "joint_unlearning_does_not_fit", str(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # -- a bundle of 16 groups (few steps: only its shape matters for the scoring costs) ------------------
    bundle = pipe.unlearn_groups(dataset, recipe=recipe, steps=1, eval_images=1, eval_draws=1, progress=False)
    scheduler = training_scheduler(pipe.scheduler)
    grid = ({"grid_size": 1000 // args.throughput_stride} if model in FLOW_MODELS else {"stride": args.throughput_stride})
    elbo_config = ELBOConfig(**{**bundle.elbo, **grid})  # rows/s do not depend on the grid
    estimator = ELBOEstimator(scheduler, elbo_config)
    queries = dataset.images[::2][: args.queries]  # the first image of each group
    x0, unet_kwargs, _ = model_inputs(pipe, queries, prompts=dataset.prompts[::2][: args.queries])
    names = [bundle.adapter_name(s) for s in bundle.slugs]
    network = denoiser(pipe)
    scorer = AttributionScorer(network, estimator, names, bundle.group_names)
    rows = len(queries) * estimator.num_rows * (GROUPS + 1)
    rates = {}

    # the bare denoiser forward: the same batch (rows_per_forward) and dtype, no estimator, no adapters
    batch = elbo_config.rows_per_forward
    x_t = torch.randn(batch, *x0.shape[1:], generator=generator).to(device, dtype)
    schedule = NoiseSchedule(scheduler)
    t = schedule.model_timesteps(torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator)).to(device)
    cond = {k: v.expand(batch, *v.shape[1:]) for k, v in unet_kwargs[0].items()}

    @torch.no_grad()
    def bare():
        network.disable_adapters()
        try:
            with autocast(device, elbo_config.autocast_dtype):
                denoise(network, x_t, t, cond)
        finally:
            network.enable_adapters()

    times = timed(bare, device, args.warmup, args.iters)
    rates["bare denoiser forward"] = batch / statistics.median(times)
    for strategy in ("merged", "swap", "mixed"):
        times = timed(lambda: scorer.score(x0, batch_size=len(queries), unet_kwargs=unet_kwargs, progress=False, strategy=strategy),
                      device, min(args.warmup, 1), args.iters)
        rates[strategy] = rows / statistics.median(times)
    auto = resolve_strategy("auto", network, names, estimator)
    fastest = max(("merged", "swap", "mixed"), key=rates.get)
    results.record(model, "elbo_rows_per_s", {
        "groups": GROUPS, "queries": len(queries), "rows_per_forward": batch, "autocast": elbo_config.autocast_dtype,
        **{name: round(rate, 1) for name, rate in rates.items()},
        **{f"{name} / bare": round(rates[name] / rates["bare denoiser forward"], 3) for name in ("merged", "swap", "mixed")},
        "auto_picks": auto, "fastest": fastest, "memory_gib": peak_memory_gib(device),
    })

    # -- attribute one image against the 16 groups ---------------------------------------------------------
    image, prompt = dataset.images[:1], dataset.prompts[0]
    attribution, last = {}, {}
    for label, adaptive_z in (("full grid", None), ("adaptive", args.adaptive_z)):  # kernels are warm from the throughput runs
        times = timed(lambda: last.update(result=pipe.attribute(image, prompts=prompt, adaptive_z=adaptive_z, progress=False)),
                      device, 0, args.iters)
        attribution[f"{label} s"] = round(statistics.median(times), 3)
    result = last["result"]  # the adaptive one
    attribution["grid rows"] = ELBOEstimator(scheduler, ELBOConfig(**bundle.elbo)).num_rows
    attribution["adaptive rows used (mean per group)"] = round(statistics.mean(result.metadata["rows_used"][0]), 1)
    attribution["strategy"] = result.metadata["strategy"]
    results.record(model, "attribute_one_image", attribution)


def time_unlearning(pipe, dataset: GroupedDataset, recipe: Recipe, args, device: torch.device, checkpointing: bool) -> dict:
    """Seconds per unlearning step of one group at the recipe's batch, the run's fixed cost and peak memory."""
    settings = dict(steps=args.steps, eval_images=min(recipe.unlearning.eval_images, 2 * 2), progress=False,
                    gradient_checkpointing=checkpointing)
    pipe.unlearn_groups(dataset, recipe=recipe, groups=[0], **{**settings, "steps": 1})  # warm-up (kernels, allocator)
    peak_memory_gib(device)
    start = time.perf_counter()
    bundle = pipe.unlearn_groups(dataset, recipe=recipe, groups=[0], **settings)
    sync(device)
    wall = time.perf_counter() - start
    stats = bundle.groups[0].stats
    per_step = stats["wall_s"] / stats["steps"]
    fixed = wall - stats["wall_s"]
    config = recipe.unlearning.for_device(device)
    return {
        "forget_batch": config.forget_batch_size, "retain_batch": config.retain_batch_size, "autocast": config.autocast_dtype,
        "gradient_checkpointing": checkpointing, "objective": config.objective, "steps_timed": stats["steps"],
        "s_per_step": round(per_step, 4), "fixed_s": round(fixed, 2), "peak_memory_gib": peak_memory_gib(device),
        "recipe_steps": config.steps, "projected_group_s": round(fixed + config.steps * per_step, 1),
    }


def time_joint_unlearning(pipe, dataset: GroupedDataset, recipe: Recipe, args, device: torch.device, joint: int = 4) -> dict:
    """Seconds per group-step of ``joint`` groups unlearned one after the other and together (the training loops only)."""
    settings = dict(steps=args.steps, eval_images=1, eval_draws=1, progress=False, gradient_checkpointing=False)
    rates = {}
    for label, joint_groups in (("sequential", 1), (f"joint_groups={joint}", joint)):
        peak_memory_gib(device)
        bundle = pipe.unlearn_groups(dataset, recipe=recipe, groups=list(range(joint)), joint_groups=joint_groups, **settings)
        sync(device)
        rates[f"{label} s per group-step"] = round(sum(g.stats["wall_s"] for g in bundle.groups) / (joint * args.steps), 4)
        rates[f"{label} peak_memory_gib"] = peak_memory_gib(device)
    rates["speedup"] = round(rates["sequential s per group-step"] / rates[f"joint_groups={joint} s per group-step"], 2)
    return rates


def autocast(device: torch.device, dtype: str | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny offline pipelines (a CPU smoke run) instead of the full-size ones")
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--weights-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the frozen base weights (default bfloat16 on CUDA, float32 on CPU); adapters stay float32")
    parser.add_argument("--steps", type=int, default=10, help="unlearning steps timed per model")
    parser.add_argument("--queries", type=int, default=2, help="query images of the throughput measurement")
    parser.add_argument("--throughput-stride", type=int, default=50,
                        help="ELBO grid stride of the throughput measurement (flow models: 1000 / stride grid points)")
    parser.add_argument("--adaptive-z", type=float, default=3.0, help="adaptive_z of the adaptive attribution")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every measurement")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.weights_dtype = args.weights_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = Results(args.out, {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "config": "tiny" if args.tiny else "full", "args": vars(args),
    })
    start = time.perf_counter()
    for model in args.models:
        try:
            measure(model, args, device, results)
        except Exception as exc:  # one model's failure must not cost the other's measurements
            results.record(model, "error", f"{type(exc).__name__}: {exc}")
        if device.type == "cuda":  # the model's pipeline is gone with measure's frame
            torch.cuda.empty_cache()
    results.data["total_s"] = round(time.perf_counter() - start, 1)
    results.write()
    return results.data


if __name__ == "__main__":
    main()
