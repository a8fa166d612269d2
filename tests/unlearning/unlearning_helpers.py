"""Shared by the tests of diffusers_guda.unlearning: small settings, adapter comparisons, a full run.

The test modules import its helpers and load it as a plugin (``pytest_plugins``) for its fixtures; it is
imported before pytest could rewrite its asserts, hence PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_guda import AdapterBundle, GroupUnlearner, LoRASettings, UnlearningConfig


def small_config(**overrides) -> UnlearningConfig:
    values = dict(
        objective="retrack",
        objective_options={"num_neighbors": 2},
        lora=LoRASettings(rank=2, alpha=2.0),
        steps=3,
        learning_rate=1e-2,
        forget_batch_size=4,
        retain_batch_size=4,
        eval_images=4,
        eval_draws=1,
        seed=0,
    )
    values.update(overrides)
    return UnlearningConfig(**values)


def has_adapters(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def assert_same_adapters(a: AdapterBundle, b: AdapterBundle, slugs=None):
    for slug in slugs or a.slugs:
        sa, sb = a.adapters[slug], b.adapters[slug]
        assert sa.keys() == sb.keys(), slug
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (slug, key)
        assert a.adapter_configs[slug] == b.adapter_configs[slug]


@pytest.fixture
def full_bundle(tiny_unet, tiny_scheduler, tiny_dataset):
    """An uninterrupted run over all three groups, without checkpoints."""
    return GroupUnlearner(tiny_unet, tiny_scheduler, small_config()).unlearn(tiny_dataset, progress=False)
