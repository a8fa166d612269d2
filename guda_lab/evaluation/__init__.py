"""Evaluation: LOGO ground truth (docs/evaluation.md#ground-truth), baselines
(docs/evaluation.md#baselines), benchmarks (docs/evaluation.md#benchmarks), the metrics
(docs/evaluation.md#metrics) and the runner of ``guda evaluate``."""

from .benchmarks import BENCHMARKS, Benchmark, GroupComparison, available_benchmarks, get_benchmark, load_benchmark
from .gradient import GradientConfig, gradient_scores
from .instance_unlearning import InstanceUnlearningConfig, instance_unlearning_scores
from .kernel import DASConfig, DTRAKConfig, das_scores, dtrak_scores
from .logo import logo_attribution, logo_model_dir, train_logo_models
from .metrics import (
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
from .runner import Evaluation, run_evaluation
from .similarity import nearest_neighbour_scores, similarity_scores

__all__ = [
    "run_evaluation",
    "Evaluation",
    "BENCHMARKS",
    "Benchmark",
    "GroupComparison",
    "available_benchmarks",
    "get_benchmark",
    "load_benchmark",
    "GradientConfig",
    "InstanceUnlearningConfig",
    "DTRAKConfig",
    "DASConfig",
    "gradient_scores",
    "dtrak_scores",
    "das_scores",
    "instance_unlearning_scores",
    "nearest_neighbour_scores",
    "similarity_scores",
    "logo_attribution",
    "logo_model_dir",
    "train_logo_models",
    "METRIC_NAMES",
    "group_level_agreement",
    "group_level_comparison",
    "kendall",
    "label_top1",
    "mrr",
    "ndcg_at_k",
    "own_group_ratios",
    "pairwise_agreement",
    "per_query_metrics",
    "ranking",
    "rbo",
    "spearman",
    "spearman_others",
    "summarize",
    "top1",
    "top3",
]
