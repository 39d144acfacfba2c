"""Loaders whose order scores can rely on: ``SubsetSampler`` and the checks every attributor
runs on the loaders it is given.

Scores are rows/columns in the loaders' order, so a loader must yield the same examples in
the same order on every pass (attributors read the training loader several times).
``check_loader`` refuses the rest (shuffling, random samplers, ``DistributedSampler``, empty
loaders); ``count_examples`` and ``loader_indices`` say what one pass yields. This module
sits below ``task`` and ``algorithm`` (it needs torch and ``hf_attrib.func.utils`` only), so
the core's messages never send users to higher layers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from hf_attrib.func.utils import batch_size_of

__all__ = ["SubsetSampler", "check_loader", "count_examples", "loader_fingerprint",
           "loader_indices"]


class SubsetSampler(Sampler[int]):
    """Yield the given dataset indices in the given order (never shuffled).

    The attribution counterpart of ``SubsetRandomSampler``: scores line up with ``indices``.

    Args:
        indices: dataset indices, e.g. ``range(1000)``.
    """

    def __init__(self, indices: Sequence[int] | torch.Tensor) -> None:
        self.indices = [int(i) for i in indices]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# Samplers whose own ``__iter__`` yields a fixed order (a subclass that overrides ``__iter__``
# is not trusted: it may shuffle). BatchSampler is sequential when its sampler is.
_SEQUENTIAL_SAMPLERS = (SequentialSampler, SubsetSampler, BatchSampler)
# A fixed sequence of indices (or of index lists, as a batch_sampler) is one order forever.
_FIXED_ORDERS = (list, tuple, range)


def _is_sequential(sampler: Any) -> bool:
    """Whether ``sampler`` yields the same fixed order on every pass (see ``check_loader``)."""
    if getattr(sampler, "hf_attrib_sequential", False) or isinstance(sampler, _FIXED_ORDERS):
        return True
    for cls in _SEQUENTIAL_SAMPLERS:
        if isinstance(sampler, cls) and type(sampler).__iter__ is cls.__iter__:
            return cls is not BatchSampler or _is_sequential(sampler.sampler)
    return False


def _order_source(loader: Any) -> Any:
    """The object that decides the order of ``loader``'s examples (``None``: the loader's own
    iteration, as for an iterable dataset or a plain list of batches)."""
    if isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
        return None  # torch allows no sampler here: the dataset's own order is used
    batch_sampler = getattr(loader, "batch_sampler", None)
    return batch_sampler if batch_sampler is not None else getattr(loader, "sampler", None)


def _check_order(loader: Any, role: str) -> None:
    source = _order_source(loader)
    if source is None or _is_sequential(source):
        return
    inner = getattr(source, "sampler", None) if isinstance(source, BatchSampler) else None
    culprit = inner if inner is not None and not _is_sequential(inner) else source
    kind = "batch_sampler" if culprit is getattr(loader, "batch_sampler", None) else "sampler"
    name = type(culprit).__name__
    if "Distributed" in name:
        fix = ("hf_attrib shares the work between processes itself (the attributor's "
               "distributed= option): give every process the same full loader, without a "
               "DistributedSampler.")
    else:
        fix = ("Build it with shuffle=False and no sampler, or select a subset in a fixed order "
               "with sampler=hf_attrib.loaders.SubsetSampler(indices). A custom sampler "
               "that yields the same order on every pass can declare it with the class "
               "attribute hf_attrib_sequential = True.")
    what = ("shuffles" if isinstance(culprit, RandomSampler) or getattr(culprit, "shuffle", False)
            else "does not yield a fixed sequential order")
    raise ValueError(
        f"the {role} loader's {kind} ({name}) {what}: scores are rows/columns in the loader's "
        f"order and would not line up with the dataset. {fix}"
    )


def check_loader(loader: Any, role: str) -> None:
    """Refuse loaders whose order is not fixed, and empty ones.

    Scores are rows/columns in the loader's order, so a loader that shuffles, samples at
    random, or otherwise changes its order between passes would silently mis-align them with
    the dataset (and attributors read the training loader several times). Accepted: plain
    iterables of batches, iterable datasets, and loaders whose sampler yields a fixed order
    (``SequentialSampler``, ``BatchSampler`` over an accepted sampler,
    ``hf_attrib.loaders.SubsetSampler``, fixed lists of indices, and samplers whose class sets
    ``hf_attrib_sequential = True``).

    Args:
        loader: a ``DataLoader`` or any iterable of batches.
        role: ``"train"`` or ``"test"``, for the messages.

    Raises:
        TypeError: ``loader`` is not iterable.
        ValueError: its order is not fixed, or it is empty.
    """
    if not isinstance(loader, DataLoader) and not hasattr(loader, "__iter__"):
        raise TypeError(f"{role} loader must be a torch DataLoader or an iterable of batches.")
    _check_order(loader, role)
    try:
        empty = len(loader) == 0
    except TypeError:
        empty = False
    if empty:
        raise ValueError(f"the {role} loader is empty; it must yield at least one batch.")


def count_examples(loader: Any) -> int:
    """Examples one pass over ``loader`` yields (after ``drop_last``, a ``batch_sampler``...).

    A map-style ``DataLoader`` is counted from its batch sampler's index lists, without loading
    data; anything else by one pass over its batches. Attributors check every later pass
    against this count.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if (isinstance(loader, DataLoader) and batch_sampler is not None
            and not isinstance(loader.dataset, IterableDataset)):
        return sum(len(indices) for indices in batch_sampler)
    return sum(batch_size_of(batch) for batch in loader)


def loader_fingerprint(loader: Any) -> tuple[int, str]:
    """``(examples, sha256)`` of one pass over ``loader``: the count ``count_examples`` gives,
    and a sha256 over every batch in order, every tensor (and NumPy array) of it by dtype,
    shape and bytes, mapping keys sorted, other values by ``repr``.

    What a saved attributor cache records of its training set: a loader over other data, or
    the same data in another order, has another fingerprint even when it yields as many
    examples. Batching is part of it (the same data batched otherwise differs too). Costs one
    pass that loads the data (no model call).
    """
    h = hashlib.sha256()
    count = 0
    for batch in loader:
        h.update(b"batch")
        _hash_value(h, batch)
        count += batch_size_of(batch)
    return count, h.hexdigest()


def _hash_value(h: Any, value: Any) -> None:
    """Feed a (nested) batch value to ``h``; each entry is prefixed by its kind and layout
    (a JSON header), so different structures never hash the same bytes alike."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(json.dumps(["tensor", str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    elif isinstance(value, np.ndarray) and value.dtype != object:
        a = np.ascontiguousarray(value)
        h.update(json.dumps(["array", a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    elif isinstance(value, Mapping):
        h.update(json.dumps(["mapping", len(value)]).encode())
        for key in sorted(value, key=repr):
            h.update(json.dumps(["key", repr(key)]).encode())
            _hash_value(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(json.dumps(["sequence", len(value)]).encode())
        for item in value:
            _hash_value(h, item)
    else:
        text = repr(value)
        h.update(json.dumps(["value", len(text)]).encode())
        h.update(text.encode("utf-8", "backslashreplace"))


def loader_indices(loader: DataLoader) -> list[int]:
    """The dataset indices a map-style ``DataLoader`` yields, in order (one pass)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None:
        return [int(i) for indices in batch_sampler for i in indices]
    sampler = getattr(loader, "sampler", None)
    if sampler is not None:
        return [int(i) for i in sampler]
    return list(range(len(loader.dataset)))
