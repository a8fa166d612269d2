"""Tests of diffusers_guda.scoring.engine: AttributionScorer checks, scores and strategies."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_guda import AttributionScorer, ELBOConfig, ELBOEstimator
from diffusers_guda.adapter_state import use_adapters
from diffusers_guda.errors import ConfigError

from scoring_helpers import add_adapter, scorer_with_adapters

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_scorer_refuses_adapters_that_are_not_loaded(tiny_unet, tiny_scheduler):
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10))
    with pytest.raises(ConfigError, match="not loaded"):
        AttributionScorer(tiny_unet, estimator, ["guda_a"], ["a"])
    add_adapter(tiny_unet, "guda_a", seed=None)
    with pytest.raises(ConfigError, match="guda_b"):
        AttributionScorer(tiny_unet, estimator, ["guda_a", "guda_b"], ["a", "b"])
    with pytest.raises(ConfigError, match="same length"):
        AttributionScorer(tiny_unet, estimator, ["guda_a"], ["a", "b"])
    AttributionScorer(tiny_unet, estimator, ["guda_a"], ["a"])  # fine


def test_scores_of_identity_and_real_adapters(tiny_unet, tiny_scheduler):
    add_adapter(tiny_unet, "identity", seed=None)
    add_adapter(tiny_unet, "real", seed=1)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10, num_draws=2))
    scorer = AttributionScorer(tiny_unet, estimator, ["identity", "real"], ["zero", "changed"])
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = scorer.score(images, batch_size=2, progress=False, metadata={"extra": 1})
    assert result.scores.shape == result.stderr.shape == (3, 2)
    assert result.groups == ["zero", "changed"]
    # an identity adapter is the full model: every paired difference is exactly 0
    assert torch.equal(result.scores[:, 0], torch.zeros(3))
    assert torch.equal(result.stderr[:, 0], torch.zeros(3))
    assert (result.scores[:, 1] != 0).all()
    assert torch.isfinite(result.stderr).all() and (result.stderr[:, 1] > 0).all()
    assert torch.isfinite(result.neg_elbo).all() and (result.neg_elbo > 0).all()
    assert result.image_hashes == estimator.image_hashes(images)
    assert result.metadata["extra"] == 1 and result.metadata["num_rows"] == estimator.num_rows
    assert not tiny_unet.training  # the model keeps its mode
    # batch size changes speed only
    again = scorer.score(images, batch_size=1, progress=False)
    assert torch.equal(again.scores, result.scores) and torch.equal(again.stderr, result.stderr)


def test_scorer_keeps_a_training_unet_in_training_mode(tiny_unet, tiny_scheduler):
    add_adapter(tiny_unet, "real", seed=1)
    scorer = AttributionScorer(tiny_unet, ELBOEstimator(tiny_scheduler, ELBOConfig(stride=25)), ["real"], ["g"])
    tiny_unet.train()
    scorer.score(torch.zeros(1, 1, 8, 8), progress=False)
    assert tiny_unet.training


def test_score_sign_follows_the_elbo_difference(tiny_unet, tiny_scheduler):
    """score = ELBO(full) - ELBO(adapter) = negELBO(adapter) - negELBO(full)."""
    add_adapter(tiny_unet, "real", seed=2)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=10))
    scorer = AttributionScorer(tiny_unet, estimator, ["real"], ["g"])
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    result = scorer.score(images, progress=False)
    with torch.no_grad():
        neg_elbo = {}
        for name in (None, "real"):
            if name is None:
                tiny_unet.disable_adapters()
            else:
                tiny_unet.enable_adapters()
                tiny_unet.set_adapter(name)
            neg_elbo[name] = torch.stack([estimator.scale * estimator.terms(tiny_unet, x, estimator.noise(x)).mean() for x in images])
    tiny_unet.enable_adapters()
    assert torch.allclose(result.neg_elbo, neg_elbo[None], rtol=1e-5)
    assert torch.allclose(result.scores[:, 0], neg_elbo["real"] - neg_elbo[None], rtol=0, atol=1e-3)  # float32 cancellation


@pytest.mark.parametrize("strategy", ["merged", "swap", "mixed"])
def test_scorer_restores_the_adapter_state(tiny_unet, tiny_scheduler, strategy):
    """Scoring switches adapters on and off; afterwards the UNet computes what it computed before."""
    add_adapter(tiny_unet, "a", seed=1)
    add_adapter(tiny_unet, "b", seed=2)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=25))
    scorer = AttributionScorer(tiny_unet, estimator, ["a", "b"], ["a", "b"])
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([3, 60])
    query = torch.zeros(1, 1, 8, 8)

    def output():
        with torch.no_grad():
            return tiny_unet(x, t).sample

    tiny_unet.disable_adapters()  # e.g. a pipeline that generates with the full model
    full = output()
    scorer.score(query, progress=False, strategy=strategy)
    assert torch.equal(output(), full)

    tiny_unet.enable_adapters()
    tiny_unet.set_adapter("a")  # a user looking at one counterfactual
    with_a = output()
    assert not torch.equal(with_a, full)
    scorer.score(query, progress=False, strategy=strategy)
    assert tiny_unet.active_adapters() == ["a"]
    assert torch.equal(output(), with_a)


def test_single_row_estimator_has_nan_stderr(tiny_unet, tiny_scheduler):
    add_adapter(tiny_unet, "real", seed=3)
    estimator = ELBOEstimator(tiny_scheduler, ELBOConfig(stride=50, t_min=50, t_max=51))
    assert estimator.num_rows == 1
    result = AttributionScorer(tiny_unet, estimator, ["real"], ["g"]).score(torch.zeros(1, 1, 8, 8), progress=False)
    assert math.isnan(result.stderr[0, 0]) and math.isfinite(result.scores[0, 0])


def test_batch_size_must_be_positive(tiny_unet, tiny_scheduler):
    add_adapter(tiny_unet, "a", seed=None)
    scorer = AttributionScorer(tiny_unet, ELBOEstimator(tiny_scheduler), ["a"], ["a"])
    with pytest.raises(ConfigError, match="batch_size"):
        scorer.score(torch.zeros(1, 1, 8, 8), batch_size=0, progress=False)


def test_strategies_agree_and_scores_do_not_depend_on_the_batch(tiny_unet, tiny_scheduler):
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    results = {s: scorer.score(images, progress=False, strategy=s) for s in ("swap", "merged", "mixed")}
    auto = scorer.score(images, progress=False)
    assert auto.metadata["strategy"] == "merged" and torch.equal(auto.scores, results["merged"].scores)
    swap = results["swap"]
    assert (swap.scores.abs() > 1e-3).all()  # the adapters do something
    for name, result in results.items():
        assert result.metadata["strategy"] == name
        # float32 reordering only: ~1e-7 per KL term, times T (=100) in the score
        assert (result.scores - swap.scores).abs().max() / swap.scores.abs().max() < 1e-5, name
        assert torch.allclose(result.stderr, swap.stderr, atol=1e-3, rtol=1e-5), name
        assert torch.allclose(result.neg_elbo, swap.neg_elbo, atol=1e-3, rtol=1e-5), name
        # within a strategy, a score does not depend on the batch size, the other images or their order
        alone = scorer.score(images[2:3], progress=False, strategy=name)
        assert torch.equal(alone.scores[0], result.scores[2]), name
        reordered = scorer.score(images.flip(0), batch_size=3, progress=False, strategy=name)
        assert torch.equal(reordered.scores.flip(0), result.scores), name
        assert torch.equal(reordered.stderr.flip(0), result.stderr), name
    assert swap.metadata["row_forwards"] == 4 * scorer.estimator.num_rows * 4  # N x rows x (K + 1)
    # merging left the base weights and adapters as they were (disabled)
    base_again = tiny_unet(images, torch.full((4,), 50)).sample
    tiny_unet.disable_adapters()
    assert torch.equal(base_again, tiny_unet(images, torch.full((4,), 50)).sample)


def test_swap_scores_are_the_per_model_forwards_of_use_adapters(tiny_unet, tiny_scheduler):
    """The swap strategy runs exactly what use_adapters runs: the same packed terms, bit for bit."""
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1"))
    est = scorer.estimator
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    result = scorer.score(image, progress=False, strategy="swap")
    rows = torch.arange(est.num_rows)
    noise = est.noise(image[0])
    terms = {}
    for name in (None, "g0", "g1"):
        with use_adapters(tiny_unet, name) as unet:
            terms[name] = est.packed_terms(unet, image, torch.zeros_like(rows), rows, noise)
    assert torch.equal(result.neg_elbo[0], est.scale * terms[None].mean())
    for j, name in enumerate(("g0", "g1")):
        assert torch.equal(result.scores[0, j], est.scale * (terms[name] - terms[None]).mean(dim=-1))


def test_unknown_strategy_is_refused(tiny_unet, tiny_scheduler):
    scorer = scorer_with_adapters(tiny_unet, tiny_scheduler, names=("g0", "g1"))
    with pytest.raises(ConfigError, match="strategy"):
        scorer.score(torch.zeros(1, 1, 8, 8), progress=False, strategy="fast")
    with pytest.raises(ConfigError, match="mixed"):
        scorer.score(torch.zeros(1, 1, 8, 8), progress=False, strategy="mixed", adaptive_z=2.0)


def test_mixed_strategy_refuses_an_adapter_named_like_peft_base_rows(tiny_unet, tiny_scheduler):
    from diffusers_guda.adapter_state import BASE_ROWS

    add_adapter(tiny_unet, BASE_ROWS, seed=1)
    scorer = AttributionScorer(tiny_unet, ELBOEstimator(tiny_scheduler, ELBOConfig(stride=25)), [BASE_ROWS], ["g"])
    with pytest.raises(ConfigError, match="reserves"):
        scorer.score(torch.zeros(1, 1, 8, 8), progress=False, strategy="mixed")


def test_a_forward_that_does_not_fit_in_memory_names_the_setting_that_makes_it_fit(tiny_unet, tiny_scheduler, monkeypatch):
    from diffusers_guda.errors import BatchTooLargeError

    add_adapter(tiny_unet, "real", seed=1)
    scorer = AttributionScorer(tiny_unet, ELBOEstimator(tiny_scheduler, ELBOConfig(stride=25, rows_per_forward=32)), ["real"], ["g"])

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(ELBOEstimator, "packed_terms", out_of_memory)
    tiny_unet.train()
    with pytest.raises(BatchTooLargeError, match=r"32 rows per UNet forward.*rows_per_forward=16"):
        scorer.score(torch.zeros(1, 1, 8, 8), progress=False, strategy="swap")
    assert tiny_unet.training  # the model's mode is restored
