"""Training subsets and random streams of the ground-truth models.

* :func:`lds_subsets` / :func:`loo_subsets` give the training subsets as boolean masks
  ``[num_models, n_train]``. Row ``j`` of :func:`lds_subsets` depends only on ``(seed, j)``,
  so any model can be rebuilt alone.
* :func:`batch_orders` (and :func:`epoch_orders`, one epoch at a time) give the order in which
  each model visits its subset, drawn from a generator seeded by ``(seed, stream id)``.
* :func:`derive_seed` turns a tag and integers into a platform-independent seed: every random
  stream of retraining (subsets, initialization, batch order, dropout) is derived from it.
* :func:`check_masks`, :func:`subset_size` and :func:`as_ids` validate masks and per-model ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "as_ids",
    "batch_orders",
    "check_masks",
    "derive_seed",
    "epoch_orders",
    "lds_subsets",
    "loo_subsets",
    "shared_windows",
    "subset_size",
]


def derive_seed(tag: str, *parts: int) -> int:
    """A 63-bit seed that is a fixed function of ``(tag, *parts)`` (platform independent).

    Args:
        tag: what the seed is for (``"lds-subset"``, ``"order"``, ``"init"``, ``"dropout"``).
        *parts: integers it depends on (the training seed, a model or stream id, ...).

    Returns:
        A seed for ``torch.manual_seed`` or ``torch.Generator.manual_seed``.
    """
    text = "/".join([tag, *(str(int(p)) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _generator(tag: str, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(tag, *parts))


def lds_subsets(
    n_train: int, num_models: int = 100, fraction: float = 0.5, seed: int = 0
) -> Tensor:
    """Random training subsets for the linear datamodeling score (Appendix B).

    Subset ``j`` holds exactly ``round(fraction * n_train)`` examples drawn without
    replacement by a ``torch.Generator`` seeded from ``(seed, j)`` only, so row ``j`` is the
    same whatever ``num_models`` is and any model can be (re)built alone.

    Args:
        n_train: number of training examples.
        num_models: number of subsets (the paper uses 100: 50 for ensembling, 50 for LDS).
        fraction: subset size as a fraction of ``n_train`` (the paper's ``alpha = 0.5``).
        seed: seed of the subset sampling.

    Returns:
        A ``torch.bool`` mask ``[num_models, n_train]``; ``mask[j, i]`` says whether model
        ``j`` trains on example ``i``.
    """
    if n_train < 1 or num_models < 0:
        raise ValueError(f"need n_train >= 1 and num_models >= 0, got {n_train}, {num_models}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    size = round(fraction * n_train)
    if size < 1:
        raise ValueError(f"fraction={fraction} of n_train={n_train} leaves empty subsets.")
    masks = torch.zeros(num_models, n_train, dtype=torch.bool)
    for j in range(num_models):
        perm = torch.randperm(n_train, generator=_generator("lds-subset", seed, j))
        masks[j, perm[:size]] = True
    return masks


def loo_subsets(n_train: int, indices: Sequence[int] | Tensor | None = None) -> Tensor:
    """Leave-one-out training subsets.

    Args:
        n_train: number of training examples.
        indices: the left-out examples, one per model (default: every example, in order).

    Returns:
        A ``torch.bool`` mask ``[k, n_train]`` that is all ``True`` except
        ``mask[r, indices[r]]``.
    """
    idx = torch.arange(n_train) if indices is None else torch.as_tensor(indices).reshape(-1)
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}.")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_train):
        raise ValueError(f"indices must lie in [0, {n_train}), got {idx.min()}..{idx.max()}.")
    masks = torch.ones(idx.numel(), n_train, dtype=torch.bool)
    masks[torch.arange(idx.numel()), idx] = False
    return masks


def as_ids(ids: Sequence[int] | Tensor | None, count: int, what: str) -> list[int]:
    """One integer id per model (model or stream ids), checked against the number of models.

    Args:
        ids: the ids, or ``None`` for ``0..count-1``.
        count: the number of models.
        what: the argument's name, for the message (``"stream_ids"``).

    Raises:
        ValueError: ``ids`` does not have ``count`` entries.
    """
    if ids is None:
        return list(range(count))
    out = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
    if len(out) != count:
        raise ValueError(f"{what} has {len(out)} entries but there are {count} models.")
    return out


def check_masks(masks: Tensor, n_train: int) -> Tensor:
    """Subset masks as a CPU ``torch.bool`` tensor ``[num_models, n_train]``.

    Raises:
        ValueError: the shape is not ``[num_models, n_train]`` or the values are not 0/1.
    """
    masks = torch.as_tensor(masks)
    if masks.dim() != 2 or masks.shape[1] != n_train:
        raise ValueError(
            f"masks must be [num_models, n_train={n_train}], got shape {tuple(masks.shape)}."
        )
    if masks.dtype != torch.bool:
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("masks must be boolean (or 0/1) subset masks.")
        masks = masks.bool()
    return masks.cpu()


def subset_size(masks: Tensor, model_ids: Sequence[int]) -> int:
    """The common subset size of models trained in one stack (they share the batch schedule).

    Args:
        masks: ``[M, n_train]`` boolean subset masks.
        model_ids: the ``M`` model ids, named in the message.

    Raises:
        ValueError: the subsets differ in size (naming the models of each size), or are empty.
    """
    sizes = masks.sum(1)
    if masks.shape[0] and not bool((sizes == sizes[0]).all()):
        by_size: dict[int, list[int]] = {}
        for mid, size in zip(model_ids, sizes.tolist(), strict=True):
            by_size.setdefault(size, []).append(mid)
        detail = "; ".join(
            f"{size} examples: models {ids[:5]}{'...' if len(ids) > 5 else ''}"
            for size, ids in sorted(by_size.items())
        )
        raise ValueError(
            "all models trained in one stack must have subsets of equal size (they share the "
            f"mini-batch schedule), got {detail}. Train models with different subset sizes in "
            "separate stacks (or kinds)."
        )
    size = int(sizes[0]) if masks.shape[0] else 0
    if masks.shape[0] and size == 0:
        raise ValueError("the subsets are empty; every model needs at least one example.")
    return size


def epoch_orders(
    masks: Tensor, epochs: int, seed: int, streams: Sequence[int]
) -> Iterator[Tensor]:
    """Yield each epoch's ``[M, k]`` visiting order (see :func:`batch_orders`).

    Args:
        masks: ``[M, n_train]`` boolean subset masks of equal subset size ``k``.
        epochs: number of epochs.
        seed: training seed.
        streams: the random stream of each model.
    """
    size = subset_size(masks, streams)
    n_train = masks.shape[1]
    unique = list(dict.fromkeys(streams))
    gens = [_generator("order", seed, stream) for stream in unique]
    row = torch.tensor([unique.index(s) for s in streams], dtype=torch.long)
    for _ in range(epochs):
        perms = torch.stack([torch.randperm(n_train, generator=g) for g in gens])  # [U, n]
        perms = perms.index_select(0, row)  # [M, n]
        keep = torch.gather(masks, 1, perms)
        yield perms[keep].reshape(masks.shape[0], size)


def _stream_permutations(n_train: int, epochs: int, seed: int, stream: int) -> Iterator[Tensor]:
    """Each epoch's permutation of all ``n_train`` examples for one stream (as
    :func:`epoch_orders` draws them)."""
    gen = _generator("order", seed, stream)
    for _ in range(epochs):
        yield torch.randperm(n_train, generator=gen)


def shared_windows(
    masks: Tensor, *, epochs: int, batch_size: int, seed: int, stream: int,
    max_width: int | None = None,
) -> list[list[tuple[Tensor, Tensor]]] | None:
    """The mini-batches of models that share one random stream, as shared windows.

    Models sharing a stream visit their subsets in the order of one permutation of all
    examples per epoch (:func:`epoch_orders`). Mini-batch ``j`` of model ``m`` is therefore a
    set of *consecutive* permutation positions minus the ones outside its subset; when the
    subsets differ by a few examples (leave-one-out: by one) the batches ``j`` of all models
    lie in one short run of positions, the *window*. A step can then evaluate every model on
    the same window of examples, each weighting its own members: inputs shared by all models
    turn the first layer of every model into one matrix product instead of ``M`` small ones.

    Args:
        masks: ``[M, n_train]`` boolean subsets of equal size ``k``.
        epochs: number of epochs.
        batch_size: mini-batch size.
        seed: training seed.
        stream: the one random stream of all the models.
        max_width: give up (return ``None``) when a window is wider than this (default
            ``2 * batch_size``): wide windows cost more than they save.

    Returns:
        Per epoch, per mini-batch, ``(window, member)``: the window's example indices ``[w]``
        (in visiting order) and ``member[m, t]``, whether example ``window[t]`` is in model
        ``m``'s mini-batch. Or ``None`` when some window is wider than ``max_width``.
    """
    size = subset_size(masks, [stream] * masks.shape[0])
    limit = 2 * batch_size if max_width is None else max_width
    epochs_out = []
    for perm in _stream_permutations(masks.shape[1], epochs, seed, stream):
        kept = torch.gather(masks, 1, perm.unsqueeze(0).expand(masks.shape[0], -1))
        rank = kept.long().cumsum(1) - 1                      # position in the model's order
        batch = torch.where(kept, rank // batch_size, -1)    # its mini-batch, -1 if left out
        positions = kept.nonzero()[:, 1].reshape(masks.shape[0], size)
        batches = []
        for start in range(0, size, batch_size):
            lo = int(positions[:, start].min())
            hi = int(positions[:, min(start + batch_size, size) - 1].max()) + 1
            if hi - lo > limit:
                return None
            member = batch[:, lo:hi] == start // batch_size
            batches.append((perm[lo:hi], member))
        epochs_out.append(batches)
    return epochs_out


def batch_orders(
    masks: Tensor,
    *,
    epochs: int,
    seed: int = 0,
    stream_ids: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """The order in which ``train_stacked`` visits each model's training examples.

    For model ``r`` with stream id ``s`` (default ``r``), a generator seeded from
    ``(seed, s)`` draws one permutation of all ``n_train`` examples per epoch, restricted to the
    model's subset. Mini-batches are consecutive runs of ``batch_size`` entries (the last one
    may be smaller, as with ``DataLoader(drop_last=False)``). Models sharing a stream id see the
    same order up to their subsets (for LOO: the full-data order with one example removed).

    Useful to reproduce one stacked model with a plain PyTorch loop.

    Args:
        masks: ``[M, n_train]`` boolean subset masks of equal subset size ``k``.
        epochs: number of epochs.
        seed: training seed.
        stream_ids: the random stream of each model.

    Returns:
        A ``torch.long`` tensor ``[M, epochs, k]`` of training-example indices.
    """
    masks = torch.as_tensor(masks).bool().cpu()
    streams = as_ids(stream_ids, masks.shape[0], "stream_ids")
    size = subset_size(masks, streams)
    orders = list(epoch_orders(masks, epochs, seed, streams))
    if not orders:
        return torch.empty(masks.shape[0], 0, size, dtype=torch.long)
    return torch.stack(orders, dim=1)
