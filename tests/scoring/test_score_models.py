"""Tests of diffusers_guda.scoring.sequential: score_models, any models one after another (LOGO)."""

from __future__ import annotations

import pytest
import torch

from diffusers_guda import ELBOConfig, ELBOEstimator
from diffusers_guda.adapter_state import use_adapters
from diffusers_guda.errors import ConfigError
from diffusers_guda.scoring import score_models

from scoring_helpers import scorer_with_adapters

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_models_or_contexts_give_the_scorers_scores(tiny_unet, tiny_scheduler):
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1"))
    est = scorer.estimator
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def switched(name):  # a model made ready by hand (as LOGO's separately trained models are)
        def ready():
            if name is None:
                tiny_unet.disable_adapters()
            else:
                tiny_unet.enable_adapters()
                tiny_unet.set_adapter(name)
            return tiny_unet
        return ready

    by_hand = score_models(est, switched(None), [switched("g0"), switched("g1")], ["g0", "g1"], images, batch_size=2, progress=False,
                           metadata={"reference": "test"})
    in_context = score_models(est, lambda: use_adapters(tiny_unet, None), [lambda n=n: use_adapters(tiny_unet, n) for n in ("g0", "g1")],
                              ["g0", "g1"], images, progress=False)
    for key in ("scores", "stderr", "neg_elbo"):
        assert torch.equal(getattr(by_hand, key), getattr(in_context, key)), key
    assert by_hand.metadata["reference"] == "test" and by_hand.metadata["num_rows"] == est.num_rows
    assert by_hand.groups == ["g0", "g1"] and by_hand.image_hashes == est.image_hashes(images)
    swap = scorer.score(images, progress=False, strategy="swap")
    assert torch.allclose(in_context.scores, swap.scores, atol=1e-3, rtol=1e-5)  # other forward sizes: float32 rounding
    assert torch.allclose(in_context.neg_elbo, swap.neg_elbo, atol=1e-3, rtol=1e-5)


def test_score_models_checks_its_arguments(tiny_unet, tiny_scheduler):
    est = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=25))
    images = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ConfigError, match="one counterfactual model per group"):
        score_models(est, lambda: tiny_unet, [lambda: tiny_unet], ["a", "b"], images, progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        score_models(est, lambda: tiny_unet, [lambda: tiny_unet], ["a"], images, batch_size=0, progress=False)
    same = score_models(est, lambda: tiny_unet, [lambda: tiny_unet], ["a"], images, progress=False)
    assert torch.equal(same.scores, torch.zeros(1, 1))  # the reference against itself
