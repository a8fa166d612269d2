"""ELBOEstimator: grid, common random numbers, batch invariance of scores, KL terms by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_guda import AttributionScorer, ELBOConfig, ELBOEstimator, LoRASettings
from diffusers_guda.errors import ConfigError, GUDAError
from diffusers_guda.hashing import derive_seed, image_content_hash

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")


# -- helpers -------------------------------------------------------------------------------------


def _images(n: int, seed: int = 0, shape=(1, 8, 8)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=generator) * 2 - 1


def _add_adapters(unet, names=("g0", "g1"), scale=0.3):
    generator = torch.Generator().manual_seed(1)
    for name in names:
        unet.add_adapter(LoRASettings(rank=2, alpha=2).to_peft(unet), adapter_name=name)
    with torch.no_grad():  # a fresh LoRA is the identity: randomise lora_B of every adapter
        for pname, param in unet.named_parameters():
            if "lora_B" in pname:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return list(names)


@pytest.fixture
def scorer(tiny_unet, tiny_scheduler):
    names = _add_adapters(tiny_unet)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10))
    return AttributionScorer(tiny_unet, estimator, names, ["left", "right"])


class _Out(SimpleNamespace):
    pass


class ConstantModel(torch.nn.Module):
    """Returns the same tensor whatever the input."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("value", value)

    def forward(self, x_t, t):
        return _Out(sample=self.value.expand_as(x_t).clone())


class OracleModel(torch.nn.Module):
    """Knows x0: outputs the exact target of its prediction type plus a fixed offset."""

    def __init__(self, x0, scheduler, offset):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.x0, self.offset = x0, offset
        self.a, self.s = _forward64(scheduler)
        self.kind = scheduler.config.prediction_type

    def forward(self, x_t, t):
        a = self.a[t].view(-1, 1, 1, 1)
        s = self.s[t].view(-1, 1, 1, 1)
        x0 = self.x0.to(torch.float64).unsqueeze(0)
        eps = (x_t.to(torch.float64) - a * x0) / s
        if self.kind == "epsilon":
            out = eps
        elif self.kind == "v_prediction":
            out = a * eps - s * x0
        else:
            out = x0.expand_as(eps)
        return _Out(sample=(out + self.offset).to(torch.float32))


def _forward64(scheduler):
    """sqrt(abar_t), sqrt(1 - abar_t) of the forward process the scheduler defines (its add_noise)."""
    abar = scheduler.alphas_cumprod.to(torch.float64)
    return abar.sqrt(), (1 - abar).sqrt()


def _kl_weight64(scheduler, t):
    """c_t^2 / (2 beta_tilde_t) in float64 from the scheduler's betas (beta_tilde_0 := beta_tilde_1)."""
    betas = scheduler.betas.to(torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta_tilde = betas * (1 - prev) / (1 - abar)
    beta_tilde[0] = betas[1] * (1 - abar[0]) / (1 - abar[1])
    c = prev.sqrt() * betas / (1 - abar)
    return c[t] ** 2 / (2 * beta_tilde[t])


# -- grid ----------------------------------------------------------------------------------------


def test_default_grid(tiny_scheduler):
    est = ELBOEstimator(tiny_scheduler)
    assert torch.equal(est.timesteps, torch.arange(1, 100))  # stride = T // 100 = 1, t_min = 1
    assert est.num_rows == 99 and est.scale == 100.0
    big = ELBOEstimator(DDPMScheduler(num_train_timesteps=1000))
    assert torch.equal(big.timesteps, torch.arange(10, 1000, 10))
    assert int(big.timesteps.max()) < 1000


def test_custom_grid_and_draws(tiny_scheduler):
    est = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=7, t_min=3, t_max=50, num_draws=2))
    assert torch.equal(est.timesteps, torch.arange(3, 50, 7))
    assert est.num_rows == 2 * len(est.timesteps)
    assert torch.equal(est.row_timesteps, est.timesteps.repeat_interleave(2))
    assert torch.equal(est.row_draws, torch.tensor([0, 1] * len(est.timesteps)))
    zero = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, t_min=0))
    assert torch.equal(zero.timesteps, torch.arange(0, 100, 10))
    assert torch.equal(ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10)).timesteps, torch.arange(10, 100, 10))


@pytest.mark.parametrize(
    "kwargs",
    [dict(t_min=50, t_max=50), dict(t_min=60, t_max=40), dict(t_max=101), dict(t_min=-1), dict(t_min=100)],
)
def test_invalid_grid(tiny_scheduler, kwargs):
    with pytest.raises(ConfigError):
        ELBOEstimator(tiny_scheduler, ELBOConfig(**kwargs))


@pytest.mark.parametrize("kwargs", [dict(stride=-1), dict(stride=-5, t_min=10), dict(stride=-5, t_min=10, t_max=20)])
def test_negative_stride_is_config_error(tiny_scheduler, kwargs):
    with pytest.raises(ConfigError):
        ELBOEstimator(tiny_scheduler, ELBOConfig(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [dict(weighting="elbo"), dict(num_draws=0), dict(num_draws=-2), dict(rows_per_forward=0), dict(autocast_dtype="float32")],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        ELBOConfig(**kwargs)
    assert issubclass(ConfigError, GUDAError)


def test_unsupported_prediction_type():
    fake = SimpleNamespace(
        config=SimpleNamespace(prediction_type="flow"),
        alphas_cumprod=torch.linspace(0.99, 0.1, 10),
        betas=torch.linspace(0.01, 0.1, 10),
    )
    with pytest.raises(ConfigError, match="prediction_type"):
        ELBOEstimator(fake)


# -- common random numbers -----------------------------------------------------------------------


def test_noise_depends_on_content_not_on_batch(tiny_scheduler):
    est = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, num_draws=2))
    images = _images(5)
    ref = est.noise(images[2].clone())
    assert ref.shape == (est.num_rows, 1, 8, 8)
    # the same content as a slice of another batch, a non-contiguous view, a float64 copy
    other = torch.cat([_images(3, seed=7), images[2:3], _images(2, seed=8)])
    assert torch.equal(est.noise(other[3]), ref)
    strided = images.transpose(2, 3).contiguous().transpose(2, 3)[2]
    assert not strided.is_contiguous()
    assert torch.equal(est.noise(strided), ref)
    assert torch.equal(est.noise(images[2].double()), ref)
    # different images get different noise; every row differs from every other row
    assert not torch.equal(est.noise(images[3]), ref)
    flat = ref.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat))).min() > 0
    # another seed: other noise
    est_seed = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, num_draws=2, seed=1))
    assert not torch.equal(est_seed.noise(images[2]), ref)


def test_noise_is_a_function_of_seed_hash_t_draw(tiny_scheduler):
    image = _images(1)[0]
    h = image_content_hash(image)
    est = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, num_draws=2, seed=5))
    noise = est.noise(image)
    for r in range(est.num_rows):
        t, d = int(est.row_timesteps[r]), int(est.row_draws[r])
        generator = torch.Generator().manual_seed(derive_seed("guda-elbo", 5, h, t, d))
        assert torch.equal(noise[r], torch.randn(image.shape, generator=generator))
    # an explicit hash is used as given
    assert torch.equal(est.noise(torch.zeros_like(image), image_hash=h), noise)
    # a subset of rows is the same subset of the full noise
    rows = torch.tensor([5, 0, 17])
    assert torch.equal(est.noise(image, rows=rows), noise[rows])
    # the same (t, draw) on another grid gets the same noise: it depends on t, not the row index
    other = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=5, t_min=5, num_draws=1, seed=5))
    other_noise = other.noise(image)
    for r in range(other.num_rows):
        t = int(other.row_timesteps[r])
        if t % 10 == 0:
            assert torch.equal(other_noise[r], noise[est.timesteps.tolist().index(t) * 2])
    # and different t or different draws give different noise
    assert not torch.equal(noise[0], noise[1])  # same t, draws 0 and 1
    assert not torch.equal(noise[0], noise[2])  # t=10 vs t=20, draw 0


def test_image_hash_depends_on_values_and_shape():
    image = _images(1)[0]
    assert image_content_hash(image) == image_content_hash(image.clone())
    assert image_content_hash(image) != image_content_hash(image.view(1, 4, 16))
    bumped = image.clone()
    bumped[0, 0, 0] = torch.nextafter(bumped[0, 0, 0], torch.tensor(2.0))
    assert image_content_hash(image) != image_content_hash(bumped)


# -- scores are bit-identical whatever the batch -------------------------------------------------


def test_scores_invariant_to_batch_size_order_and_composition(scorer):
    images = _images(7, seed=3)
    ref = scorer.score(images, batch_size=7, progress=False)
    assert ref.scores.shape == (7, 2) and ref.stderr.shape == (7, 2)
    assert ref.scores.abs().min() > 0  # the adapters really change the model
    for batch_size in (1, 3):
        out = scorer.score(images, batch_size=batch_size, progress=False)
        assert torch.equal(out.scores, ref.scores)
        assert torch.equal(out.stderr, ref.stderr)
        assert torch.equal(out.neg_elbo, ref.neg_elbo)
    perm = torch.tensor([4, 0, 6, 2, 5, 1, 3])
    shuffled = scorer.score(images[perm], batch_size=3, progress=False)
    inverse = torch.argsort(perm)
    assert torch.equal(shuffled.scores[inverse], ref.scores)
    assert torch.equal(shuffled.stderr[inverse], ref.stderr)
    assert torch.equal(shuffled.neg_elbo[inverse], ref.neg_elbo)
    mixed = torch.cat([_images(2, seed=11), images[:4], _images(3, seed=12)])
    together = scorer.score(mixed, batch_size=4, progress=False)
    assert torch.equal(together.scores[2:6], ref.scores[:4])
    assert torch.equal(together.stderr[2:6], ref.stderr[:4])
    assert together.image_hashes[2:6] == ref.image_hashes[:4]


def test_every_model_sees_the_same_draws(scorer, tiny_scheduler):
    unet, est = scorer.unet, scorer.estimator
    images = _images(3, seed=4)
    calls = []

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append([sample.detach().clone(), timestep.detach().clone(), None])

    def post_hook(module, args, kwargs, output):
        calls[-1][2] = output.sample.detach().clone()

    handles = [
        unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
        unet.register_forward_hook(post_hook, with_kwargs=True),
    ]
    try:
        scorer.score(images, batch_size=2, progress=False, strategy="swap")  # "merged" runs a plain copy of the UNet
    finally:
        for handle in handles:
            handle.remove()
    # rows of 2 images share each model's forward (padded to rows_per_forward): 2 batches x 3 models
    assert len(calls) == 2 * 3 and all(len(t) == est.config.rows_per_forward for _, t, _ in calls)
    abar = tiny_scheduler.alphas_cumprod.sqrt()
    a = abar[est.row_timesteps].view(-1, 1, 1, 1)
    expected = {i: a * image + (1 - a**2).sqrt() * est.noise(image) for i, image in enumerate(images)}
    seen = {(i, r): {} for i in expected for r in range(est.num_rows)}  # (image, row) -> {call: (x_t, output)}
    for call, (sample, timestep, output) in enumerate(calls):
        for j in range(len(timestep)):
            matches = [(i, r) for (i, r) in seen
                       if timestep[j] == est.row_timesteps[r] and torch.allclose(sample[j], expected[i][r], atol=1e-5)]
            assert len(matches) == 1, "a UNet row whose x_t matches no query image's common random numbers"
            seen[matches[0]][call] = (sample[j], output[j])  # padding repeats a row within its call
    for key, by_call in seen.items():
        assert len(by_call) == 3, f"(image, row) {key} reached {len(by_call)} models"
        (x_base, out_base), (x_a, out_a), (x_b, out_b) = by_call.values()
        assert torch.equal(x_base, x_a) and torch.equal(x_base, x_b)
        # three different models answered (base, adapter g0, adapter g1)
        assert not torch.equal(out_base, out_a) and not torch.equal(out_base, out_b) and not torch.equal(out_a, out_b)


def test_stderr_positive_and_shrinks_with_draws(tiny_unet, tiny_scheduler):
    names = _add_adapters(tiny_unet)
    images = _images(4, seed=5)
    results = {}
    for draws in (1, 4):
        est = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, num_draws=draws))
        results[draws] = AttributionScorer(tiny_unet, est, names, ["a", "b"]).score(images, progress=False)
    for result in results.values():
        assert torch.isfinite(result.stderr).all() and (result.stderr > 0).all()
        assert torch.isfinite(result.neg_elbo).all() and (result.neg_elbo > 0).all()
    ratio = results[4].stderr.mean() / results[1].stderr.mean()
    assert 0.2 < ratio < 0.8  # ~ 1/sqrt(4)


# -- KL terms by hand ----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_kl_terms_constant_model(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    est = ELBOEstimator(scheduler, ELBOConfig(stride=3, t_min=0))
    image = _images(1, seed=6)[0]
    noise = est.noise(image)
    constant = 0.5 * _images(1, seed=9)[0]
    terms = est.terms(ConstantModel(constant), image, noise)
    assert terms.dtype == torch.float32 and terms.shape == (est.num_rows,)

    t = est.row_timesteps
    sqrt_abar, sqrt_one_minus_abar = _forward64(scheduler)
    a, s = sqrt_abar[t].view(-1, 1, 1, 1), sqrt_one_minus_abar[t].view(-1, 1, 1, 1)
    x0, out = image.double(), constant.double()
    x_t = a * x0 + s * noise.double()
    if prediction_type == "epsilon":
        x0_hat = (x_t - s * out) / a
    elif prediction_type == "v_prediction":
        x0_hat = a * x_t - s * out
    else:
        x0_hat = out.expand_as(x_t)
    expected = _kl_weight64(scheduler, t) * (x0 - x0_hat).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(terms.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_kl_terms_oracle_with_offset(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    est = ELBOEstimator(scheduler, ELBOConfig(stride=7, t_min=1, num_draws=2))
    image = _images(1, seed=2)[0]
    noise = est.noise(image)
    t = est.row_timesteps
    sqrt_abar, sqrt_one_minus_abar = _forward64(scheduler)
    a, s = sqrt_abar[t], sqrt_one_minus_abar[t]

    exact = est.terms(OracleModel(image, scheduler, 0.0), image, noise)
    offset_only = est.terms(OracleModel(image, scheduler, 0.25), image, noise)
    assert exact.abs().max() < 1e-6 * offset_only.abs().min()  # exact prediction: KL ~ 0

    # an output offset d moves x0_hat by -(s/a) d (epsilon), -s d (v) or +d (sample)
    d2 = 0.25**2 * image.numel()
    factor = {"epsilon": (s / a) ** 2, "v_prediction": s**2, "sample": torch.ones_like(s)}[prediction_type]
    expected = _kl_weight64(scheduler, t) * factor * d2
    torch.testing.assert_close(offset_only.double(), expected, rtol=1e-4, atol=0)

    # 'simple' weighting: the eps-MSE per row; eps_hat moves by d, a d and -(a/s) d
    simple = ELBOEstimator(scheduler, ELBOConfig(stride=7, t_min=1, num_draws=2, weighting="simple"))
    mse = simple.terms(OracleModel(image, scheduler, 0.25), image, noise)
    eps_factor = {"epsilon": torch.ones_like(s), "v_prediction": a**2, "sample": (a / s) ** 2}[prediction_type]
    torch.testing.assert_close(mse.double(), eps_factor * 0.25**2, rtol=1e-4, atol=0)
    exact_mse = simple.terms(OracleModel(image, scheduler, 0.0), image, noise)
    assert exact_mse.abs().max() < 1e-6


def test_simple_weighting_is_eps_mse(tiny_unet, tiny_scheduler):
    est = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, weighting="simple"))
    image = _images(1, seed=8)[0]
    noise = est.noise(image)
    terms = est.terms(tiny_unet, image, noise)
    t = est.row_timesteps
    abar = tiny_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * image + (1 - abar).sqrt() * noise
    with torch.no_grad():
        eps_hat = tiny_unet(x_t, t).sample
    expected = (eps_hat - noise).flatten(1).pow(2).mean(1)
    torch.testing.assert_close(terms, expected, rtol=1e-4, atol=1e-6)


def test_terms_chunking_and_rows(tiny_unet, tiny_scheduler):
    est = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10))
    chunked = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, rows_per_forward=4))
    image = _images(1, seed=10)[0]
    noise = est.noise(image)
    full = est.terms(tiny_unet, image, noise)
    assert torch.isfinite(full).all() and (full > 0).all()
    torch.testing.assert_close(chunked.terms(tiny_unet, image, noise), full, rtol=1e-4, atol=1e-6)
    rows = torch.tensor([8, 2, 5])
    torch.testing.assert_close(est.terms(tiny_unet, image, est.noise(image, rows=rows), rows=rows), full[rows], rtol=1e-4, atol=1e-6)
