"""The block store: the one home of the on-disk format of stacked models.

A *block* is one safetensors file ``{out_dir}/{kind}/block-{b:05d}.safetensors`` holding the
models with ids ``[b * block_size, (b + 1) * block_size)`` of a retrain build, stacked along
the first axis. Its tensors (the format :data:`BLOCK_FORMAT`):

* every parameter under its own name, ``[M, *shape]``;
* every buffer, for blocks trained by the sequential path, under ``__buffer__.{name}``
  (:data:`BUFFER_PREFIX`);
* ``__model_ids__`` (:data:`MODEL_IDS_KEY`, ``int64 [M]``) and ``__stream_ids__``
  (:data:`STREAM_IDS_KEY`, ``int64 [M]``);
* the training subset of each model, in one of two encodings (:func:`encode_subsets`):
  ``__left_out__`` (:data:`LEFT_OUT_KEY`, ``int64 [M]``) when every model of the block leaves
  out exactly one example (a LOO block: the left-out example), otherwise ``__subset_mask__``
  (:data:`SUBSET_MASK_KEY`, ``uint8 [M, ceil(n_train / 8)]``: the subset masks bit-packed,
  example ``i`` in bit ``i % 8`` of byte ``i // 8``; :func:`pack_masks`).

Blocks of the first format (``hf_attrib.retrain.block/1``) stored ``__subset_indices__``
(:data:`SUBSET_INDICES_KEY`, ``[M, k]``: the kept examples of each model, 4,999 int32 per
MNIST LOO model where ``/2`` stores one int64); they are still read, and resumed builds keep
them (their content is the same). Readers return the same thing for both formats:
:func:`read_block` returns the subsets as ``__subset_indices__`` (decoded), and
:func:`load_subsets` returns boolean masks.

Its metadata: ``format``, ``kind``, ``block``, ``block_size``, ``num_models``, ``n_train``,
``fingerprint`` (of the build), ``strategy``, ``recipe``, and the checksums: a sha256 per
tensor over its name, dtype, shape and bytes (``tensor_sha256``) and one over the metadata
(``block_sha256``).

The Hub's checkpoint shards (``hf_attrib.hub``) store stacked models with the same keys for
parameters, buffers and model ids; :func:`stacked_tensors` writes those keys and
:func:`merge_stacked` reads them back, for blocks and shards alike.

Here: the keys and file names; the writer (:func:`write_block`: atomic, sealed with checksums,
a clear error on a full disk); the reader and verifier (:func:`read_block`,
:class:`CorruptBlockError`); the ``a:b`` model-range parser (:func:`parse_model_range`); and the
readers of a whole build (:func:`load_stacked`, :func:`load_subsets`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from hf_attrib.files import write_atomic

__all__ = [
    "BLOCK_FORMAT",
    "BLOCK_FORMATS_READ",
    "BUFFER_PREFIX",
    "LEFT_OUT_KEY",
    "MODEL_IDS_KEY",
    "OPEN_END",
    "RESERVED_KEYS",
    "STREAM_IDS_KEY",
    "SUBSET_INDICES_KEY",
    "SUBSET_KEYS",
    "SUBSET_MASK_KEY",
    "CorruptBlockError",
    "ModelRange",
    "block_ids",
    "block_metadata",
    "block_path",
    "check_kind",
    "decode_subsets",
    "encode_subsets",
    "load_stacked",
    "load_subsets",
    "merge_stacked",
    "pack_masks",
    "parse_model_range",
    "read_block",
    "remove_stale_temps",
    "select_blocks",
    "stacked_tensors",
    "subset_indices",
    "tensor_bytes",
    "unpack_masks",
    "write_block",
]

ModelRange = slice | tuple[int, int] | str

BLOCK_FORMAT = "hf_attrib.retrain.block/2"
# Formats read: /1 stored the kept indices (SUBSET_INDICES_KEY); /2 the compact encodings.
BLOCK_FORMATS_READ = ("hf_attrib.retrain.block/1", BLOCK_FORMAT)
MODEL_IDS_KEY = "__model_ids__"
STREAM_IDS_KEY = "__stream_ids__"
SUBSET_INDICES_KEY = "__subset_indices__"
LEFT_OUT_KEY = "__left_out__"
SUBSET_MASK_KEY = "__subset_mask__"
# The keys a block may store its subsets under (one per block): /1's, then /2's two.
SUBSET_KEYS = (SUBSET_INDICES_KEY, LEFT_OUT_KEY, SUBSET_MASK_KEY)
RESERVED_KEYS = (MODEL_IDS_KEY, STREAM_IDS_KEY, *SUBSET_KEYS)
BUFFER_PREFIX = "__buffer__."
# Checksums in the block metadata: a sha256 per tensor (over its name, dtype, shape and bytes),
# and one over the whole metadata (which holds the per-tensor ones, in sorted key order).
_TENSOR_SUMS_KEY = "tensor_sha256"
_BLOCK_SUM_KEY = "block_sha256"
_BLOCK_RE = re.compile(r"^block-(\d{5,})\.safetensors$")
_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# An open end of a model range read without the number of models (Hub shards).
OPEN_END = 1 << 62


def parse_model_range(models: ModelRange | None, num_models: int | None = None
                      ) -> tuple[int, int]:
    """The model ids ``[a, b)`` that ``models`` names.

    ``models`` is ``"a:b"`` (either end may be left out), ``slice(a, b)`` or ``(a, b)``;
    ``None`` names every model.

    Args:
        models: the range.
        num_models: the number of models of the build. With it (a build on disk), ``"a:b"``
            and slices follow Python's slice rules (clamped to ``[0, num_models]``, negative
            ends count from the end) and ``(a, b)`` must satisfy
            ``0 <= a <= b <= num_models``. Without it (Hub shards, whose reader checks the
            range against the repo's index), the ends are taken as written; an open start is
            0 and an open end ``2**62``.

    Returns:
        ``(a, b)``.

    Raises:
        ValueError: ``models`` is not of one of these forms, a slice has a step other than 1,
            or a tuple lies outside ``[0, num_models]``.
    """
    if models is None:
        return 0, OPEN_END if num_models is None else num_models
    if isinstance(models, str):
        start, sep, stop = models.partition(":")
        if not sep:
            raise ValueError(f"models must look like 'a:b', got {models!r}.")
        models = slice(int(start) if start else None, int(stop) if stop else None)
    if isinstance(models, slice):
        if models.step not in (None, 1):
            raise ValueError("models must be a contiguous range (slice step 1).")
        if num_models is None:
            return models.start or 0, OPEN_END if models.stop is None else models.stop
        start, stop, _ = models.indices(num_models)
        return start, max(start, stop)
    start, stop = (int(v) for v in models)
    if num_models is not None and not 0 <= start <= stop <= num_models:
        raise ValueError(f"models=({start}, {stop}) must satisfy 0 <= a <= b <= {num_models}.")
    return start, stop


def block_ids(block: int, block_size: int, num_models: int) -> list[int]:
    """The model ids of block ``block``: ``[block * block_size, (block + 1) * block_size)``,
    cut at ``num_models``."""
    return list(range(block * block_size, min((block + 1) * block_size, num_models)))


def select_blocks(
    num_models: int, block_size: int, models: ModelRange | None, shard: tuple[int, int] | None
) -> list[int]:
    """The blocks holding any model of ``models``, restricted to shard ``(i, n)``.

    Args:
        num_models: the number of models of the build.
        block_size: models per block.
        models: the model range (see :func:`parse_model_range`); ``None``: all.
        shard: ``(i, n)``: only blocks ``b`` with ``b % n == i``; ``None``: all.

    Raises:
        ValueError: a bad range, or a shard that does not satisfy ``0 <= i < n``.
    """
    start, stop = parse_model_range(models, num_models)
    blocks = range(start // block_size, -(-stop // block_size)) if stop > start else range(0)
    if shard is None:
        return list(blocks)
    index, count = (int(v) for v in shard)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard=(i, n) needs 0 <= i < n, got {shard}.")
    return [b for b in blocks if b % count == index]


def block_path(directory: Path, block: int) -> Path:
    """``directory/block-{block:05d}.safetensors``: the file of block ``block``."""
    return directory / f"block-{block:05d}.safetensors"


def check_kind(kind: str) -> None:
    """Raise a ``ValueError`` unless ``kind`` is a plain folder name (``[A-Za-z0-9_.-]``)."""
    if not _KIND_RE.match(kind):
        raise ValueError(f"kind must be a plain folder name ([A-Za-z0-9_.-]), got {kind!r}.")


class CorruptBlockError(ValueError):
    """A retrain block that cannot be trusted: unreadable, not matching its checksums, or
    written without checksums (by an older version), so its content cannot be verified.

    :func:`.retrain` warns and retrains such a block; readers (:func:`load_stacked`,
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


def tensor_bytes(t: Tensor) -> Any:
    """The raw bytes of ``t`` (CPU, contiguous, native byte order) as a ``uint8`` array."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _tensor_digest(name: str, t: Tensor) -> str:
    """sha256 over a tensor's name, dtype, shape and bytes (the JSON prefix is unambiguous)."""
    h = hashlib.sha256(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
    h.update(tensor_bytes(t))
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
        if meta.get("format") not in BLOCK_FORMATS_READ:
            raise _not_a_block(path, meta)
        raise CorruptBlockError(path, f"{path} has no checksums (it was written by an "
                                "hf_attrib version before block checksums), so its content "
                                "cannot be verified.")
    if _metadata_digest(meta) != meta[_BLOCK_SUM_KEY]:
        raise CorruptBlockError(path, f"{path}: the block metadata does not match its "
                                f"checksum ({_BLOCK_SUM_KEY}); the file is corrupt.", "metadata")
    if meta.get("format") not in BLOCK_FORMATS_READ:
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


def block_metadata(path: Path) -> dict[str, str]:
    """The checked metadata of a block (the header only; tensors are not read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise _unreadable(path, err) from err
    return _checked_metadata(path, meta)


def _read_stored(
    path: Path, keys: Sequence[str] | None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors ``keys`` (default all) as stored, each checked against its checksum;
    ``SUBSET_INDICES_KEY`` in ``keys`` names whichever subset key the block stores."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            names = set(f.keys())
            stored_subsets = next((k for k in SUBSET_KEYS if k in names), SUBSET_INDICES_KEY)
            wanted = sorted(names) if keys is None else list(dict.fromkeys(
                stored_subsets if k == SUBSET_INDICES_KEY else k for k in keys))
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


def _block_masks(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> Tensor:
    """The ``[M, n_train]`` subset masks of a block, from whichever key it stores them
    under (checksums already verified: a failure here is a block written inconsistently)."""
    try:
        return decode_subsets(tensors, int(meta["n_train"]))
    except ValueError as err:
        key = next((k for k in SUBSET_KEYS if k in tensors), None)
        raise CorruptBlockError(path, f"{path}: the subsets cannot be decoded ({err}); the "
                                "file is corrupt.", key) from err


def read_block(
    path: str | os.PathLike[str], keys: Sequence[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read one retrain block, every tensor read checked against its stored checksum.

    Blocks written by :func:`.retrain` carry a sha256 per tensor (over its name, dtype, shape
    and bytes) and one over the metadata, which holds the per-tensor ones. A flipped bit
    in a tensor read (its data or its header entry) or in the metadata is an error that
    names the file and the tensor key.

    The subsets are returned as ``__subset_indices__`` (``[M, k]``, :func:`subset_indices`)
    whichever way the block stores them (``/1``: as such; ``/2``: ``__left_out__`` or
    ``__subset_mask__``, decoded after their checksums are checked), so readers see the same
    tensors for both formats. A stored key asked for by its own name is returned as stored.

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
    tensors, meta = _read_stored(path, keys)
    asked = set(keys or ())
    compact = [k for k in (LEFT_OUT_KEY, SUBSET_MASK_KEY) if k in tensors and k not in asked]
    if compact:
        masks = _block_masks(path, {compact[0]: tensors.pop(compact[0])}, meta)
        tensors[SUBSET_INDICES_KEY] = subset_indices(masks)
    return tensors, meta


def subset_indices(masks: Tensor) -> Tensor:
    """The training examples of each model, ``[M, k]`` (int32, or int64 for huge sets): how
    ``/1`` blocks stored their ``[M, n_train]`` subset masks, and how :func:`read_block`
    returns the subsets of every block (all subsets of a block have size ``k``)."""
    size = int(masks[0].sum()) if masks.shape[0] else 0
    dtype = torch.int32 if masks.shape[1] < 2**31 else torch.int64
    return masks.nonzero()[:, 1].reshape(masks.shape[0], size).to(dtype)


_BIT_VALUES = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)


def pack_masks(masks: Tensor) -> Tensor:
    """Bit-pack ``[M, n]`` boolean masks into ``uint8 [M, ceil(n / 8)]``: example ``i`` is bit
    ``i % 8`` (least significant first) of byte ``i // 8``; the padding bits are 0."""
    masks = masks.detach().cpu().bool()
    rows, n = masks.shape
    padded = torch.nn.functional.pad(masks.to(torch.uint8), (0, -n % 8))
    return (padded.reshape(rows, -1, 8) * _BIT_VALUES).sum(-1, dtype=torch.uint8)


def unpack_masks(packed: Tensor, n: int) -> Tensor:
    """The ``[M, n]`` boolean masks that :func:`pack_masks` packed.

    Raises:
        ValueError: ``packed`` is not ``uint8 [M, ceil(n / 8)]``, or a padding bit is set.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != -(-n // 8):
        raise ValueError(f"packed masks of {n} examples must be uint8 [M, {-(-n // 8)}], got "
                         f"{packed.dtype} {list(packed.shape)}")
    bits = (packed.unsqueeze(-1) & _BIT_VALUES).ne(0).reshape(packed.shape[0], -1)
    if bits[:, n:].any():
        raise ValueError(f"packed masks of {n} examples have bits set past example {n - 1}")
    return bits[:, :n].contiguous()


def encode_subsets(masks: Tensor) -> dict[str, Tensor]:
    """The compact stored form of ``[M, n_train]`` subset masks.

    Returns:
        ``{LEFT_OUT_KEY: int64 [M]}`` (the example each model leaves out) when every model
        leaves out exactly one example, else ``{SUBSET_MASK_KEY: uint8 [M, ceil(n_train/8)]}``
        (:func:`pack_masks`).
    """
    masks = masks.detach().cpu().bool()
    n = masks.shape[1]
    if n > 0 and bool((masks.sum(1) == n - 1).all()):
        return {LEFT_OUT_KEY: (~masks).to(torch.uint8).argmax(1).to(torch.int64)}
    return {SUBSET_MASK_KEY: pack_masks(masks)}


def decode_subsets(tensors: Mapping[str, Tensor], n_train: int) -> Tensor:
    """The ``[M, n_train]`` boolean subset masks from a block's stored subset key (any of
    :data:`SUBSET_KEYS`: ``/1``'s indices or ``/2``'s left-out ids or packed masks).

    Raises:
        ValueError: no subset key, or one whose content does not fit ``n_train``.
    """
    if LEFT_OUT_KEY in tensors:
        left = tensors[LEFT_OUT_KEY].long()
        if left.dim() != 1 or bool(((left < 0) | (left >= n_train)).any()):
            raise ValueError(f"{LEFT_OUT_KEY} must be [M] ids in [0, {n_train})")
        masks = torch.ones(left.numel(), n_train, dtype=torch.bool)
        masks[torch.arange(left.numel()), left] = False
        return masks
    if SUBSET_MASK_KEY in tensors:
        return unpack_masks(tensors[SUBSET_MASK_KEY], n_train)
    if SUBSET_INDICES_KEY in tensors:
        kept = tensors[SUBSET_INDICES_KEY].long()
        if kept.dim() != 2 or bool(((kept < 0) | (kept >= n_train)).any()):
            raise ValueError(f"{SUBSET_INDICES_KEY} must be [M, k] ids in [0, {n_train})")
        return torch.zeros(kept.shape[0], n_train, dtype=torch.bool).scatter_(1, kept, True)
    raise ValueError(f"no subsets (none of {list(SUBSET_KEYS)})")


def stacked_tensors(
    params: Mapping[str, Tensor], model_ids: Sequence[int] | Tensor,
    buffers: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The tensors of a file of stacked models (a block, or a Hub checkpoint shard).

    Args:
        params: ``{name: [M, ...]}`` stacked parameters, stored under their names.
        model_ids: the ``M`` model ids, stored as int64 under :data:`MODEL_IDS_KEY`.
        buffers: ``{name: [M, ...]}`` stacked buffers, stored under
            :data:`BUFFER_PREFIX` ``+ name``.

    Returns:
        The tensors to save, on the CPU and contiguous.

    Raises:
        ValueError: a parameter name is one the format reserves.
    """
    for name in params:
        if name in RESERVED_KEYS or name.startswith(BUFFER_PREFIX):
            raise ValueError(f"parameter name {name!r} is reserved by the block format.")
    tensors = {name: p.detach().cpu().contiguous() for name, p in params.items()}
    for name, b in (buffers or {}).items():
        tensors[BUFFER_PREFIX + name] = b.detach().cpu().contiguous()
    tensors[MODEL_IDS_KEY] = torch.as_tensor(model_ids, dtype=torch.int64).cpu().contiguous()
    return tensors


def merge_stacked(
    files: Iterable[Mapping[str, Tensor]], models: tuple[int, int] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Join files of stacked models (as :func:`stacked_tensors` wrote them) along the model
    axis, keep the models with ids in ``[a, b)`` and split parameters from buffers.

    Args:
        files: the tensors of each file, in model-id order, with the same keys (drop the
            block-only keys :data:`STREAM_IDS_KEY` and :data:`SUBSET_KEYS` first).
        models: ``(a, b)`` from :func:`parse_model_range`; ``None``: every model.

    Returns:
        ``(params, buffers, model_ids)``: ``{name: [M, ...]}`` parameters, ``{name: [M, ...]}``
        buffers keyed by their plain names (``bn.running_mean``), and the ``[M]`` ids.
    """
    parts: dict[str, list[Tensor]] = {}
    for tensors in files:
        for name, tensor in tensors.items():
            parts.setdefault(name, []).append(tensor)
    if MODEL_IDS_KEY not in parts:
        raise ValueError(f"no stacked models to merge (model range {models}): ask for a range "
                         "that holds at least one model, e.g. 0:1.")
    stacked = {name: torch.cat(ts) for name, ts in parts.items()}
    ids = stacked.pop(MODEL_IDS_KEY)
    keep = (torch.ones_like(ids, dtype=torch.bool) if models is None
            else (ids >= models[0]) & (ids < models[1]))
    params = {n: t[keep] for n, t in stacked.items() if not n.startswith(BUFFER_PREFIX)}
    buffers = {n[len(BUFFER_PREFIX):]: t[keep] for n, t in stacked.items()
               if n.startswith(BUFFER_PREFIX)}
    return params, buffers, ids[keep]


def write_block(
    path: Path, params: Mapping[str, Tensor], ids: list[int], streams: list[int],
    masks: Tensor, metadata: dict[str, str], buffers: Mapping[str, Tensor] | None = None,
) -> None:
    """Write one block atomically, sealed with its checksums.

    Args:
        path: the block file (:func:`block_path`).
        params: ``{name: [M, ...]}`` stacked parameters.
        ids: the ``M`` model ids.
        streams: their stream ids.
        masks: their ``[M, n_train]`` subset masks, all of one size (stored as
            :func:`encode_subsets` chooses: the left-out example of each model of a LOO
            block, else the bit-packed masks).
        metadata: the block's metadata (``format``, ``block``, ``fingerprint``, ...); the
            checksums are added.
        buffers: ``{name: [M, ...]}`` stacked buffers (sequential path), if any.

    Raises:
        ValueError: a parameter name is one the format reserves, or the subsets differ in
            size.
        OSError: the write failed; on a full disk the message says how much space the block
            needs and what to do (no partial file is left).
    """
    sizes = masks.sum(1)
    if masks.shape[0] and not bool((sizes == sizes[0]).all()):
        raise ValueError(f"the models of block {path.name} have subsets of different sizes "
                         f"({sorted(set(sizes.tolist()))}); a block trains one stack, whose "
                         "subsets all have one size.")
    tensors = stacked_tensors(params, ids, buffers)
    tensors[STREAM_IDS_KEY] = torch.tensor(streams, dtype=torch.int64)
    tensors.update(encode_subsets(masks))
    _write_atomic(path, safetensors_save(tensors, metadata=_seal(tensors, metadata)))


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`hf_attrib.files.write_atomic`): ``path`` is
    never partial, and the temporary file is removed on any failure (a kill leaves it behind;
    :func:`.retrain` removes it on the next run). A full disk is an error that says how much
    the block needs and where."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()

    try:
        write_atomic(path, write)
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        raise OSError(err.errno, _disk_full_message(path, len(data)), str(path)) from err


def _disk_full_message(path: Path, size: int) -> str:
    try:
        free = f"; {shutil.disk_usage(path.parent).free:,} bytes are free there"
    except OSError:
        free = ""
    return (f"the disk is full (or the quota is used up): block {path.name} needs {size:,} "
            f"bytes ({size / 2**20:.1f} MiB) in {path.parent}{free}. Free space there or "
            "choose another out_dir (CLI: --out), then re-run: finished blocks are kept and "
            "skipped, and no partial file was left")


def remove_stale_temps(directory: Path, block: int) -> None:
    """Remove the temporary files that interrupted writes of block ``block`` left behind."""
    for tmp in directory.glob(f".{block_path(directory, block).name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _scan_blocks(directory: Path) -> dict[int, tuple[Path, dict[str, str]]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist; build it with retrain() first.")
    found = {}
    for path in sorted(directory.iterdir()):
        match = _BLOCK_RE.match(path.name)
        if match:
            found[int(match.group(1))] = (path, block_metadata(path))
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
    start, stop = parse_model_range(models, num_models)
    needed = select_blocks(num_models, block_size, (start, stop), None)
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
        out_dir: root folder of the build (as given to :func:`.retrain`).
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
        pass ``buffers`` to :func:`.evaluate_stacked`.

    Raises:
        CorruptBlockError: a block fails its checksums or has none (the message names the file,
            the tensor key and how to rebuild the block).
        FileNotFoundError: if blocks are missing (the message names the missing id ranges and
            the ``retrain`` call that builds them).
    """
    check_kind(kind)
    blocks, start, stop, _ = _needed_blocks(Path(out_dir) / kind, kind, models)
    files = []
    names = None
    for _, path in blocks:
        tensors, _ = _read_stored(path, None)  # all checked; the subsets are not decoded
        # Without the block-only keys: a resumed build mixes /1 and /2 blocks, which store
        # their subsets under different keys.
        tensors = {name: tensor for name, tensor in tensors.items()
                   if name != STREAM_IDS_KEY and name not in SUBSET_KEYS}
        if names is None:
            names = set(tensors)
        elif set(tensors) != names:
            raise ValueError(f"{path} holds other tensors than the first block "
                             f"(differs in {sorted(set(tensors) ^ names)}).")
        files.append(tensors)
    params, buffers, ids = merge_stacked(files, (start, stop))
    return (params, buffers, ids) if with_buffers else (params, ids)


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
    check_kind(kind)
    blocks, start, stop, _ = _needed_blocks(Path(out_dir) / kind, kind, models)
    masks, ids = [], []
    for _, path in blocks:
        tensors, block_meta = _read_stored(path, (MODEL_IDS_KEY, SUBSET_INDICES_KEY))
        masks.append(_block_masks(path, tensors, block_meta))
        ids.append(tensors[MODEL_IDS_KEY])
    all_ids, all_masks = torch.cat(ids), torch.cat(masks)
    keep = (all_ids >= start) & (all_ids < stop)
    return all_masks[keep], all_ids[keep]
