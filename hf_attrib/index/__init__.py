"""Attribution indexes: featurize a training set once, answer "which examples?" in milliseconds.

``build(task, train_dataset, method="trak", out=DIR)`` streams the training set through the
attributor's featurizer into fixed-size safetensors shards (fp16 by default), with the method's
query-time state (TRAK's kernel inverse) and an index file recording the model, layers,
projection seeds, method, dataset and the sha256 of every file; ``Index.open(DIR_or_repo)
.query(texts, top_k=10)`` answers from the memory-mapped shards with the in-memory attributor's
scores. ``push_index`` / ``pull_index`` move an index to and from the Hub (a model repo next to
the model); ``IndexCallback`` builds it at the end of a ``transformers.Trainer`` run. The
layout is described in ``hf_attrib.index.format``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BuildResult",
    "Index",
    "IndexCallback",
    "QueryResult",
    "build",
    "pull_index",
    "push_index",
]

_NAME_TO_MODULE = {
    "BuildResult": "hf_attrib.index.builder",
    "build": "hf_attrib.index.builder",
    "Index": "hf_attrib.index.query",
    "QueryResult": "hf_attrib.index.query",
    "IndexCallback": "hf_attrib.index.callback",
    "pull_index": "hf_attrib.index.hub",
    "push_index": "hf_attrib.index.hub",
}


def __getattr__(name: str) -> Any:
    # Lazy: `hf-attrib --help` imports hf_attrib.index.cli, which must not import torch.
    if name in _NAME_TO_MODULE:
        import importlib

        return getattr(importlib.import_module(_NAME_TO_MODULE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
