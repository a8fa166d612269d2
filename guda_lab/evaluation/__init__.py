"""Evaluation: LOGO ground truth, baselines and the metrics of DESIGN §1.4."""

from .baselines import (
    GradientConfig,
    InstanceUnlearningConfig,
    gradient_scores,
    instance_unlearning_scores,
    nearest_neighbour_scores,
    similarity_scores,
)
from .benchmarks import GroupComparison, available_benchmarks, group_comparisons, load_benchmark
from .runner import run_evaluation
from .logo import logo_attribution, logo_model_dir, train_logo_models
from .metrics import (
    METRIC_NAMES,
    group_level_agreement,
    group_level_comparison,
    kendall,
    label_top1,
    mrr,
    ndcg_at_k,
    pairwise_agreement,
    per_query_metrics,
    ranking,
    rbo,
    spearman,
    summarize,
    top1,
    top3,
)

__all__ = [
    "run_evaluation",
    "GroupComparison",
    "available_benchmarks",
    "group_comparisons",
    "load_benchmark",
    "GradientConfig",
    "InstanceUnlearningConfig",
    "gradient_scores",
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
    "pairwise_agreement",
    "per_query_metrics",
    "ranking",
    "rbo",
    "spearman",
    "summarize",
    "top1",
    "top3",
]
