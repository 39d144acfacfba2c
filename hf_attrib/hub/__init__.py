"""Hub repos of the benchmark: export, push, pull, results and ``load_benchmark``.

Layout of the repos: ``docs/hub.md``. Safetensors, parquet and JSON only (nothing pickled).
Names are imported lazily so ``hf-attrib --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from hf_attrib.hub.errors import (
    HubAuthError,
    HubConnectionError,
    HubError,
    HubIntegrityError,
    HubNotFoundError,
    HubPathError,
)
from hf_attrib.hub.layout import (
    DEFAULT_ORG,
    DEFAULT_RESULTS_REPO,
    checkpoints_repo_id,
    dataset_repo_id,
)

_LAZY = {
    "Benchmark": "benchmark", "GroundTruth": "benchmark", "load_benchmark": "benchmark",
    "pull_benchmark": "benchmark", "read_checkpoints": "benchmark",
    "read_ground_truth": "benchmark",
    "read_splits": "benchmark", "read_state": "benchmark",
    "ExportResult": "export", "export": "export",
    "PullResult": "transfer", "pull": "transfer", "push": "transfer",
    "push_results": "transfer", "resolve_repos": "transfer",
}

__all__ = [
    "DEFAULT_ORG",
    "DEFAULT_RESULTS_REPO",
    "Benchmark",
    "ExportResult",
    "GroundTruth",
    "HubAuthError",
    "HubConnectionError",
    "HubError",
    "HubIntegrityError",
    "HubNotFoundError",
    "HubPathError",
    "PullResult",
    "checkpoints_repo_id",
    "dataset_repo_id",
    "export",
    "load_benchmark",
    "pull",
    "pull_benchmark",
    "push",
    "push_results",
    "read_checkpoints",
    "read_ground_truth",
    "read_splits",
    "read_state",
    "resolve_repos",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"hf_attrib.hub.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_attrib.hub' has no attribute {name!r}")
