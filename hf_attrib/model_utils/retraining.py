"""Ground-truth retraining: many small models trained at once, resumably, in shards.

The LOO and LDS metrics (dattri paper, Section 3.3 and Appendix B) compare attribution scores
with models *retrained* on subsets of the training data: one model per left-out example for
LOO (5,000 per MNIST setting in the paper) and 100 models on random half subsets for LDS
(the first 50 for ensembling methods, the last 50 as ground truth). This module builds them.

* :func:`lds_subsets` / :func:`loo_subsets` give the training subsets as boolean masks. Row
  ``j`` of :func:`lds_subsets` depends only on ``(seed, j)``, so any model can be rebuilt alone.
* :func:`train_stacked` trains ``M`` copies of a small ``nn.Module`` at once: parameters are
  stacked to ``[M, ...]`` and one step is ``torch.func.vmap`` over ``torch.func.grad`` of the
  loss, followed by SGD (momentum, weight decay) or Adam on the stacked tensors, with PyTorch's
  optimizer semantics. Each model has its own subset, initialization and batch order, all
  drawn from generators seeded by ``(seed, stream id)`` (the stream id defaults to the model
  id), so model ``k`` of a stack equals model ``k`` trained alone.
* :func:`retrain` is the driver: models are grouped in fixed blocks of ``block_size``
  consecutive ids, each finished block is written atomically to
  ``out_dir/{kind}/block-{b:05d}.safetensors``, finished blocks are skipped on rerun and
  ``shard=(i, n)`` splits the blocks between ``n`` uncoordinated processes. A block is always
  trained with the same composition, so an interrupted and resumed build is bitwise identical
  to an uninterrupted one (same machine, software and thread count; on GPU also
  ``torch.use_deterministic_algorithms(True)``). :func:`load_stacked` gathers
  the blocks; :func:`retrain_lds` and :func:`retrain_loo` are the two ground truths.
* Every block carries checksums in its metadata (a sha256 per tensor over its name, dtype,
  shape and bytes, and one over the metadata). They are checked on rerun (a block that fails
  them, or an older block without them, is retrained with a warning, never used) and on every
  read (:func:`load_stacked`, :func:`load_subsets`, :func:`read_block`: a
  :class:`CorruptBlockError` naming the file, the tensor and how to rebuild the block).
* :func:`evaluate_stacked` computes a target (e.g. the margin) of every stacked model on every
  test example.

Scope: models are trained in training mode (dropout active, with ``randomness="different"``
under vmap: every model and step gets its own masks). Buffers that training mode changes, such
as BatchNorm running statistics, cannot be carried by stacked functional training. For such
models (found by one probing forward pass) :func:`train_stacked` switches automatically to a
*sequential* path (``strategy="sequential"``): the models of the stack are trained one after
another by a plain PyTorch loop (``torch.optim.SGD``/``Adam``, same hyperparameters, same
per-model initialization and batch order, dropout seeded per model id), so BatchNorm updates
each model's own running statistics. It is slower (no vectorization over models) but keeps
every guarantee above. Those blocks also store the trained buffers (keys
``__buffer__.{name}``); ``load_stacked(..., with_buffers=True)`` returns them and
``evaluate_stacked(..., buffers=...)`` evaluates every model with its own running statistics.

Example (LDS ground truth for a logistic regression)::

    def loss_fn(params, x, y):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    retrain_lds("gt", model, loss_fn, x_train, y_train, epochs=20, batch_size=64, lr=0.01,
                momentum=0.9, shard=(0, 4))          # this process: every 4th block
    params, ids = load_stacked("gt", "lds")          # {name: [100, ...]}, [100]
    # margin_fn(params, xb, yb) -> [b]: e.g. logit_y - logsumexp(other logits)
    values = evaluate_stacked(model, params, x_test, y_test, margin_fn)   # [100, n_test]

With BatchNorm (e.g. ResNet-9) the same calls train sequentially; load and evaluate with the
buffers (``margin_fn`` must pass the whole mapping it receives to ``functional_call``)::

    params, buffers, ids = load_stacked("gt", "lds", with_buffers=True)
    values = evaluate_stacked(model, params, x_test, y_test, margin_fn, buffers=buffers)
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "CorruptBlockError",
    "RetrainBuild",
    "RetrainResult",
    "batch_orders",
    "evaluate_stacked",
    "lds_subsets",
    "load_stacked",
    "load_subsets",
    "loo_subsets",
    "read_block",
    "retrain",
    "retrain_lds",
    "retrain_loo",
    "train_stacked",
]

LossFn = Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor]
ModelRange = slice | tuple[int, int] | str

_FORMAT = "hf_attrib.retrain.block/1"
_IDS_KEY = "__model_ids__"
_STREAMS_KEY = "__stream_ids__"
_SUBSETS_KEY = "__subset_indices__"
_RESERVED = (_IDS_KEY, _STREAMS_KEY, _SUBSETS_KEY)
_BUFFER_PREFIX = "__buffer__."
# Checksums in the block metadata: a sha256 per tensor (over its name, dtype, shape and bytes),
# and one over the whole metadata (which holds the per-tensor ones, in sorted key order).
_TENSOR_SUMS_KEY = "tensor_sha256"
_BLOCK_SUM_KEY = "block_sha256"
_STRATEGIES = ("auto", "stacked", "sequential")
_BLOCK_RE = re.compile(r"^block-(\d{5,})\.safetensors$")
_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------
# Seeds and subsets
# --------------------------------------------------------------------------------------------


def _derive_seed(tag: str, *parts: int) -> int:
    """A 63-bit seed that is a fixed function of ``(tag, *parts)`` (platform independent)."""
    text = "/".join([tag, *(str(int(p)) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _generator(tag: str, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(tag, *parts))


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


def _as_ids(ids: Sequence[int] | Tensor | None, count: int, what: str) -> list[int]:
    if ids is None:
        return list(range(count))
    out = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
    if len(out) != count:
        raise ValueError(f"{what} has {len(out)} entries but there are {count} models.")
    return out


def _check_masks(masks: Tensor, n_train: int) -> Tensor:
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


def _subset_size(masks: Tensor, model_ids: Sequence[int]) -> int:
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


def _epoch_orders(
    masks: Tensor, epochs: int, seed: int, streams: Sequence[int]
) -> Iterator[Tensor]:
    """Yield each epoch's ``[M, k]`` visiting order (see :func:`batch_orders`)."""
    size = _subset_size(masks, streams)
    n_train = masks.shape[1]
    unique = list(dict.fromkeys(streams))
    gens = [_generator("order", seed, stream) for stream in unique]
    row = torch.tensor([unique.index(s) for s in streams], dtype=torch.long)
    for _ in range(epochs):
        perms = torch.stack([torch.randperm(n_train, generator=g) for g in gens])  # [U, n]
        perms = perms.index_select(0, row)  # [M, n]
        keep = torch.gather(masks, 1, perms)
        yield perms[keep].reshape(masks.shape[0], size)


def batch_orders(
    masks: Tensor,
    *,
    epochs: int,
    seed: int = 0,
    stream_ids: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """The order in which :func:`train_stacked` visits each model's training examples.

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
    streams = _as_ids(stream_ids, masks.shape[0], "stream_ids")
    size = _subset_size(masks, streams)
    orders = list(_epoch_orders(masks, epochs, seed, streams))
    if not orders:
        return torch.empty(masks.shape[0], 0, size, dtype=torch.long)
    return torch.stack(orders, dim=1)


# --------------------------------------------------------------------------------------------
# Stacked training
# --------------------------------------------------------------------------------------------


@contextmanager
def _rng_scope(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNG (CPU and ``device``) for the block and restore it afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _initial_params(
    model: nn.Module, init: str, seed: int, streams: Sequence[int]
) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if init == "model":
        return {
            name: p.detach().unsqueeze(0).expand(len(streams), *p.shape).clone()
            for name, p in named.items()
        }
    if init != "seeded":
        raise ValueError(f"init must be 'model' or 'seeded', got {init!r}.")
    device = next(iter(named.values())).device
    fresh = copy.deepcopy(model)
    resets = [m for m in fresh.modules() if callable(getattr(m, "reset_parameters", None))]
    per_stream: dict[int, dict[str, Tensor]] = {}
    for stream in dict.fromkeys(streams):
        with _rng_scope(device, _derive_seed("init", seed, stream)), torch.no_grad():
            for module in resets:
                module.reset_parameters()
        per_stream[stream] = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    return {
        name: torch.stack([per_stream[s][name] for s in streams]) for name in named
    }


def _changing_buffers(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> list[str]:
    """Names of the buffers a training-mode forward pass changes (e.g. BatchNorm statistics).

    Runs ``loss_fn`` once on (at most) 4 examples, without gradients and under a fixed seed,
    then restores the buffers and the model's mode.
    """
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    if not before:
        return []
    was_training = model.training
    device = next(model.parameters()).device
    model.train()
    try:
        with torch.no_grad(), _rng_scope(device, 0):
            loss_fn(dict(model.named_parameters()), x[:4].to(device), y[:4].to(device))
    finally:
        model.train(was_training)
        changed = _restore_buffers(model, before)
    return changed


def _restore_buffers(model: nn.Module, before: Mapping[str, Tensor]) -> list[str]:
    """Copy ``before`` back into the model's buffers; return the names that had changed."""
    changed = []
    with torch.no_grad():
        for name, buf in model.named_buffers():
            old = before.get(name)
            if old is None or old.shape != buf.shape or not torch.equal(old, buf):
                changed.append(name)
                if old is not None and old.shape == buf.shape:
                    buf.copy_(old)
    return changed


def _check_strategy(strategy: str) -> None:
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}.")


def _resolve_strategy(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, strategy: str
) -> str:
    """``"stacked"`` or ``"sequential"``: what ``strategy`` means for this model."""
    _check_strategy(strategy)
    if strategy == "sequential":
        return strategy
    changed = _changing_buffers(model, loss_fn, x, y)
    if not changed:
        return "stacked"
    if strategy == "stacked":
        raise ValueError(
            f"buffers {changed} change when the model runs in training mode (e.g. BatchNorm "
            "running statistics). Stacked training carries parameters only, so it does not "
            "support them: use strategy='sequential' (or 'auto'), or GroupNorm/LayerNorm or "
            "BatchNorm(track_running_stats=False)."
        )
    return "sequential"


class _StackedSGD:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) on stacked tensors."""

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.bufs: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], grads: Mapping[str, Tensor]) -> None:
        for name, g in grads.items():
            p = params[name]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.bufs.get(name)
                if buf is None:
                    buf = self.bufs[name] = g.clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


class _StackedAdam:
    """``torch.optim.Adam`` (L2 weight decay added to the gradient, no AMSGrad) on stacks."""

    def __init__(
        self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], grads: Mapping[str, Tensor]) -> None:
        beta1, beta2 = self.betas
        self.t += 1
        step_size = self.lr / (1 - beta1**self.t)
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.t)
        for name, g in grads.items():
            p = params[name]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if name not in self.exp_avg:
                self.exp_avg[name] = torch.zeros_like(p)
                self.exp_avg_sq[name] = torch.zeros_like(p)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


def _torch_optimizer(
    params: list[nn.Parameter], optimizer: str, lr: float, momentum: float,
    weight_decay: float, betas: tuple[float, float], eps: float,
) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _train_vmap(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, masks: Tensor, ids: list[int],
    streams: list[int], size: int, *, epochs: int, batch_size: int, lr: float, momentum: float,
    weight_decay: float, optimizer: str, betas: tuple[float, float], eps: float, seed: int,
    init: str,
) -> dict[str, Tensor]:
    """The stacked path of :func:`train_stacked`: one ``vmap(grad)`` step for all models."""
    params_named = dict(model.named_parameters())
    device = x.device
    params = _initial_params(model, init, seed, streams)
    trainable = [n for n, p in params_named.items() if p.requires_grad]
    frozen = {n: params[n] for n in params if n not in trainable}

    def split_loss(train_p: dict[str, Tensor], frozen_p: dict[str, Tensor], xb: Tensor,
                   yb: Tensor) -> Tensor:
        return loss_fn({**train_p, **frozen_p}, xb, yb)

    grad_fn = torch.func.vmap(torch.func.grad(split_loss), randomness="different")
    opt: _StackedSGD | _StackedAdam
    if optimizer == "sgd":
        opt = _StackedSGD(lr, momentum, weight_decay)
    else:
        opt = _StackedAdam(lr, betas, eps, weight_decay)

    train_p = {n: params[n] for n in trainable}
    was_training = model.training
    model.train()
    try:
        with _rng_scope(device, _derive_seed("dropout", seed, *ids)):
            for order in _epoch_orders(masks, epochs, seed, streams):
                order = order.to(device)
                for start in range(0, size, batch_size):
                    idx = order[:, start:start + batch_size]  # [M, b]
                    flat = idx.reshape(-1)
                    xb = x.index_select(0, flat).reshape(*idx.shape, *x.shape[1:])
                    yb = y.index_select(0, flat).reshape(*idx.shape, *y.shape[1:])
                    grads = grad_fn(train_p, frozen, xb, yb)
                    with torch.no_grad():
                        opt.step(train_p, grads)
    finally:
        model.train(was_training)
    return {n: params[n].detach() for n in params_named}


def _train_sequential(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, masks: Tensor, ids: list[int],
    streams: list[int], size: int, *, epochs: int, batch_size: int, lr: float, momentum: float,
    weight_decay: float, optimizer: str, betas: tuple[float, float], eps: float, seed: int,
    init: str,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The sequential path of :func:`train_stacked`: a plain PyTorch loop, model by model.

    One deep copy ``net`` of the model is reused: for every model it is reset to the model's
    weights and buffers (then re-initialized per stream with ``init="seeded"``, exactly as the
    stacked path does), and trained with a fresh ``torch.optim`` optimizer. ``loss_fn`` gets
    ``net``'s parameters *and* buffers, so ``functional_call(model, ...)`` in training mode
    updates ``net``'s running statistics in place, never the model's own.
    """
    device = x.device
    net = copy.deepcopy(model)
    net.train()
    resets = [m for m in net.modules() if callable(getattr(m, "reset_parameters", None))]
    start_p = {n: p.detach() for n, p in model.named_parameters()}
    start_b = {n: b.detach() for n, b in model.named_buffers()}
    guard = {n: b.clone() for n, b in start_b.items()}
    net_p, net_b = dict(net.named_parameters()), dict(net.named_buffers())
    state = {**net_p, **net_b}
    trainable = [p for p in net_p.values() if p.requires_grad]
    out_p: dict[str, list[Tensor]] = {n: [] for n in net_p}
    out_b: dict[str, list[Tensor]] = {n: [] for n in net_b}
    checked = False
    was_training = model.training
    model.train()
    try:
        for row, (mid, stream) in enumerate(zip(ids, streams, strict=True)):
            with torch.no_grad():
                for n, p in net_p.items():
                    p.copy_(start_p[n])
                for n, b in net_b.items():
                    b.copy_(start_b[n])
            if init == "seeded":
                with _rng_scope(device, _derive_seed("init", seed, stream)), torch.no_grad():
                    for module in resets:
                        module.reset_parameters()
            opt = (_torch_optimizer(trainable, optimizer, lr, momentum, weight_decay, betas, eps)
                   if trainable else None)
            with _rng_scope(device, _derive_seed("dropout", seed, mid)):
                for order in _epoch_orders(masks[row:row + 1], epochs, seed, [stream]):
                    order = order[0].to(device)
                    for start in range(0, size, batch_size):
                        idx = order[start:start + batch_size]
                        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
                        if opt is None:
                            with torch.no_grad():
                                loss_fn(state, xb, yb)
                        else:
                            opt.zero_grad()
                            loss_fn(state, xb, yb).backward()
                            opt.step()
                        if not checked:
                            _check_routed(model, guard)
                            checked = True
            for n, p in net_p.items():
                out_p[n].append(p.detach().clone())
            for n, b in net_b.items():
                out_b[n].append(b.detach().clone())
    finally:
        model.train(was_training)
    return ({n: torch.stack(v) for n, v in out_p.items()},
            {n: torch.stack(v) for n, v in out_b.items()})


def _check_routed(model: nn.Module, guard: Mapping[str, Tensor]) -> None:
    """Raise if ``loss_fn`` updated the model's own buffers instead of the ones it was given."""
    changed = _restore_buffers(model, guard)
    if changed:
        raise ValueError(
            f"loss_fn changed the model's own buffers {changed}: for sequential training it "
            "must pass the whole mapping it receives (parameters and buffers) to "
            "torch.func.functional_call, e.g. functional_call(model, params, xb)."
        )


def train_stacked(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    masks: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    seed: int = 0,
    model_ids: Sequence[int] | Tensor | None = None,
    init: str = "model",
    stream_ids: Sequence[int] | Tensor | None = None,
    strategy: str = "auto",
    return_buffers: bool = False,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Train ``M`` copies of a small model at once, each on its own subset.

    Parameters are stacked to ``[M, ...]`` and each step evaluates
    ``vmap(grad(loss_fn), randomness="different")`` on one mini-batch per model, then applies
    the optimizer to the stacked tensors with PyTorch's semantics (``torch.optim.SGD`` with
    momentum and L2 weight decay; ``torch.optim.Adam``). Model ``r`` draws its initialization
    (``init="seeded"``) and its batch order (see :func:`batch_orders`) from generators seeded
    by ``(seed, stream_ids[r])``, so it does not depend on the other models of the stack:
    stacked model ``r`` equals the same model trained alone. Dropout masks are the exception:
    they come from the global RNG, seeded per stack from ``(seed, model_ids)``, so with
    dropout a model is reproducible for a fixed stack composition only.

    The model runs in training mode (its mode is restored afterwards); parameters with
    ``requires_grad=False`` are stacked and returned but not trained.

    **When the sequential path is used.** Stacked (vmap) training carries parameters only, so
    buffers that change in training mode (BatchNorm running statistics, ``num_batches_tracked``)
    cannot be updated. With ``strategy="auto"`` (the default) one probing forward pass in
    training mode (on 4 examples, buffers restored afterwards) decides: if no buffer changes,
    the stacked path runs; if some do (e.g. ResNet-9), the models are trained **one after
    another** with a plain PyTorch loop instead: a deep copy of the model, a fresh
    ``torch.optim.SGD``/``Adam`` per model with the same hyperparameters and semantics, the same
    initialization and batch order as above, and dropout masks from the global RNG seeded per
    model from ``(seed, model_ids[r])``, so every model (dropout included) is independent of
    the stack composition. ``loss_fn`` then receives the copy's parameters *and* buffers and
    must pass the whole mapping to ``functional_call`` (the usual form below does), so BatchNorm
    updates each model's own statistics. ``strategy="sequential"`` forces this path (slower,
    but it works for any model); ``strategy="stacked"`` forces the vmap path and raises a
    ``ValueError`` naming the changing buffers. The two paths agree to float rounding on
    models without changing buffers and dropout.

    Args:
        model: the architecture (and, with ``init="model"``, the initial weights and buffers);
            not changed.
        loss_fn: ``loss_fn(params, xb, yb) -> scalar`` on one model's mini-batch, typically
            ``cross_entropy(torch.func.functional_call(model, params, xb), yb)``.
        x: all training inputs ``[n_train, ...]``.
        y: all training targets ``[n_train, ...]``.
        masks: ``[M, n_train]`` boolean subset masks, all of the same subset size.
        epochs: passes over each subset.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty added to the gradient (PyTorch's ``weight_decay``).
        optimizer: ``"sgd"`` or ``"adam"``.
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
        seed: training seed.
        model_ids: ids of the ``M`` models (default ``0..M-1``); they seed the dropout RNG
            (of the stack, or of each model on the sequential path) and are the default
            stream ids.
        init: ``"model"``: every model starts from ``model``'s current weights (and buffers);
            ``"seeded"``: model ``r`` re-initializes a copy of ``model`` by calling every
            module's ``reset_parameters()`` (in ``model.modules()`` order) under
            ``torch.manual_seed`` derived from ``(seed, stream_ids[r])`` (for BatchNorm this
            also resets the running statistics). Parameters of modules without
            ``reset_parameters`` keep the model's values.
        stream_ids: the random stream of each model (default: ``model_ids``). Models sharing
            a stream share their initialization and batch order (up to their subsets), e.g.
            leave-one-out models that should differ only by the removed example.
        strategy: ``"auto"``, ``"stacked"`` or ``"sequential"`` (see above).
        return_buffers: also return the buffers of every model.

    Returns:
        The trained parameters ``{name: [M, *shape]}``, detached, on the model's device. With
        ``return_buffers=True``, ``(params, buffers)`` where ``buffers`` is
        ``{name: [M, *shape]}`` for every buffer of the model: the trained ones on the
        sequential path, the model's own (constant) buffers on the stacked path. Without it,
        buffers that training changed are dropped with a warning.
    """
    params_named = dict(model.named_parameters())
    if not params_named:
        raise ValueError("the model has no parameters to train.")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
    if init not in ("model", "seeded"):
        raise ValueError(f"init must be 'model' or 'seeded', got {init!r}.")
    _check_strategy(strategy)
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}.")
    masks = _check_masks(masks, x.shape[0])
    num = masks.shape[0]
    ids = _as_ids(model_ids, num, "model_ids")
    streams = _as_ids(stream_ids, num, "stream_ids") if stream_ids is not None else ids
    size = _subset_size(masks, ids)
    model_buffers = {n: b.detach() for n, b in model.named_buffers()}
    if num == 0:
        params = {n: p.detach().new_empty(0, *p.shape) for n, p in params_named.items()}
        empty = {n: b.new_empty(0, *b.shape) for n, b in model_buffers.items()}
        return (params, empty) if return_buffers else params
    device = next(iter(params_named.values())).device
    x, y = x.to(device), y.to(device)
    recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                  weight_decay=weight_decay, optimizer=optimizer, betas=betas, eps=eps,
                  seed=seed, init=init)
    if _resolve_strategy(model, loss_fn, x, y, strategy) == "sequential":
        params, buffers = _train_sequential(model, loss_fn, x, y, masks, ids, streams, size,
                                            **recipe)
        if not return_buffers:
            dropped = [n for n, b in buffers.items()
                       if not bool((b == model_buffers[n].unsqueeze(0)).all())]
            if dropped:
                warnings.warn(
                    f"train_stacked trained buffers {dropped} (e.g. BatchNorm running "
                    "statistics) but return_buffers=False drops them; pass return_buffers=True "
                    "to keep them.", stacklevel=2,
                )
            return params
        return params, buffers
    params = _train_vmap(model, loss_fn, x, y, masks, ids, streams, size, **recipe)
    if not return_buffers:
        return params
    buffers = {n: b.unsqueeze(0).expand(num, *b.shape).clone() for n, b in model_buffers.items()}
    return params, buffers


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_stacked(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    target_fn: Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor],
    chunk: int = 1024,
    model_chunk: int | None = None,
    *,
    buffers: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The target value of every stacked model on every test example.

    Runs ``vmap`` over the models (``model`` in eval mode, restored afterwards) and loops over
    test examples in chunks, without gradients.

    Args:
        model: the architecture that ``target_fn`` calls through ``functional_call``.
        params: stacked parameters ``{name: [M, ...]}`` (e.g. from :func:`load_stacked`).
        x: test inputs ``[n_test, ...]``.
        y: test targets ``[n_test, ...]``.
        target_fn: ``target_fn(params, xb, yb) -> [b]``, one value per example, e.g. the margin
            ``logit_y - logsumexp(other logits)`` of the true class.
        chunk: test examples per forward pass.
        model_chunk: models per vectorized call (``vmap``'s ``chunk_size``); ``None`` for all.
        buffers: stacked buffers ``{name: [M, ...]}`` of the same models (e.g. from
            ``load_stacked(..., with_buffers=True)``). They are merged into the mapping that
            ``target_fn`` receives, so ``functional_call(model, params, xb)`` in eval mode uses
            each model's own BatchNorm running statistics. Without them, ``functional_call``
            falls back to ``model``'s own buffers for every model.

    Returns:
        A ``[M, n_test]`` tensor of target values.
    """
    if not params:
        raise ValueError("params is empty.")
    num = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    state = dict(params)
    if buffers:
        clash = sorted(set(buffers) & set(params))
        if clash:
            raise ValueError(f"names {clash} are in both params and buffers.")
        wrong = {n: tuple(b.shape[:1]) for n, b in buffers.items() if b.shape[:1] != (num,)}
        if wrong:
            raise ValueError(f"buffers must be stacked over the {num} models of params, got "
                             f"leading shapes {wrong}.")
        state.update({n: b.to(device) for n, b in buffers.items()})
    x, y = x.to(device), y.to(device)
    fn = torch.func.vmap(target_fn, in_dims=(0, None, None), chunk_size=model_chunk)
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                xb, yb = x[start:start + chunk], y[start:start + chunk]
                out = fn(state, xb, yb)
                if out.shape != (num, xb.shape[0]):
                    raise ValueError(
                        f"target_fn must return one value per example ([{xb.shape[0]}] per "
                        f"model), got {tuple(out.shape[1:])}."
                    )
                outs.append(out)
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty(num, 0, device=device)
    return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------
# Resumable, shardable driver
# --------------------------------------------------------------------------------------------


@dataclass
class RetrainBuild:
    """Everything :func:`retrain` needs to train every model of one kind.

    Attributes:
        model: the architecture (and, with ``init="model"``, the initial weights).
        loss_fn: ``loss_fn(params, xb, yb) -> scalar`` (see :func:`train_stacked`).
        x: training inputs ``[n_train, ...]``.
        y: training targets ``[n_train, ...]``.
        masks: ``[M_total, n_train]`` boolean subsets, row ``m`` for model id ``m``.
        epochs: passes over each subset.
        batch_size: mini-batch size.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty (PyTorch optimizer semantics).
        optimizer: ``"sgd"`` or ``"adam"``.
        betas: Adam betas.
        eps: Adam epsilon.
        seed: training seed.
        init: ``"seeded"`` (each stream re-initializes the model) or ``"model"``.
        stream_ids: random stream of each model id (default: the model id).
        strategy: ``"auto"`` (default), ``"stacked"`` or ``"sequential"``; see
            :func:`train_stacked`. :func:`retrain` resolves it once per call
            (:meth:`resolve_strategy`); sequential blocks also store the models' buffers.
    """

    model: nn.Module
    loss_fn: LossFn
    x: Tensor
    y: Tensor
    masks: Tensor
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    init: str = "seeded"
    stream_ids: Sequence[int] | Tensor | None = None
    strategy: str = "auto"

    def __post_init__(self) -> None:
        _check_strategy(self.strategy)
        self.masks = _check_masks(self.masks, self.x.shape[0])
        self.stream_ids = _as_ids(self.stream_ids, self.masks.shape[0], "stream_ids")

    def resolve_strategy(self) -> str:
        """``"stacked"`` or ``"sequential"``: the path :func:`train_stacked` takes for this
        build (``"auto"`` probes the model once; see :func:`train_stacked`)."""
        return _resolve_strategy(self.model, self.loss_fn, self.x, self.y, self.strategy)

    @property
    def num_models(self) -> int:
        """Total number of models (rows of ``masks``)."""
        return int(self.masks.shape[0])

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`train_stacked` shared by all blocks."""
        return dict(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            momentum=self.momentum, weight_decay=self.weight_decay, optimizer=self.optimizer,
            betas=tuple(self.betas), eps=self.eps, seed=self.seed, init=self.init,
        )

    def fingerprint(self, strategy: str | None = None) -> str:
        """Hash of the configuration blocks are checked against (data, recipe, architecture).

        Args:
            strategy: the resolved strategy (``"stacked"`` or ``"sequential"``), if known;
                default :meth:`resolve_strategy`. Builds that resolve to the stacked path keep
                the fingerprint they had before the sequential path existed; sequential builds
                also hash the strategy, the buffer names/shapes/dtypes and, with
                ``init="model"``, the initial buffer values.
        """
        if strategy is None:
            strategy = self.resolve_strategy()
        if strategy not in ("stacked", "sequential"):
            raise ValueError(f"strategy must be resolved ('stacked' or 'sequential'), got "
                             f"{strategy!r}.")
        h = hashlib.sha256()
        spec: dict[str, Any] = {
            "train": {k: list(v) if isinstance(v, tuple) else v
                      for k, v in self.train_kwargs().items()},
            "params": [[n, list(p.shape), str(p.dtype), p.requires_grad]
                       for n, p in self.model.named_parameters()],
            "model": type(self.model).__qualname__,
            "data": [[list(t.shape), str(t.dtype)] for t in (self.x, self.y)],
        }
        sequential = strategy == "sequential"
        if sequential:
            spec["strategy"] = strategy
            spec["buffers"] = [[n, list(b.shape), str(b.dtype)]
                               for n, b in self.model.named_buffers()]
        h.update(json.dumps(spec, sort_keys=True).encode())
        tensors = [self.x, self.y]
        if self.init == "model":
            tensors += [p for _, p in self.model.named_parameters()]
            if sequential:
                tensors += [b for _, b in self.model.named_buffers()]
        for t in tensors:
            h.update(_tensor_bytes(t))
        return h.hexdigest()[:32]


@dataclass
class RetrainResult:
    """What one :func:`retrain` call did.

    Attributes:
        kind: the kind of models (sub-folder of ``out_dir``).
        directory: ``out_dir/kind``.
        trained: indices of the blocks trained by this call.
        skipped: indices of selected blocks that were already on disk (and verified).
        repaired: blocks found on disk but unreadable, failing their checksums or without
            checksums (older versions), and therefore retrained (also in ``trained``).
    """

    kind: str
    directory: Path
    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)


def _block_ids(block: int, block_size: int, num_models: int) -> list[int]:
    return list(range(block * block_size, min((block + 1) * block_size, num_models)))


def _parse_range(models: ModelRange | None, num_models: int) -> tuple[int, int]:
    if models is None:
        return 0, num_models
    if isinstance(models, str):
        start, sep, stop = models.partition(":")
        if not sep:
            raise ValueError(f"models must look like 'a:b', got {models!r}.")
        models = slice(int(start) if start else None, int(stop) if stop else None)
    if isinstance(models, slice):
        if models.step not in (None, 1):
            raise ValueError("models must be a contiguous range (slice step 1).")
        start, stop, _ = models.indices(num_models)
        return start, max(start, stop)
    start, stop = (int(v) for v in models)
    if not 0 <= start <= stop <= num_models:
        raise ValueError(f"models=({start}, {stop}) must satisfy 0 <= a <= b <= {num_models}.")
    return start, stop


def _select_blocks(
    num_models: int, block_size: int, models: ModelRange | None, shard: tuple[int, int] | None
) -> list[int]:
    start, stop = _parse_range(models, num_models)
    blocks = range(start // block_size, -(-stop // block_size)) if stop > start else range(0)
    if shard is None:
        return list(blocks)
    index, count = (int(v) for v in shard)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard=(i, n) needs 0 <= i < n, got {shard}.")
    return [b for b in blocks if b % count == index]


def _block_path(directory: Path, block: int) -> Path:
    return directory / f"block-{block:05d}.safetensors"


class CorruptBlockError(ValueError):
    """A retrain block that cannot be trusted: unreadable, not matching its checksums, or
    written without checksums (by an older version), so its content cannot be verified.

    :func:`retrain` warns and retrains such a block; readers (:func:`load_stacked`,
    :func:`load_subsets`, :func:`read_block`) raise this error.

    Attributes:
        path: the block file.
        problem: what is wrong, without the fix.
        key: the tensor key that fails its checksum, ``"metadata"`` for the metadata, or
            ``None`` (unreadable or no checksums).
    """

    def __init__(self, path: Path, problem: str, key: str | None = None) -> None:
        self.path, self.problem, self.key = path, problem, key
        super().__init__(f"{problem} {_repair_hint(path)}")


def _repair_hint(path: Path) -> str:
    """How to rebuild one block, in the vocabulary of both entry points (API and CLI)."""
    kind, out_dir = path.parent.name, path.parent.parent
    cli = f"hf-attrib bench ground-truth SETTING --kind {kind.removesuffix('-full')}"
    if out_dir.name == "ground_truth":  # the CLI's layout: {--out}/ground_truth/{kind}
        cli += f" --out {out_dir.parent}"
    return (f"Do not use it: delete {path} and re-run the build that wrote it (retrain(), "
            f"retrain_lds() or retrain_loo() with the same arguments and out_dir="
            f"{str(out_dir)!r}, or `{cli}` for a benchmark build); only the missing block is "
            "retrained.")


def _tensor_bytes(t: Tensor) -> Any:
    """The raw bytes of ``t`` (CPU, contiguous, native byte order) as a ``uint8`` array."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _tensor_digest(name: str, t: Tensor) -> str:
    """sha256 over a tensor's name, dtype, shape and bytes (the JSON prefix is unambiguous)."""
    h = hashlib.sha256(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


def _metadata_digest(meta: Mapping[str, str]) -> str:
    body = {k: v for k, v in meta.items() if k != _BLOCK_SUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _seal(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus the checksums of ``tensors`` and of the metadata itself."""
    sums = {name: _tensor_digest(name, t) for name, t in sorted(tensors.items())}
    meta = {**metadata, _TENSOR_SUMS_KEY: json.dumps(sums, sort_keys=True)}
    meta[_BLOCK_SUM_KEY] = _metadata_digest(meta)
    return meta


def _not_a_block(path: Path, meta: Mapping[str, str]) -> ValueError:
    return ValueError(f"{path} is not a retrain block (format {meta.get('format')!r}); move it "
                      "out of the folder.")


def _checked_metadata(path: Path, meta: Mapping[str, str]) -> dict[str, str]:
    """``meta`` after checking it against the block checksum (raises CorruptBlockError)."""
    if _BLOCK_SUM_KEY not in meta:
        if meta.get("format") != _FORMAT:
            raise _not_a_block(path, meta)
        raise CorruptBlockError(path, f"{path} has no checksums (it was written by an "
                                "hf_attrib version before block checksums), so its content "
                                "cannot be verified.")
    if _metadata_digest(meta) != meta[_BLOCK_SUM_KEY]:
        raise CorruptBlockError(path, f"{path}: the block metadata does not match its "
                                f"checksum ({_BLOCK_SUM_KEY}); the file is corrupt.", "metadata")
    if meta.get("format") != _FORMAT:
        raise _not_a_block(path, meta)
    try:
        sums = json.loads(meta.get(_TENSOR_SUMS_KEY, ""))
    except json.JSONDecodeError:
        sums = None
    if not isinstance(sums, dict):
        raise CorruptBlockError(path, f"{path}: the metadata entry {_TENSOR_SUMS_KEY} is not "
                                "a checksum table; the file is corrupt.", "metadata")
    return dict(meta)


def _unreadable(path: Path, err: Exception) -> CorruptBlockError:
    return CorruptBlockError(path, f"{path} is not a readable safetensors file ({err}); it is "
                             "truncated or corrupt.")


def _block_metadata(path: Path) -> dict[str, str]:
    """The checked metadata of a block (the header only; tensors are not read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise _unreadable(path, err) from err
    return _checked_metadata(path, meta)


def read_block(
    path: str | os.PathLike[str], keys: Sequence[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read one retrain block, every tensor read checked against its stored checksum.

    Blocks written by :func:`retrain` carry a sha256 per tensor (over its name, dtype, shape
    and bytes) and one over the metadata, which holds the per-tensor ones. A flipped bit
    in a tensor read (its data or its header entry) or in the metadata is an error that
    names the file and the tensor key.

    Args:
        path: a ``block-NNNNN.safetensors`` file.
        keys: read only these tensors (e.g. ``("__model_ids__", "__subset_indices__")``);
            default all. Only the tensors read are hashed.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        CorruptBlockError: the file is unreadable, fails a checksum, or has no checksums
            (written by an older version); the message says how to rebuild the block.
        ValueError: the file is not a retrain block, or lacks a requested key.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            names = set(f.keys())
            wanted = sorted(names) if keys is None else list(keys)
            tensors = {k: f.get_tensor(k) for k in wanted if k in names}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise _unreadable(path, err) from err
    meta = _checked_metadata(path, raw_meta)
    sums = json.loads(meta[_TENSOR_SUMS_KEY])
    if names != set(sums):
        raise CorruptBlockError(path, f"{path}: its tensors differ from those its checksums "
                                f"list (in {sorted(names ^ set(sums))}); the file is corrupt.",
                                "metadata")
    missing = [k for k in wanted if k not in names]
    if missing:
        raise ValueError(f"{path} has no tensors {missing}.")
    for key in wanted:
        if _tensor_digest(key, tensors[key]) != sums[key]:
            raise CorruptBlockError(path, f"{path}: tensor {key!r} does not match its checksum "
                                    "(a flipped bit on disk or in a copy); the file is corrupt.",
                                    key)
    return tensors, meta


def _config_mismatch(
    meta: Mapping[str, str], build: RetrainBuild, fingerprint: str, block: int, block_size: int
) -> dict[str, tuple[Any, Any]]:
    expected = {
        "block": str(block), "block_size": str(block_size),
        "num_models": str(build.num_models), "n_train": str(build.masks.shape[1]),
        "fingerprint": fingerprint,
    }
    return {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}


def _raise_mismatch(path: Path, wrong: Mapping[str, tuple[Any, Any]]) -> None:
    detail = ", ".join(f"{k}: file {a!r} != build {b!r}" for k, (a, b) in wrong.items())
    raise ValueError(
        f"{path} was built with a different configuration ({detail}). Use another out_dir "
        "or kind, or delete the folder to rebuild."
    )


def _verify_block(
    path: Path, build: RetrainBuild, fingerprint: str, block: int, block_size: int,
    tensors: Mapping[str, Tensor], meta: Mapping[str, str],
) -> None:
    """Raise if a (checksum-verified) block on disk was built from another configuration."""
    wrong = _config_mismatch(meta, build, fingerprint, block, block_size)
    ids = _block_ids(block, block_size, build.num_models)
    if not wrong:
        got_ids = tensors[_IDS_KEY].tolist()
        got_streams = tensors[_STREAMS_KEY].tolist()
        got_subsets = tensors[_SUBSETS_KEY].long()
        if got_ids != ids:
            wrong["model_ids"] = (got_ids, ids)
        elif got_streams != [build.stream_ids[i] for i in ids]:
            wrong["stream_ids"] = (got_streams, [build.stream_ids[i] for i in ids])
        elif not torch.equal(got_subsets, _subset_indices(build.masks[ids])):
            wrong["subset_indices"] = ("on disk", "differ from build.masks")
    if wrong:
        _raise_mismatch(path, wrong)


def _subset_indices(masks: Tensor) -> Tensor:
    size = int(masks[0].sum()) if masks.shape[0] else 0
    dtype = torch.int32 if masks.shape[1] < 2**31 else torch.int64
    return masks.nonzero()[:, 1].reshape(masks.shape[0], size).to(dtype)


def _write_block(
    path: Path, params: Mapping[str, Tensor], ids: list[int], streams: list[int],
    masks: Tensor, metadata: dict[str, str], buffers: Mapping[str, Tensor] | None = None,
) -> None:
    for name in params:
        if name in _RESERVED or name.startswith(_BUFFER_PREFIX):
            raise ValueError(f"parameter name {name!r} is reserved by the block format.")
    tensors = {name: p.detach().cpu().contiguous() for name, p in params.items()}
    for name, b in (buffers or {}).items():
        tensors[_BUFFER_PREFIX + name] = b.detach().cpu().contiguous()
    tensors[_IDS_KEY] = torch.tensor(ids, dtype=torch.int64)
    tensors[_STREAMS_KEY] = torch.tensor(streams, dtype=torch.int64)
    tensors[_SUBSETS_KEY] = _subset_indices(masks)
    _write_atomic(path, safetensors_save(tensors, metadata=_seal(tensors, metadata)))


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: ``path`` is never partial, and the temporary file is removed on any
    failure (a kill leaves it behind; :func:`retrain` removes it on the next run)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        raise OSError(err.errno, _disk_full_message(path, len(data)), str(path)) from err
    finally:
        tmp.unlink(missing_ok=True)


def _disk_full_message(path: Path, size: int) -> str:
    try:
        free = f"; {shutil.disk_usage(path.parent).free:,} bytes are free there"
    except OSError:
        free = ""
    return (f"the disk is full (or the quota is used up): block {path.name} needs {size:,} "
            f"bytes ({size / 2**20:.1f} MiB) in {path.parent}{free}. Free space there or "
            "choose another out_dir (CLI: --out), then re-run: finished blocks are kept and "
            "skipped, and no partial file was left")


def _remove_stale_temps(directory: Path, block: int) -> None:
    for tmp in directory.glob(f".{_block_path(directory, block).name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _check_kind(kind: str) -> None:
    if not _KIND_RE.match(kind):
        raise ValueError(f"kind must be a plain folder name ([A-Za-z0-9_.-]), got {kind!r}.")


def retrain(
    kind: str,
    out_dir: str | os.PathLike[str],
    build: RetrainBuild,
    *,
    models: ModelRange | None = None,
    shard: tuple[int, int] | None = None,
    block_size: int = 10,
    progress: bool = True,
) -> RetrainResult:
    """Train the models of ``build`` block by block, resumably and shardably.

    Block ``b`` holds model ids ``[b * block_size, (b + 1) * block_size)`` and is always trained
    as one stack by :func:`train_stacked`, so its result does not depend on which process
    trains it or when. Each finished block is written atomically (a temporary file in the same
    folder, then ``os.replace``) to ``out_dir/{kind}/block-{b:05d}.safetensors`` with the
    stacked parameters (keys = parameter names), the model ids, stream ids and subset indices
    (``__model_ids__``, ``__stream_ids__``, ``__subset_indices__``) and the configuration
    fingerprint. When ``build`` resolves to the sequential path (buffers that change in
    training mode, e.g. BatchNorm, or ``strategy="sequential"``; see :func:`train_stacked`),
    the block also holds every model's buffers, stacked, under ``__buffer__.{name}`` (the
    metadata ``strategy`` says which path trained it). On rerun, blocks on disk are checked
    against ``build`` (a mismatch is an error) and skipped; leftover temporary files of
    interrupted writes are removed. Each block stores checksums in its metadata (see
    :func:`read_block`); a block on disk that is unreadable, fails them (a flipped bit) or has
    none (written by an older version) is retrained with a warning, its file replaced
    atomically, and listed in ``RetrainResult.repaired``.

    Do not run two processes on overlapping blocks at the same time; disjoint ``shard`` values
    (or ``models`` ranges on block boundaries) split the work without coordination.

    Args:
        kind: folder name for this family of models, e.g. ``"lds"``.
        out_dir: root folder of the build.
        build: the data, recipe and subsets (``build.masks`` has one row per model id).
        models: restrict to the blocks covering these ids: ``slice(a, b)``, ``(a, b)`` or
            ``"a:b"``. Whole blocks are trained, so ids outside the range may be trained too.
        shard: ``(i, n)``: only blocks ``b`` with ``b % n == i``.
        block_size: models per block (and per stack); must match existing blocks.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`RetrainResult` listing the trained and skipped blocks.
    """
    _check_kind(kind)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    directory = Path(out_dir) / kind
    directory.mkdir(parents=True, exist_ok=True)
    blocks = _select_blocks(build.num_models, block_size, models, shard)
    strategy = build.resolve_strategy()
    fingerprint = build.fingerprint(strategy)
    result = RetrainResult(kind=kind, directory=directory)
    todo = []
    for block in blocks:
        path = _block_path(directory, block)
        if not path.exists():
            todo.append(block)
        elif _usable_block(path, build, fingerprint, block, block_size):
            result.skipped.append(block)
        else:
            result.repaired.append(block)
            todo.append(block)
    metadata = {
        "format": _FORMAT, "kind": kind, "block_size": str(block_size),
        "num_models": str(build.num_models), "n_train": str(build.masks.shape[1]),
        "fingerprint": fingerprint, "strategy": strategy,
        "recipe": json.dumps({k: list(v) if isinstance(v, tuple) else v
                              for k, v in build.train_kwargs().items()}),
    }
    for block in todo:  # fail before hours of training, not in the middle
        ids = _block_ids(block, block_size, build.num_models)
        _subset_size(build.masks[ids], ids)
    total = sum(len(_block_ids(b, block_size, build.num_models)) for b in todo)
    with tqdm(total=total, desc=f"retrain {kind}", unit="model", disable=not progress) as bar:
        bar.set_postfix(skipped_blocks=len(result.skipped), blocks=len(todo))
        for block in todo:
            ids = _block_ids(block, block_size, build.num_models)
            streams = [build.stream_ids[i] for i in ids]
            _remove_stale_temps(directory, block)
            params, buffers = train_stacked(
                build.model, build.loss_fn, build.x, build.y, build.masks[ids],
                model_ids=ids, stream_ids=streams, **build.train_kwargs(),
                strategy=strategy, return_buffers=True,
            )
            _write_block(_block_path(directory, block), params, ids, streams,
                         build.masks[ids], {**metadata, "block": str(block)},
                         buffers if strategy == "sequential" else None)
            result.trained.append(block)
            bar.update(len(ids))
    return result


def _usable_block(
    path: Path, build: RetrainBuild, fingerprint: str, block: int, block_size: int
) -> bool:
    """Whether a block on disk can be skipped: ``False`` (with a warning) if it fails its
    checksums, so it is retrained; an error if it belongs to another configuration."""
    try:
        tensors, meta = read_block(path)
    except CorruptBlockError as err:
        if err.key not in (None, "metadata"):  # metadata intact: still refuse another config
            wrong = _config_mismatch(_block_metadata(path), build, fingerprint, block,
                                     block_size)
            if wrong:
                _raise_mismatch(path, wrong)
        ids = _block_ids(block, block_size, build.num_models)
        warnings.warn(f"{err.problem} Retraining block {block} (models {ids[0]}..{ids[-1]}); "
                      "the new block replaces the file once it is written.", stacklevel=3)
        return False
    _verify_block(path, build, fingerprint, block, block_size, tensors, meta)
    return True


def _scan_blocks(directory: Path) -> dict[int, tuple[Path, dict[str, str]]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist; build it with retrain() first.")
    found = {}
    for path in sorted(directory.iterdir()):
        match = _BLOCK_RE.match(path.name)
        if match:
            found[int(match.group(1))] = (path, _block_metadata(path))
    if not found:
        raise FileNotFoundError(f"{directory} holds no retrain blocks; build it with retrain().")
    keys = ("num_models", "block_size", "fingerprint", "n_train")
    first = next(iter(found.values()))[1]
    for block, (path, meta) in found.items():
        diff = [k for k in keys if meta.get(k) != first.get(k)]
        if diff or meta.get("block") != str(block):
            raise ValueError(f"{path} does not belong to the same build as the other blocks "
                             f"in {directory} (differs in {diff or ['block']}).")
    return found


def _needed_blocks(
    directory: Path, kind: str, models: ModelRange | None
) -> tuple[list[tuple[int, Path]], int, int, dict[str, str]]:
    found = _scan_blocks(directory)
    meta = next(iter(found.values()))[1]
    num_models, block_size = int(meta["num_models"]), int(meta["block_size"])
    start, stop = _parse_range(models, num_models)
    needed = _select_blocks(num_models, block_size, (start, stop), None)
    missing = [b for b in needed if b not in found]
    if missing:
        runs: list[list[int]] = []
        for b in missing:
            if runs and runs[-1][1] == b:
                runs[-1][1] = b + 1
            else:
                runs.append([b, b + 1])
        ranges = [(a * block_size, min(b * block_size, num_models)) for a, b in runs]
        text = ", ".join(f"{a}..{b - 1}" if b - 1 > a else f"{a}" for a, b in ranges)
        calls = "; ".join(f"retrain({kind!r}, {str(directory.parent)!r}, build, "
                          f"models=slice({a}, {b}), block_size={block_size})" for a, b in ranges)
        raise FileNotFoundError(
            f"{directory}: models {text} are missing (blocks {missing}). Build them with: "
            f"{calls} (or rerun the full retrain: finished blocks are skipped)."
        )
    return [(b, found[b][0]) for b in needed], start, stop, meta


def load_stacked(
    out_dir: str | os.PathLike[str],
    kind: str,
    models: ModelRange | None = None,
    *,
    with_buffers: bool = False,
) -> tuple[dict[str, Tensor], Tensor] | tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Gather the blocks of ``out_dir/kind`` into stacked parameters, in model-id order.

    Args:
        out_dir: root folder of the build (as given to :func:`retrain`).
        kind: the kind of models.
        models: only these ids (``slice(a, b)``, ``(a, b)`` or ``"a:b"``); default all.
        with_buffers: also return the stacked buffers.

    Returns:
        ``(params, model_ids)``: ``{name: [M, ...]}`` (parameters only) and the ``[M]`` ids.
        With ``with_buffers=True``, ``(params, buffers, model_ids)``: ``buffers`` is
        ``{name: [M, ...]}`` keyed by the plain buffer names (e.g. ``bn.running_mean``,
        ``bn.num_batches_tracked``) for blocks trained by the sequential path, and ``{}`` for
        blocks trained by the stacked path (their buffers are the model's own, unchanged).
        ``{**params, **buffers}`` of one model is a full state dict for ``functional_call``;
        pass ``buffers`` to :func:`evaluate_stacked`.

    Raises:
        CorruptBlockError: a block fails its checksums or has none (the message names the file,
            the tensor key and how to rebuild the block).
        FileNotFoundError: if blocks are missing (the message names the missing id ranges and
            the ``retrain`` call that builds them).
    """
    _check_kind(kind)
    blocks, start, stop, _ = _needed_blocks(Path(out_dir) / kind, kind, models)
    parts: dict[str, list[Tensor]] = {}
    names = None
    for _, path in blocks:
        tensors, _ = read_block(path)
        if names is None:
            names = set(tensors)
        elif set(tensors) != names:
            raise ValueError(f"{path} holds other tensors than the first block "
                             f"(differs in {sorted(set(tensors) ^ names)}).")
        for name, tensor in tensors.items():
            if name not in (_STREAMS_KEY, _SUBSETS_KEY):
                parts.setdefault(name, []).append(tensor)
    stacked = {name: torch.cat(ts) for name, ts in parts.items()}
    ids = stacked.pop(_IDS_KEY)
    keep = (ids >= start) & (ids < stop)
    params = {n: t[keep] for n, t in stacked.items() if not n.startswith(_BUFFER_PREFIX)}
    if not with_buffers:
        return params, ids[keep]
    buffers = {n[len(_BUFFER_PREFIX):]: t[keep] for n, t in stacked.items()
               if n.startswith(_BUFFER_PREFIX)}
    return params, buffers, ids[keep]


def load_subsets(
    out_dir: str | os.PathLike[str], kind: str, models: ModelRange | None = None
) -> tuple[Tensor, Tensor]:
    """The training subsets stored with the blocks of ``out_dir/kind``.

    Args:
        out_dir: root folder of the build.
        kind: the kind of models.
        models: only these ids; default all.

    Returns:
        ``(masks, model_ids)``: a ``[M, n_train]`` boolean mask and the ``[M]`` ids.

    Raises:
        CorruptBlockError: the ids or subsets of a block fail their checksums (or the block
            has none); see :func:`load_stacked`.
    """
    _check_kind(kind)
    blocks, start, stop, meta = _needed_blocks(Path(out_dir) / kind, kind, models)
    n_train = int(meta["n_train"])
    masks, ids = [], []
    for _, path in blocks:
        tensors, _ = read_block(path, (_IDS_KEY, _SUBSETS_KEY))
        block_ids, subsets = tensors[_IDS_KEY], tensors[_SUBSETS_KEY].long()
        mask = torch.zeros(block_ids.numel(), n_train, dtype=torch.bool)
        mask.scatter_(1, subsets, True)
        masks.append(mask)
        ids.append(block_ids)
    all_ids, all_masks = torch.cat(ids), torch.cat(masks)
    keep = (all_ids >= start) & (all_ids < stop)
    return all_masks[keep], all_ids[keep]


def retrain_lds(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    num_models: int = 100,
    fraction: float = 0.5,
    seed: int = 0,
    kind: str = "lds",
    models: ModelRange | None = None,
    shard: tuple[int, int] | None = None,
    block_size: int = 10,
    progress: bool = True,
    **train_kwargs: Any,
) -> RetrainResult:
    """Train the LDS ground-truth models: one per :func:`lds_subsets` subset.

    Each model has its own random stream (initialization with ``init="seeded"``, the default,
    and batch order), as independently retrained models should.

    Args:
        out_dir: root folder of the build; blocks go to ``out_dir/kind``.
        model: the architecture.
        loss_fn: ``loss_fn(params, xb, yb) -> scalar``.
        x: training inputs.
        y: training targets.
        epochs: passes over each subset.
        batch_size: mini-batch size.
        lr: learning rate.
        num_models: number of subsets/models.
        fraction: subset size as a fraction of the training set.
        seed: seed of the subsets and of training.
        kind: folder name.
        models: restrict to the blocks covering these ids (see :func:`retrain`).
        shard: ``(i, n)`` block sharding (see :func:`retrain`).
        block_size: models per block.
        progress: show a progress bar.
        **train_kwargs: further :class:`RetrainBuild` fields (``momentum``, ``weight_decay``,
            ``optimizer``, ``betas``, ``eps``, ``init``, ``strategy``).

    Returns:
        The :class:`RetrainResult`.
    """
    masks = lds_subsets(x.shape[0], num_models, fraction, seed)
    build = RetrainBuild(model=model, loss_fn=loss_fn, x=x, y=y, masks=masks, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, **train_kwargs)
    return retrain(kind, out_dir, build, models=models, shard=shard, block_size=block_size,
                   progress=progress)


def retrain_loo(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    indices: Sequence[int] | Tensor | None = None,
    num_full: int = 1,
    common_randomness: bool = True,
    seed: int = 0,
    kind: str = "loo",
    models: ModelRange | None = None,
    shard: tuple[int, int] | None = None,
    block_size: int = 10,
    progress: bool = True,
    **train_kwargs: Any,
) -> dict[str, RetrainResult]:
    """Train the leave-one-out models and the full-data reference model(s).

    Kind ``kind`` holds model ``r`` trained without example ``indices[r]``; kind
    ``f"{kind}-full"`` holds ``num_full`` models trained on all examples (a separate kind
    because a stack needs equal subset sizes). With ``common_randomness`` (the default) every
    LOO model and the first full model share one random stream: the same initialization and
    the same batch order up to the removed example, so ``full - loo[r]`` isolates the effect
    of example ``indices[r]`` rather than seed noise (dropout masks still differ per stack).
    Further full models use streams ``1..num_full-1`` and show the seed-to-seed variation.

    Args:
        out_dir: root folder of the build.
        model: the architecture.
        loss_fn: ``loss_fn(params, xb, yb) -> scalar``.
        x: training inputs.
        y: training targets.
        epochs: passes over each subset.
        batch_size: mini-batch size.
        lr: learning rate.
        indices: the left-out examples (default: all).
        num_full: number of full-data models (0 for none).
        common_randomness: share one random stream between all LOO models and the first full
            model; otherwise LOO model ``r`` uses stream ``num_full + r``.
        seed: training seed.
        kind: folder name of the LOO models.
        models: restrict the LOO models to the blocks covering these ids.
        shard: ``(i, n)`` block sharding, applied to both kinds (the full models are block 0
            of their kind, so shard 0 trains them).
        block_size: models per block.
        progress: show progress bars.
        **train_kwargs: further :class:`RetrainBuild` fields.

    Returns:
        ``{kind: result, f"{kind}-full": result}`` (the latter only if ``num_full > 0``).
    """
    masks = loo_subsets(x.shape[0], indices)
    num = masks.shape[0]
    streams = [0] * num if common_randomness else [num_full + r for r in range(num)]
    common = dict(model=model, loss_fn=loss_fn, x=x, y=y, epochs=epochs, batch_size=batch_size,
                  lr=lr, seed=seed, **train_kwargs)
    results = {}
    if num_full > 0:
        full = RetrainBuild(masks=torch.ones(num_full, x.shape[0], dtype=torch.bool),
                            stream_ids=list(range(num_full)), **common)
        results[f"{kind}-full"] = retrain(f"{kind}-full", out_dir, full, shard=shard,
                                          block_size=block_size, progress=progress)
    build = RetrainBuild(masks=masks, stream_ids=streams, **common)
    results[kind] = retrain(kind, out_dir, build, models=models, shard=shard,
                            block_size=block_size, progress=progress)
    return results
