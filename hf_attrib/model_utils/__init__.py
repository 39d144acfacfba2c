"""Model-level helpers: dropout ensembles and many-model (re)training for ground truth."""

from hf_attrib.model_utils.dropout import activate_dropout, dropout_modules
from hf_attrib.model_utils.retraining import (
    RetrainBuild,
    RetrainResult,
    batch_orders,
    evaluate_stacked,
    lds_subsets,
    load_stacked,
    load_subsets,
    loo_subsets,
    retrain,
    retrain_lds,
    retrain_loo,
    train_stacked,
)

__all__ = [
    "RetrainBuild",
    "RetrainResult",
    "activate_dropout",
    "batch_orders",
    "dropout_modules",
    "evaluate_stacked",
    "lds_subsets",
    "load_stacked",
    "load_subsets",
    "loo_subsets",
    "retrain",
    "retrain_lds",
    "retrain_loo",
    "train_stacked",
]
