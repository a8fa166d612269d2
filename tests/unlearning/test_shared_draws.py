"""Tests of diffusers_guda.unlearning.shared_draws: rows that are a pure function of (seed, image, draw),
teacher outputs equal to the teacher's on those rows, a group's adapter that does not depend on which
groups were trained before it, and the teacher's passes counted once per row."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_guda import GroupUnlearner, UnlearningConfig
from diffusers_guda.errors import ConfigError
from diffusers_guda.hashing import derive_seed
from diffusers_guda.objectives import NoiseSchedule
from diffusers_guda.pipelines import GUDAStableDiffusionPipeline
from diffusers_guda.unlearning.forwards import UNetForwards
from diffusers_guda.unlearning.shared_draws import SharedDraws

from conftest import GUDAUNet2DModel, make_sd_dataset, tiny_unet_config
from unlearning_helpers import assert_same_adapters, small_config

pytest_plugins = ["unlearning_helpers"]

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

POSTERIOR = {"num_neighbors": "all", "target": "teacher_posterior", "preserve": "teacher_posterior"}


def fresh_unet():
    torch.manual_seed(0)
    return GUDAUNet2DModel(**tiny_unet_config()).eval()


def shared(dataset, scheduler, unet, draws=3, seed=7, rows_per_forward=5):
    schedule = NoiseSchedule(scheduler)
    return SharedDraws(dataset, draws, seed, schedule, UNetForwards(unet, False, schedule=schedule), rows_per_forward)


def test_rows_are_a_pure_function_of_seed_image_and_draw(tiny_dataset, tiny_scheduler, tiny_unet):
    a, b = shared(tiny_dataset, tiny_scheduler, tiny_unet), shared(tiny_dataset, tiny_scheduler, tiny_unet)
    index, draw = torch.tensor([0, 3, 0, 5]), torch.tensor([1, 2, 1, 0])
    (t_a, noise_a), (t_b, noise_b) = a.rows(index, draw), b.rows(index[[2, 1, 0, 3]], draw[[2, 1, 0, 3]])
    assert torch.equal(t_a[[2, 1, 0, 3]], t_b) and torch.equal(noise_a[[2, 1, 0, 3]], noise_b)
    assert torch.equal(noise_a[0], noise_a[2])  # the same row twice
    other_draw = a.rows(torch.tensor([0]), torch.tensor([2]))[1][0]
    other_seed = shared(tiny_dataset, tiny_scheduler, tiny_unet, seed=8).rows(torch.tensor([0]), torch.tensor([1]))[1][0]
    assert not torch.equal(noise_a[0], other_draw) and not torch.equal(noise_a[0], other_seed)
    assert t_a.dtype == torch.long and 0 <= int(t_a.min()) and int(t_a.max()) < tiny_scheduler.config.num_train_timesteps


def test_teacher_outputs_are_the_teachers_on_the_rows_and_computed_once(tiny_dataset, tiny_scheduler, tiny_unet):
    table = shared(tiny_dataset, tiny_scheduler, tiny_unet)
    index, draw = torch.tensor([1, 4, 1, 6, 2, 7, 0]), torch.tensor([0, 2, 0, 1, 1, 0, 2])
    out = table.teacher_outputs(index, draw, group=0)
    t, noise = table.rows(index, draw)
    x_t = table.schedule.add_noise(tiny_dataset.images[index], noise, t)
    with torch.no_grad():
        direct = tiny_unet(x_t, t).sample
    # computed in forwards of 5 rows (the last padded); a row's output does not depend on its companions
    assert torch.equal(out, direct)
    assert table.computed_for[0] == 6  # (1, 0) twice: one forward row
    again = table.teacher_outputs(index[[3, 0]], draw[[3, 0]], group=1)
    assert torch.equal(again, out[[3, 0]]) and table.computed_for[1] == 0


@pytest.mark.parametrize("flow", [False, True], ids=["ddpm", "flow-matching"])
def test_a_groups_adapter_does_not_depend_on_the_groups_trained_before_it(flow, tiny_scheduler, tiny_dataset):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0) if flow else tiny_scheduler
    config = small_config(objective_options=POSTERIOR, shared_draws=2)
    alone = GroupUnlearner(fresh_unet(), scheduler, config).unlearn(tiny_dataset, groups=["right"], progress=False)
    after_others = GroupUnlearner(fresh_unet(), scheduler, config).unlearn(tiny_dataset, progress=False)
    assert_same_adapters(alone, after_others, slugs=["right"])
    # the rows the first two groups drew were reused: the last group computed fewer teacher rows alone than
    # its steps asked for, and fewer still after the others
    fresh_rows = config.steps * (config.forget_batch_size + config.retain_batch_size)
    alone_rows = alone.groups[0].stats["shared_teacher_rows"]
    assert after_others.groups[2].stats["shared_teacher_rows"] < alone_rows <= fresh_rows
    total_rows = sum(g.stats["shared_teacher_rows"] for g in after_others.groups)
    assert total_rows <= len(tiny_dataset) * config.shared_draws
    student = config.steps * (config.forget_batch_size + config.retain_batch_size)
    for g in after_others.groups:
        assert g.stats["sample_passes"] == student + g.stats["shared_teacher_rows"]
    assert after_others.training["shared_draws"] == 2


def test_shared_draws_change_only_where_rows_are_drawn(tiny_scheduler, tiny_dataset):
    """Fresh draws (the default) keep their batches and count the teacher per step."""
    fresh = GroupUnlearner(fresh_unet(), tiny_scheduler, small_config(objective_options=POSTERIOR)).unlearn(tiny_dataset, progress=False)
    with_shared = GroupUnlearner(fresh_unet(), tiny_scheduler, small_config(objective_options=POSTERIOR, shared_draws=2)).unlearn(
        tiny_dataset, progress=False)
    per_step = 2 * (4 + 4)  # student rows plus the teacher on the same rows
    assert all(g.stats["sample_passes"] == g.stats["steps"] * per_step and "shared_teacher_rows" not in g.stats for g in fresh.groups)
    assert sum(g.stats["sample_passes"] for g in with_shared.groups) < sum(g.stats["sample_passes"] for g in fresh.groups)
    slug = fresh.slugs[0]
    assert any(not torch.equal(fresh.adapters[slug][k], with_shared.adapters[slug][k]) for k in fresh.adapters[slug])


def test_shared_draws_with_adapters_trained_together(tiny_scheduler, tiny_dataset):
    from test_joint import assert_close_adapters

    def run(joint_groups):
        config = small_config(objective_options=POSTERIOR, shared_draws=2, joint_groups=joint_groups, steps=4)
        return GroupUnlearner(fresh_unet(), tiny_scheduler, config).unlearn(tiny_dataset, progress=False)

    alone, together = run(1), run(3)
    assert_close_adapters(alone, together)
    assert sum(g.stats["shared_teacher_rows"] for g in alone.groups) == sum(g.stats["shared_teacher_rows"] for g in together.groups)


def test_text_conditioned_teacher_rows_are_shared(tiny_sd_dir):
    """esd's conditional teacher prediction is at the batch's own rows and prompts: shared; its unconditional one is not."""
    pipe = GUDAStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    dataset = make_sd_dataset(per_group=4)
    config = UnlearningConfig(objective="esd", lora={"rank": 2, "alpha": 2.0}, steps=3, forget_batch_size=2, retain_batch_size=2,
                              eval_images=2, eval_draws=1, learning_rate=1e-2, shared_draws=2)
    alone = pipe.unlearn_groups(dataset, config=config, groups=["blue"], progress=False)
    after_others = pipe.unlearn_groups(dataset, config=config, progress=False)
    assert_same_adapters(alone, after_others, slugs=["blue"])
    for g in after_others.groups:
        unconditional, student = g.stats["steps"] * 2, g.stats["steps"] * 4
        assert g.stats["sample_passes"] == student + unconditional + g.stats["shared_teacher_rows"]
    assert 0 < sum(g.stats["shared_teacher_rows"] for g in after_others.groups) <= 3 * 2 * 4  # forget rows only: ≤ 2 per image


def test_shared_draws_must_not_be_negative():
    with pytest.raises(ConfigError, match="shared_draws must be >= 0"):
        UnlearningConfig(shared_draws=-1)


def test_log_snr_timesteps_in_shared_and_fresh_draws(tiny_scheduler, tiny_dataset, tiny_unet):
    """Both kinds of rows draw their steps as the setting says, and the adapters change with it."""
    schedule = NoiseSchedule(tiny_scheduler)
    log_snr = SharedDraws(tiny_dataset, 3, 7, schedule, UNetForwards(tiny_unet, False, schedule=schedule), 5, "log_snr")
    index, draw = torch.arange(len(tiny_dataset)).repeat(3), torch.arange(3).repeat_interleave(len(tiny_dataset))
    t = log_snr.rows(index, draw)[0]
    generator = torch.Generator().manual_seed(derive_seed("guda-shared-draw", 7, 2, 1))
    assert t[len(tiny_dataset) + 2] == schedule.draw_timesteps(1, generator, "log_snr")[0]
    uniform = shared(tiny_dataset, tiny_scheduler, tiny_unet).rows(index, draw)[0]
    assert not torch.equal(t, uniform)
    for draws in (0, 2):
        runs = [GroupUnlearner(fresh_unet(), tiny_scheduler, small_config(shared_draws=draws, timestep_sampling=s)).unlearn(
            tiny_dataset, progress=False) for s in ("uniform", "log_snr")]
        slug = runs[0].slugs[0]
        assert any(not torch.equal(runs[0].adapters[slug][k], runs[1].adapters[slug][k]) for k in runs[0].adapters[slug])


def test_unknown_timestep_sampling_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="timestep_sampling must be one of"):
        UnlearningConfig(timestep_sampling="cosine")
