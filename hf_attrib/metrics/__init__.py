"""Evaluation metrics for attribution scores: LDS, LOO correlation, mislabel detection.

Sign convention: ``score[i, j]`` estimates how much including training example ``i`` raises
the target on test example ``j``; summed over a subset it predicts the target of a model
trained on that subset.
"""

from hf_attrib.metrics.bootstrap import bootstrap_mean_ci
from hf_attrib.metrics.correlation import lds, loo_corr, subset_mask
from hf_attrib.metrics.mislabel import mislabel_detection_auc, mislabel_detection_curve
from hf_attrib.metrics.result import LDSResult, MetricResult
from hf_attrib.metrics.stats import pearson, rankdata, spearman

__all__ = [
    "LDSResult",
    "MetricResult",
    "bootstrap_mean_ci",
    "lds",
    "loo_corr",
    "mislabel_detection_auc",
    "mislabel_detection_curve",
    "pearson",
    "rankdata",
    "spearman",
    "subset_mask",
]
