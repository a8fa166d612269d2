"""The text-to-image objectives: anchor (AWSS, uniform, style_removed) and esd, on a tiny offline SD."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_guda import UnlearningConfig
from diffusers_guda.errors import ConfigError, DataError
from diffusers_guda.objectives import (
    NoiseSchedule,
    UnlearningBatch,
    anchor_distribution,
    get_objective,
    replace_phrases,
    strip_phrases,
)
from diffusers_guda.pipelines import GUDAStableDiffusionPipeline
from diffusers_guda.pipelines.conditioning import PromptEncoder

from conftest import SD_WORDS, make_sd_dataset

DESCRIPTORS = {"red": ["red", "warm"], "green": ["green", "leafy"], "blue": ["blue", "cold", "deep"]}


@pytest.fixture(scope="module")
def tiny_sd():
    from diffusers_guda.testing import tiny_stable_diffusion

    return tiny_stable_diffusion(words=SD_WORDS + ["warm", "leafy", "cold", "deep"], seed=0, pipeline_class=GUDAStableDiffusionPipeline)


def make_batch(pipe, dataset, group: int, seed: int = 0) -> UnlearningBatch:
    """A real batch: the tiny SD UNet as student and teacher (no adapter, so they agree), real embeddings."""
    unet, encode = pipe.unet, PromptEncoder(pipe)
    schedule = NoiseSchedule(DDPMScheduler.from_config(pipe.scheduler.config))
    generator = torch.Generator().manual_seed(seed)
    latents = pipe.encode_latents(dataset.images)
    fi, ri = dataset.forget_indices(group)[:3], dataset.retain_indices(group)[:3]

    def model(x, t, cond):
        return unet(x, t, encoder_hidden_states=cond).sample

    @torch.no_grad()
    def teacher(x, t, cond):
        return unet(x, t, encoder_hidden_states=cond).sample

    t = torch.tensor([100, 500, 900])
    return UnlearningBatch(
        latents[fi], fi, t, torch.randn(3, 4, 8, 8, generator=generator), latents[ri], ri, t, torch.randn(3, 4, 8, 8, generator=generator),
        model, teacher, schedule, generator,
        forget_cond=encode([dataset.prompts[i] for i in fi.tolist()]), retain_cond=encode([dataset.prompts[i] for i in ri.tolist()]),
        forget_prompts=[dataset.prompts[i] for i in fi.tolist()], retain_prompts=[dataset.prompts[i] for i in ri.tolist()],
        encode_prompts=encode, group=group,
    )


def test_anchor_distribution():
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.0, 0.0, 0.0, 0.0]])
    pi = anchor_distribution(sims, forget_group=0, beta=2.0, eta=0.3)
    torch.testing.assert_close(pi.sum(1), torch.ones(2, dtype=torch.float64))
    assert (pi[:, 0] == 0).all()  # never the forget group, however similar
    expected = 0.7 * torch.softmax(2.0 * torch.tensor([0.1, 0.5, 0.2], dtype=torch.float64), 0) + 0.3 / 3
    torch.testing.assert_close(pi[0, 1:], expected)
    torch.testing.assert_close(pi[1, 1:], torch.full((3,), 1 / 3, dtype=torch.float64))
    sharp = anchor_distribution(sims, 0, beta=1e4, eta=0.0)
    assert sharp[0].argmax() == 2 and sharp[0, 2] > 0.999
    torch.testing.assert_close(anchor_distribution(sims, 0, 2.0, 0.3, uniform=True)[0, 1:], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_prompt_editing():
    assert strip_phrases("a house, loose brushwork, soft light", ["soft light", "loose brushwork"]) == "a house"
    assert replace_phrases("a square in red style", ["red"], "blue, cold") == "a square in blue, cold style"
    assert replace_phrases("a Red square, warm", ["red", "warm"], "green") == "a green square"
    assert replace_phrases("a square", ["red"], "green") == "a square, green"  # no descriptor: appended
    assert replace_phrases("a redder square", ["red"], "green") == "a redder square, green"  # whole words only


@pytest.mark.parametrize("strategy", ["awss", "uniform", "style_removed"])
def test_anchor_prompts_leave_the_forget_group(tiny_sd, strategy):
    dataset = make_sd_dataset()
    dataset.group_descriptors = DESCRIPTORS
    objective = get_objective("anchor", {"strategy": strategy})
    objective.setup(dataset, 0, None)
    encode = PromptEncoder(tiny_sd)
    prompts = ["a square in red style", "a stripe in warm red style"] * 20
    anchors = objective.anchor_prompts(prompts, encode, torch.Generator().manual_seed(0))
    assert len(anchors) == len(prompts)
    for anchor in anchors:
        assert "red" not in anchor and "warm" not in anchor
        if strategy == "style_removed":
            assert anchor in ("a square in style", "a stripe in style")
        else:
            used = [g for g, words in DESCRIPTORS.items() if any(w in anchor.split(", ") or f" {w}" in anchor for w in words)]
            assert used and "red" not in used
    if strategy != "style_removed":
        greens = sum("green" in a or "leafy" in a for a in anchors)
        assert 0 < greens < len(anchors)  # both other groups are drawn


def test_awss_follows_the_prototype_similarities(tiny_sd):
    dataset = make_sd_dataset()
    dataset.group_descriptors = DESCRIPTORS
    objective = get_objective("anchor", {"beta": 1e4, "eta": 0.0, "num_descriptors": 1})
    objective.setup(dataset, 0, None)
    encode = PromptEncoder(tiny_sd)
    prompts = ["a square in red style"] * 8
    sims = objective._embed(encode, prompts[:1]) @ objective.prototypes(encode).T
    nearest = int(sims[0, 1:].argmax()) + 1
    anchors = objective.anchor_prompts(prompts, encode, torch.Generator().manual_seed(0))
    assert all(any(w in a for w in DESCRIPTORS[dataset.group_names[nearest]]) for a in anchors)
    assert objective.prototypes(encode).shape == (3, 32)
    torch.testing.assert_close(objective.prototypes(encode).norm(dim=1), torch.ones(3))


def test_anchor_loss_is_the_teacher_under_the_anchor_prompt(tiny_sd):
    dataset = make_sd_dataset()
    batch = make_batch(tiny_sd, dataset, group=1)
    objective = get_objective("anchor", {})
    objective.setup(dataset, 1, batch.schedule)
    state = batch.generator.get_state()
    loss = objective.forget_loss(batch)
    anchors = objective.anchor_prompts(batch.forget_prompts, batch.encode_prompts, torch.Generator().set_state(state))
    assert all("green" not in a for a in anchors)
    x_t = batch.schedule.add_noise(batch.forget_x0, batch.forget_noise, batch.forget_t)
    with torch.no_grad():
        own = batch.model(x_t, batch.forget_t, batch.forget_cond)
        anchored = batch.model(x_t, batch.forget_t, batch.encode_prompts(anchors))
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(own, anchored), rtol=1e-5, atol=1e-8)
    assert loss.item() > 0
    assert objective.config.preserve == "distill" and objective.preserve_loss(batch).item() == 0.0  # student == teacher
    assert objective.teacher_passes(4, 5) == 9


def test_esd_target_is_negative_guidance(tiny_sd):
    dataset = make_sd_dataset()
    batch = make_batch(tiny_sd, dataset, group=2)
    objective = get_objective("esd", {"guidance_weight": 2.0})
    loss = objective.forget_loss(batch)
    x_t = batch.schedule.add_noise(batch.forget_x0, batch.forget_noise, batch.forget_t)
    with torch.no_grad():
        cond = batch.model(x_t, batch.forget_t, batch.forget_cond)
        uncond = batch.model(x_t, batch.forget_t, batch.encode_prompts([""] * 3))
    # student == teacher here, so the loss is ||ε_c - (ε_u - w(ε_c - ε_u))||² = (1 + w)² ||ε_c - ε_u||²
    torch.testing.assert_close(loss.detach(), 9.0 * torch.nn.functional.mse_loss(cond, uncond), rtol=1e-4, atol=1e-8)
    assert objective.teacher_passes(4, 5) == 13


def test_option_validation():
    with pytest.raises(ConfigError, match="strategy"):
        get_objective("anchor", {"strategy": "nearest"})
    with pytest.raises(ConfigError, match="eta"):
        get_objective("anchor", {"eta": 1.5})
    with pytest.raises(ConfigError, match="guidance_weight"):
        get_objective("esd", {"guidance_weight": -1.0})
    from conftest import make_tiny_dataset

    for name in ("anchor", "esd"):
        with pytest.raises(DataError, match="prompt"):
            get_objective(name, {}).setup(make_tiny_dataset(), 0, None)


@pytest.mark.parametrize("objective", ["anchor", "esd"])
def test_unlearn_groups_with_text_objectives(tiny_sd_dir, objective):
    pipe = GUDAStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    dataset = make_sd_dataset(per_group=4)
    config = UnlearningConfig(objective=objective, lora={"rank": 2, "alpha": 2.0}, steps=2, forget_batch_size=2,
                              retain_batch_size=2, eval_images=2, eval_draws=1, learning_rate=1e-2)
    bundle = pipe.unlearn_groups(dataset, config=config, groups=["red"], progress=False)
    assert bundle.objective["name"] == objective and bundle.objective["config"]["preserve"] == "distill"
    stats = bundle.groups[0].stats
    assert stats["sample_passes"] == 2 * (2 + 2 + (2 if objective == "anchor" else 4) + 2)
    assert all(v == v for v in (stats["forget_loss_after"], stats["retain_loss_after"]))  # finite, no NaN
    assert any(t.abs().sum() > 0 for k, t in bundle.adapters["red"].items() if "lora_B" in k)


def test_anchor_is_the_default_for_text_to_image(tiny_sd_dir):
    from diffusers_guda import default_recipe

    recipe = default_recipe(GUDAStableDiffusionPipeline.from_pretrained(tiny_sd_dir))
    assert recipe.name == "sd-styles" and recipe.unlearning.objective == "anchor"
