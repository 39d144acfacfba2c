"""Model-level helpers: dropout ensembles and many-model (re)training for ground truth.

``retrain`` is the stacked-training driver (``hf_attrib.model_utils.retraining.retrain``) and
also the module of dattri's call forms, ``from hf_attrib.model_utils.retrain import
retrain_lds, retrain_loo`` (see ``hf_attrib.model_utils.retrain``): calling it calls the driver.
"""

# retrain: the module at dattri's path, callable as retraining.retrain (imported here so that
# the package attribute is that module however it is reached).
from hf_attrib.model_utils import retrain
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
