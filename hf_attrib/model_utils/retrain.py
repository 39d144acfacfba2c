"""dattri's retraining call forms: ``retrain_loo`` and ``retrain_lds`` with a user ``train_func``.

Code ported from ``dattri.model_util.retrain`` runs unchanged::

    from hf_attrib.model_utils.retrain import retrain_lds, retrain_loo

    def train_func(dataloader, seed=None, **kwargs):   # returns the trained model
        ...

    retrain_lds(train_func, train_loader, "gt/lds", num_subsets=50, subset_ratio=0.5, seed=0)
    target_values, indices = calculate_lds_ground_truth(target_func, "gt/lds", test_loader)

The folder layout and ``metadata.yml`` keys are dattri's. What differs, on purpose:

* Checkpoints are ``safetensors`` files (``model_weights_{j}.safetensors``,
  ``index_{i}/model_weights.safetensors``), never pickles: load them with
  ``safetensors.torch.load_file`` (``torch.load`` of dattri's ``.pt`` files unpickles).
  ``metadata.yml`` is written as JSON, which YAML readers also read.
* LDS subsets come from :func:`hf_attrib.model_utils.subsets.lds_subsets` (row ``i`` is a
  function of ``(seed, i)`` only), not from numpy's generator, so they are the same subsets
  as hf_attrib's own ground truth for the same ``seed``; ``seed=None`` draws a seed and
  records it in ``metadata.yml``. Indices in ``indices.txt`` are in increasing order.
* The subset loaders keep the given loader's ``collate_fn``.

For many small models, :func:`hf_attrib.model_utils.retraining.retrain_lds` (stacked training,
resumable, sharded) is much faster; these functions call ``train_func`` once per model.

The module is also callable: ``hf_attrib.model_utils.retrain(...)`` remains
:func:`hf_attrib.model_utils.retraining.retrain`, the stacked-training driver.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from hf_attrib.files import write_atomic
from hf_attrib.model_utils import retraining as _retraining
from hf_attrib.model_utils.subsets import lds_subsets

__all__ = ["retrain_lds", "retrain_loo"]

METADATA = "metadata.yml"


def _dataset(dataloader: DataLoader) -> Any:
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError("dataloader must be a torch DataLoader over a map-style dataset "
                        "(dataset[i] and len(dataset)): subsets are built by index.")
    return dataset


def _save_weights(model: Any, file: Path) -> None:
    """Write what ``train_func`` returned to ``file`` atomically, as safetensors."""
    if isinstance(model, nn.Module):
        # save_model drops tied duplicates
        write_atomic(file, lambda tmp: save_model(model, str(tmp), force_contiguous=True))
    elif isinstance(model, Mapping) and all(isinstance(v, Tensor) for v in model.values()):
        tensors = {k: v.detach().contiguous() for k, v in model.items()}
        write_atomic(file, lambda tmp: save_file(tensors, str(tmp)))
    else:
        raise TypeError(f"train_func must return the trained nn.Module (or its state dict), got "
                        f"{type(model).__name__}.")


def _write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    text = json.dumps(metadata, indent=2, sort_keys=True)
    write_atomic(path / METADATA, lambda tmp: tmp.write_text(text))


def _train(train_func: Callable[..., Any], loader: DataLoader, seed: int | None,
           kwargs: dict[str, Any]) -> Any:
    if seed is not None:
        torch.manual_seed(seed)  # as dattri: a train_func drawing from the global RNG repeats
    return train_func(loader, seed=seed, **kwargs)


def retrain_loo(
    train_func: Callable[..., Any],
    dataloader: DataLoader,
    path: str | os.PathLike[str],
    indices: Sequence[int] | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> None:
    """Retrain once per left-out example, as ``dattri.model_util.retrain.retrain_loo``.

    For each ``index``, ``train_func(loader, seed=seed, **kwargs)`` gets a loader over every
    example but ``index`` (same batch size, unshuffled, as in dattri) and returns the model,
    saved to ``path/index_{index}/model_weights.safetensors``. ``path/metadata.yml`` records
    ``mode``, ``data_length``, ``train_func``, ``indices`` and ``map_index_dir``.

    Args:
        train_func: ``(dataloader, seed=None, **kwargs) -> nn.Module`` (or a state dict).
        dataloader: the training data (a map-style dataset).
        path: output folder (created).
        indices: the examples to leave out, one model each (default: every example).
        seed: passed to ``train_func``, and seeds torch's global RNG before each call.
        **kwargs: further arguments of ``train_func``.
    """
    dataset = _dataset(dataloader)
    n = len(dataset)
    indices = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices must lie in [0, {n}) (the dataset's examples), got {bad[:5]}.")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for index in indices:
        keep = [k for k in range(n) if k != index]
        loader = DataLoader(Subset(dataset, keep), batch_size=dataloader.batch_size,
                            collate_fn=dataloader.collate_fn)
        folder = root / f"index_{index}"
        folder.mkdir(exist_ok=True)
        model = _train(train_func, loader, seed, kwargs)
        _save_weights(model, folder / "model_weights.safetensors")
    _write_metadata(root, {
        "mode": "loo",
        "data_length": n,
        "train_func": getattr(train_func, "__name__", type(train_func).__name__),
        "indices": indices,
        "map_index_dir": {str(i): f"index_{i}" for i in indices},
    })


def retrain_lds(
    train_func: Callable[..., Any],
    dataloader: DataLoader,
    path: str | os.PathLike[str],
    num_subsets: int = 100,
    subset_ratio: float = 0.5,
    num_runs_per_subset: int = 1,
    start_id: int = 0,
    total_num_subsets: int = 0,
    seed: int | None = None,
    **kwargs: Any,
) -> None:
    """Retrain on random subsets for LDS, as ``dattri.model_util.retrain.retrain_lds``.

    Subset ``i`` (``start_id <= i < start_id + num_subsets``) holds
    ``round(subset_ratio * n)`` examples; its indices go to ``path/{i}/indices.txt`` and its
    ``num_runs_per_subset`` models, each ``train_func(loader, seed=..., **kwargs)`` on a
    shuffling loader over the subset, to ``path/{i}/model_weights_{j}.safetensors``. With a
    ``seed``, run ``j`` of subset ``i`` gets ``seed + i * num_runs_per_subset + j`` (dattri's
    rule), which also seeds torch's global RNG before the call. ``path/metadata.yml`` lists
    every subset folder present (so processes that split the subsets with ``start_id`` can
    share ``path``), with ``num_subsets``, ``num_runs_per_subset``, ``subset_ratio`` and the
    subset ``seed``.

    Args:
        train_func: ``(dataloader, seed=None, **kwargs) -> nn.Module`` (or a state dict).
        dataloader: the training data (a map-style dataset; its batch size and collate_fn
            are kept).
        path: output folder (created).
        num_subsets: subsets trained by this call.
        subset_ratio: subset size as a fraction of the training set.
        num_runs_per_subset: models trained per subset.
        start_id: id of the first subset (to split the work between processes).
        total_num_subsets: the total over all processes (``0``: ``num_subsets``; then
            ``start_id`` is ignored, as in dattri); ``num_subsets`` must divide it.
        seed: seed of the subsets and of training (``None``: a random one, recorded).
        **kwargs: further arguments of ``train_func``.

    Raises:
        ValueError: ``total_num_subsets`` negative or not a multiple of ``num_subsets``.
    """
    if num_subsets < 1 or num_runs_per_subset < 1:
        raise ValueError("num_subsets and num_runs_per_subset must be at least 1.")
    if total_num_subsets < 0:
        raise ValueError("total_num_subsets must be non-negative.")
    if total_num_subsets % num_subsets != 0:
        raise ValueError(f"num_subsets ({num_subsets}) must divide total_num_subsets "
                         f"({total_num_subsets}).")
    if total_num_subsets == 0:
        start_id = 0
    dataset = _dataset(dataloader)
    n = len(dataset)
    subset_seed = int(torch.randint(2**31 - 1, (1,))) if seed is None else seed
    masks = lds_subsets(n, start_id + num_subsets, subset_ratio, subset_seed)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start_id, start_id + num_subsets):
        indices = masks[i].nonzero()[:, 0].tolist()
        folder = root / str(i)
        folder.mkdir(exist_ok=True)
        (folder / "indices.txt").write_text("\n".join(map(str, indices)))
        shuffle = torch.Generator().manual_seed(subset_seed + i)
        loader = DataLoader(Subset(dataset, indices), batch_size=dataloader.batch_size,
                            shuffle=True, generator=shuffle, collate_fn=dataloader.collate_fn)
        for j in range(num_runs_per_subset):
            run_seed = None if seed is None else seed + i * num_runs_per_subset + j
            _save_weights(_train(train_func, loader, run_seed, kwargs),
                          folder / f"model_weights_{j}.safetensors")
    done = sorted(int(p.name) for p in root.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "indices.txt").exists())
    _write_metadata(root, {
        "mode": "lds",
        "data_length": n,
        "train_func": getattr(train_func, "__name__", type(train_func).__name__),
        "num_subsets": len(done),
        "total_num_subsets": total_num_subsets or num_subsets,
        "subset_ratio": subset_ratio,
        "num_runs_per_subset": num_runs_per_subset,
        "seed": subset_seed,
        "subset_dir_map": {str(i): str(i) for i in done},
    })


# The one trick, kept here alone: `hf_attrib.model_utils.retrain` is both this module (dattri's
# import path) and our driver `retraining.retrain` (`model_utils.retrain(kind, out_dir, build)`).
# No plain object is both a module and callable, so the module's class gets a `__call__` (the
# documented `module.__class__` assignment); the driver is looked up per call, so patching
# `retraining.retrain` patches this too.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _retraining.retrain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(_retraining.retrain)
