"""Integrations with the Hugging Face libraries.

* ``hf_attrib.integrations.transformers``: an ``AttributionTask`` from any ``PreTrainedModel``,
  model id or local folder (``task_from_pretrained``), with loss/target functions for dict
  batches, layer selection (named modules, the last N blocks, PEFT adapters) and unshuffled
  loaders built from ``datasets.Dataset``.
* ``hf_attrib.integrations.trainer``: Trainer ``output_dir`` checkpoints as a TracInCP
  trajectory, and ``TracInCheckpointCallback``, which records the exact learning rates.

Submodules are imported on first use, so ``import hf_attrib`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "HFAttributionTask",
    "TracInCheckpointCallback",
    "dataloader_from_dataset",
    "task_from_pretrained",
    "trainer_checkpoints",
]

_LAZY = {
    "HFAttributionTask": "hf_attrib.integrations.transformers",
    "dataloader_from_dataset": "hf_attrib.integrations.transformers",
    "task_from_pretrained": "hf_attrib.integrations.transformers",
    "TracInCheckpointCallback": "hf_attrib.integrations.trainer",
    "trainer_checkpoints": "hf_attrib.integrations.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_attrib.integrations' has no attribute {name!r}")
