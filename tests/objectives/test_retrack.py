"""ReTrack: log-space neighbour weights in 3072 dims, capped offsets, the redirect target by hand."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_guda.errors import ConfigError
from diffusers_guda.objectives import (
    NoiseSchedule,
    ReTrack,
    ReTrackConfig,
    UnlearningBatch,
    capped_offsets,
    get_objective,
    neighbour_weights,
    pool_redirect,
    pool_weights,
    posterior_shift,
)

TIMESTEPS = [1, 10, 100, 500, 999]


@pytest.fixture(scope="module")
def schedule_1000():
    return NoiseSchedule(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))


def _rand(shape, seed, lo=-1.0, hi=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * (hi - lo) + lo


def _cifar_like(schedule, k=10, seed=0):
    """A forget image, k random neighbours, noised at every t in TIMESTEPS: 3x32x32 = 3072 dims."""
    b = len(TIMESTEPS)
    t = torch.tensor(TIMESTEPS)
    forget = _rand((1, 3, 32, 32), seed).expand(b, -1, -1, -1)
    neighbours = _rand((1, k, 3, 32, 32), seed + 1).expand(b, -1, -1, -1, -1)
    noise = torch.randn((b, 3, 32, 32), generator=torch.Generator().manual_seed(seed + 2))
    a, s = schedule.alphas[t], schedule.sigmas[t]
    x_t = a.view(-1, 1, 1, 1) * forget + s.view(-1, 1, 1, 1) * noise
    return t, forget, neighbours, noise, x_t, a, s


# -- neighbour weights ---------------------------------------------------------------------------


def test_neighbour_weights_normalised_and_not_degenerate_in_3072_dims(schedule_1000):
    t, forget, neighbours, noise, x_t, a, s = _cifar_like(schedule_1000)
    weights = neighbour_weights(x_t, neighbours, a, s)
    assert weights.shape == (len(TIMESTEPS), 10)
    assert torch.isfinite(weights).all()
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(len(TIMESTEPS)), atol=1e-5, rtol=0)
    assert (weights.max(1).values > 0).all()  # no row collapsed to zero
    # at large t every neighbour is about as far from x_t: the posterior is spread over several
    spread = (weights > 1e-6).sum(1)
    assert spread[TIMESTEPS.index(999)] > 1
    assert spread.max() > 1
    # at t = 1 the posterior concentrates on the neighbour nearest to x_t / sqrt(abar)
    nearest = ((x_t[0] / a[0]) - neighbours[0]).flatten(1).norm(dim=1).argmin()
    assert int(weights[0].argmax()) == int(nearest)


def test_naive_weights_underflow_in_3072_dims(schedule_1000):
    """The defect of the authors' released code: exp(-d2 / 2 s^2) is 0 for every neighbour."""
    t, forget, neighbours, noise, x_t, a, s = _cifar_like(schedule_1000)
    d2 = (x_t.flatten(1).unsqueeze(1) - a.view(-1, 1, 1) * neighbours.flatten(2)).pow(2).sum(-1)
    unnormalised = torch.exp(-d2 / (2 * s.view(-1, 1) ** 2))
    naive = unnormalised / (unnormalised.sum(1, keepdim=True) + 1e-8)
    assert torch.all(naive == 0)  # the target would collapse to 0
    fixed = neighbour_weights(x_t, neighbours, a, s)
    assert torch.all(fixed.sum(1) > 0.99)


def test_neighbour_weights_match_posterior_in_low_dims():
    """In 4 dims, where nothing underflows, the weights are the normalised Gaussian likelihoods."""
    generator = torch.Generator().manual_seed(3)
    b, k = 3, 5
    neighbours = torch.randn((b, k, 1, 2, 2), generator=generator)
    x_t = torch.randn((b, 1, 2, 2), generator=generator)
    a = torch.tensor([0.9, 0.6, 0.3])
    s = (1 - a**2).sqrt()
    d2 = (x_t.double().flatten(1).unsqueeze(1) - a.double().view(-1, 1, 1) * neighbours.double().flatten(2)).pow(2).sum(-1)
    likelihood = torch.exp(-d2 / (2 * s.double().view(-1, 1) ** 2))
    expected = likelihood / likelihood.sum(1, keepdim=True)
    torch.testing.assert_close(neighbour_weights(x_t, neighbours, a, s).double(), expected, rtol=1e-5, atol=1e-7)


# -- capped offsets ------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_cap", [0.01, 1.0, 50.0, 1e4])
def test_capped_offsets_norm_bound(schedule_1000, kl_cap):
    t, forget, neighbours, noise, x_t, a, s = _cifar_like(schedule_1000)
    delta = capped_offsets(forget, neighbours, a, s, kl_cap)
    assert delta.shape == neighbours.shape
    raw = (a / s).view(-1, 1, 1, 1, 1) * (forget.unsqueeze(1) - neighbours)
    raw_norm = raw.flatten(2).norm(dim=-1)
    norm = delta.flatten(2).norm(dim=-1)
    cap = math.sqrt(2 * kl_cap)
    assert (norm <= cap + 1e-5 * max(1.0, cap)).all()
    below = raw_norm <= cap
    above = ~below
    # offsets under the cap are untouched; those over it keep their direction and land on the cap
    assert torch.equal(delta[below], raw[below])
    if above.any():
        torch.testing.assert_close(norm[above], torch.full_like(norm[above], cap), rtol=1e-5, atol=0)
        cosine = torch.nn.functional.cosine_similarity(delta.flatten(2)[above], raw.flatten(2)[above], dim=-1)
        assert (cosine > 1 - 1e-5).all()
    if kl_cap == 0.01:
        assert above.all()
    if kl_cap == 1e4:
        assert above[TIMESTEPS.index(1)].all() and below[TIMESTEPS.index(999)].all()  # the cap binds only at small t


def test_capped_offsets_zero_offset_stays_zero():
    x = torch.zeros(2, 1, 2, 2)
    out = capped_offsets(x, x.unsqueeze(1).repeat(1, 3, 1, 1, 1), torch.tensor([0.5, 0.9]), torch.tensor([0.8, 0.3]), 1.0)
    assert torch.equal(out, torch.zeros_like(out))


# -- a pool shared by the batch (num_neighbors="all") ---------------------------------------------


@pytest.mark.parametrize("kl_cap", [0.01, 10.0, 1e4])
def test_pool_functions_match_the_gathered_computation_in_3072_dims(schedule_1000, kl_cap):
    cases = _cifar_like(schedule_1000, k=40)
    t, forget, neighbours, noise, x_t, a, s = (c.double() for c in cases)  # the formula, exactly
    pool = neighbours[0]  # every row sees the same 40 images
    weights = pool_weights(x_t, pool, a, s)
    torch.testing.assert_close(weights, neighbour_weights(x_t, neighbours, a, s), rtol=1e-9, atol=1e-12)
    gathered = (weights.view(len(TIMESTEPS), -1, 1, 1, 1) * capped_offsets(forget, neighbours, a, s, kl_cap)).sum(1)
    shift = pool_redirect(forget, pool, weights, a, s, kl_cap)
    assert shift.shape == forget.shape
    torch.testing.assert_close(shift, gathered, rtol=1e-9, atol=1e-10)
    # in float32 (3072-term sums: a few 1e-6 relative error in logits of ~1500 at t = 999)
    t, forget, neighbours, noise, x_t, a, s = cases
    weights32 = pool_weights(x_t, neighbours[0], a, s)
    torch.testing.assert_close(weights32.double(), weights, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(weights32.sum(1), torch.ones(len(TIMESTEPS)), atol=1e-5, rtol=0)
    shift32 = pool_redirect(forget, neighbours[0], weights32, a, s, kl_cap)
    torch.testing.assert_close(shift32.double(), shift, rtol=1e-2, atol=1e-4 * max(1.0, math.sqrt(kl_cap)))


def test_pool_weights_keep_small_distances_exact_at_small_t(schedule_1000):
    """At small t the weights hinge on distances far below the images' norms; the matmul shortcut
    of cdist (|x|^2 + |y|^2 - 2xy) would round them away, the difference-by-difference distance does not."""
    generator = torch.Generator().manual_seed(4)
    base = torch.rand((1, 3, 32, 32), generator=generator) * 2 - 1
    pool = base + 1e-3 * torch.randn((30, 3, 32, 32), generator=generator)  # 30 near-identical images
    t = torch.tensor([20])  # sqrt(1 - abar) ~ 0.05, about the distances between the images
    a, s = schedule_1000.alphas[t], schedule_1000.sigmas[t]
    x_t = a * pool[2:3] + s * 1e-2 * torch.randn((1, 3, 32, 32), generator=generator)
    expected = neighbour_weights(x_t.double(), pool.double().unsqueeze(0), a.double(), s.double())
    assert expected.max() < 0.9  # a spread posterior: the distances matter
    torch.testing.assert_close(pool_weights(x_t, pool, a, s).double(), expected, rtol=1e-3, atol=1e-5)


# -- the forget loss, by hand --------------------------------------------------------------------


def _batch(dataset, group, schedule, model, teacher, t, seed=0):
    forget_index = dataset.forget_indices(group)[: len(t)]
    retain_index = dataset.retain_indices(group)[: len(t)]
    generator = torch.Generator().manual_seed(seed)
    return UnlearningBatch(
        forget_x0=dataset.images[forget_index],
        forget_index=forget_index,
        forget_t=t,
        forget_noise=torch.randn((len(t), *dataset.image_shape), generator=generator),
        retain_x0=dataset.images[retain_index],
        retain_index=retain_index,
        retain_t=t,
        retain_noise=torch.randn((len(t), *dataset.image_shape), generator=generator),
        model=model,
        teacher=teacher,
        schedule=schedule,
        generator=torch.Generator().manual_seed(seed + 1),
    )


def _brute_force_neighbours(dataset, group, k):
    forget, retain = dataset.forget_indices(group), dataset.retain_indices(group)
    d = torch.cdist(dataset.images[forget].flatten(1).double(), dataset.images[retain].flatten(1).double())
    return forget, retain[d.topk(k, largest=False).indices]


@pytest.mark.parametrize("group", [0, 2])
def test_setup_picks_true_nearest_retain_neighbours(tiny_dataset, tiny_scheduler, group):
    objective = ReTrack(num_neighbors=4)
    objective.setup(tiny_dataset, group, NoiseSchedule(tiny_scheduler))
    forget, expected = _brute_force_neighbours(tiny_dataset, group, 4)
    table = objective._neighbours
    for row, idx in enumerate(forget.tolist()):
        chosen = table[idx]
        assert set(chosen.tolist()) == set(expected[row].tolist())
        assert (tiny_dataset.group_ids[chosen] != group).all()  # never from the forget group


class _Leaf:
    """A model whose output is a leaf tensor: the gradient of an MSE recovers its target."""

    def __init__(self, shape, seed=5):
        self.output = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
        self.calls = []

    def __call__(self, x_t, t):
        self.calls.append((x_t.detach().clone(), t.clone()))
        return self.output


@pytest.mark.filterwarnings("ignore:kl_cap=0.05 over images")  # a tiny cap on purpose: every offset is capped
@pytest.mark.parametrize("kl_cap", [0.05, 1e6])
@pytest.mark.parametrize("num_neighbors", [3, "all"])
def test_retrack_target_is_noise_plus_weighted_offsets(tiny_dataset, tiny_scheduler, kl_cap, num_neighbors):
    group = 1
    k = len(tiny_dataset.retain_indices(group)) if num_neighbors == "all" else num_neighbors
    schedule = NoiseSchedule(tiny_scheduler)
    objective = ReTrack(num_neighbors=num_neighbors, kl_cap=kl_cap)
    objective.setup(tiny_dataset, group, schedule)
    t = torch.tensor([1, 5, 20, 50, 80, 99])
    model = _Leaf((len(t), 1, 8, 8))
    batch = _batch(tiny_dataset, group, schedule, model, lambda x, t: pytest.fail("teacher not used"), t)
    loss = objective.forget_loss(batch)
    loss.backward()
    # mse = mean((P - target)^2)  =>  grad = 2 (P - target) / numel
    target = model.output.detach() - model.output.grad * model.output.numel() / 2

    # independent computation in float64
    forget, neighbour_idx = _brute_force_neighbours(tiny_dataset, group, k)
    row = {int(i): r for r, i in enumerate(forget)}
    neighbours = tiny_dataset.images[neighbour_idx[[row[int(i)] for i in batch.forget_index]]].double()
    abar = tiny_scheduler.alphas_cumprod.double()[t]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x0, eps = batch.forget_x0.double(), batch.forget_noise.double()
    x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    logits = -(x_t.unsqueeze(1) - a.view(-1, 1, 1, 1, 1) * neighbours).flatten(2).pow(2).sum(-1) / (2 * s.view(-1, 1) ** 2)
    w = torch.exp(logits - logits.max(1, keepdim=True).values)
    w = w / w.sum(1, keepdim=True)
    delta = (a / s).view(-1, 1, 1, 1, 1) * (x0.unsqueeze(1) - neighbours)
    norm = delta.flatten(2).norm(dim=-1).view(len(t), k, 1, 1, 1)
    delta = delta * torch.clamp(math.sqrt(2 * kl_cap) / norm, max=1.0)
    expected = eps + (w.view(len(t), k, 1, 1, 1) * delta).sum(1)
    torch.testing.assert_close(target.double(), expected, rtol=1e-4, atol=1e-4)
    # the model saw the forget images noised with the batch's (t, noise)
    (seen_x, seen_t), = model.calls
    assert torch.equal(seen_t, t)
    torch.testing.assert_close(seen_x.double(), x_t, rtol=1e-5, atol=1e-5)
    # the target is not the plain noise (the redirect is active) and is finite
    assert torch.isfinite(target).all()
    assert (target - batch.forget_noise).abs().max() > 1e-2


def test_retrack_target_with_v_prediction(tiny_dataset):
    """With v-prediction the model output is read as epsilon: eps_hat = s x_t + a v."""
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    schedule = NoiseSchedule(scheduler)
    objective = ReTrack(num_neighbors=2, kl_cap=1e6)
    objective.setup(tiny_dataset, 0, schedule)
    t = torch.tensor([3, 40, 90])
    zero_v = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    batch = _batch(tiny_dataset, 0, schedule, zero_v, zero_v, t)
    s = schedule.sigmas[t].view(-1, 1, 1, 1)
    loss_v = objective.forget_loss(batch)
    # the same loss with an epsilon-model returning s * x_t (what v = 0 means as a noise prediction)
    eps_schedule = NoiseSchedule(DDPMScheduler(num_train_timesteps=100))
    batch_eps = _batch(tiny_dataset, 0, eps_schedule, lambda x, tt: s * x, zero_v, t)
    loss_eps = objective.forget_loss(batch_eps)
    torch.testing.assert_close(loss_v, loss_eps, rtol=1e-5, atol=1e-6)


def test_teacher_neighbour_target_and_per_t_weight(tiny_dataset, tiny_scheduler):
    group = 2
    schedule = NoiseSchedule(tiny_scheduler)
    objective = ReTrack(num_neighbors=1, target="teacher_neighbour")  # k = 1: the draw is fixed
    objective.setup(tiny_dataset, group, schedule)
    t = torch.tensor([1, 3, 10, 30, 60, 99])  # (1 - abar)/abar goes from ~1e-4 to > 1 (clamped)
    teacher_calls = []

    def teacher(x_t, tt):
        teacher_calls.append(x_t.detach().clone())
        return 0.1 * x_t  # a known teacher

    model = _Leaf((len(t), 1, 8, 8), seed=7)
    batch = _batch(tiny_dataset, group, schedule, model, teacher, t)
    loss = objective.forget_loss(batch).detach()
    assert loss.ndim == 0 and torch.isfinite(loss)

    forget, neighbour_idx = _brute_force_neighbours(tiny_dataset, group, 1)
    row = {int(i): r for r, i in enumerate(forget)}
    chosen = tiny_dataset.images[neighbour_idx[[row[int(i)] for i in batch.forget_index], 0]].double()
    abar = tiny_scheduler.alphas_cumprod.double()[t]
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    eps = batch.forget_noise.double()
    x_t = a * batch.forget_x0.double() + s * eps
    x_t_n = a * chosen + s * eps  # the neighbour noised with the same (t, eps)
    (seen,) = teacher_calls
    torch.testing.assert_close(seen.double(), x_t_n, rtol=1e-5, atol=1e-5)
    target = 0.1 * x_t_n + (x_t - x_t_n) / s
    per_t = torch.clamp((1 - abar) / abar, max=1.0)
    assert per_t[0] < 1e-3 and per_t[-1] == 1.0
    per_sample = (model.output.detach().double() - target).flatten(1).pow(2).mean(1)
    torch.testing.assert_close(loss.double(), (per_t * per_sample).mean(), rtol=1e-4, atol=1e-6)
    unweighted = per_sample.mean()
    assert abs(float(unweighted) - float(loss)) > 1e-3 * float(loss)  # the weight made a difference


@pytest.mark.parametrize("num_neighbors", [3, "all"])
def test_teacher_neighbour_draw_uses_batch_generator(tiny_dataset, tiny_scheduler, num_neighbors):
    schedule = NoiseSchedule(tiny_scheduler)
    objective = get_objective("retrack", {"num_neighbors": num_neighbors, "target": "teacher_neighbour"})
    objective.setup(tiny_dataset, 0, schedule)
    t = torch.full((8,), 99)  # large t: the posterior over neighbours is spread
    model = lambda x, tt: torch.zeros_like(x)  # noqa: E731
    teacher = lambda x, tt: 0.5 * x  # noqa: E731
    losses = [objective.forget_loss(_batch(tiny_dataset, 0, schedule, model, teacher, t, seed=3)) for _ in range(2)]
    assert torch.isfinite(losses[0]) and losses[0] > 0
    assert torch.equal(losses[0], losses[1])  # reproducible with the same generator


# -- teacher_posterior: the exact change of the optimal denoiser ------------------------------------


def _posterior_mean(x_t, pool, a, s):
    """E[a | x_t] over ``pool`` in float64, by hand."""
    logits = -(x_t.unsqueeze(1) - a.view(-1, 1, 1, 1, 1) * pool.unsqueeze(0)).flatten(2).pow(2).sum(-1) / (2 * s.view(-1, 1) ** 2)
    return (torch.softmax(logits, dim=1) @ pool.flatten(1)).view_as(x_t)


def test_posterior_shift_is_the_change_of_the_optimal_denoiser(tiny_dataset, tiny_scheduler):
    group = 1
    images = tiny_dataset.images.double()
    retain = images[tiny_dataset.retain_indices(group)]
    t = torch.tensor([20, 50, 80, 99])  # a spread posterior: no offset reaches the cap below
    abar = tiny_scheduler.alphas_cumprod.double()[t]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x0 = images[tiny_dataset.forget_indices(group)[: len(t)]]
    x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    retained = tiny_dataset.group_ids != group
    shift = posterior_shift(x0, x_t, images, retained, a, s, kl_cap=1e9)
    optimal = lambda pool: (x_t - a.view(-1, 1, 1, 1) * _posterior_mean(x_t, pool, a, s)) / s.view(-1, 1, 1, 1)  # noqa: E731
    torch.testing.assert_close(shift, optimal(retain) - optimal(images), rtol=1e-6, atol=1e-6)
    assert shift.flatten(1).norm(dim=1).min() > 1e-2  # the group's own images move


def test_posterior_shift_vanishes_where_the_group_has_no_mass(tiny_dataset, tiny_scheduler):
    """Retain images keep the teacher's output: far from the group at moderate t, and all of them at small t."""
    group = 0
    images, retained = tiny_dataset.images, tiny_dataset.group_ids != group
    abar = tiny_scheduler.alphas_cumprod
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    for index, t, bound in ((tiny_dataset.retain_indices(group)[-4:], 30, 1e-3), (tiny_dataset.retain_indices(group)[:4], 1, 1e-3)):
        tt = torch.full((4,), t)
        a, s = abar[tt].sqrt(), (1 - abar[tt]).sqrt()
        x0 = images[index]
        x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise
        shift = posterior_shift(x0, x_t, images, retained, a, s, kl_cap=20.0)
        assert shift.abs().max() < bound, (t, shift.abs().max())
    # while a forget image at the same moderate t is redirected
    tt = torch.full((4,), 30)
    a, s = abar[tt].sqrt(), (1 - abar[tt]).sqrt()
    x0 = images[tiny_dataset.forget_indices(group)[:4]]
    x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise
    assert posterior_shift(x0, x_t, images, retained, a, s, kl_cap=20.0).flatten(1).norm(dim=1).min() > 1.0


def test_teacher_posterior_targets_by_hand(tiny_dataset, tiny_scheduler):
    group = 2
    schedule = NoiseSchedule(tiny_scheduler)
    objective = get_objective("retrack", {"num_neighbors": "all", "kl_cap": 20.0, "target": "teacher_posterior", "preserve": "teacher_posterior"})
    objective.setup(tiny_dataset, group, schedule)
    assert objective.teacher_passes(64, 32) == 96  # one teacher forward per forget and per retain sample
    t = torch.tensor([2, 10, 40, 70, 99])
    teacher_calls = []

    def teacher(x_t, tt):
        teacher_calls.append(x_t.detach().clone())
        return 0.1 * x_t

    abar = tiny_scheduler.alphas_cumprod[t]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    for term in ("forget", "retain"):
        model = _Leaf((len(t), 1, 8, 8), seed=9)
        teacher_calls.clear()
        batch = _batch(tiny_dataset, group, schedule, model, teacher, t)
        loss = objective.forget_loss(batch) if term == "forget" else objective.preserve_loss(batch)
        loss.backward()
        target = model.output.detach() - model.output.grad * model.output.numel() / 2
        x0, noise = getattr(batch, f"{term}_x0"), getattr(batch, f"{term}_noise")
        x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise
        (seen,) = teacher_calls
        torch.testing.assert_close(seen, x_t, rtol=1e-5, atol=1e-5)
        expected = 0.1 * x_t + posterior_shift(x0, x_t, tiny_dataset.images, tiny_dataset.group_ids != group, a, s, 20.0)
        torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)
        moved = (target - 0.1 * x_t).flatten(1).norm(dim=1)
        assert (moved.max() > 0.5) == (term == "forget")  # only the group's images are redirected


# -- flow matching: the same targets read as velocities ----------------------------------------------


def _flow_case(dataset, group, seed=4):
    """A flow schedule, steps across the σ range, and the optimal velocity ``(x_σ - E[x0 | x_σ]) / σ`` of a pool."""
    schedule = NoiseSchedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0))
    t = torch.tensor([5, 30, 60, 90])
    a, s = schedule.alphas[t].double(), schedule.sigmas[t].double()

    def optimal_velocity(x_t, pool):
        return (x_t - _posterior_mean(x_t, pool.double(), a, s)) / s.view(-1, 1, 1, 1)

    return schedule, t, optimal_velocity


def test_flow_retrack_target_is_the_optimal_velocity_of_the_retain_set(tiny_dataset):
    """Uncapped, 'neighbour' over every retain image regresses the velocity on (x_σ - E_retain[x0 | x_σ]) / σ."""
    group = 1
    schedule, t, optimal_velocity = _flow_case(tiny_dataset, group)
    objective = ReTrack(num_neighbors="all", kl_cap=1e9)
    objective.setup(tiny_dataset, group, schedule)
    model = _Leaf((len(t), 1, 8, 8), seed=11)
    batch = _batch(tiny_dataset, group, schedule, model, model, t)
    objective.forget_loss(batch).backward()
    (x_t, _), = model.calls
    a = schedule.alphas[t].view(-1, 1, 1, 1)
    # the loss is the ε-MSE: ε̂ = x_σ + (1 - σ) v̂, so the gradient in v̂ is (1 - σ)² times the velocity error
    velocity_target = model.output.detach() - model.output.grad * model.output.numel() / 2 / a**2
    expected = optimal_velocity(x_t.double(), tiny_dataset.images[tiny_dataset.retain_indices(group)]).float()
    torch.testing.assert_close(velocity_target, expected, rtol=1e-4, atol=1e-4)
    own = optimal_velocity(x_t.double(), tiny_dataset.images).float()
    assert (expected - own).flatten(1).norm(dim=1).max() > 0.5  # the group's images are redirected


def test_flow_teacher_posterior_target_is_the_teacher_plus_the_change_of_the_optimal_velocity(tiny_dataset):
    group = 2
    schedule, t, optimal_velocity = _flow_case(tiny_dataset, group)
    objective = get_objective("retrack", {"num_neighbors": "all", "kl_cap": 1e9, "target": "teacher_posterior"})
    objective.setup(tiny_dataset, group, schedule)
    teacher = lambda x_t, tt: 0.2 * x_t  # noqa: E731
    model = _Leaf((len(t), 1, 8, 8), seed=12)
    batch = _batch(tiny_dataset, group, schedule, model, teacher, t)
    objective.forget_loss(batch).backward()
    (x_t, _), = model.calls
    a = schedule.alphas[t].view(-1, 1, 1, 1)
    velocity_target = model.output.detach() - model.output.grad * model.output.numel() / 2 / a**2
    images, retain = tiny_dataset.images, tiny_dataset.images[tiny_dataset.retain_indices(group)]
    change = (optimal_velocity(x_t.double(), retain) - optimal_velocity(x_t.double(), images)).float()
    torch.testing.assert_close(velocity_target, 0.2 * x_t + change, rtol=1e-4, atol=1e-4)


# -- config --------------------------------------------------------------------------------------


def test_a_cap_that_binds_on_larger_images_is_warned_about(tiny_dataset, tiny_scheduler):
    import warnings

    from diffusers_guda import GroupedDataset

    schedule = NoiseSchedule(tiny_scheduler)
    generator = torch.Generator().manual_seed(0)
    emoji_sized = GroupedDataset(torch.rand((6, 3, 16, 16), generator=generator) * 2 - 1, torch.tensor([0, 0, 1, 1, 2, 2]), ["a", "b", "c"])
    with pytest.warns(UserWarning, match=r"kl_cap=20 over images of 768 values allows a redirect of 0\.23 RMS per value.*pass kl_cap=81"):
        ReTrack(num_neighbors="all", kl_cap=20.0).setup(emoji_sized, 0, schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReTrack(num_neighbors="all", kl_cap=80.0).setup(emoji_sized, 0, schedule)  # the emoji recipe's cap: 0.46 per value
        ReTrack(num_neighbors="all", kl_cap=20.0).setup(tiny_dataset, 0, schedule)  # the digits recipe's: 0.79 on 8x8


@pytest.mark.parametrize(
    "options",
    [{"target": "teacher"}, {"num_neighbors": 0}, {"num_neighbors": "every"}, {"num_neighbors": 2.5}, {"kl_cap": 0.0}, {"kl_cap": -1.0}, {"nope": 1}, {"preserve": "l1"},
     {"target": "teacher_posterior", "num_neighbors": 3}, {"preserve": "teacher_posterior", "num_neighbors": 3}],
)
def test_retrack_config_errors(options):
    with pytest.raises(ConfigError):
        get_objective("retrack", options)


def test_retrack_config_direct_and_unknown_option_message():
    with pytest.raises(ConfigError):
        ReTrackConfig(target="x")
    with pytest.raises(ConfigError):
        ReTrackConfig(num_neighbors=0)
    with pytest.raises(ConfigError, match="an integer or 'all'"):
        get_objective("retrack", {"num_neighbors": "every"})
    assert get_objective("retrack", {"num_neighbors": "all"}).config.num_neighbors == "all"
    with pytest.raises(ConfigError) as info:
        get_objective("retrack", {"nope": 1})
    assert "nope" in str(info.value) and "num_neighbors" in str(info.value)
    with pytest.raises(ConfigError):
        ReTrack(ReTrackConfig(), kl_cap=2.0)  # config object and options together
    objective = get_objective("retrack", {"num_neighbors": 3, "kl_cap": 2.0})
    assert isinstance(objective, ReTrack)
    assert objective.describe() == {"name": "retrack", "config": {**ReTrackConfig(num_neighbors=3, kl_cap=2.0).to_dict()}}
