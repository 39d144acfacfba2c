"""Names and paths of the hf_attrib Hub repositories (the spec is ``docs/hub.md``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINTS_FORMAT",
    "DEFAULT_ORG",
    "DEFAULT_RESULTS_REPO",
    "GROUND_TRUTH_FORMAT",
    "INDEX_FILE",
    "checkpoints_repo_id",
    "dataset_repo_id",
    "file_entry",
    "read_index",
    "setting_slug",
    "sha256_file",
    "shard_name",
]

DEFAULT_ORG = "hf-attrib"
DEFAULT_RESULTS_REPO = f"{DEFAULT_ORG}/attribution-results"
INDEX_FILE = "hf_attrib_index.json"
INDEX_FORMAT = "hf-attrib-index/1"
CHECKPOINTS_FORMAT = "hf-attrib-checkpoints/1"
GROUND_TRUTH_FORMAT = "hf-attrib-ground-truth/1"
RESULTS_FORMAT = "hf-attrib-results/1"
MODEL_IDS_KEY = "__model_ids__"
BUFFER_PREFIX = "__buffer__."
CHECKPOINTS_SUFFIX = "-checkpoints"


def setting_slug(name: str) -> str:
    """``digits_lr`` -> ``digits-lr`` (repo names use dashes)."""
    return name.strip().lower().replace("_", "-")


def dataset_repo_id(setting: str, org: str = DEFAULT_ORG) -> str:
    """The dataset repo of a setting: ``<org>/<setting>``."""
    return f"{org}/{setting_slug(setting)}"


def checkpoints_repo_id(setting: str, org: str = DEFAULT_ORG) -> str:
    """The checkpoint repo of a setting: ``<org>/<setting>-checkpoints``."""
    return f"{org}/{setting_slug(setting)}{CHECKPOINTS_SUFFIX}"


def shard_name(kind: str, index: int, count: int) -> str:
    """``lds/shard-00000-of-00004.safetensors``."""
    return f"{kind}/shard-{index:05d}-of-{count:05d}.safetensors"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | Path) -> dict[str, Any]:
    """``{"sha256": ..., "size": ...}`` of a file (recorded in the index)."""
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size}


def read_index(folder: str | Path) -> dict[str, Any]:
    """The ``hf_attrib_index.json`` of a repo folder."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        from hf_attrib.hub.errors import HubNotFoundError

        raise HubNotFoundError(
            f"{path} does not exist: {folder} is not an hf-attrib repo folder (export one with "
            "`hf-attrib hub export SETTING --out DIR` or pull one with `hf-attrib hub pull`).")
    return json.loads(path.read_text())
