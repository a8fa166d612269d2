"""The gradient baseline (docs/evaluation.md#baselines): projected gradients of the denoising loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from baseline_helpers import small_dataset, unchanged, weights
from conftest import tiny_unet_config

from diffusers_guda import GUDAUNet2DModel
from diffusers_guda.errors import ConfigError, DataError
from diffusers_guda.hashing import derive_seed, image_content_hash
from diffusers_guda.objectives.base import NoiseSchedule
from guda_lab.evaluation.gradient import GradientConfig, gradient_scores, projected_gradients, projection_blocks

FAST_GRAD = dict(projection_dim=32, timesteps=(10, 50, 90))


def test_gradient_shape_determinism_and_model_untouched(tiny_unet, tiny_scheduler, tiny_dataset):
    data = small_dataset(tiny_dataset)
    queries = tiny_dataset.images[[3, 27]]
    for p in tiny_unet.parameters():
        p.requires_grad_(False)
    tiny_unet.conv_in.weight.requires_grad_(True)  # a mixed pattern to restore
    tiny_unet.train()  # the baseline runs in eval mode and restores train mode
    state = weights(tiny_unet)
    config = GradientConfig(**FAST_GRAD)
    first = gradient_scores(tiny_unet, tiny_scheduler, queries, data, config)
    assert first.shape == (2, 3) and first.dtype == torch.float64 and torch.isfinite(first).all()
    assert torch.equal(first, gradient_scores(tiny_unet, tiny_scheduler, queries, data, config))
    assert unchanged(tiny_unet, state)
    flags = {n: p.requires_grad for n, p in tiny_unet.named_parameters()}
    assert flags.pop("conv_in.weight") is True and not any(flags.values())
    assert tiny_unet.training and all(p.grad is None for p in tiny_unet.parameters())
    tiny_unet.eval()
    assert torch.equal(first, gradient_scores(tiny_unet, tiny_scheduler, queries, data, config))
    # gradient batching does not change the projected gradients beyond float rounding
    chunked = projected_gradients(tiny_unet, tiny_scheduler, data.images[:4], GradientConfig(**FAST_GRAD, gradient_batch_size=3))
    whole = projected_gradients(tiny_unet, tiny_scheduler, data.images[:4], GradientConfig(**FAST_GRAD, gradient_batch_size=4))
    assert torch.allclose(chunked, whole, rtol=1e-9, atol=1e-12)
    with pytest.raises(DataError):
        gradient_scores(tiny_unet, tiny_scheduler, torch.zeros(1, 3, 8, 8), data, config)
    with pytest.raises(ConfigError, match="param_filter"):
        gradient_scores(tiny_unet, tiny_scheduler, queries, data, GradientConfig(**FAST_GRAD, param_filter="no-such"))


def _full_gradient(unet, scheduler, image, config, names):
    """Flattened exact gradient of the denoising loss, computed independently of the module."""
    schedule = NoiseSchedule(scheduler)
    params = dict(unet.named_parameters())
    t = torch.tensor(config.timesteps).repeat_interleave(config.num_draws)
    generator = torch.Generator()
    noise = []
    for i, step in enumerate(t.tolist()):
        generator.manual_seed(derive_seed("guda-gradient", config.seed, image_content_hash(image), step, i % config.num_draws))
        noise.append(torch.randn(image.shape, generator=generator))
    noise = torch.stack(noise)
    x0 = image.unsqueeze(0).expand_as(noise)
    for p in unet.parameters():
        p.requires_grad_(True)
    x_t = schedule.add_noise(x0, noise, t).requires_grad_(True)  # see denoising_loss: avoids a torch segfault
    loss = torch.nn.functional.mse_loss(unet(x_t, t).sample, noise)
    grads = torch.autograd.grad(loss, [params[n] for n in names] + [x_t])[:-1]
    for p in unet.parameters():
        p.requires_grad_(False)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def test_gradient_chunked_projection_equals_dense(tiny_unet, tiny_scheduler, tiny_dataset):
    config = GradientConfig(projection_dim=8, timesteps=(20, 70), param_filter="up_blocks.0.resnets.0", seed=3)
    names = [n for n, _ in tiny_unet.named_parameters() if "up_blocks.0.resnets.0" in n]
    numels = {n: p.numel() for n, p in tiny_unet.named_parameters()}
    assert max(numels[n] for n in names) > 8192  # at least one parameter spans several seeded blocks
    # the dense projection, built here from its definition: per parameter, seeded blocks of 8192 rows
    generator, blocks = torch.Generator(), []
    for n in names:
        for b, start in enumerate(range(0, numels[n], 8192)):
            generator.manual_seed(derive_seed("guda-projection", 3, n, b))
            blocks.append(torch.randn((min(8192, numels[n] - start), 8), generator=generator) / 8**0.5)
    dense = torch.cat(blocks).double()
    blockwise = torch.cat([torch.cat([b for _, b in projection_blocks(n, numels[n], 8, 3)]) for n in names]).double()
    torch.testing.assert_close(dense, blockwise, rtol=1e-6, atol=1e-7)
    assert dense.shape == (sum(numels[n] for n in names), 8)
    images = tiny_dataset.images[[0, 20]]
    projected = projected_gradients(tiny_unet, tiny_scheduler, images, config)
    exact = torch.stack([_full_gradient(tiny_unet, tiny_scheduler, x, config, names) for x in images])
    torch.testing.assert_close(projected, exact @ dense, atol=1e-5, rtol=1e-4)


def test_gradient_large_projection_approximates_exact_inner_products(tiny_unet, tiny_scheduler, tiny_dataset):
    config = GradientConfig(projection_dim=2048, timesteps=(30, 60), param_filter="up_blocks.1.resnets.0.conv2")
    names = [n for n, _ in tiny_unet.named_parameters() if config.param_filter in n]
    images = tiny_dataset.images[[0, 1, 13, 14, 25, 26]]
    projected = projected_gradients(tiny_unet, tiny_scheduler, images, config)
    exact = torch.stack([_full_gradient(tiny_unet, tiny_scheduler, x, config, names) for x in images])
    iu = torch.triu_indices(6, 6)
    approx, truth = (projected @ projected.T)[iu[0], iu[1]], (exact @ exact.T)[iu[0], iu[1]]
    correlation = np.corrcoef(approx.numpy(), truth.numpy())[0, 1]
    assert correlation > 0.9


def test_gradient_depends_on_seed(tiny_unet, tiny_scheduler, tiny_dataset):
    data = small_dataset(tiny_dataset, 2)
    queries = tiny_dataset.images[:1]
    a = gradient_scores(tiny_unet, tiny_scheduler, queries, data, GradientConfig(**FAST_GRAD, seed=0))
    b = gradient_scores(tiny_unet, tiny_scheduler, queries, data, GradientConfig(**FAST_GRAD, seed=1))
    assert not torch.equal(a, b)


def test_gradient_config_errors(tiny_unet, tiny_scheduler, tiny_dataset):
    with pytest.raises(ConfigError):
        GradientConfig(projection_dim=0)
    with pytest.raises(ConfigError):
        GradientConfig(aggregate="max")
    with pytest.raises(ConfigError, match="timesteps"):
        gradient_scores(tiny_unet, tiny_scheduler, tiny_dataset.images[:1], tiny_dataset, GradientConfig(timesteps=(100,)))


def test_gradient_normalized_attributes_training_copies_to_their_group(tiny_scheduler, tiny_dataset):
    """After brief training, a query equal to a training image mostly scores its own group highest."""
    torch.manual_seed(0)
    unet = GUDAUNet2DModel(**tiny_unet_config())
    schedule = NoiseSchedule(tiny_scheduler)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    x = tiny_dataset.images
    for _ in range(60):
        t = torch.randint(0, 100, (len(x),), generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        loss = torch.nn.functional.mse_loss(unet(schedule.add_noise(x, noise, t), t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    queries = x[[0, 5, 12, 17, 24, 29]]
    scores = gradient_scores(unet, tiny_scheduler, queries, tiny_dataset, GradientConfig(projection_dim=128, normalize=True, aggregate="mean"))
    assert (scores.argmax(1) == labels).sum() >= 4  # chance: 2 of 6
