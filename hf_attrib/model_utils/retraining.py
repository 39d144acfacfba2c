"""Ground-truth retraining: the resumable, shardable drivers.

The LOO and LDS metrics (dattri paper, Section 3.3 and Appendix B) compare attribution scores
with models *retrained* on subsets of the training data: one model per left-out example for
LOO (5,000 per MNIST setting in the paper) and 100 models on random half subsets for LDS
(the first 50 for ensembling methods, the last 50 as ground truth). This module builds them,
from three parts that each have their own module:

* :mod:`~hf_attrib.model_utils.subsets`: the training subsets as boolean masks
  (:func:`lds_subsets`, :func:`loo_subsets`; row ``j`` of :func:`lds_subsets` depends only on
  ``(seed, j)``) and each model's batch order (:func:`batch_orders`);
* :mod:`~hf_attrib.model_utils.stacked_training`: :func:`train_stacked` trains a stack of
  models at once (``vmap`` over ``grad``, or a sequential loop for BatchNorm models) and
  :func:`evaluate_stacked` evaluates them;
* :mod:`~hf_attrib.model_utils.block_store`: the block files, their checksums and readers
  (:func:`load_stacked`, :func:`load_subsets`, :func:`read_block`,
  :class:`CorruptBlockError`).

Here, :func:`retrain` is the driver: models are grouped in fixed blocks of ``block_size``
consecutive ids, each finished block is written atomically to
``out_dir/{kind}/block-{b:05d}.safetensors``, finished blocks are skipped on rerun and
``shard=(i, n)`` splits the blocks between ``n`` uncoordinated processes. A block is always
trained with the same composition, so an interrupted and resumed build is bitwise identical to
an uninterrupted one (same machine, software and thread count; on GPU also
``torch.use_deterministic_algorithms(True)``). Blocks are checked on rerun: one that fails its
checksums, or an older block without them, is retrained with a warning, never used; one built
from another configuration is an error. :func:`retrain_lds` and :func:`retrain_loo` are the two
ground truths. Every name that used to live here is still importable from here.

Example (LDS ground truth for a logistic regression)::

    def loss_fn(params, x, y):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    retrain_lds("gt", model, loss_fn, x_train, y_train, epochs=20, batch_size=64, lr=0.01,
                momentum=0.9, shard=(0, 4))          # this process: every 4th block
    params, ids = load_stacked("gt", "lds")          # {name: [100, ...]}, [100]
    # margin_fn(params, xb, yb) -> [b]: e.g. logit_y - logsumexp(other logits)
    values = evaluate_stacked(model, params, x_test, y_test, margin_fn)   # [100, n_test]

With BatchNorm (e.g. ResNet-9) the same calls train sequentially (see :func:`train_stacked`);
those blocks also store the trained buffers (keys ``__buffer__.{name}``). Load and evaluate
with the buffers (``margin_fn`` must pass the whole mapping it receives to
``functional_call``)::

    params, buffers, ids = load_stacked("gt", "lds", with_buffers=True)
    values = evaluate_stacked(model, params, x_test, y_test, margin_fn, buffers=buffers)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hf_attrib.model_utils.block_store import (
    BLOCK_FORMAT,
    MODEL_IDS_KEY,
    STREAM_IDS_KEY,
    SUBSET_INDICES_KEY,
    CorruptBlockError,
    ModelRange,
    block_ids,
    block_metadata,
    block_path,
    check_kind,
    load_stacked,
    load_subsets,
    read_block,
    remove_stale_temps,
    select_blocks,
    subset_indices,
    tensor_bytes,
    write_block,
)
from hf_attrib.model_utils.stacked_training import (
    ExampleLossFn,
    LossFn,
    check_strategy,
    evaluate_stacked,
    resolve_strategy,
    train_stacked,
)
from hf_attrib.model_utils.subsets import (
    as_ids,
    batch_orders,
    check_masks,
    lds_subsets,
    loo_subsets,
    subset_size,
)

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
        example_loss_fn: per-example losses whose mean is ``loss_fn``: lets stacks of models
            sharing one stream (leave-one-out blocks) train on shared windows (a 250-model
            MNIST-LR block: 22 s instead of 37 s on 2 CPU cores; see :func:`train_stacked`).
            Not part of the fingerprint: the models are the same up to float rounding.
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
    example_loss_fn: ExampleLossFn | None = None

    def __post_init__(self) -> None:
        check_strategy(self.strategy)
        self.masks = check_masks(self.masks, self.x.shape[0])
        self.stream_ids = as_ids(self.stream_ids, self.masks.shape[0], "stream_ids")

    def resolve_strategy(self) -> str:
        """``"stacked"`` or ``"sequential"``: the path :func:`train_stacked` takes for this
        build (``"auto"`` probes the model once; see :func:`train_stacked`)."""
        return resolve_strategy(self.model, self.loss_fn, self.x, self.y, self.strategy)

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
            h.update(tensor_bytes(t))
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
    ids = block_ids(block, block_size, build.num_models)
    if not wrong:
        got_ids = tensors[MODEL_IDS_KEY].tolist()
        got_streams = tensors[STREAM_IDS_KEY].tolist()
        got_subsets = tensors[SUBSET_INDICES_KEY].long()
        if got_ids != ids:
            wrong["model_ids"] = (got_ids, ids)
        elif got_streams != [build.stream_ids[i] for i in ids]:
            wrong["stream_ids"] = (got_streams, [build.stream_ids[i] for i in ids])
        elif not torch.equal(got_subsets, subset_indices(build.masks[ids])):
            wrong["subset_indices"] = ("on disk", "differ from build.masks")
    if wrong:
        _raise_mismatch(path, wrong)


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
    stacked parameters (keys = parameter names), the model ids, stream ids and subsets
    (``__model_ids__``, ``__stream_ids__``, and ``__left_out__`` for LOO blocks or the
    bit-packed ``__subset_mask__``; see :mod:`.block_store`) and the configuration
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
    check_kind(kind)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    directory = Path(out_dir) / kind
    directory.mkdir(parents=True, exist_ok=True)
    blocks = select_blocks(build.num_models, block_size, models, shard)
    strategy = build.resolve_strategy()
    fingerprint = build.fingerprint(strategy)
    result = RetrainResult(kind=kind, directory=directory)
    todo = []
    for block in blocks:
        path = block_path(directory, block)
        if not path.exists():
            todo.append(block)
        elif _usable_block(path, build, fingerprint, block, block_size):
            result.skipped.append(block)
        else:
            result.repaired.append(block)
            todo.append(block)
    metadata = {
        "format": BLOCK_FORMAT, "kind": kind, "block_size": str(block_size),
        "num_models": str(build.num_models), "n_train": str(build.masks.shape[1]),
        "fingerprint": fingerprint, "strategy": strategy,
        "recipe": json.dumps({k: list(v) if isinstance(v, tuple) else v
                              for k, v in build.train_kwargs().items()}),
    }
    for block in todo:  # fail before hours of training, not in the middle
        ids = block_ids(block, block_size, build.num_models)
        subset_size(build.masks[ids], ids)
    total = sum(len(block_ids(b, block_size, build.num_models)) for b in todo)
    with tqdm(total=total, desc=f"retrain {kind}", unit="model", disable=not progress) as bar:
        bar.set_postfix(skipped_blocks=len(result.skipped), blocks=len(todo))
        for block in todo:
            ids = block_ids(block, block_size, build.num_models)
            streams = [build.stream_ids[i] for i in ids]
            remove_stale_temps(directory, block)
            params, buffers = train_stacked(
                build.model, build.loss_fn, build.x, build.y, build.masks[ids],
                model_ids=ids, stream_ids=streams, **build.train_kwargs(),
                strategy=strategy, return_buffers=True, example_loss_fn=build.example_loss_fn,
            )
            write_block(block_path(directory, block), params, ids, streams,
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
            wrong = _config_mismatch(block_metadata(path), build, fingerprint, block,
                                     block_size)
            if wrong:
                _raise_mismatch(path, wrong)
        ids = block_ids(block, block_size, build.num_models)
        warnings.warn(f"{err.problem} Retraining block {block} (models {ids[0]}..{ids[-1]}); "
                      "the new block replaces the file once it is written.", stacklevel=3)
        return False
    _verify_block(path, build, fingerprint, block, block_size, tensors, meta)
    return True


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
