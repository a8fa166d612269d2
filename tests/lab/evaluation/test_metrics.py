"""Ranking metrics (docs/evaluation.md#metrics) against values computed by hand on small examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from diffusers_guda.errors import ConfigError
from guda_lab.evaluation import (
    METRIC_NAMES,
    group_level_agreement,
    group_level_comparison,
    kendall,
    label_top1,
    mrr,
    ndcg_at_k,
    own_group_ratios,
    pairwise_agreement,
    per_query_metrics,
    ranking,
    rbo,
    spearman,
    spearman_others,
    summarize,
    top1,
    top3,
)

L3 = math.log2(3)
# Reference: order [0, 1, 2, 3], so relevances rel = [3, 2, 1, 0] (group 0 best).
G = np.array([0.9, 0.5, 0.3, 0.1])
# Prediction with order [2, 0, 1, 3].
S = np.array([0.6, 0.4, 0.8, 0.0])
# Reversed prediction: order [3, 2, 1, 0].
REV = -G


def test_ranking_orders_best_first_and_breaks_ties_to_lower_index():
    assert ranking(S).tolist() == [2, 0, 1, 3]
    assert ranking([1.0, 1.0, 0.0, 0.0]).tolist() == [0, 1, 2, 3]
    assert ranking([0.0, 2.0, 2.0, 1.0]).tolist() == [1, 2, 3, 0]
    assert ranking(np.zeros(5)).tolist() == [0, 1, 2, 3, 4]


def test_perfect_agreement():
    g = np.array([0.1, 0.7, 0.3, 0.9, 0.5])  # K = 5
    for fn in (top1, top3, mrr, ndcg_at_k, spearman, kendall):
        assert fn(g, g) == pytest.approx(1.0)
    # |top-d ∩ top-d| / d = 1 for all d, so RBO = (1 - p) Σ_{d=1..5} p^{d-1} = 1 - p^5 = 1 - 0.59049.
    assert rbo(g, g) == pytest.approx(0.40951)
    assert rbo(g, g, p=0.5) == pytest.approx(1 - 0.5**5)


def test_partial_agreement_hand_computed():
    assert top1(S, G) == 0.0  # argmax s = 2, argmax g = 0
    assert top3(S, G) == pytest.approx(1.0)  # {2, 0, 1} ∩ {0, 1, 2} = 3 -> 3/3
    assert mrr(S, G) == pytest.approx(0.5)  # group 0 at position 2 of [2, 0, 1, 3]
    # ndcg@3: predicted relevances [rel2, rel0, rel1] = [1, 3, 2]
    # DCG = (2^1-1)/log2(2) + (2^3-1)/log2(3) + (2^2-1)/log2(4) = 1 + 7/log2 3 + 3/2
    # IDCG = (2^3-1)/1 + (2^2-1)/log2 3 + (2^1-1)/2 = 7 + 3/log2 3 + 1/2
    assert ndcg_at_k(S, G) == pytest.approx((1 + 7 / L3 + 1.5) / (7 + 3 / L3 + 0.5))
    # rbo: overlaps/d = 0/1, 1/2 ({2,0}∩{0,1}), 3/3, 4/4
    # 0.1 * (0 + 0.9*0.5 + 0.81*1 + 0.729*1) = 0.1 * 1.989
    assert rbo(S, G) == pytest.approx(0.1989)
    # spearman: ranks(s) = [3, 2, 4, 1], ranks(g) = [4, 3, 2, 1], d = [-1, -1, 2, 0], Σd² = 6
    # rho = 1 - 6*6 / (4*(16-1)) = 1 - 36/60 = 0.4
    assert spearman(S, G) == pytest.approx(0.4)
    # kendall: pairs (0,1) C, (0,2) D, (0,3) C, (1,2) D, (1,3) C, (2,3) C -> (4 - 2)/6
    assert kendall(S, G) == pytest.approx(1 / 3)
    # spearman_others: without g's top group 0, s = [0.4, 0.8, 0.0] and g = [0.5, 0.3, 0.1] over groups 1-3;
    # ranks [2, 3, 1] and [3, 2, 1], d = [-1, 1, 0], rho = 1 - 6*2 / (3*8) = 0.5
    assert spearman_others(S, G) == pytest.approx(0.5)


def test_reversed_ranking_hand_computed():
    assert top1(REV, G) == 0.0
    assert top3(REV, G) == pytest.approx(2 / 3)  # {3, 2, 1} ∩ {0, 1, 2} = {1, 2}
    assert mrr(REV, G) == pytest.approx(0.25)  # group 0 comes last of 4
    # DCG = (2^0-1)/1 + (2^1-1)/log2 3 + (2^2-1)/2 = 1/log2 3 + 3/2; IDCG as above
    assert ndcg_at_k(REV, G) == pytest.approx((1 / L3 + 1.5) / (7 + 3 / L3 + 0.5))
    # overlaps/d = 0, 0, 2/3, 1 -> 0.1 * (0.81*2/3 + 0.729) = 0.1 * 1.269
    assert rbo(REV, G) == pytest.approx(0.1269)
    assert spearman(REV, G) == pytest.approx(-1.0)
    assert kendall(REV, G) == pytest.approx(-1.0)


def test_ndcg_other_depths():
    # ndcg@1: DCG = 2^rel2 - 1 = 1, IDCG = 2^3 - 1 = 7
    assert ndcg_at_k(S, G, k=1) == pytest.approx(1 / 7)
    # k = 10 is clipped to K = 4; the 4th position adds (2^0 - 1)/log2 5 = 0 to both
    full = (1 + 7 / L3 + 1.5) / (7 + 3 / L3 + 0.5)
    assert ndcg_at_k(S, G, k=10) == pytest.approx(full)
    assert per_query_metrics(S[None], G[None], names=("ndcg@1",))["ndcg@1"][0] == pytest.approx(1 / 7)


def test_ties_use_lower_index_for_both_orders():
    g = np.array([0.5, 0.5, 0.1, 0.0])  # argmax g -> 0 (tie with 1)
    s = np.array([0.2, 0.9, 0.0, 0.0])  # order [1, 0, 2, 3]
    assert top1(s, g) == 0.0
    assert mrr(s, g) == pytest.approx(0.5)
    assert top1(g, np.array([0.5, 0.5, 0.0, 0.0])) == 1.0


def test_top3_with_two_groups_uses_min_3_k():
    assert top3([1.0, 0.0], [0.0, 1.0]) == 1.0  # {0, 1} ∩ {1, 0} = 2 -> 2 / min(3, 2)


def test_constant_vector_correlations_become_zero():
    c = np.ones(4)
    assert spearman(c, G) == 0.0 and kendall(c, G) == 0.0
    assert spearman(G, c) == 0.0 and kendall(G, c) == 0.0


def test_spearman_others_ignores_the_top_group_and_needs_two_others():
    g = np.array([0.1, 0.7, 0.3, 0.9, 0.5])
    assert spearman_others(g, g) == pytest.approx(1.0)
    wrong_top = g.copy()
    wrong_top[3] = -1.0  # the reference's top group placed last: the others' order is unchanged
    assert spearman_others(wrong_top, g) == pytest.approx(1.0) and spearman(wrong_top, g) < 1.0
    assert spearman_others(REV, G) == pytest.approx(-1.0)
    assert spearman_others([1.0, 0.0], [0.0, 1.0]) == 0.0  # K = 2: one other group, no order


def test_label_top1():
    assert label_top1(S, 2) == 1.0
    assert label_top1(S, 0) == 0.0
    assert label_top1([1.0, 1.0, 0.0], 0) == 1.0  # tie -> index 0
    with pytest.raises(ValueError, match="label"):
        label_top1(S, 4)


def test_per_query_metrics_matches_single_functions():
    pred, ref = np.stack([G, S, REV]), np.stack([G, G, G])
    out = per_query_metrics(pred, ref)
    assert tuple(out) == METRIC_NAMES
    assert all(v.shape == (3,) for v in out.values())
    np.testing.assert_allclose(out["mrr"], [1.0, 0.5, 0.25])
    np.testing.assert_allclose(out["rbo"], [1 - 0.9**4, 0.1989, 0.1269])


def test_summarize_three_queries():
    pred, ref = np.stack([G, S, REV]), np.stack([G, G, G])
    out = summarize(pred, ref, labels=np.array([0, 0, 3]))
    # top1 = [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3), Σ² = 6/9, /(3-1) -> std sqrt(1/3)
    assert out["top1"] == pytest.approx({"mean": 1 / 3, "std": math.sqrt(1 / 3), "median": 0.0, "n": 3})
    # mrr = [1, 1/2, 1/4]: mean 7/12, deviations (5, -1, -4)/12, Σ² = 42/144, /2 -> std sqrt(21)/12
    assert out["mrr"] == pytest.approx({"mean": 7 / 12, "std": math.sqrt(21) / 12, "median": 0.5, "n": 3})
    # spearman = [1, 0.4, -1]: mean 0.4/3, median 0.4
    assert out["spearman"]["mean"] == pytest.approx(0.4 / 3)
    assert out["spearman"]["median"] == pytest.approx(0.4)
    # label_top1: argmax pred = [0, 2, 3] vs labels [0, 0, 3] -> [1, 0, 1]
    assert out["label_top1"]["mean"] == pytest.approx(2 / 3)
    assert out["label_top1"]["n"] == 3
    # N = 1: std is 0.0
    one = summarize(S[None], G[None], names=("top3",))
    assert one == {"top3": {"mean": 1.0, "std": 0.0, "median": 1.0, "n": 1}}


def test_group_level_comparison_known_difference():
    a = np.array([3.0, 5.0, 4.0, 6.0, 2.0])
    d = np.array([1.0, 2.0, 3.0, 2.0, 2.0])  # mean 2, deviations (-1, 0, 1, 0, 0), var = 2/4
    b = a - d
    out = group_level_comparison(a, b)
    assert out["mean_a"] == pytest.approx(4.0) and out["mean_b"] == pytest.approx(2.0)
    assert out["mean_diff"] == pytest.approx(2.0)
    assert out["stderr"] == pytest.approx(math.sqrt(0.5 / 5))
    half = 2.7764451051977987 * math.sqrt(0.1)  # t_{0.975, 4}
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((2.0 - half, 2.0 + half))
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert out["winner"] == "a" and out["n"] == 5
    assert group_level_comparison(b, a)["winner"] == "b"
    # mean difference 0.1 with spread ~1.7: the interval straddles 0
    c = a - np.array([1.0, -1.0, 2.0, -2.0, 0.5])
    assert group_level_comparison(a, c)["winner"] == "unresolved"
    ci90 = stats.ttest_rel(a, c).confidence_interval(0.90)
    out90 = group_level_comparison(a, c, confidence=0.90)
    assert (out90["ci_low"], out90["ci_high"]) == pytest.approx((ci90.low, ci90.high))


def test_group_level_agreement_counts_resolved_reference_comparisons():
    def result(mean_diff, winner):
        return {"mean_diff": mean_diff, "winner": winner}

    ref = [result(0.5, "a"), result(-0.2, "b"), result(0.01, "unresolved"), result(0.3, "a")]
    pred = [result(2.0, "a"), result(1.0, "unresolved"), result(-5.0, "b"), result(-0.1, "unresolved")]
    # resolved by the reference: 1st (a; pred +), 2nd (b; pred +: wrong), 4th (a; pred -: wrong)
    assert group_level_agreement(pred, ref) == pytest.approx(1 / 3)
    assert group_level_agreement(ref, ref) == 1.0
    assert group_level_agreement(pred[2:3], ref[2:3]) is None
    with pytest.raises(ConfigError, match="same comparisons"):
        group_level_agreement(pred, ref[:2])


def test_own_group_ratios_by_hand():
    reference = np.array([[10.0, 1.0, 0.0], [20.0, 2.0, 1.0], [1.0, 8.0, 0.0]])  # group 0 leads 2 queries, group 1 one, group 2 none
    scores = np.array([[5.0, 9.0, 9.0], [5.0, 9.0, 9.0], [9.0, 2.0, 9.0]])  # only the led queries' own scores count
    ratios = own_group_ratios(scores, reference)
    np.testing.assert_allclose(ratios[:2], [(5 + 5) / (10 + 20), 2 / 8])
    assert np.isnan(ratios[2])


def test_pairwise_agreement_by_hand():
    ref_a, ref_b = [3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 1.0, 5.0]  # reference orders: a, b, a, b
    pred_a, pred_b = [0.9, 0.1, 0.2, 0.5], [0.1, 0.3, 0.4, 0.5]  # a (agrees), b (agrees), b (wrong), tie (half)
    assert pairwise_agreement(pred_a, pred_b, ref_a, ref_b) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert pairwise_agreement(ref_a, ref_b, ref_a, ref_b) == 1.0
    assert pairwise_agreement(ref_b, ref_a, ref_a, ref_b) == 0.0
    # scale-free: only each query's order counts
    assert pairwise_agreement(np.array(ref_a) * 100, np.array(ref_b) * 100 - 1, ref_a, ref_b) == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: top1([1.0, 0.0, 0.5], [1.0, 0.0]), "same number of groups"),
        (lambda: top1([1.0], [1.0]), "K >= 2"),
        (lambda: mrr([1.0, np.nan], [1.0, 0.0]), "non-finite"),
        (lambda: rbo([1.0, np.inf], [1.0, 0.0]), "non-finite"),
        (lambda: spearman(np.ones((2, 2)), np.ones((2, 2))), "1-D"),
        (lambda: ndcg_at_k(S, G, k=0), "positive integer"),
        (lambda: rbo(S, G, p=1.0), r"\(0, 1\)"),
        (lambda: per_query_metrics(np.zeros((2, 4)), np.zeros((3, 4))), "shapes differ"),
        (lambda: per_query_metrics(np.zeros((0, 4)), np.zeros((0, 4))), "N = 0"),
        (lambda: per_query_metrics(np.zeros((2, 1)), np.zeros((2, 1))), "K >= 2"),
        (lambda: per_query_metrics(G, G), r"\[N, K\]"),
        (lambda: per_query_metrics(S[None], G[None], names=("auc",)), "unknown metric"),
        (lambda: summarize(S[None], G[None], labels=[0, 1]), "labels"),
        (lambda: group_level_comparison([1.0, 2.0], [1.0]), "equal length"),
        (lambda: group_level_comparison([1.0], [0.0]), "N >= 2"),
        (lambda: group_level_comparison([1.0, 2.0], [0.0, 1.0], confidence=1.5), "confidence"),
        (lambda: pairwise_agreement([1.0, 2.0], [0.0, 1.0], [1.0], [0.0]), "one non-zero length"),
        (lambda: pairwise_agreement([], [], [], []), "one non-zero length"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
