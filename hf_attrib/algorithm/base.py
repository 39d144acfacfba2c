"""The loop every attributor shares: checkpoints x train batches x test batches.

Most methods score a pair (train ``i``, test ``j``) as a weighted sum over checkpoints ``c`` of
an inner product of two feature vectors,

    score[i, j] = r_i * sum_c w_c <u_c(x_i), T_c(v_c(x_j))>,

where ``u`` is a *train feature* (a loss gradient, perhaps projected), ``v`` a *test feature*
(a target gradient, perhaps projected), ``T_c`` a per-checkpoint transform built in ``cache``
(an inverse Hessian, TRAK's kernel inverse, the identity) and ``r_i`` an optional per-example
factor (TRAK's ``Q``). ``FeatureAttributor`` implements that loop once, with bounded memory:
features are computed ``grad_chunk_size`` examples at a time and projected right away, the
train side is kept in memory only when it fits ``max_cache_bytes``, and scores are filled in
``[train batch, all test]`` blocks.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hf_attrib.algorithm.cache_store import (
    CacheIntegrityError,
    CacheReader,
    describe_differences,
    jsonable,
    read_cache,
    weights_fingerprint,
    write_cache,
)
from hf_attrib.algorithm.factored import FactoredFeatures, factored_options
from hf_attrib.distributed import all_reduce_sum, gather_rows, rank_and_world, shard_range
from hf_attrib.func.projection import Projector, make_projector, projector_options
from hf_attrib.func.utils import batch_size_of, describe_batch, slice_batch
from hf_attrib.loaders import check_loader, count_examples, loader_fingerprint, loader_indices
from hf_attrib.task import AttributionTask, CheckpointFunctions

# check_loader, count_examples, loader_indices: at home in hf_attrib.loaders, re-exported here
# (their former home).
__all__ = [
    "Attributor",
    "BaseAttributor",
    "FeatureAttributor",
    "check_loader",
    "count_examples",
    "loader_indices",
    "to_device",
]

# Per-example gradients held at once before projection: chunk * d floats stay under this.
_GRAD_CHUNK_BYTES = 256 * 2**20
# A sha256 in hex (the manifest's train_fingerprint).
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Training examples whose self-influence is solved together (train + test features, float32).
_SELF_GROUP_BYTES = 256 * 2**20


@dataclass
class _Pass:
    """Examples one pass over a loader yielded (all processes' batches, set at its end)."""

    rows: int = 0


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class BaseAttributor(ABC):
    """The public surface of every attributor.

    Every constructor argument after ``task`` is keyword-only, in every attributor (subclasses
    pass their base's options on by keyword).

    Args:
        task: the attribution task.
        layer_name: parameter or module names to attribute through (``None``: all).
        device: where the computation runs (the model is moved there). ``None``: the device
            of the model's parameters (``task.model_device()``).
        grad_chunk_size: examples per vectorised per-example-gradient call (``None``: chosen
            so that one chunk of gradients takes at most 256 MiB).
        progress: show tqdm progress bars.
        distributed: share the work between the processes of the ``torch.distributed``
            process group (``accelerate launch`` / ``torchrun``; see ``hf_attrib.distributed``)
            and gather the results on every process. ``None``: whenever a group of more than
            one process is initialised. Every process must build the same task and loaders
            (unshuffled, without a DistributedSampler): batches are dealt out round-robin.
    """

    def __init__(
        self,
        task: AttributionTask,
        *,
        layer_name: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
        grad_chunk_size: int | None = None,
        progress: bool = False,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(task, AttributionTask):
            raise TypeError("task must be an hf_attrib.task.AttributionTask.")
        self.task = task
        self.layer_name = layer_name
        self.device = task.model_device() if device is None else torch.device(device)
        self.grad_chunk_size = grad_chunk_size
        self.distributed = distributed
        self.progress = progress
        task.to(self.device)
        task.select_parameters(layer_name)  # fail early on an unknown layer name
        # Training examples of a cache restored by load_cache, until a train loader is bound
        # to it (see _check_loaded_count); None when no loaded cache waits for one.
        self._loaded_n: int | None = None
        self._loaded_from: Path | None = None
        # The loaded cache's training-set fingerprint (loaders.loader_fingerprint's sha256).
        self._loaded_fingerprint: str | None = None
        self._cache_loader: DataLoader | None = None  # the loader cache() was given

    # -- public API ------------------------------------------------------------------------
    @abstractmethod
    def cache(self, train_loader: DataLoader) -> None:
        """Pre-compute what depends only on the training data (Hessians, kernels, features)."""

    @abstractmethod
    def attribute(self, train_loader: DataLoader, test_loader: DataLoader) -> Tensor:
        """Scores ``[n_train, n_test]``: how much each training example raises the target."""

    @abstractmethod
    def self_attribute(self, train_loader: DataLoader) -> Tensor:
        """Self-influence ``[n_train]``: each training example's score on its own target."""

    # -- helpers ---------------------------------------------------------------------------
    def _batches(self, loader: DataLoader, role: str, desc: str | None = None,
                 shard: bool = False, count: _Pass | None = None,
                 expected: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(offset, batch_on_device)`` in loader order.

        With ``shard``, only this process's batches (``i % world == rank``); the others are
        still read (their sizes give the offsets) but not moved or differentiated. At the end
        of the pass the examples read are stored in ``count`` and checked against
        ``expected`` (the count the results were sized for).
        """
        check_loader(loader, role)
        rank, world = self._world() if shard else (0, 1)
        offset = 0
        bar = tqdm(loader, desc=desc or role, disable=not self.progress, leave=False)
        for i, batch in enumerate(bar):
            size = batch_size_of(batch)
            if expected is not None and offset + size > expected:
                _changed_pass(role, f"more than {expected}", expected)
            if i % world == rank:
                yield offset, to_device(batch, self.device)
            offset += size
        if offset == 0:
            raise ValueError(f"the {role} loader yielded no examples.")
        if expected is not None and offset != expected:
            _changed_pass(role, str(offset), expected)
        if count is not None:
            count.rows = offset

    @staticmethod
    def _batch_error(role: str, offset: int, batch: Any, func: str,
                     err: Exception) -> ValueError:
        """The error to raise (``from err``) when ``func`` fails on a batch of the ``role``
        loader: it names the loader, the batch and its structure.

        Callers catch only around the call (free when nothing is raised), so the happy path
        pays nothing.
        """
        where = "first batch" if offset == 0 else f"batch starting at example {offset}"
        like = ", as the train loader's do" if role in ("test", "query") else ""
        return ValueError(
            f"the {role} loader's {where} (structure: {describe_batch(batch)}) does not fit "
            f"{func}, which raised {type(err).__name__}: {err}. Give the {role} loader batches "
            f"of the structure {func} unpacks{like} (e.g. the same collate_fn / columns)."
        )

    def _world(self) -> tuple[int, int]:
        """``(rank, world_size)`` this attributor shares work over (``(0, 1)``: alone)."""
        return (0, 1) if self.distributed is False else rank_and_world()

    def _chunk(self, dim: int) -> int:
        if self.grad_chunk_size is not None:
            return self.grad_chunk_size
        return max(1, _GRAD_CHUNK_BYTES // (4 * max(dim, 1)))

    # -- persistent caches ---------------------------------------------------------------------
    def save_cache(self, path: str | PathLike) -> Path:
        """Write what ``cache`` computed to the folder ``path`` (safetensors + ``cache.json``).

        ``load_cache(path)`` on an attributor of the same method, options, layers and
        checkpoint weights (in another process too) restores it, so that ``attribute`` and
        ``self_attribute`` do not recompute the training set. The write is atomic: an earlier
        cache at ``path`` is replaced only once the new one is complete. The format is
        described in ``hf_attrib.algorithm.cache_store``. With several processes, rank 0
        writes and the others wait for it (and raise if it failed).

        The manifest records a fingerprint of the training set (``loaders.loader_fingerprint``:
        a sha256 over every batch of the train loader, in order), computed here with one pass
        over the loader given to ``cache`` (data loading only, no model call).

        Args:
            path: the cache folder (created; if it exists it must be an hf_attrib cache,
                which is replaced, or empty).

        Returns:
            The folder's path.

        Raises:
            ValueError: nothing is cached yet (call ``cache(train_loader)`` first),
                ``path`` exists and holds something else, or the train loader given to
                ``cache`` now yields another number of examples.
            OSError: (other processes) rank 0 failed to write the cache.
        """
        tensors, manifest = self._cache_contents()
        manifest = {**manifest, "identity": self._cache_identity()}
        path = Path(path)
        rank, world = self._world()
        if world == 1:
            return write_cache(path, tensors, self._with_fingerprint(manifest))
        written = torch.zeros(1, device=self.device)
        try:
            if rank == 0:
                write_cache(path, tensors, self._with_fingerprint(manifest))
                written += 1
        finally:  # reached by rank 0 even when its write fails: nobody waits forever
            # rank 0's outcome, not the folder's state, decides (an earlier cache may be there)
            written = all_reduce_sum(written)
        if rank != 0 and float(written) != 1:
            raise OSError(f"rank 0 did not write the cache to {path} (see its error).")
        return path

    def _with_fingerprint(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """``manifest`` with the training set's fingerprint (see ``save_cache``)."""
        if self._cache_loader is None:  # restored by load_cache, no train loader bound yet
            if self._loaded_fingerprint is None:
                raise ValueError(f"{type(self).__name__} has nothing cached to save: call "
                                 "cache(train_loader) (or attribute) first.")
            return {**manifest, "train_fingerprint": self._loaded_fingerprint}
        # Computed at every save, never remembered: the loader's data may have changed since
        # an earlier save, and a stale fingerprint would vouch for the wrong rows.
        count, sha = loader_fingerprint(self._cache_loader)
        if count != manifest.get("num_train"):
            _changed_pass("train", str(count), manifest.get("num_train"))
        return {**manifest, "train_fingerprint": sha}

    def load_cache(self, path: str | PathLike) -> None:
        """Restore a cache written by ``save_cache``, instead of calling ``cache``.

        Every file is checked against the sha256 in ``cache.json``, and the cache against this
        attributor: its method, the options that change the cached results (projection and its
        seed, regularisation baked into a kernel inverse, ...), the selected parameters and
        their shapes, a sha256 of every checkpoint's weights, and the task's kind and target
        (tasks of ``hf_attrib.integrations``). The next ``attribute`` or ``self_attribute``
        call takes its train loader as the cached training set when it yields the very
        batches the cache was built on (same fingerprint: ``loaders.loader_fingerprint``, one
        pass loading the data), and computes no training gradient for it. Checkpoints whose
        features were not kept (``max_cache_bytes``, at save or here) have them recomputed when
        used, as after ``cache``.

        Args:
            path: a folder written by ``save_cache``.

        Raises:
            FileNotFoundError: no cache folder at ``path``.
            CacheIntegrityError: (a ``ValueError``) a file is corrupted, edited, missing or
                outside the folder.
            ValueError: the cache was built for another method, options, layers or weights
                (the message says what differs). A train loader other than the cache's is
                refused by the next ``attribute``/``self_attribute`` (``ValueError``).
        """
        reader = read_cache(path)
        differences = describe_differences(reader.manifest.get("identity") or {},
                                           self._cache_identity())
        if differences:
            raise ValueError(
                f"the cache in {path} was not built for this attributor; it differs in "
                + "; ".join(differences) + ". Re-run cache(train_loader) with this attributor "
                "(and save_cache to replace the folder).")
        n = reader.manifest.get("num_train")
        if type(n) is not int or n <= 0:
            raise CacheIntegrityError(f"cache.json in {path} has no valid num_train; rebuild "
                                      "the cache with cache(train_loader) and save_cache.")
        fingerprint = reader.manifest.get("train_fingerprint")
        if not isinstance(fingerprint, str) or not _HEX64.fullmatch(fingerprint):
            raise CacheIntegrityError(
                f"cache.json in {path} has no valid train_fingerprint (the sha256 of the "
                "training set it was built on; caches written before hf_attrib recorded it "
                "lack it), so the train loader cannot be checked against it: rebuild the cache "
                "with cache(train_loader) and save_cache.")
        self._loaded_n = None
        self._restore_cache(reader)
        self._loaded_n, self._loaded_from = n, reader.path
        self._loaded_fingerprint = fingerprint

    def cache_identity(self) -> dict[str, Any]:
        """What a saved cache or index (``hf_attrib.index``) must match to be used by this
        attributor, as JSON data: method, options, selected parameters, a sha256 of each
        checkpoint's weights, projectors (compare with ``cache_store.describe_differences``)."""
        return self._cache_identity()

    def _cache_identity(self) -> dict[str, Any]:
        """What a saved cache must match to be used here, as JSON data (see
        ``cache_store.describe_differences``). Loads every checkpoint once to fingerprint it."""
        fingerprints = [weights_fingerprint(self.task.load_checkpoint(c))
                        for c in range(self.task.num_checkpoints)]
        params = dict(self.task.model.named_parameters())
        selected = [[n, list(params[n].shape), str(params[n].dtype).removeprefix("torch.")]
                    for n in self.task.select_parameters(self.layer_name)]
        return jsonable({
            "method": type(self).__name__,
            "parameters": selected,
            "options": {**self._cache_options(), **self._task_options()},
            "num_checkpoints": self.task.num_checkpoints,
            "weights_sha256": fingerprints,
            "projectors": self._projector_descriptions(),
        })

    def _cache_options(self) -> dict[str, Any]:
        """Options that change what ``cache`` computes: a saved cache whose options differ is
        refused by ``load_cache``. Options applied only when scoring are left out."""
        return {}

    def _task_options(self) -> dict[str, Any]:
        """The task's own options that change its loss and target, where it has them (an
        ``integrations`` task: its kind, e.g. ``causal-lm``, and ``target``); a plain
        ``AttributionTask``'s functions are the user's and cannot be fingerprinted."""
        kind = getattr(self.task, "task_kind", None)
        if kind is None:
            return {}
        return {"task_kind": kind,
                "task_target": "loss" if self.task.target_is_loss else "default"}

    def _projector_descriptions(self) -> list[Any] | None:
        """The resolved projection of each checkpoint (``None``: nothing to compare)."""
        return None

    def _cache_contents(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(named tensors, manifest entries)`` of what ``cache`` computed; the manifest
        holds ``num_train``."""
        raise NotImplementedError(f"{type(self).__name__} does not support save_cache.")

    def _restore_cache(self, reader: CacheReader) -> None:
        """Take the state written by ``_cache_contents`` back from a verified cache."""
        raise NotImplementedError(f"{type(self).__name__} does not support load_cache.")

    def _check_loaded_count(self, loader: DataLoader) -> None:
        """Refuse a train loader that is not the loaded cache's training set: another number
        of examples, or other batches (``loaders.loader_fingerprint``: other data, order or
        batching), whose rows the cached features would silently be credited to."""
        check_loader(loader, "train")
        got, sha = loader_fingerprint(loader)
        if got != self._loaded_n:
            raise ValueError(
                f"the train loader yields {got} examples, but the cache loaded from "
                f"{self._loaded_from} was built on {self._loaded_n}: pass the training loader "
                "the cache was built with, or call cache(train_loader) to build a new one.")
        if sha != self._loaded_fingerprint:
            raise ValueError(
                f"the train loader's batches differ from those the cache loaded from "
                f"{self._loaded_from} was built on (training-set sha256 {sha[:12]}..., the "
                f"cache's {str(self._loaded_fingerprint)[:12]}...): other examples, the same in "
                "another order, or another batching; the cached features would be credited to "
                "the wrong rows. Pass the training loader the cache was built with (same data, "
                "order, batch_size and collate_fn), or call cache(train_loader) to build a new "
                "one.")


#: The type every attributor is (``cache``, ``attribute``, ``self_attribute``).
Attributor = BaseAttributor


def _changed_pass(role: str, got: str, expected: int) -> None:
    raise ValueError(
        f"the {role} loader yielded {got} examples on this pass but {expected} when it was "
        "counted: it must yield the same examples on every pass (a deterministic sampler, a "
        "collate_fn that keeps one row per dataset index, no random filtering in the dataset)."
    )


def _check_finite(grads: Tensor, offset: int, role: str, ckpt: int) -> None:
    # A NaN or inf anywhere makes the sum non-finite; one reduction is much cheaper than an
    # elementwise test of every gradient entry. A non-finite sum of finite values (overflow)
    # falls through to the exact test, which then finds nothing.
    if bool(torch.isfinite(grads.sum())):
        return
    bad = ~torch.isfinite(grads).all(dim=1)
    if bool(bad.any()):
        first = offset + int(bad.nonzero()[0, 0])
        raise FloatingPointError(
            f"non-finite (NaN/inf) gradient for {role} example {first} (its position in the "
            f"{role} loader), checkpoint {ckpt}; {int(bad.sum())} example(s) in that batch are "
            "affected. Check the loss on that example (log of zero, overflow) and the "
            "checkpoint's weights."
        )


class FeatureAttributor(BaseAttributor):
    """Attributors whose score is an inner product of per-checkpoint features (see module).

    Subclasses set ``train_kind``/``test_kind`` (``"loss"`` or ``"target"``: which gradient
    each side uses) and may override ``_prepare``, ``_transform_test``, ``_weight``,
    ``_row_factor`` and ``_gradient_transform``.

    Args:
        projector_kwargs: random projection of the gradients (``proj_dim``, ``proj_type``,
            ``proj_seed``, ...), or ``None`` for none. The projection of checkpoint ``c`` uses
            ``ensemble_id=c``.
        max_cache_bytes: keep the training features (all checkpoints together) in memory while
            they fit in this many bytes; a checkpoint whose features do not fit has them
            recomputed block by block when needed.
    """

    train_kind = "loss"
    test_kind = "target"
    # Whether features may come from the per-layer engine's factored projection: true where
    # the score is an inner product in feature space (TRAK, TracIn), not where a Hessian in
    # parameter space is applied to full gradients (IF).
    supports_factored = False
    # Whether features are unit-normalised gradients (Grad-Cos); the factored path divides by
    # the exact gradient norms, which it computes from the layer factors.
    normalizes_gradients = False
    # Whether ``_transform_test`` is an expensive per-row solve (CG, LiSSA) whose rows are
    # worth sharing between processes; a matrix product is cheaper to repeat than to gather.
    shard_solves = False

    def __init__(
        self,
        task: AttributionTask,
        *,
        layer_name: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
        projector_kwargs: dict[str, Any] | None = None,
        grad_chunk_size: int | None = None,
        max_cache_bytes: int = 4 * 2**30,
        progress: bool = False,
        distributed: bool | None = None,
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device,
                         grad_chunk_size=grad_chunk_size, progress=progress,
                         distributed=distributed)
        self.projector_kwargs = dict(projector_kwargs) if projector_kwargs else None
        self._factored_options = factored_options(self.projector_kwargs)
        if self._factored_options is None:
            projector_options(self.projector_kwargs)  # impossible options fail here, not later
        elif not self.supports_factored:
            raise ValueError(
                f"{type(self).__name__} computes with full-dimensional gradients (its curvature "
                "lives in parameter space), so proj_type='factored' does not apply; it is for "
                "TRAK, TracInCP, Grad-Dot and Grad-Cos.")
        self._factored: FactoredFeatures | None = None
        self.max_cache_bytes = max_cache_bytes
        self._projectors: dict[int, Projector] = {}
        self._cache_loader: DataLoader | None = None
        self._hessian_loader: DataLoader | None = None
        self._train_cache: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._states: dict[int, Any] = {}
        self._n_cache: int = 0
        self._rebuild: list[int] = []  # checkpoints whose state load_cache left to _prepare

    # -- hooks -------------------------------------------------------------------------------
    def _gradient_transform(self, grads: Tensor) -> Tensor:
        """Applied to raw gradients before projection (e.g. normalisation for Grad-Cos)."""
        return grads

    def _prepare(self, fns: CheckpointFunctions, loader: DataLoader,
                 features: Tensor | None) -> Any:
        """Per-checkpoint state built in ``cache`` (Hessian operator, kernel inverse...)."""
        return None

    def _transform_test(self, fns: CheckpointFunctions, state: Any, feats: Tensor) -> Tensor:
        """Map test features ``[m, p]`` through the checkpoint's transform."""
        return feats

    def _weight(self, fns: CheckpointFunctions) -> float:
        """Weight ``w_c`` of checkpoint ``c`` in the sum."""
        return 1.0 / self.task.num_checkpoints

    def _row_factor(self, fns: CheckpointFunctions, batch: Any) -> Tensor | None:
        """Optional per-training-example factor ``[B]`` (averaged over checkpoints)."""
        return None

    # -- features ----------------------------------------------------------------------------
    def _factored_features(self, fns: CheckpointFunctions) -> FactoredFeatures | None:
        """The per-layer engine with its factored projection, when the options ask for it."""
        if self._factored_options is None:
            return None
        if self._factored is None:
            self._factored = FactoredFeatures(self.task, fns, self._factored_options,
                                              self.device)
        return self._factored

    def _projector(self, fns: CheckpointFunctions) -> Projector:
        if fns.index not in self._projectors:
            options = projector_options(self.projector_kwargs)
            self._projectors[fns.index] = make_projector(fns.dim, device=self.device, **options)
        return self._projectors[fns.index]

    def _features(self, fns: CheckpointFunctions, batch: Any, kind: str, offset: int,
                  role: str) -> Tensor:
        """Projected per-example gradients ``[B, p]``, computed chunk by chunk."""
        factored = self._factored_features(fns)
        if factored is not None:
            return self._engine_features(factored, fns, batch, kind, offset, role)
        grad_fn = fns.loss_grads if kind == "loss" else fns.target_grads
        projector = self._projector(fns)
        size = batch_size_of(batch)
        chunk = self._chunk(fns.dim)
        out = []
        for start in range(0, size, chunk):
            try:
                grads = grad_fn(slice_batch(batch, start, start + chunk))
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError is 2.5+ only
                raise
            except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as err:
                func = ("loss_func" if kind == "loss" or fns.target_is_loss
                        else "target_func")
                raise self._batch_error(role, offset, batch, func, err) from err
            _check_finite(grads, offset + start, role, fns.index)
            out.append(projector(self._gradient_transform(grads), ensemble_id=fns.index))
        return torch.cat(out)

    def _engine_features(self, factored: FactoredFeatures, fns: CheckpointFunctions,
                         batch: Any, kind: str, offset: int, role: str) -> Tensor:
        """Factored features of a whole batch from one forward/backward with layer hooks."""
        try:
            feats = factored(fns, batch, kind, normalize=self.normalizes_gradients)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, IndexError, KeyError, RuntimeError) as err:
            func = "loss_func" if kind == "loss" or fns.target_is_loss else "target_func"
            raise self._batch_error(role, offset, batch, func, err) from err
        _check_finite(feats, offset, role, fns.index)
        return feats

    def _batches(self, loader: DataLoader, role: str, desc: str | None = None,
                 shard: bool = False, count: _Pass | None = None,
                 expected: int | None = None) -> Iterator[tuple[int, Any]]:
        # Every pass over the training set of the cache (and of the Hessian) must yield the
        # examples it was counted with: results are sized, and IF's 1/n set, by that count.
        if expected is None and loader is self._hessian_loader:
            expected = self._n_cache
        return super()._batches(loader, role, desc, shard, count, expected)

    def _train_blocks(self, fns: CheckpointFunctions, loader: DataLoader, shard: bool = False,
                      count: _Pass | None = None
                      ) -> Iterator[tuple[int, Tensor, Tensor | None, Any]]:
        """``(offset, features, row_factor, batch)`` for the training loader, from the cache
        when ``loader`` is the cached one (``batch`` is then ``None``). With ``shard``, a
        computed (not cached) pass covers only this process's batches. ``count`` receives the
        examples of the whole pass."""
        if loader is self._cache_loader and fns.index in self._train_cache:
            feats, factors = self._train_cache[fns.index]
            step = 4096
            for start in range(0, feats.shape[0], step):
                rows = slice(start, start + step)
                yield start, feats[rows], None if factors is None else factors[rows], None
            if count is not None:
                count.rows = feats.shape[0]
            return
        desc = f"train features (ckpt {fns.index})"
        for offset, batch in self._batches(loader, "train", desc, shard=shard, count=count):
            feats = self._features(fns, batch, self.train_kind, offset, "train")
            yield offset, feats, self._row_factor(fns, batch), batch

    def _test_features(self, fns: CheckpointFunctions, loader: DataLoader) -> Tensor:
        offsets, blocks = [], []
        count = _Pass()
        batches = self._batches(loader, "test", f"test features (ckpt {fns.index})", shard=True,
                                count=count)
        for offset, batch in batches:
            blocks.append(self._features(fns, batch, self.test_kind, offset, "test"))
            offsets.append(offset)
        return self._gather_blocks(offsets, blocks, count.rows, self._width(fns))

    def _gather_blocks(self, offsets: list[int], blocks: list[Tensor], total: int,
                       width: int) -> Tensor:
        """Rows ``[B, width]`` computed by this process at ``offsets`` -> ``[total, width]``.

        A process may own no batch (fewer batches than processes): it still joins the
        collective, with zero rows.
        """
        if self._world()[1] == 1:
            return torch.cat(blocks)
        if not blocks:
            return gather_rows(torch.zeros(0, width, device=self.device),
                               torch.zeros(0, dtype=torch.long), total)
        index = torch.cat([torch.arange(o, o + b.shape[0])
                           for o, b in zip(offsets, blocks, strict=True)])
        return gather_rows(torch.cat(blocks), index, total)

    def _width(self, fns: CheckpointFunctions) -> int:
        """Size of one feature vector (the projection's output)."""
        factored = self._factored_features(fns)
        if factored is not None:
            return factored.width
        return self._projector(fns).proj_dim

    @property
    def _uses_row_factor(self) -> bool:
        """Whether ``_row_factor`` returns factors (decided up front so that every process
        makes the same collective calls)."""
        return False

    def _transform_rows(self, fns: CheckpointFunctions, state: Any, feats: Tensor) -> Tensor:
        """``_transform_test`` with its rows shared between processes when it is a solve."""
        rank, world = self._world()
        if world == 1 or not self.shard_solves:
            return self._transform_test(fns, state, feats)
        own = shard_range(feats.shape[0], rank, world)
        out = self._transform_test(fns, state, feats[own.start:own.stop])
        return gather_rows(out, torch.arange(own.start, own.stop), feats.shape[0])

    # -- the query side of a stored index (hf_attrib.index) -----------------------------------
    def state_from_kernel(self, checkpoint: int, kernel: Tensor | None) -> dict[str, Tensor]:
        """Set checkpoint ``checkpoint``'s query-time state from its training features' kernel
        ``Phi^T Phi`` (float64 ``[width, width]``, summed by the caller over the training set;
        ``None`` when ``needs_kernel`` is false) instead of a pass over a train loader, and
        return it as the named tensors ``save_cache`` stores (``{}``: no state)."""
        self._forget_training_set()
        fns = self.task.functions(checkpoint, self.layer_name)
        self._states[checkpoint] = state = self._state_from_kernel(fns, kernel)
        return {} if state is None else dict(self._state_tensors(checkpoint, state) or {})

    def restore_state(self, checkpoint: int, tensors: Mapping[str, Tensor]) -> None:
        """Set a checkpoint's query-time state from the tensors ``state_from_kernel`` returned."""
        self._forget_training_set()
        self._states[checkpoint] = (self._state_from_tensors(checkpoint, dict(tensors))
                                    if tensors else None)

    def _forget_training_set(self) -> None:
        """Unbind the training set ``cache`` or ``load_cache`` gave (its features, loader and
        count): a state set from another set's kernel must not be paired with them, so the next
        ``attribute`` or ``self_attribute`` caches its loader afresh."""
        self._loaded_n = None
        self._cache_loader = None
        self._hessian_loader = None
        self._train_cache.clear()
        self._rebuild = []

    def query_transform(self, checkpoint: int, test_features: Tensor) -> Tensor:
        """The test side of a score, ``w_c T_c(v)``: test features ``[m, width]`` mapped
        through checkpoint ``checkpoint``'s transform (TRAK's kernel inverse, the identity)
        and weight, so that ``score = train_features @ result.T`` summed over checkpoints."""
        fns = self.task.functions(checkpoint, self.layer_name)
        return self._weight(fns) * self._transform_test(fns, self._states.get(checkpoint),
                                                        test_features)

    #: Whether the query-time state needs the training features' kernel (``state_from_kernel``).
    needs_kernel = False

    def _state_from_kernel(self, fns: CheckpointFunctions, kernel: Tensor | None) -> Any:
        """``_prepare``'s state from the kernel ``Phi^T Phi``; the default needs none."""
        return None

    # -- public API --------------------------------------------------------------------------
    def featurize(self, loader: DataLoader, checkpoint: int = 0, kind: str | None = None,
                  role: str = "train", expected: int | None = None
                  ) -> Iterator[tuple[int, Tensor]]:
        """Stream ``(offset, features [B, width])`` of every batch of ``loader``, nothing kept.

        The features are those ``cache`` stores for training examples (``kind=None``: the
        training side's gradient, ``"loss"`` or ``"target"`` to choose), projected as this
        attributor projects; memory does not grow with the number of examples.

        Args:
            loader: the examples (unshuffled).
            checkpoint: which checkpoint's gradients.
            kind: ``"loss"``, ``"target"`` or ``None`` (``self.train_kind``).
            role: what the loader is, in error messages (``"train"``, ``"query"``...).
            expected: the number of examples the caller sized its results for; a pass that
                yields another number (a ``collate_fn`` dropping rows) raises ``ValueError``
                instead of leaving rows unwritten or shifted.
        """
        kind = self.train_kind if kind is None else kind
        if kind not in ("loss", "target"):
            raise ValueError(f"kind must be 'loss', 'target' or None, got {kind!r}.")
        fns = self.task.functions(checkpoint, self.layer_name)
        for offset, batch in self._batches(loader, role, f"features (ckpt {checkpoint})",
                                           expected=expected):
            yield offset, self._features(fns, batch, kind, offset, role)

    @property
    def has_row_factors(self) -> bool:
        """Whether each training example's scores are multiplied by a factor (TRAK's
        ``1 - p(correct)``), which ``row_factors`` streams."""
        return self._uses_row_factor

    def row_factors(self, loader: DataLoader, checkpoint: int = 0, expected: int | None = None
                    ) -> Iterator[tuple[int, Tensor]]:
        """Stream ``(offset, factor [B])``: checkpoint ``checkpoint``'s per-example factor of
        every batch of the training ``loader`` (``attribute`` multiplies each row of scores by
        its mean over checkpoints); nothing when ``has_row_factors`` is false. ``expected`` as
        in ``featurize``."""
        if not self._uses_row_factor:
            return
        fns = self.task.functions(checkpoint, self.layer_name)
        for offset, batch in self._batches(loader, "train", f"row factors (ckpt {checkpoint})",
                                           expected=expected):
            factor = self._row_factor(fns, batch)
            assert factor is not None
            yield offset, factor

    def cache(self, train_loader: DataLoader) -> None:
        """Compute (and keep, memory permitting) training features and per-checkpoint state.

        The loader given here also defines the training set for Hessians and kernels; later
        ``attribute``/``self_attribute`` calls with this same loader reuse its features.
        """
        check_loader(train_loader, "train")
        self._forget_training_set()  # a cache restored by load_cache is replaced
        self._states.clear()
        self._n_cache = count_examples(train_loader)
        self._hessian_loader = train_loader
        for c in range(self.task.num_checkpoints):
            fns = self.task.functions(c, self.layer_name)
            features = self._cache_features(fns, train_loader)
            self._states[c] = self._prepare(fns, train_loader, features)
        self._cache_loader = train_loader

    def _cache_features(self, fns: CheckpointFunctions, loader: DataLoader) -> Tensor | None:
        """Training features of one checkpoint, kept if they fit ``max_cache_bytes`` (else
        ``None``: recomputed block by block when needed).

        With several processes each computes its own batches and the blocks are gathered.
        """
        width = self._width(fns)
        used = sum(f.numel() * f.element_size() for f, _ in self._train_cache.values())
        if used + self._n_cache * width * 4 > self.max_cache_bytes:
            return None
        if self._world()[1] == 1:
            return self._fill_cache(fns, loader, width)
        offsets: list[int] = []
        feats_list: list[Tensor] = []
        factor_list: list[Tensor] = []
        for offset, feats, factor, _ in self._train_blocks(fns, loader, shard=True):
            offsets.append(offset)
            feats_list.append(feats)
            if factor is not None:
                factor_list.append(factor[:, None])
        features = self._gather_blocks(offsets, feats_list, self._n_cache, width)
        factors = None
        if self._uses_row_factor:
            factors = self._gather_blocks(offsets, factor_list, self._n_cache, 1)[:, 0]
        self._train_cache[fns.index] = (features, factors)
        return features

    def _fill_cache(self, fns: CheckpointFunctions, loader: DataLoader, width: int) -> Tensor:
        """One process: write each block into a preallocated ``[n, width]`` tensor (no
        concatenation, so the cache never exists twice in memory)."""
        features: Tensor | None = None
        factors: Tensor | None = None
        count = _Pass()
        # The pass is checked against _n_cache (see _batches): every preallocated row is
        # written exactly once, or the pass raises.
        for offset, feats, factor, _ in self._train_blocks(fns, loader, count=count):
            if features is None:
                features = feats.new_empty(self._n_cache, width)
            rows = slice(offset, offset + feats.shape[0])
            features[rows] = feats
            if factor is not None:
                if factors is None:
                    factors = factor.new_empty(self._n_cache)
                factors[rows] = factor
        assert features is not None and count.rows == self._n_cache
        self._train_cache[fns.index] = (features, factors)
        return features

    def _ensure_cached(self, train_loader: DataLoader) -> None:
        if self._cache_loader is not None:
            return
        if self._loaded_n is None:
            self.cache(train_loader)
            return
        # A cache restored by load_cache: this loader is its training set (same count). The
        # states not saved are rebuilt by _prepare, which for them computes no training
        # gradient (an HVP operator, LiSSA's sampler, nothing).
        self._check_loaded_count(train_loader)
        self._hessian_loader = train_loader
        for c in self._rebuild:
            fns = self.task.functions(c, self.layer_name)
            cached = self._train_cache.get(c)
            self._states[c] = self._prepare(fns, train_loader,
                                            None if cached is None else cached[0])
        self._rebuild = []
        self._cache_loader = train_loader
        self._loaded_n = None

    def attribute(self, train_loader: DataLoader, test_loader: DataLoader) -> Tensor:
        self._ensure_cached(train_loader)
        scores: Tensor | None = None
        row_factor: Tensor | None = None
        for c in range(self.task.num_checkpoints):
            fns = self.task.functions(c, self.layer_name)
            test = self._transform_rows(fns, self._states[c],
                                        self._test_features(fns, test_loader))
            weight = self._weight(fns)
            offsets, blocks, factors = [], [], []
            count = _Pass()
            for offset, feats, factor, _ in self._train_blocks(fns, train_loader, shard=True,
                                                               count=count):
                offsets.append(offset)
                blocks.append(weight * (feats @ test.T))
                factors.append(factor)
            cached = train_loader is self._cache_loader and c in self._train_cache
            if cached:  # every process holds all features: no gathering
                block = torch.cat(blocks)
                f = torch.cat(factors) if self._uses_row_factor else None
            else:
                block = self._gather_blocks(offsets, blocks, count.rows, test.shape[0])
                f = self._gather_blocks(offsets, [x[:, None] for x in factors], count.rows,
                                        1)[:, 0] if self._uses_row_factor else None
            scores = block if scores is None else scores + block
            if f is not None:
                f = f / self.task.num_checkpoints
                row_factor = f if row_factor is None else row_factor + f
        assert scores is not None
        if row_factor is not None:
            scores = scores * row_factor[:, None]
        return scores

    def self_attribute(self, train_loader: DataLoader) -> Tensor:
        self._ensure_cached(train_loader)
        total: Tensor | None = None
        row_factor: Tensor | None = None
        for c in range(self.task.num_checkpoints):
            fns = self.task.functions(c, self.layer_name)
            weight = self._weight(fns)
            index, values, factors = [], [], []
            count = _Pass()
            for rows, feats, test_raw, factor in self._self_groups(fns, train_loader, count):
                test = self._transform_test(fns, self._states[c], test_raw)
                index.append(rows)
                values.append(weight * (feats * test).sum(dim=1))
                factors.append(factor)
            block = self._gather_values(index, values, count.rows)
            total = block if total is None else total + block
            if self._uses_row_factor:
                f = self._gather_values(index, factors, count.rows) / self.task.num_checkpoints
                row_factor = f if row_factor is None else row_factor + f
        assert total is not None
        return total if row_factor is None else total * row_factor

    def _gather_values(self, index: list[Tensor], values: list[Tensor], total: int) -> Tensor:
        world = self._world()[1]  # distributed=False: this process computed every row
        if not values:
            return gather_rows(torch.zeros(0, device=self.device),
                               torch.zeros(0, dtype=torch.long), total, world)
        return gather_rows(torch.cat(values), torch.cat(index), total, world)

    def _self_groups(self, fns: CheckpointFunctions, loader: DataLoader, count: _Pass
                     ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
        """``(row indices, train features, test-side features, row factor)`` of this
        process's share of the training examples, in groups of up to ``_SELF_GROUP_BYTES``;
        ``count`` receives the number of training examples.

        Each group's test side goes through ``_transform_test`` in one call (one CG or LiSSA
        solve for the whole group, not one per loader batch); cached features are read from
        the cache without touching the loader.
        """
        rank, world = self._world()
        same_side = self.train_kind == self.test_kind or fns.target_is_loss
        cached = loader is self._cache_loader and fns.index in self._train_cache
        if cached:
            all_feats, all_factors = self._train_cache[fns.index]
        if same_side and cached:
            count.rows = all_feats.shape[0]
            own = shard_range(all_feats.shape[0], rank, world)
            step = self._group_rows(all_feats.shape[1])
            for start in range(own.start, own.stop, step):
                rows = slice(start, min(start + step, own.stop))
                factor = None if all_factors is None else all_factors[rows]
                yield (torch.arange(rows.start, rows.stop), all_feats[rows], all_feats[rows],
                       factor)
            return
        pending: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
        rows_pending = 0
        batches = self._batches(loader, "train", f"self-influence (ckpt {fns.index})",
                                shard=True, count=count)
        for offset, batch in batches:
            size = batch_size_of(batch)
            if cached:
                rows = slice(offset, offset + size)
                feats = all_feats[rows]
                factor = None if all_factors is None else all_factors[rows]
            else:
                feats = self._features(fns, batch, self.train_kind, offset, "train")
                factor = self._row_factor(fns, batch)
            test_raw = feats if same_side else self._features(
                fns, batch, self.test_kind, offset, "train")
            pending.append((torch.arange(offset, offset + size), feats, test_raw, factor))
            rows_pending += size
            if rows_pending >= self._group_rows(feats.shape[1]):
                yield _merge(pending)
                pending, rows_pending = [], 0
        if pending:
            yield _merge(pending)

    def _group_rows(self, dim: int) -> int:
        return max(1, _SELF_GROUP_BYTES // (8 * max(dim, 1)))

    # -- persistent caches (save_cache / load_cache) -------------------------------------------
    def _state_tensors(self, index: int, state: Any) -> dict[str, Tensor] | None:
        """Checkpoint ``index``'s ``_prepare`` state as named tensors for ``save_cache``, or
        ``None`` (the default) when ``_prepare`` rebuilds it after ``load_cache`` without any
        training gradient (TracIn's nothing, CG's HVP operator, LiSSA's sampler). A subclass
        whose ``_prepare`` costs training gradients must save its state."""
        return None

    def _state_from_tensors(self, index: int, tensors: dict[str, Tensor]) -> Any:
        """The state ``_state_tensors`` saved, from its tensors (on ``self.device``)."""
        raise NotImplementedError(f"{type(self).__name__} saves no checkpoint state.")

    def _cache_options(self) -> dict[str, Any]:
        options = {"projection": (self._factored_options if self._factored_options is not None
                                  else projector_options(self.projector_kwargs)),
                   "train_kind": self.train_kind, "row_factor": self._uses_row_factor}
        return {**super()._cache_options(), **options}

    def _projector_descriptions(self) -> list[Any] | None:
        if self._factored_options is not None:  # its options (seeds included) say it all
            return None
        return [_describe_projector(self._projector(self.task.functions(c, self.layer_name)))
                for c in range(self.task.num_checkpoints)]

    def _cache_contents(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self._cache_loader is None and self._loaded_n is None:
            raise ValueError(f"{type(self).__name__} has nothing cached to save: call "
                             "cache(train_loader) (or attribute) first.")
        tensors: dict[str, Tensor] = {}
        checkpoints = []
        for c in range(self.task.num_checkpoints):
            prefix = f"checkpoint-{c}/"
            entry: dict[str, Any] = {"features": c in self._train_cache, "row_factor": False}
            if c in self._train_cache:
                feats, factors = self._train_cache[c]
                tensors[prefix + "features"] = feats
                if factors is not None:
                    tensors[prefix + "row_factor"] = factors
                    entry["row_factor"] = True
            state = None if c in self._rebuild else self._state_tensors(
                c, self._states.get(c))
            entry["state"] = sorted(state) if state is not None else None
            tensors.update({f"{prefix}state/{k}": v for k, v in (state or {}).items()})
            checkpoints.append(entry)
        return tensors, {"num_train": self._n_cache, "checkpoints": checkpoints}

    def _restore_cache(self, reader: CacheReader) -> None:
        entries = reader.manifest.get("checkpoints")
        n = reader.manifest.get("num_train")
        if not isinstance(entries, list) or len(entries) != self.task.num_checkpoints:
            raise CacheIntegrityError(f"cache.json in {reader.path} does not list one entry "
                                      "per checkpoint; rebuild the cache.")
        states, rebuild, train = {}, [], {}
        used = 0
        for c, entry in enumerate(entries):
            prefix = f"checkpoint-{c}/"
            if entry.get("state"):
                states[c] = self._state_from_tensors(c, {
                    k: reader.tensor(f"{prefix}state/{k}", self.device) for k in entry["state"]})
            else:
                rebuild.append(c)
            if not entry.get("features"):
                continue
            layout = reader.manifest["tensors"][prefix + "features"]
            nbytes = getattr(torch, layout["dtype"]).itemsize * math.prod(layout["shape"])
            # this attributor's max_cache_bytes holds too: what does not fit is recomputed
            if used + nbytes > self.max_cache_bytes:
                continue
            feats = reader.tensor(prefix + "features", self.device)
            factors = (reader.tensor(prefix + "row_factor", self.device)
                       if entry.get("row_factor") else None)
            if feats.shape[0] != n:
                raise CacheIntegrityError(f"checkpoint {c}'s features in {reader.path} have "
                                          f"{feats.shape[0]} rows for {n} training examples; "
                                          "rebuild the cache.")
            train[c] = (feats, factors)
            used += nbytes
        self._cache_loader = None
        self._hessian_loader = None
        self._train_cache = train
        self._states = states
        self._rebuild = rebuild
        self._n_cache = n


def _describe_projector(projector: Projector) -> dict[str, Any]:
    """A projector's class and the settings that fix its map (sizes, seed, kind, generator);
    knobs that only bound memory or time are left out."""
    skip = {"block_rows", "max_batch_size", "num_sms"}
    return {"class": type(projector).__name__, **{
        k: v for k, v in vars(projector).items()
        if not k.startswith("_") and k not in skip and isinstance(v, (bool, int, float, str))}}


def _merge(groups: list[tuple[Tensor, Tensor, Tensor, Tensor | None]]
           ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    index = torch.cat([g[0] for g in groups])
    feats = torch.cat([g[1] for g in groups])
    test = torch.cat([g[2] for g in groups])
    factors = None if groups[0][3] is None else torch.cat([g[3] for g in groups])
    return index, feats, test, factors
