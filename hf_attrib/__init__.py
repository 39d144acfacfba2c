"""hf-attrib: data attribution for PyTorch and Hugging Face models.

The public surface is flat and loaded lazily, as ``huggingface_hub`` does it::

    from hf_attrib import AttributionTask, IFAttributorCG, TRAKAttributor, lds, loo_corr

``import hf_attrib`` imports nothing heavy (not even torch); each name is imported from its
home module on first use. The home modules stay the reference (``hf_attrib.task``,
``hf_attrib.algorithm``, ``hf_attrib.metrics``, ...), so the dattri paper's demos run with
``dattri`` replaced by ``hf_attrib``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# Home module -> the names it exports at the top level. One line per name keeps diffs small.
_SUBMOD_ATTRS: dict[str, list[str]] = {
    "hf_attrib.task": ["AttributionTask"],
    "hf_attrib.algorithm": [
        "Attributor",
        "GradCosAttributor",
        "GradDotAttributor",
        "IFAttributorArnoldi",
        "IFAttributorCG",
        "IFAttributorExplicit",
        "IFAttributorLiSSA",
        "RPSAttributor",
        "TRAKAttributor",
        "TracInAttributor",
    ],
    "hf_attrib.metrics": [
        "lds",
        "loo_corr",
        "mislabel_detection_auc",
    ],
    "hf_attrib.model_utils": ["activate_dropout"],
    "hf_attrib.func": ["random_project"],
    "hf_attrib.integrations": ["TracInCheckpointCallback", "task_from_pretrained"],
    "hf_attrib.loaders": ["SubsetSampler"],
}

_NAME_TO_MODULE = {name: mod for mod, names in _SUBMOD_ATTRS.items() for name in names}

# Written out (not derived) so that linters and IDEs read it; tests/test_layers.py checks it
# against _SUBMOD_ATTRS.
__all__ = [
    "AttributionTask",
    "Attributor",
    "GradCosAttributor",
    "GradDotAttributor",
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
    "RPSAttributor",
    "SubsetSampler",
    "TRAKAttributor",
    "TracInAttributor",
    "TracInCheckpointCallback",
    "__version__",
    "activate_dropout",
    "lds",
    "loo_corr",
    "mislabel_detection_auc",
    "random_project",
    "task_from_pretrained",
]


def __getattr__(name: str) -> Any:
    module = _NAME_TO_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_attrib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from hf_attrib.algorithm import (
        Attributor,
        GradCosAttributor,
        GradDotAttributor,
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorExplicit,
        IFAttributorLiSSA,
        RPSAttributor,
        TracInAttributor,
        TRAKAttributor,
    )
    from hf_attrib.func import random_project
    from hf_attrib.integrations import TracInCheckpointCallback, task_from_pretrained
    from hf_attrib.loaders import SubsetSampler
    from hf_attrib.metrics import lds, loo_corr, mislabel_detection_auc
    from hf_attrib.model_utils import activate_dropout
    from hf_attrib.task import AttributionTask
