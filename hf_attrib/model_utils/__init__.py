"""Model-level helpers: dropout ensembles and many-model (re)training for ground truth.

Modules, one job each:

* ``dropout``: :func:`activate_dropout` (dropout ensembles at inference);
* ``subsets``: the training subsets (:func:`lds_subsets`, :func:`loo_subsets`) and batch orders;
* ``stacked_training``: :func:`train_stacked` / :func:`evaluate_stacked` (many models at once);
* ``block_store``: the on-disk block format of stacked models, its checksums and readers
  (:func:`load_stacked`, :func:`load_subsets`), shared with the Hub's checkpoint shards;
* ``retraining``: the resumable drivers (:func:`retrain_lds`, :func:`retrain_loo`, ``retrain``);
* ``retrain``: dattri's call forms, ``from hf_attrib.model_utils.retrain import retrain_lds,
  retrain_loo``. The package attribute ``retrain`` is that module, and calling it calls the
  driver ``retraining.retrain`` (see the end of ``retrain.py``).
"""

# retrain: the module at dattri's path, callable as retraining.retrain (imported here so that
# the package attribute is that module however it is reached).
from hf_attrib.model_utils import retrain
from hf_attrib.model_utils.block_store import load_stacked, load_subsets
from hf_attrib.model_utils.dropout import activate_dropout, dropout_modules
from hf_attrib.model_utils.retraining import RetrainBuild, RetrainResult, retrain_lds, retrain_loo
from hf_attrib.model_utils.stacked_training import evaluate_stacked, train_stacked
from hf_attrib.model_utils.subsets import batch_orders, lds_subsets, loo_subsets

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
