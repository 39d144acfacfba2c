"""Ground truth from folders of retrained models, in dattri's call forms.

``calculate_lds_ground_truth`` and ``calculate_loo_ground_truth`` read the folders that
:mod:`hf_attrib.model_utils.retrain` (dattri's ``retrain_lds`` / ``retrain_loo``) writes and
return the tuples that :func:`~hf_attrib.metrics.lds` and :func:`~hf_attrib.metrics.loo_corr`
take::

    retrain_lds(train_func, train_loader, "gt/lds", num_subsets=50, seed=0)
    ground_truth = calculate_lds_ground_truth(target_func, "gt/lds", test_loader)
    lds_corr, lds_pval = lds(score, ground_truth)

Unlike dattri, the LDS target values are **not negated**: hf_attrib's scores predict the
target itself (``score[i, j] > 0``: including example ``i`` raises the target on ``j``), so
``lds`` correlates them with the target as measured; dattri flips it to match its attributors'
opposite sign. Checkpoints are passed to ``target_func`` as paths (safetensors files written
by hf_attrib, or the ``.pt`` files of a dattri folder, which ``target_func`` then loads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["calculate_lds_ground_truth", "calculate_loo_ground_truth"]

TargetFunc = Callable[[Path, Any], Tensor]


def _metadata(retrain_dir: Path, mode: str) -> dict[str, Any]:
    file = retrain_dir / "metadata.yml"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: retrain_dir must be a folder written by "
            f"hf_attrib.model_utils.retrain.retrain_{mode} (or dattri's)."
        )
    text = file.read_text()
    try:
        metadata = json.loads(text)  # hf_attrib writes JSON, which is also YAML
    except json.JSONDecodeError:
        import yaml  # a dattri folder: real YAML (PyYAML comes with huggingface_hub)

        metadata = yaml.safe_load(text)
    if not isinstance(metadata, dict) or metadata.get("mode", mode) != mode:
        raise ValueError(f"{file} does not describe a '{mode}' retraining folder.")
    return metadata


def _child(retrain_dir: Path, name: Any) -> Path:
    """``retrain_dir / name``, with ``name`` reduced to a single folder name (dattri records
    absolute or working-directory-relative paths; only their last part is trusted)."""
    leaf = Path(str(name)).name
    if leaf in ("", ".", ".."):
        raise ValueError(f"bad folder name {name!r} in {retrain_dir / 'metadata.yml'}.")
    return retrain_dir / leaf


def _checkpoint(folder: Path, stem: str) -> Path:
    for suffix in (".safetensors", ".pt"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    raise FileNotFoundError(f"{folder / (stem + '.safetensors')} is missing: the retraining "
                            "did not finish; rerun it for this subset.")


def _values(target_func: TargetFunc, ckpt: Path, test_dataloader: Any,
            n_test: int | None) -> Tensor:
    values = torch.as_tensor(target_func(ckpt, test_dataloader)).detach().reshape(-1)
    if n_test is not None and values.numel() != n_test:
        raise ValueError(f"target_func returned {values.numel()} values for {ckpt} but "
                         f"{n_test} before: it must return one value per test example.")
    return values.to(device="cpu", dtype=torch.float64)


def calculate_lds_ground_truth(
    target_func: TargetFunc,
    retrain_dir: str | os.PathLike[str],
    test_dataloader: Any,
) -> tuple[Tensor, Tensor]:
    """Target values of every model of an LDS retraining folder (dattri's call form).

    Args:
        target_func: ``(checkpoint_path, test_dataloader) -> [n_test]`` target values of the
            model saved at ``checkpoint_path`` (e.g. its margin or loss on each test example).
        retrain_dir: the folder written by ``hf_attrib.model_utils.retrain.retrain_lds``.
        test_dataloader: passed to ``target_func``.

    Returns:
        ``(target_values [num_subsets, n_test], indices [num_subsets, subset_size])``: the
        target averaged over each subset's runs, and the training indices of each subset,
        ready for ``lds(score, ...)``. Not negated (see the module docstring).
    """
    root = Path(retrain_dir)
    metadata = _metadata(root, "lds")
    runs = int(metadata["num_runs_per_subset"])
    subset_dirs = sorted(metadata["subset_dir_map"].items(), key=lambda kv: int(kv[0]))
    rows, indices = [], []
    n_test: int | None = None
    for _, name in subset_dirs:
        folder = _child(root, name)
        index_file = folder / "indices.txt"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} is missing: the retraining did not finish.")
        indices.append(torch.tensor([int(i) for i in index_file.read_text().split()]))
        total = None
        for j in range(runs):
            values = _values(target_func, _checkpoint(folder, f"model_weights_{j}"),
                             test_dataloader, n_test)
            n_test = values.numel()
            total = values if total is None else total + values
        rows.append(total / runs)
    if not rows:
        raise ValueError(f"{root} holds no trained subset.")
    if len({i.numel() for i in indices}) > 1:
        raise ValueError(f"the subsets of {root} differ in size; LDS needs equal subset sizes.")
    return torch.stack(rows), torch.stack(indices)


def calculate_loo_ground_truth(
    target_func: TargetFunc,
    retrain_dir: str | os.PathLike[str],
    test_dataloader: Any,
) -> tuple[Tensor, Tensor]:
    """Target values of every model of a leave-one-out folder (dattri's call form).

    dattri passes ``target_func`` an unpickled model; hf_attrib passes the checkpoint path
    (``index_{i}/model_weights.safetensors``), as for LDS.

    Args:
        target_func: ``(checkpoint_path, test_dataloader) -> [n_test]`` target values.
        retrain_dir: the folder written by ``hf_attrib.model_utils.retrain.retrain_loo``.
        test_dataloader: passed to ``target_func``.

    Returns:
        ``(loo_values [num_models, n_test], removed_indices [num_models])``, ready for
        ``loo_corr(score, ...)`` (which correlates the scores with ``-loo_values``).
    """
    root = Path(retrain_dir)
    metadata = _metadata(root, "loo")
    entries = sorted(((int(i), name) for i, name in metadata["map_index_dir"].items()))
    rows = []
    n_test: int | None = None
    for _, name in entries:
        values = _values(target_func, _checkpoint(_child(root, name), "model_weights"),
                         test_dataloader, n_test)
        n_test = values.numel()
        rows.append(values)
    if not rows:
        raise ValueError(f"{root} holds no trained model.")
    return torch.stack(rows), torch.tensor([i for i, _ in entries], dtype=torch.long)
