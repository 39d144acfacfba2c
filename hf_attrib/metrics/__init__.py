"""Evaluation metrics for attribution scores: LDS, LOO correlation, mislabel detection.

Every function also takes dattri's call forms: ``corr, pval = lds(...)`` / ``loo_corr(...)``,
``auc, (fpr, tpr, thresholds) = mislabel_detection_auc(score, noise_mask)`` and
``calculate_lds_ground_truth(target_func, retrain_dir, test_loader)``.

Sign convention: ``score[i, j]`` estimates how much including training example ``i`` raises
the target on test example ``j``; summed over a subset it predicts the target of a model
trained on that subset.
"""

from hf_attrib.metrics.bootstrap import bootstrap_mean_ci
from hf_attrib.metrics.correlation import lds, loo_corr, subset_mask
from hf_attrib.metrics.ground_truth import calculate_lds_ground_truth, calculate_loo_ground_truth
from hf_attrib.metrics.mislabel import mislabel_detection_auc, mislabel_detection_curve, roc_curve
from hf_attrib.metrics.result import AUCResult, LDSResult, MetricResult
from hf_attrib.metrics.stats import correlation_pvalue, pearson, rankdata, spearman

__all__ = [
    "AUCResult",
    "LDSResult",
    "MetricResult",
    "bootstrap_mean_ci",
    "calculate_lds_ground_truth",
    "calculate_loo_ground_truth",
    "correlation_pvalue",
    "lds",
    "loo_corr",
    "mislabel_detection_auc",
    "mislabel_detection_curve",
    "pearson",
    "rankdata",
    "roc_curve",
    "spearman",
    "subset_mask",
]
