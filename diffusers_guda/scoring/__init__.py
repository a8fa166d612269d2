"""Attribution scores: ELBO differences between the full model and each group's counterfactual.

``score[n, k] = ELBO(x_n; full) - ELBO(x_n; full + LoRA_k)`` (higher: removing group k makes x_n
less likely, so k mattered more). The full model is the UNet with adapters disabled; the adapters are
switched on the one UNet, and every model sees the same (t, noise) draws per image
(docs/method.md#leave-one-group-out, docs/method.md#common-random-numbers).

* :mod:`.result`: :class:`AttributionResult`, shards joined, score and standard error.
* :mod:`.engine`: :class:`AttributionScorer`, the one engine behind ``pipe.attribute``.
* :mod:`.strategies`: how a model is run (merged, swap, mixed).
* :mod:`.adaptive`: the walk of a query over its grid (full, or adaptive: an exact head, then stratified blocks).
* :mod:`.rows`: rows of many images packed into fixed-size forwards.
* :mod:`.sequential`: :func:`score_models`, any models one after another (LOGO).
"""

from .adaptive import ADAPTIVE_BLOCK, ADAPTIVE_HEAD, QueryWalk, stratified_walk, survivors
from .engine import AttributionScorer
from .result import AttributionResult, concatenate_results, mean_and_stderr
from .sequential import score_models
from .strategies import STRATEGIES

__all__ = [
    "ADAPTIVE_BLOCK",
    "ADAPTIVE_HEAD",
    "STRATEGIES",
    "AttributionResult",
    "AttributionScorer",
    "QueryWalk",
    "concatenate_results",
    "mean_and_stderr",
    "score_models",
    "stratified_walk",
    "survivors",
]
