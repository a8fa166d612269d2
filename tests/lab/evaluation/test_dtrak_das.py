"""The kernel baselines (docs/evaluation.md#baselines): D-TRAK and DAS, projected gradients whitened by (ΦᵀΦ + λI)⁻¹."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from baseline_helpers import small_dataset, unchanged, weights
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

from diffusers_guda.cli import main
from diffusers_guda.errors import ConfigError
from diffusers_guda.hashing import derive_seed, image_content_hash
from diffusers_guda.objectives.base import NoiseSchedule
from guda_lab.evaluation import DASConfig, DTRAKConfig, das_scores, dtrak_scores
from guda_lab.evaluation.gradient import GradientConfig, gradient_scores, projection_blocks

FAST = {"projection_dim": 16, "timesteps": (10, 60)}


def test_shapes_determinism_batch_independence_and_model_untouched(tiny_unet, tiny_scheduler, tiny_dataset):
    data = small_dataset(tiny_dataset)
    queries = tiny_dataset.images[[3, 14, 27]]
    tiny_unet.train()
    state = weights(tiny_unet)
    for score, config_class in ((dtrak_scores, DTRAKConfig), (das_scores, DASConfig)):
        config = config_class(**FAST, gradient_batch_size=2)
        first = score(tiny_unet, tiny_scheduler, queries, data, config)
        assert first.shape == (3, 3) and first.dtype == torch.float64 and torch.isfinite(first).all() and first.abs().sum() > 0
        assert torch.equal(first, score(tiny_unet, tiny_scheduler, queries, data, config))
        # the gradient batch and the query batch change nothing beyond float rounding
        other = score(tiny_unet, tiny_scheduler, queries, data, config_class(**FAST, gradient_batch_size=7))
        torch.testing.assert_close(first, other, rtol=1e-9, atol=1e-12)
        alone = torch.cat([score(tiny_unet, tiny_scheduler, q[None], data, config) for q in queries])
        torch.testing.assert_close(first, alone, rtol=1e-9, atol=1e-12)
    assert unchanged(tiny_unet, state) and tiny_unet.training and all(p.grad is None for p in tiny_unet.parameters())
    assert (das_scores(tiny_unet, tiny_scheduler, queries, data, DASConfig(**FAST)) >= 0).all()


def _exact_features(unet, scheduler, images, config, names, output_function):
    """Dense projected gradients and denoising losses, computed here from the definitions."""
    schedule = NoiseSchedule(scheduler)
    params = dict(unet.named_parameters())
    numels = {n: params[n].numel() for n in names}
    dense = torch.cat([torch.cat([b for _, b in projection_blocks(n, numels[n], config.projection_dim, config.seed)]) for n in names]).double()
    t = torch.tensor(config.timesteps).repeat_interleave(config.num_draws)
    features, losses = [], []
    for p in unet.parameters():
        p.requires_grad_(True)
    for image in images:
        generator, noise = torch.Generator(), []
        for i, step in enumerate(t.tolist()):
            generator.manual_seed(derive_seed("guda-gradient", config.seed, image_content_hash(image), step, i % config.num_draws))
            noise.append(torch.randn(image.shape, generator=generator))
        noise = torch.stack(noise)
        x_t = schedule.add_noise(image.unsqueeze(0).expand_as(noise), noise, t).requires_grad_(True)
        out = unet(x_t, t).sample
        value = out.pow(2).mean() if output_function == "squared_norm" else out.mean()
        grads = torch.autograd.grad(value, [params[n] for n in names] + [x_t])[:-1]
        features.append(torch.cat([g.reshape(-1) for g in grads]).double() @ dense)
        losses.append(torch.nn.functional.mse_loss(out.detach(), noise).double())  # ε-prediction: the target is the noise
    for p in unet.parameters():
        p.requires_grad_(False)
    return torch.stack(features), torch.stack(losses)


def test_known_answer_against_dense_features_and_linalg_inverse(tiny_unet, tiny_scheduler, tiny_dataset):
    data = small_dataset(tiny_dataset, 4)
    queries = tiny_dataset.images[[5, 25]]
    common = {"projection_dim": 6, "timesteps": (20, 70), "num_draws": 2, "param_filter": "up_blocks.0.resnets.0.conv2", "seed": 2, "damping": 0.05}
    names = [n for n, _ in tiny_unet.named_parameters() if common["param_filter"] in n]
    onehot = torch.nn.functional.one_hot(data.group_ids, 3).double()  # [M, K]: the group sums

    config = DTRAKConfig(**common)
    phi_q, _ = _exact_features(tiny_unet, tiny_scheduler, queries, config, names, "squared_norm")
    phi, _ = _exact_features(tiny_unet, tiny_scheduler, data.images, config, names, "squared_norm")
    gram = phi.T @ phi
    inverse = torch.linalg.inv(gram + 0.05 * gram.trace() / 6 * torch.eye(6, dtype=torch.float64))
    expected = phi_q @ inverse @ phi.T @ onehot
    torch.testing.assert_close(dtrak_scores(tiny_unet, tiny_scheduler, queries, data, config), expected, rtol=1e-4, atol=1e-9)

    config = DASConfig(**common)
    phi_q, _ = _exact_features(tiny_unet, tiny_scheduler, queries, config, names, "mean")
    phi, losses = _exact_features(tiny_unet, tiny_scheduler, data.images, config, names, "mean")
    gram = phi.T @ phi
    inverse = torch.linalg.inv(gram + 0.05 * gram.trace() / 6 * torch.eye(6, dtype=torch.float64))
    leverage = torch.einsum("md,de,me->m", phi, inverse, phi)
    assert (leverage > 0).all() and (leverage < 1).all()
    change = phi_q @ inverse @ phi.T * (losses.sqrt() / (1 - leverage))
    torch.testing.assert_close(das_scores(tiny_unet, tiny_scheduler, queries, data, config), change.square() @ onehot, rtol=1e-4, atol=1e-12)
    plain = (phi_q @ inverse @ phi.T * losses.sqrt()).square() @ onehot
    torch.testing.assert_close(das_scores(tiny_unet, tiny_scheduler, queries, data, DASConfig(**common, leverage=False)), plain, rtol=1e-4, atol=1e-12)


def test_the_kernel_inverse_changes_the_ranking_of_plain_gradients(tiny_unet, tiny_scheduler, tiny_dataset):
    """With the denoising loss as output function, D-TRAK is TRAK: the gradient baseline whitened by (ΦᵀΦ + λI)⁻¹."""
    queries = tiny_dataset.images[[0, 4, 11, 15, 22, 29]]
    common = {"projection_dim": 8, "timesteps": (30, 80)}
    plain = gradient_scores(tiny_unet, tiny_scheduler, queries, tiny_dataset, GradientConfig(**common))
    # huge damping: the inverse is ≈ I/λ, so the scores are the gradient baseline's scaled
    undamped = dtrak_scores(tiny_unet, tiny_scheduler, queries, tiny_dataset, DTRAKConfig(**common, output_function="loss", damping=1e8))
    lam = 1e8 * _mean_eigenvalue(tiny_unet, tiny_scheduler, tiny_dataset, common)
    torch.testing.assert_close(undamped * lam, plain, rtol=1e-5, atol=1e-12)
    whitened = dtrak_scores(tiny_unet, tiny_scheduler, queries, tiny_dataset, DTRAKConfig(**common, output_function="loss", damping=1e-3))
    assert not torch.equal(whitened.argsort(1), plain.argsort(1))
    assert (whitened.argmax(1) != plain.argmax(1)).any()


def _mean_eigenvalue(unet, scheduler, dataset, common) -> float:
    from guda_lab.evaluation.gradient import projected_gradients

    phi = projected_gradients(unet, scheduler, dataset.images, GradientConfig(**common))
    return float((phi.T @ phi).diagonal().mean())


def test_flow_matching_model(tiny_unet, tiny_dataset):
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0)
    data = small_dataset(tiny_dataset)
    queries = tiny_dataset.images[-2:]
    for score, config in ((dtrak_scores, DTRAKConfig(**FAST)), (das_scores, DASConfig(**FAST))):
        scores = score(tiny_unet, flow, queries, data, config)
        assert scores.shape == (2, 3) and torch.isfinite(scores).all() and scores.abs().sum() > 0
        assert torch.equal(scores, score(tiny_unet, flow, queries, data, config))
        assert not torch.allclose(scores, score(tiny_unet, _ddpm(), queries, data, config))  # the flow's own noise process


def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100, beta_schedule="linear")


def test_text_conditioned_model_uses_each_images_conditioning(tiny_scheduler, tiny_dataset):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                norm_num_groups=8, cross_attention_dim=12, attention_head_dim=4).eval()
    data = small_dataset(tiny_dataset, 2)
    queries = tiny_dataset.images[[1, 13]]
    generator = torch.Generator().manual_seed(0)
    train_cond, query_cond = torch.randn((len(data), 3, 12), generator=generator), torch.randn((2, 3, 12), generator=generator)
    for score, config in ((dtrak_scores, DTRAKConfig(**FAST)), (das_scores, DASConfig(**FAST))):
        with pytest.raises(ConfigError, match="text-conditioned"):
            score(unet, tiny_scheduler, queries, data, config)
        scores = score(unet, tiny_scheduler, queries, data, config, query_conditioning=query_cond, train_conditioning=train_cond)
        assert scores.shape == (2, 3) and torch.isfinite(scores).all() and scores.abs().sum() > 0
        other = score(unet, tiny_scheduler, queries, data, config, query_conditioning=query_cond.flip(0), train_conditioning=train_cond)
        assert not torch.allclose(scores, other)


def test_config_errors():
    for config_class in (DTRAKConfig, DASConfig):
        with pytest.raises(ConfigError, match=r"projection_dim must be >= 1, got 0"):
            config_class(projection_dim=0)
        with pytest.raises(ConfigError, match=r"damping must be a finite number >= 0"):
            config_class(damping=-0.1)
        with pytest.raises(ConfigError, match=r"damping must be a finite number >= 0"):
            config_class(damping=float("nan"))
        with pytest.raises(ConfigError, match="gradient_batch_size"):
            config_class(gradient_batch_size=0)
        with pytest.raises(ConfigError, match="aggregate"):
            config_class(aggregate="max")
    with pytest.raises(ConfigError, match="output_function must be one of"):
        DTRAKConfig(output_function="l1")
    assert DTRAKConfig().output_function == "squared_norm" and DASConfig().leverage is True


def test_damping_zero_is_the_pseudo_inverse(tiny_unet, tiny_scheduler, tiny_dataset):
    data = small_dataset(tiny_dataset)  # 9 images, 16 dimensions: ΦᵀΦ is singular
    queries = tiny_dataset.images[[2]]
    scores = dtrak_scores(tiny_unet, tiny_scheduler, queries, data, DTRAKConfig(**FAST, damping=0))
    tiny = dtrak_scores(tiny_unet, tiny_scheduler, queries, data, DTRAKConfig(**FAST, damping=1e-9))
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, tiny, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("flag, option, words", [("--dtrak-option", "damping=-1", "damping"),
                                                  ("--das-option", "projection_dim=0", "projection_dim"),
                                                  ("--das-option", "lambda=3", "unknown setting")])
def test_cli_options_are_checked_before_anything_runs(tmp_path, flag, option, words):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(["evaluate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), flag, option, "--quiet"])
        except SystemExit as exc:
            code = exc.code
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0] and flag in lines[0]
    assert not (tmp_path / "o").exists()
