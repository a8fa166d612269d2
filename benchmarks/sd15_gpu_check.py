"""GPU check: unlearning-step and ELBO-evaluation cost on a Stable-Diffusion-1.5-sized UNet.

Builds a ``UNet2DConditionModel`` with SD 1.5's configuration in code (random weights, nothing is
downloaded: 860 M parameters, 4 x 64 x 64 latents, 77 x 768 text embeddings), attaches a rank-r LoRA
adapter the way diffusers-guda's unlearning does (:class:`~diffusers_guda.LoRASettings`, default
targets), and times, CUDA-synchronised, the median of several iterations after warm-up:

* one unlearning step as the ``anchor`` objective takes it: the student (adapter on, with gradients)
  on a forget batch and a retain batch, the teacher (adapters disabled, no gradients) on both (the
  anchor target and the distillation target), backward, gradient clipping and an AdamW step;
* ELBO evaluation (rows/s, one row = one (image, t, noise) UNet evaluation plus the KL term) through
  :meth:`ELBOEstimator.packed_terms`, the library's scoring path: the base model without LoRA
  wrappers, the base with wrappers and adapters disabled, one adapter active (``swap``), and the
  adapter merged into a plain copy (``merged``, :class:`MergedAdapterRunner`); also the bare UNet
  forward (rows/s) to show the estimator's own overhead.

Needs only torch, diffusers, peft, safetensors and this package importable (``PYTHONPATH=.``).
Runs in well under 3 minutes on one H100/H200; ``--tiny`` runs a small configuration on CPU::

    PYTHONPATH=. python benchmarks/sd15_gpu_check.py --out sd15_gpu_check.json
    PYTHONPATH=. python benchmarks/sd15_gpu_check.py --tiny --device cpu --out /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from diffusers_guda.elbo import ELBOConfig, ELBOEstimator
from diffusers_guda.lora import LoRASettings
from diffusers_guda.merging import MergedAdapterRunner

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


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


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": len(times)}


def peak_memory(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    value = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(value, 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="A tiny UNet (CPU smoke run) instead of SD 1.5's.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument("--batch", type=int, default=8, help="Forget and retain images per unlearning step (each).")
    parser.add_argument("--rows-per-forward", type=int, default=64, help="ELBO rows per UNet forward.")
    parser.add_argument("--forwards", type=int, default=2, help="ELBO forwards per timed evaluation.")
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16", "none"],
                        help="Autocast dtype (default bfloat16 on CUDA, none on CPU).")
    parser.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the frozen base weights are held in (LoRA weights stay float32).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = args.autocast or ("bfloat16" if device.type == "cuda" else "none")
    amp_dtype = None if autocast == "none" else getattr(torch, autocast)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = TINY_UNET if args.tiny else SD15_UNET
    text_len, text_dim = (8, config["cross_attention_dim"]) if args.tiny else (77, 768)
    latent = config["sample_size"]

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    if args.weights_dtype != "float32":
        unet = unet.to(getattr(torch, args.weights_dtype))
    unet = unet.eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": "tiny" if args.tiny else "sd15",
        "unet_parameters": params,
        "latent_shape": [4, latent, latent],
        "text_embeddings": [text_len, text_dim],
        "weights_dtype": args.weights_dtype,
        "autocast": autocast,
        "lora_rank": args.rank,
        "build_s": round(build_s, 2),
        "args": vars(args),
    }
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else torch.autocast(device.type, enabled=False)

    # -- ELBO of the plain base (no LoRA wrappers) ---------------------------------------------
    n_items = args.rows_per_forward * args.forwards
    n_images = 4
    estimator = ELBOEstimator(scheduler, ELBOConfig(stride=10, rows_per_forward=args.rows_per_forward, autocast_dtype=None if autocast == "none" else autocast))
    images = torch.randn(n_images, 4, latent, latent, generator=gen)
    cond = torch.randn(n_images, text_len, text_dim, generator=gen)
    image_index = torch.arange(n_items) % n_images
    rows = torch.arange(n_items) % estimator.num_rows
    noise = torch.randn(n_items, 4, latent, latent, generator=gen)
    kwargs = {"encoder_hidden_states": cond}

    def elbo(model):
        return lambda: estimator.packed_terms(model, images, image_index, rows, noise, kwargs)

    elbo_rows = {}
    elbo_rows["base (no LoRA wrappers)"] = timed(elbo(unet), device, args.warmup, args.iters)
    x_raw = rand(args.rows_per_forward, 4, latent, latent).to(unet.dtype)
    t_raw = torch.randint(0, 1000, (args.rows_per_forward,), generator=gen).to(device)
    c_raw = rand(args.rows_per_forward, text_len, text_dim).to(unet.dtype)

    @torch.no_grad()
    def raw_forward():
        with amp():
            unet(x_raw, t_raw, encoder_hidden_states=c_raw).sample

    raw = timed(raw_forward, device, args.warmup, args.iters)
    results["elbo_memory_gib"] = peak_memory(device)

    # -- one LoRA adapter, as unlearning attaches it -------------------------------------------
    settings = LoRASettings(rank=args.rank, alpha=float(args.rank))
    torch.manual_seed(args.seed)
    unet.add_adapter(settings.to_peft(unet), adapter_name="guda_group")
    lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
    with torch.no_grad():  # a trained adapter is not the identity
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(1e-3 * torch.randn(p.shape, generator=gen).to(p))
    for p in lora_params:
        p.data = p.data.float()
        p.requires_grad_(True)
    results["lora_parameters"] = sum(p.numel() for p in lora_params)
    results["lora_targets"] = list(settings.target_modules)

    unet.disable_adapters()
    elbo_rows["base (LoRA wrappers, adapters disabled)"] = timed(elbo(unet), device, args.warmup, args.iters)
    unet.enable_adapters()
    unet.set_adapter("guda_group")
    elbo_rows["one adapter active (swap)"] = timed(elbo(unet), device, args.warmup, args.iters)
    runner = MergedAdapterRunner(unet)

    def merged():
        with runner.merged("guda_group") as plain:
            estimator.packed_terms(plain, images, image_index, rows, noise, kwargs)

    elbo_rows["adapter merged (merged)"] = timed(merged, device, args.warmup, args.iters)
    results["elbo_memory_gib_with_adapter"] = peak_memory(device)

    # -- one unlearning step (anchor objective: forget + anchor teacher, retain + distillation) ---
    for p in lora_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(lora_params, lr=1e-5, weight_decay=0.0)
    b = args.batch
    fx, rx = rand(b, 4, latent, latent), rand(b, 4, latent, latent)
    fc, ac, rc = (rand(b, text_len, text_dim).to(unet.dtype) for _ in range(3))
    ft = torch.randint(0, 1000, (b,), generator=gen).to(device)
    rt = torch.randint(0, 1000, (b,), generator=gen).to(device)
    unet.train()

    def teacher(x, t, c):
        unet.disable_adapters()
        try:
            with torch.no_grad(), amp():
                return unet(x.to(unet.dtype), t, encoder_hidden_states=c).sample.float()
        finally:
            unet.enable_adapters()
            unet.set_adapter("guda_group")
            for p in lora_params:  # set_adapter resets requires_grad of the active adapter only; keep ours
                p.requires_grad_(True)

    def step():
        with amp():
            forget = unet(fx.to(unet.dtype), ft, encoder_hidden_states=fc).sample.float()
            retain = unet(rx.to(unet.dtype), rt, encoder_hidden_states=rc).sample.float()
        loss = torch.nn.functional.mse_loss(forget, teacher(fx, ft, ac)) + torch.nn.functional.mse_loss(retain, teacher(rx, rt, rc))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        optimizer.step()

    peak_memory(device)
    step_times = timed(step, device, args.warmup, args.iters)
    results["unlearning_memory_gib"] = peak_memory(device)
    unet.eval()

    results["unlearning_step"] = {**summary(step_times), "batch_forget": b, "batch_retain": b,
                                  "sample_passes_per_step": 4 * b,
                                  "steps_per_s": 1.0 / statistics.median(step_times)}
    results["elbo"] = {}
    for name, times in elbo_rows.items():
        results["elbo"][name] = {**summary(times), "rows": n_items, "rows_per_s": n_items / statistics.median(times)}
    results["unet_forward_only"] = {**summary(raw), "rows": args.rows_per_forward,
                                    "rows_per_s": args.rows_per_forward / statistics.median(raw)}
    results["total_s"] = round(time.perf_counter() - t0, 1)

    print(f"{results['config']} UNet ({params / 1e6:.1f} M parameters, LoRA rank {args.rank}: "
          f"{results['lora_parameters'] / 1e6:.2f} M) on {results['device_name']}, weights {args.weights_dtype}, autocast {autocast}")
    print(f"{'measurement':<44} {'median s':>10} {'rate':>16}")
    step = results["unlearning_step"]
    print(f"{'unlearning step (batch ' + str(b) + '+' + str(b) + ')':<44} {step['median_s']:>10.4f} {step['steps_per_s']:>10.2f} step/s")
    for name, entry in results["elbo"].items():
        print(f"{'ELBO: ' + name:<44} {entry['median_s']:>10.4f} {entry['rows_per_s']:>10.1f} rows/s")
    fwd = results["unet_forward_only"]
    print(f"{'bare UNet forward (no estimator)':<44} {fwd['median_s']:>10.4f} {fwd['rows_per_s']:>10.1f} rows/s")
    if device.type == "cuda":
        print(f"peak GPU memory: ELBO {results['elbo_memory_gib']} GiB, with adapter {results['elbo_memory_gib_with_adapter']} GiB, "
              f"unlearning {results['unlearning_memory_gib']} GiB")
    print(f"total {results['total_s']} s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
