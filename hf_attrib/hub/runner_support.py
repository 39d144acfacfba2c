"""``bench run --from-hub``: swap a prepared setting's data and ground truth for pulled ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from hf_attrib.benchmark.data import BenchmarkData
from hf_attrib.hub.benchmark import (
    read_checkpoints,
    read_ground_truth,
    read_splits,
    read_state,
    resolve_folders,
    split_tensors,
)
from hf_attrib.hub.layout import read_index

__all__ = ["Pulled", "use_pulled"]

Stacked = tuple[dict[str, Tensor], dict[str, Tensor]]


@dataclass
class Pulled:
    """What the runner takes from pulled repos instead of building it."""

    full: Stacked
    lds_models: Stacked
    ground_truth: dict[str, Any]
    noisy: Stacked | None
    loo_index: list[int]
    source: str


def use_pulled(prep: Any, source: str | Path, ensemble_models: int) -> Pulled:
    """Load the pulled repos at ``source`` into ``prep`` (its data tensors are replaced by the
    pulled parquet splits) and return the models and ground truth the runner needs.

    Args:
        prep: the runner's ``Prepared`` setting.
        source: folder (export or ``hub pull --out``) or repo id / setting name to pull.
        ensemble_models: LDS models ``0..k-1`` needed by ensembling methods (TRAK-k).
    """
    s = prep.setting
    models = f"0:{ensemble_models}" if ensemble_models else None
    ds_dir, ck_dir = resolve_folders(source, what=("data", "ground-truth", "checkpoints"),
                                     models=models)
    if ds_dir is None or ck_dir is None:
        raise FileNotFoundError(f"{source} must hold both the dataset and the checkpoint repo "
                                "(pull both: `hf-attrib hub pull SETTING --out DIR`).")
    gt = read_ground_truth(ds_dir)
    meta = gt.meta
    if meta.get("setting") != s.name:
        raise ValueError(f"{source} holds setting {meta.get('setting')!r}, not {s.name!r}.")
    mine = {"n_train": s.n_train, "n_test": s.n_test, "lds_models": s.lds_models}
    theirs = {k: meta.get(k) for k in mine}
    if mine != theirs:
        hint = (" (it is a smoke build: pass --smoke)" if meta.get("smoke")
                else " (it is a full build: drop --smoke)")
        raise ValueError(f"{source} was exported for {theirs}, this run is {mine}{hint}.")
    splits = read_splits(ds_dir)
    prep.x, prep.y = split_tensors(splits["train"], s.kind)
    prep.xt, prep.yt = split_tensors(splits["test"], s.kind)
    prep.data = BenchmarkData(train=splits["train"], test=splits["test"],
                              noisy_train=splits.get("noisy_train"),
                              noisy_indices=gt.noisy_indices)
    full_state = read_state(ck_dir, "full")
    full = ({k: v[None] for k, v in full_state.items()}, {})
    noisy = None
    if "noisy" in read_index(ck_dir).get("kinds", {}):
        noisy = ({k: v[None] for k, v in read_state(ck_dir, "noisy").items()}, {})
    lds_models: Stacked = ({}, {})
    if ensemble_models:
        params, buffers, ids = read_checkpoints(ck_dir, "lds", models)
        if ids.tolist() != list(range(ensemble_models)):
            raise ValueError(f"{ck_dir}: LDS models 0..{ensemble_models - 1} are needed, found "
                             f"{ids.tolist()}.")
        lds_models = (params, buffers)
    ground_truth: dict[str, Any] = {"lds": gt.lds()}
    loo = gt.loo()
    if loo is not None:
        ground_truth["loo"] = loo
    loo_index = gt.loo_indices.tolist() if gt.loo_indices is not None else []
    return Pulled(full, lds_models, ground_truth, noisy, loo_index, str(source))
