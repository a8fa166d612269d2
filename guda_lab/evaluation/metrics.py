"""Ranking metrics (docs/evaluation.md#metrics): agreement of predicted group scores with a reference (e.g. LOGO).

Per query, ``s`` is the predicted score vector over K groups and ``g`` the reference score vector
(higher = more important in both). The definitions follow the GUDA paper's evaluation code so numbers
are comparable. Ties are broken deterministically: among equal scores the lower group index ranks
first, for ``s`` and ``g`` alike (a stable argsort of ``-scores``).

Inputs may be numpy arrays, sequences or torch tensors (any device; detached and copied to CPU).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from diffusers_guda.errors import ConfigError

METRIC_NAMES = ("top1", "top3", "mrr", "ndcg@3", "rbo", "spearman", "kendall", "spearman_others")
_NDCG = re.compile(r"^ndcg@([1-9][0-9]*)$")


def _array(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be numeric, got {type(x).__name__}: {e}") from None
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{what} contains non-finite values (NaN or inf); clean the scores first")
    return a


def _vector(x, what: str = "scores") -> np.ndarray:
    a = _array(x, what)
    if a.ndim != 1:
        raise ConfigError(f"{what} must be a 1-D vector over K groups, got shape {a.shape}")
    if a.shape[0] < 2:
        raise ConfigError(f"{what} needs K >= 2 groups to rank, got K = {a.shape[0]}")
    return a


def _pair(s, g) -> tuple[np.ndarray, np.ndarray]:
    s, g = _vector(s, "predicted scores s"), _vector(g, "reference scores g")
    if s.shape != g.shape:
        raise ConfigError(f"s and g must have the same number of groups, got {s.shape[0]} and {g.shape[0]}")
    return s, g


def ranking(scores) -> np.ndarray:
    """Group indices ordered best first.

    Args:
        scores: ``[K]`` scores, higher = more important.

    Returns:
        ``[K]`` int array; ties go to the lower group index first (stable argsort of ``-scores``).
    """
    return np.argsort(-_vector(scores), kind="stable")


def _overlap(rs: np.ndarray, rg: np.ndarray, d: int) -> int:
    return len(set(rs[:d].tolist()) & set(rg[:d].tolist()))


def top1(s, g) -> float:
    """``1`` if ``argmax(s) == argmax(g)`` else ``0`` (ties to the lower index)."""
    s, g = _pair(s, g)
    return float(ranking(s)[0] == ranking(g)[0])


def top3(s, g) -> float:
    """Top-3 overlap ``|top-3(s) ∩ top-3(g)| / 3``; with K < 3, ``m = min(3, K)`` replaces 3."""
    s, g = _pair(s, g)
    m = min(3, s.shape[0])
    return _overlap(ranking(s), ranking(g), m) / m


def mrr(s, g) -> float:
    """Reciprocal rank ``1 / r`` of the reference's top group ``argmax(g)`` in the order of ``s``
    (``r = 1`` when it comes first)."""
    s, g = _pair(s, g)
    r = int(np.flatnonzero(ranking(s) == ranking(g)[0])[0]) + 1
    return 1.0 / r


def ndcg_at_k(s, g, k: int = 3) -> float:
    """NDCG@k with rank-based relevance from the reference.

    ``rel(j) = K - 1 - (position of j in the g order, 0-based)`` (best = K−1 … worst = 0);
    ``DCG@k(order) = Σ_{r=1..k} (2^{rel(order_r)} − 1) / log2(r + 1)``;
    ``NDCG@k = DCG@k(order of s) / DCG@k(order of g)``. ``k`` is clipped to K.

    Args:
        s: ``[K]`` predicted scores. g: ``[K]`` reference scores. k: cut-off depth (>= 1).

    Returns:
        A value in ``[0, 1]``; 1 when the top-k of ``s`` is the top-k of ``g`` in order.
    """
    s, g = _pair(s, g)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    K = s.shape[0]
    kk = min(int(k), K)
    rg = ranking(g)
    rel = np.empty(K)
    rel[rg] = np.arange(K - 1, -1, -1, dtype=np.float64)
    disc = 1.0 / np.log2(np.arange(2, kk + 2))
    dcg = float(np.sum((2.0 ** rel[ranking(s)[:kk]] - 1.0) * disc))
    idcg = float(np.sum((2.0 ** rel[rg[:kk]] - 1.0) * disc))  # > 0 since K >= 2
    return dcg / idcg


def rbo(s, g, p: float = 0.9) -> float:
    """Rank-biased overlap truncated at depth K, without extrapolation.

    ``RBO = (1 − p) Σ_{d=1..K} p^{d−1} |top-d(s) ∩ top-d(g)| / d``; identical orders give ``1 − p^K``.
    """
    s, g = _pair(s, g)
    if not 0.0 < p < 1.0:
        raise ConfigError(f"p must lie in (0, 1), got {p!r}")
    rs, rg = ranking(s), ranking(g)
    K = s.shape[0]
    return float((1 - p) * sum(p ** (d - 1) * _overlap(rs, rg, d) / d for d in range(1, K + 1)))


def _corr(fn, s: np.ndarray, g: np.ndarray) -> float:
    with warnings.catch_warnings():  # a constant vector warns and gives NaN; report 0.0 instead
        warnings.simplefilter("ignore")
        value = float(fn(s, g).statistic)
    return 0.0 if math.isnan(value) else value


def spearman(s, g) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``); NaN (a constant vector) becomes 0.0."""
    s, g = _pair(s, g)
    return _corr(stats.spearmanr, s, g)


def kendall(s, g) -> float:
    """Kendall's tau-b (``scipy.stats.kendalltau``); NaN (a constant vector) becomes 0.0."""
    s, g = _pair(s, g)
    return _corr(stats.kendalltau, s, g)


def spearman_others(s, g) -> float:
    """Spearman rank correlation over the groups other than the reference's top group (0.0 when
    fewer than two remain or either is constant).

    With few groups and the top group found, ``spearman`` is mostly this order of the rest: how much
    a retrained model loses on a query's other groups, which a second retraining reproduces only in
    part (docs/evaluation.md#metrics).
    """
    s, g = _pair(s, g)
    rest = np.delete(np.arange(g.shape[0]), ranking(g)[0])
    return _corr(stats.spearmanr, s[rest], g[rest]) if rest.shape[0] >= 2 else 0.0


def label_top1(s, label: int) -> float:
    """``1`` if ``argmax(s) == label`` (ties to the lower index) else ``0``; ``label`` is a group index."""
    s = _vector(s, "predicted scores s")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < s.shape[0]:
        raise ConfigError(f"label must be a group index in [0, {s.shape[0]}), got {label!r}")
    return float(ranking(s)[0] == label)


def metric_function(name: str):
    """The per-query function ``f(pred_scores, ref_scores) -> float`` of a metric name.

    Raises:
        ConfigError: naming the known metrics if ``name`` is none of them.
    """
    fns = {"top1": top1, "top3": top3, "mrr": mrr, "rbo": rbo, "spearman": spearman, "kendall": kendall,
           "spearman_others": spearman_others}
    if name in fns:
        return fns[name]
    m = _NDCG.match(name)
    if m:
        k = int(m.group(1))
        return lambda s, g: ndcg_at_k(s, g, k)
    raise ConfigError(f"unknown metric {name!r}; choose from {METRIC_NAMES} (or 'ndcg@<k>')")


def _matrices(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    p, r = _array(pred, "pred"), _array(ref, "ref")
    if p.ndim != 2 or r.ndim != 2:
        raise ConfigError(f"pred and ref must be [N, K] matrices, got shapes {p.shape} and {r.shape}")
    if p.shape != r.shape:
        raise ConfigError(f"pred and ref shapes differ: {p.shape} vs {r.shape}")
    if p.shape[0] == 0:
        raise ConfigError("pred and ref hold no queries (N = 0)")
    if p.shape[1] < 2:
        raise ConfigError(f"ranking needs K >= 2 groups, got K = {p.shape[1]}")
    return p, r


def per_query_metrics(pred, ref, names: Sequence[str] = METRIC_NAMES) -> dict[str, np.ndarray]:
    """Each metric for each query.

    Args:
        pred: ``[N, K]`` predicted scores. ref: ``[N, K]`` reference scores.
        names: metric names from ``METRIC_NAMES``; any ``"ndcg@<k>"`` is accepted too.

    Returns:
        ``{name: [N] float64 array}``.
    """
    p, r = _matrices(pred, ref)
    fns = {name: metric_function(name) for name in names}
    return {name: np.array([fn(p[i], r[i]) for i in range(p.shape[0])]) for name, fn in fns.items()}


def _stats(v: np.ndarray) -> dict:
    n = int(v.shape[0])
    std = float(np.std(v, ddof=1)) if n > 1 else 0.0
    return {"mean": float(np.mean(v)), "std": std, "median": float(np.median(v)), "n": n}


def summarize(pred, ref, names: Sequence[str] = METRIC_NAMES, labels=None) -> dict[str, dict]:
    """Mean, sample std (``ddof=1``; 0.0 when N = 1), median and N of each metric over queries.

    Args:
        pred: ``[N, K]`` predicted scores. ref: ``[N, K]`` reference scores.
        names: metric names (see :func:`per_query_metrics`).
        labels: optional ``[N]`` known group indices; adds ``"label_top1"`` (``pred`` vs labels).

    Returns:
        ``{name: {"mean": float, "std": float, "median": float, "n": int}}``.
    """
    per = per_query_metrics(pred, ref, names)
    out = {name: _stats(v) for name, v in per.items()}
    if labels is not None:
        p = _array(pred, "pred")
        lab = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
        if lab.shape != (p.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
            raise ConfigError(f"labels must be {p.shape[0]} integer group indices, got {lab.dtype} {lab.shape}")
        out["label_top1"] = _stats(np.array([label_top1(p[i], int(lab[i])) for i in range(p.shape[0])]))
    return out


def group_level_comparison(delta_a, delta_b, confidence: float = 0.95) -> Mapping[str, object]:
    """Paired comparison of two groups' mean Δ over the same N queries.

    With ``d_n = a_n − b_n``: ``mean_diff = mean(d)``, ``stderr = std(d, ddof=1) / sqrt(N)`` and the
    interval ``mean_diff ± t_{(1+confidence)/2, N−1} · stderr`` (Student t, ``scipy.stats.t.ppf``).

    Args:
        delta_a: ``[N]`` Δ of group a per query. delta_b: ``[N]`` Δ of group b, same queries.
        confidence: interval level in (0, 1).

    Returns:
        ``{"mean_a", "mean_b", "mean_diff", "stderr", "ci_low", "ci_high", "confidence", "n",
        "winner"}``; ``winner`` is ``"a"`` if the interval lies entirely above 0, ``"b"`` if entirely
        below 0, else ``"unresolved"``.
    """
    a, b = _array(delta_a, "delta_a"), _array(delta_b, "delta_b")
    if a.ndim != 1 or a.shape != b.shape:
        raise ConfigError(f"delta_a and delta_b must be 1-D of equal length, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n < 2:
        raise ConfigError(f"a paired interval needs N >= 2 queries, got N = {n}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence!r}")
    d = a - b
    mean_diff = float(d.mean())
    stderr = float(d.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * stderr
    lo, hi = mean_diff - half, mean_diff + half
    winner = "a" if lo > 0 else "b" if hi < 0 else "unresolved"
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": mean_diff, "stderr": stderr,
            "ci_low": lo, "ci_high": hi, "confidence": float(confidence), "n": int(n), "winner": winner}


def pairwise_agreement(pred_a, pred_b, ref_a, ref_b) -> float:
    """Fraction of queries on which a method orders two groups as the reference does.

    The finer group-level score: where several methods give a comparison's mean difference the
    reference's sign, it still tells apart how often each one does so query by query. A tie in
    either ordering counts one half.

    Args:
        pred_a, pred_b: ``[N]`` the method's scores of group a and group b on the same queries.
        ref_a, ref_b: ``[N]`` the reference's scores of the same groups on the same queries.

    Returns:
        The fraction in [0, 1].
    """
    arrays = [_array(x, name) for x, name in zip((pred_a, pred_b, ref_a, ref_b), ("pred_a", "pred_b", "ref_a", "ref_b"))]
    if any(x.ndim != 1 or x.shape != arrays[0].shape for x in arrays) or arrays[0].size == 0:
        raise ConfigError(f"pred_a, pred_b, ref_a, ref_b must be 1-D of one non-zero length, got {[x.shape for x in arrays]}")
    pred, ref = np.sign(arrays[0] - arrays[1]), np.sign(arrays[2] - arrays[3])
    return float(np.mean(np.where((pred == 0) | (ref == 0), 0.5, pred == ref)))


def group_level_agreement(pred: Sequence[Mapping], ref: Sequence[Mapping]) -> float | None:
    """Fraction of group-level comparisons on which a method picks the reference's winner.

    Only comparisons the reference resolves (its interval excludes 0) count; on those, the method
    agrees when its own ``mean_diff`` has the reference's sign (scores of different methods live on
    different scales, so the sign is what compares).

    Args:
        pred: The method's :func:`group_level_comparison` results, one per comparison.
        ref: The reference's results for the same comparisons, in the same order.

    Returns:
        The fraction in [0, 1], or ``None`` when the reference resolves none of them.
    """
    if len(pred) != len(ref):
        raise ConfigError(f"pred and ref must hold the same comparisons, got {len(pred)} and {len(ref)}")
    resolved = [(p, r) for p, r in zip(pred, ref) if r["winner"] != "unresolved"]
    if not resolved:
        return None
    return sum((p["mean_diff"] > 0) == (r["winner"] == "a") for p, r in resolved) / len(resolved)


def own_group_ratios(scores, reference) -> np.ndarray:
    """How much of the reference's effect a method's own-group scores reach, per group.

    For group k, over the queries the reference ranks k first: the mean of the method's score of k
    divided by the reference's mean score of k. Scores of a method in the reference's units (GUDA
    and LOGO, both in nats) give its strength; 1 is the reference's.

    Args:
        scores: ``[N, K]`` the method's scores.
        reference: ``[N, K]`` the reference's scores of the same queries and groups.

    Returns:
        ``[K]`` ratios, NaN for a group the reference ranks first on no query.
    """
    pred, ref = _matrices(scores, reference)
    top = ref.argmax(1)
    ratios = np.full(ref.shape[1], np.nan)
    for k in range(ref.shape[1]):
        led = top == k
        if led.any():
            ratios[k] = pred[led, k].mean() / ref[led, k].mean()
    return ratios
