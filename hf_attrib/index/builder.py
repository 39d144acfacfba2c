"""``build``: featurize a training set once into an attribution index (``format``).

The training loader is cut into shards of ``rows_per_shard`` rows (a multiple of its batch
size, so every batch is the one the whole loader yields). Each shard is featurized with the
attributor's ``featurize`` (nothing else kept: memory is one shard's features plus, for TRAK,
a ``width x width`` kernel) and written at once; its share of the kernel ``Phi^T Phi`` goes to
``.build/``, and a receipt with both files' sha256 and the sha256 of the shard's collated
input tensors is written last. A killed build, run again with the same arguments, checks the
receipts' hashes, collates each finished shard's batches again (no gradients) to check that its
inputs are still the same (a changed tokenisation, e.g. another ``max_length``, is recomputed,
never mixed in), and computes only the shards without a valid receipt. ``shard=(i, n)``
(``--shard i/n``) computes every n-th shard starting at i, so that n processes (or
``accelerate launch`` / ``torchrun``, where the rank and world size are used) split the build;
whichever process finds every shard done writes the state (the kernel inverse from the summed
kernels), the card and ``hf_attrib_index.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hf_attrib import __version__
from hf_attrib.algorithm.base import FeatureAttributor
from hf_attrib.algorithm.cache_store import describe_differences, jsonable
from hf_attrib.algorithm.registry import get_method, make_attributor, method_names
from hf_attrib.distributed import rank_and_world
from hf_attrib.hub.errors import HubPathError
from hf_attrib.hub.layout import confined_path, sha256_file
from hf_attrib.index.format import (
    BUILD_DIR,
    DTYPES,
    FEATURES_KIND,
    INDEX_FILE,
    INDEX_KIND,
    INDEX_VERSION,
    STATE_FILE,
    features_key,
    save_tensors_atomic,
    shard_file,
    write_json_atomic,
)
from hf_attrib.loaders import SubsetSampler, check_loader, count_examples, loader_indices
from hf_attrib.task import AttributionTask

__all__ = ["ROW_FACTOR", "BuildResult", "FileHashes", "build", "featurize_shard",
           "inputs_sha256", "method_kwargs_of", "resolve_attributor"]

logger = logging.getLogger(__name__)

#: Default rows per shard (rounded up to a multiple of the loader's batch size).
DEFAULT_SHARD_ROWS = 4096
_SUPPORTED = "TRAK, TracInCP, Grad-Dot and Grad-Cos"
#: The tensor of a shard holding each row's score factor (TRAK's ``1 - p(correct)``, averaged
#: over checkpoints), present when the method has one.
ROW_FACTOR = "row_factor"


@dataclass
class BuildResult:
    """What :func:`build` did.

    Attributes:
        path: the index folder.
        num_rows: training examples indexed.
        num_shards: shards of the whole index.
        computed: shards featurized by this call.
        skipped: shards of this call already on disk (hash-checked, not recomputed).
        complete: whether the index file is written (every shard done).
    """

    path: Path
    num_rows: int
    num_shards: int
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    complete: bool = False


# --------------------------------------------------------------------------------------------
# The attributor and what identifies it
# --------------------------------------------------------------------------------------------
def resolve_attributor(task_or_attributor: AttributionTask | FeatureAttributor,
                       method: str = "trak", method_kwargs: Mapping[str, Any] | None = None
                       ) -> FeatureAttributor:
    """The attributor an index is built or queried with: the one given, else ``method`` on the
    task (``task.attributor`` for a transformers task: its layers and factored projection).

    Raises:
        ValueError: the method is not one an index supports, or uses a per-example factor.
    """
    kwargs = dict(method_kwargs or {})
    if isinstance(task_or_attributor, FeatureAttributor):
        attributor = task_or_attributor
    elif isinstance(task_or_attributor, AttributionTask):
        maker = getattr(task_or_attributor, "attributor", None)
        attributor = (maker(method, **kwargs) if callable(maker)
                      else make_attributor(method, task_or_attributor, **kwargs))
    else:
        raise TypeError("build/open need an hf_attrib AttributionTask (e.g. from "
                        "task_from_pretrained) or a FeatureAttributor, got "
                        f"{type(task_or_attributor).__name__}.")
    if not isinstance(attributor, FeatureAttributor) or not attributor.supports_factored:
        raise ValueError(f"an attribution index stores per-example feature vectors, which "
                         f"{_SUPPORTED} score with; {type(attributor).__name__} needs the "
                         "training set at query time. Use method='trak' (or grad-dot, "
                         "grad-cos, tracin).")
    return attributor


def _method_name(attributor: FeatureAttributor) -> str:
    for name in method_names():
        if get_method(name).attributor_class is type(attributor):
            return name
    raise ValueError(f"{type(attributor).__name__} is not a registered method; register it "
                     "(hf_attrib.algorithm.register_method) so that an index can name it.")


def method_kwargs_of(attributor: FeatureAttributor, given: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
    """The constructor options that rebuild ``attributor`` on a task (recorded in the index;
    the query checks the rebuilt attributor's identity against the recorded one)."""
    import inspect

    kwargs = dict(given or {})
    kwargs["projector_kwargs"] = attributor.projector_kwargs
    accepted = inspect.signature(type(attributor)).parameters
    for name in ("regularization", "relative_regularization", "correct_probability_func",
                 "weight_list"):
        if name in accepted and hasattr(attributor, name):
            kwargs[name] = getattr(attributor, name)
    return jsonable(kwargs)


def _model_info(attributor: FeatureAttributor, identity: Mapping[str, Any],
                model_id: str | None, model_revision: str | None) -> dict[str, Any]:
    config = getattr(attributor.task.model, "config", None)
    return jsonable({
        "id": model_id or getattr(config, "_name_or_path", None) or None,
        "revision": model_revision or getattr(config, "_commit_hash", None),
        "task": getattr(attributor.task, "task_kind", None),
        "layers": attributor.layer_name,
        "weights_sha256": identity.get("weights_sha256"),
    })


def _dataset_info(dataset: Any, num_rows: int, dataset_id: str | None,
                  dataset_revision: str | None, text_column: str | None) -> dict[str, Any]:
    """What the index records of its training data. ``num_rows`` are the rows indexed,
    ``num_examples`` the dataset's length (more when a subset was indexed: example ids are
    dataset indices, so the query checks a dataset given for texts against this)."""
    info = getattr(dataset, "info", None)
    columns = list(getattr(dataset, "column_names", None) or [])
    if text_column is None:
        text_column = next((c for c in ("text", "sentence", "content") if c in columns), None)
    return jsonable({
        "id": dataset_id or getattr(info, "dataset_name", None),
        "revision": dataset_revision or getattr(info, "version", None),
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "num_rows": num_rows,
        "num_examples": len(dataset) if hasattr(dataset, "__len__") else None,
        "text_column": text_column,
    })


# --------------------------------------------------------------------------------------------
# Loaders cut into shards
# --------------------------------------------------------------------------------------------
def _train_loader(attributor: FeatureAttributor, train: Any, batch_size: int,
                  dataloader_kwargs: Mapping[str, Any]) -> DataLoader:
    if isinstance(train, DataLoader):
        if dataloader_kwargs:
            raise ValueError("dataloader_kwargs apply to a dataset (they go to "
                             "task.dataloader); a DataLoader is used as given: build it with "
                             "those settings instead.")
        return train
    maker = getattr(attributor.task, "dataloader", None)
    if callable(maker):
        return maker(train, batch_size=batch_size, **dataloader_kwargs)
    raise TypeError("pass the training set as a DataLoader (or a datasets.Dataset with a "
                    f"transformers task), got {type(train).__name__}.")


def _subloader(loader: DataLoader, indices: list[int]) -> DataLoader:
    """The loader restricted to dataset ``indices`` (same batch size, collate, workers)."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=SubsetSampler(indices), collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers)


def _example_indices(loader: DataLoader) -> list[int]:
    if not isinstance(loader, DataLoader) or loader.batch_size is None or isinstance(
            loader.dataset, torch.utils.data.IterableDataset):
        raise ValueError("an index is built shard by shard, so the training loader must be a "
                         "map-style DataLoader with a batch_size (not an iterable dataset or a "
                         "custom batch_sampler): build one with task.dataloader(dataset) or "
                         "DataLoader(dataset, batch_size=..., collate_fn=...).")
    check_loader(loader, "train")
    return loader_indices(loader)


# --------------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------------
def featurize_shard(attributor: FeatureAttributor, loader: DataLoader, indices: list[int]
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None]:
    """``(features, kernels, row_factor)`` of the examples ``indices`` (in that order): per
    checkpoint ``c`` the float32 features ``[rows, width]`` and, for a method whose state needs
    it, their kernel ``Phi^T Phi`` in float64; and, for a method that weights each training
    example (TRAK's ``1 - p(correct)``), the float32 factor ``[rows]`` averaged over the
    checkpoints as ``attribute`` averages it (else ``None``)."""
    sub = _subloader(loader, indices)
    features: dict[str, Tensor] = {}
    kernels: dict[str, Tensor] = {}
    row_factor: Tensor | None = None
    num_checkpoints = attributor.task.num_checkpoints
    for c in range(num_checkpoints):
        buf: Tensor | None = None
        # ``expected``: every row of ``buf`` written, each at its own example's place
        for offset, feats in attributor.featurize(sub, checkpoint=c, expected=len(indices)):
            if buf is None:
                buf = torch.empty(len(indices), feats.shape[1], dtype=torch.float32)
            buf[offset:offset + feats.shape[0]] = feats.detach().float().cpu()
        assert buf is not None
        features[features_key(c)] = buf
        if attributor.needs_kernel:
            kernels[features_key(c)] = buf.double().T @ buf.double()
        if attributor.has_row_factors:
            factor = torch.empty(len(indices), dtype=torch.float32)
            for offset, f in attributor.row_factors(sub, checkpoint=c, expected=len(indices)):
                factor[offset:offset + f.shape[0]] = f.detach().float().cpu()
            # the same operations, in the same order, as FeatureAttributor.attribute
            factor = factor / num_checkpoints
            row_factor = factor if row_factor is None else row_factor + factor
    return features, kernels, row_factor


def inputs_sha256(loader: DataLoader) -> str:
    """sha256 of every collated batch of ``loader`` (tensor names, dtypes, shapes and bytes):
    what the features of a shard were computed from. Collating costs no gradient, so a resumed
    build checks each finished shard's inputs with it."""
    import hashlib

    h = hashlib.sha256()
    for batch in loader:
        _hash_value(h, batch)
    return h.hexdigest()


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(f"M{len(value)}:".encode())
        for key in sorted(value, key=str):
            h.update(f"{key!s}=".encode())
            _hash_value(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}:".encode())
        for item in value:
            _hash_value(h, item)
    else:
        h.update(f"V{value!r};".encode())


def _receipt_name(shard: int) -> str:
    return f"{BUILD_DIR}/shard-{shard:05d}.json"


def _kernel_name(shard: int) -> str:
    return f"{BUILD_DIR}/kernel-{shard:05d}.safetensors"


class FileHashes:
    """sha256 of files, each hashed once while its size and mtime stay the same: a build
    call checks a shard against its receipt, then again before the merge, without reading it
    twice (a file rewritten since gets a new mtime and is hashed again)."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[int, int, str]] = {}

    def entry(self, path: Path) -> dict[str, Any]:
        """``{"sha256": ..., "size": ...}`` of ``path`` (as ``hub.layout.file_entry``)."""
        path = path.resolve()
        stat = path.stat()
        known = self._known.get(path)
        if known is None or known[:2] != (stat.st_size, stat.st_mtime_ns):
            # stat before hashing: a write during the hash changes the mtime, so the next
            # call hashes again instead of trusting a hash of other bytes
            known = (stat.st_size, stat.st_mtime_ns, sha256_file(path))
            self._known[path] = known
        return {"sha256": known[2], "size": known[0]}


def _receipt_file(out: Path, receipt: Mapping[str, Any], key: str, expected: str,
                  hashes: FileHashes) -> Path | None:
    """The file ``receipt[key]`` names when it is ``expected`` (the receipt decides no path),
    stays inside ``out`` and matches the size and sha256 recorded; else ``None``."""
    entry = receipt.get(key)
    if not isinstance(entry, dict) or entry.get("file") != expected:
        return None
    try:
        file = confined_path(out, expected, where=f"{BUILD_DIR} receipt")
    except HubPathError:
        return None
    if not file.is_file() or hashes.entry(file) != {"sha256": entry.get("sha256"),
                                                    "size": entry.get("size")}:
        return None
    return file


def _valid_receipt(out: Path, shard: int, count: int, plan_sha: str, hashes: FileHashes,
                   kernel: bool) -> dict[str, Any] | None:
    """The shard's receipt when it and the files it names are intact, else ``None``."""
    import json

    try:
        path = confined_path(out, _receipt_name(shard), where="the build")
        receipt = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # HubPathError is a ValueError: a receipt linked elsewhere
        receipt = None
    if not isinstance(receipt, dict) or receipt.get("plan_sha256") != plan_sha:
        return None
    intact = _receipt_file(out, receipt, "shard", shard_file(shard, count), hashes) is not None
    if intact and kernel:
        intact = _receipt_file(out, receipt, "kernel", _kernel_name(shard), hashes) is not None
    if not intact:
        logger.warning("shard %d of %s does not match its receipt: computing it again",
                       shard, out)
        return None
    return receipt


def _same_inputs(receipt: Mapping[str, Any], loader: DataLoader, indices: list[int],
                 shard: int, out: Path) -> bool:
    """Whether a finished shard's collated inputs are still those it was computed from."""
    if receipt.get("inputs_sha256") == inputs_sha256(_subloader(loader, indices)):
        return True
    logger.warning("shard %d of %s was computed from other inputs (the examples or their "
                   "tokenisation changed since): computing it again", shard, out)
    return False


def _narrowed(features: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """``features`` cast to the index's ``dtype``, refused if the cast overflowed: float16
    holds at most 65504, and an inf feature would make every score of its row NaN."""
    out = features.to(dtype)
    if not bool(torch.isfinite(out).all()):
        top = features.abs().max().item()
        raise ValueError(
            f"features {name!r} reach {top:.3g}, which overflows the index dtype {dtype}: "
            "build with dtype='bfloat16' or 'float32' (or scale the loss down, e.g. a mean "
            "instead of a sum over tokens).")
    return out


def _write_shard(out: Path, shard: int, count: int, features: dict[str, Tensor],
                 kernels: dict[str, Tensor], row_factor: Tensor | None, indices: list[int],
                 dtype: torch.dtype, plan_sha: str, inputs_sha: str, hashes: FileHashes
                 ) -> dict[str, Any]:
    """Write a shard, its kernel share, then its receipt (last: a receipt means both are
    complete)."""
    name = shard_file(shard, count)
    tensors = {k: _narrowed(v, dtype, k) for k, v in features.items()}
    tensors["example_id"] = torch.tensor(indices, dtype=torch.int64)
    if row_factor is not None:  # float32 whatever the features' dtype: a factor of scores
        tensors[ROW_FACTOR] = row_factor.float()
    save_tensors_atomic(tensors, out / name, {"format": INDEX_KIND})
    receipt: dict[str, Any] = {"plan_sha256": plan_sha, "inputs_sha256": inputs_sha,
                               "shard": {"file": name, **hashes.entry(out / name)},
                               "kernel": None}
    if kernels:
        save_tensors_atomic(kernels, out / _kernel_name(shard))
        receipt["kernel"] = {"file": _kernel_name(shard),
                             **hashes.entry(out / _kernel_name(shard))}
    write_json_atomic(out / _receipt_name(shard), receipt)
    return receipt


# --------------------------------------------------------------------------------------------
# The plan (what a resumed build must match) and the final merge
# --------------------------------------------------------------------------------------------
def _check_plan(out: Path, plan: dict[str, Any]) -> str:
    """Write the plan, or check it against the one of the build already in ``out``."""
    import hashlib
    import json

    path = out / BUILD_DIR / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diffs = describe_differences(old.get("identity") or {}, plan["identity"])
            diffs += [f"{k}: on disk {old.get(k)!r}, now {plan.get(k)!r}" for k in sorted(plan)
                      if k != "identity" and old.get(k) != plan.get(k)]
            raise ValueError(
                f"{out} holds a build of another index (it differs in " + "; ".join(diffs)
                + f"). Build into an empty folder (--out), or delete {out} to start over.")
    elif (out / INDEX_FILE).exists():
        raise ValueError(f"{out} holds an index file but no build plan: it is not an index "
                         "this build can resume; choose an empty --out folder.")
    else:
        if out.exists() and any(p.name != BUILD_DIR for p in out.iterdir()):
            raise ValueError(f"{out} exists and is not an index build; choose an empty or new "
                             "--out folder.")
        write_json_atomic(path, plan)
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _merge(out: Path, attributor: FeatureAttributor, plan: dict[str, Any], plan_sha: str,
           meta: dict[str, Any], card: bool, hashes: FileHashes) -> bool:
    """Write the state, the card and the index file once every shard has a valid receipt."""
    count = plan["num_shards"]
    receipts = []
    for s in range(count):
        receipt = _valid_receipt(out, s, count, plan_sha, hashes, attributor.needs_kernel)
        if receipt is None:
            return False
        receipts.append(receipt)
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for c in range(plan["num_checkpoints"]):
        kernel = None
        if attributor.needs_kernel:
            for s in range(count):  # in shard order: the same sum on every run
                part = load_file(str(confined_path(out, _kernel_name(s))))[features_key(c)]
                kernel = part if kernel is None else kernel + part
        tensors = attributor.state_from_kernel(c, kernel)
        state.update({f"{features_key(c)}/{k}": v for k, v in tensors.items()})
    files = {r["shard"]["file"]: {"sha256": r["shard"]["sha256"], "size": r["shard"]["size"]}
             for r in receipts}
    kinds: dict[str, Any] = {FEATURES_KIND: {
        "num_rows": plan["num_rows"],
        "shards": [{"file": shard_file(s, count), "start": s * plan["rows_per_shard"],
                    "stop": min((s + 1) * plan["rows_per_shard"], plan["num_rows"])}
                   for s in range(count)]}}
    if state:
        save_tensors_atomic(state, out / STATE_FILE, {"format": INDEX_KIND})
        files[STATE_FILE] = hashes.entry(out / STATE_FILE)
        kinds["state"] = {"file": STATE_FILE}
    from hf_attrib.index.format import mmap_tensor

    meta["features"]["width"] = int(mmap_tensor(out / shard_file(0, count),
                                                features_key(0)).shape[1])
    feature_bytes = sum(r["shard"]["size"] for r in receipts)
    meta["sizes"] = {"feature_bytes": feature_bytes,
                     "bytes_per_example": feature_bytes / plan["num_rows"],
                     "state_bytes": files.get(STATE_FILE, {}).get("size", 0)}
    index = {"format": "hf-attrib-index/1", "repo_type": "model",
             "setting": f"attribution index ({meta['method']['name']}) of "
                        f"{meta['model']['id'] or 'a model'}",
             "attribution_index": meta, "kinds": kinds, "files": files}
    if card:
        from hf_attrib.index.card import index_card

        index_card(index).save(out / "README.md")
    write_json_atomic(out / INDEX_FILE, index)
    return True


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------
def build(task_or_attributor: AttributionTask | FeatureAttributor, train: Any, *,
          out: str | Path, method: str = "trak", dtype: str = "float16",
          shard_rows: int = DEFAULT_SHARD_ROWS, batch_size: int = 8,
          shard: tuple[int, int] | None = None, method_kwargs: Mapping[str, Any] | None = None,
          model_id: str | None = None, model_revision: str | None = None,
          dataset_id: str | None = None, dataset_revision: str | None = None,
          text_column: str | None = None, card: bool = True,
          dataloader_kwargs: Mapping[str, Any] | None = None) -> BuildResult:
    """Featurize a training set once into an attribution index folder (see the module).

    Args:
        task_or_attributor: an ``AttributionTask`` (``task_from_pretrained``) or a
            ``FeatureAttributor`` (TRAK, TracInCP, Grad-Dot, Grad-Cos) configured as wanted.
        train: the training set: a ``datasets.Dataset`` (tokenised with the task's
            ``dataloader``) or an unshuffled map-style ``DataLoader``. Row ``r`` of the index is
            the loader's ``r``-th example; its dataset index is stored as its example id.
        out: the index folder (new or empty, or a build of the same index to resume).
        method: the registered method when a task is given (``trak``, ``grad-dot``, ...).
        dtype: feature storage, ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        shard_rows: rows per shard (rounded up to a multiple of the batch size).
        batch_size: batch size of the loader made from a dataset.
        shard: ``(i, n)``: compute only shards ``i, i+n, ...`` (several processes split the
            build; the last to finish writes the index). Under ``torchrun``/``accelerate``
            the default is ``(rank, world_size)``.
        method_kwargs: options of the method's constructor (e.g. ``projector_kwargs``).
        model_id, model_revision: the Hub model recorded (default: from the model's config).
        dataset_id, dataset_revision: the training data recorded (default: from the dataset).
        text_column: the column holding each example's text (default ``text`` if present).
        card: write a ``README.md`` card.
        dataloader_kwargs: settings of ``task.dataloader`` for a dataset (``max_length``,
            ``text_column``...); recorded, and used for text queries too.

    Returns:
        A :class:`BuildResult`.

    Raises:
        ValueError: an unsupported method or loader, an unknown dtype, or ``out`` holding
            something else than a build of this index.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}.")
    attributor = resolve_attributor(task_or_attributor, method, method_kwargs)
    loader_kwargs = dict(dataloader_kwargs or {})
    # the column recorded for texts is the one tokenised, not a guess beside it
    if (text_column is not None and not isinstance(train, DataLoader)
            and loader_kwargs.setdefault("text_column", text_column) != text_column):
        raise ValueError(f"text_column={text_column!r} but dataloader_kwargs tokenise "
                         f"{loader_kwargs['text_column']!r}: give one column.")
    loader = _train_loader(attributor, train, batch_size, loader_kwargs)
    indices = _example_indices(loader)
    n = len(indices)
    if n != count_examples(loader):
        raise ValueError("the training loader's sampler and its batches disagree on the "
                         "number of examples; use an unshuffled DataLoader without drop_last.")
    rows = math.ceil(shard_rows / loader.batch_size) * loader.batch_size
    count = math.ceil(n / rows)
    identity = attributor.cache_identity()
    out = Path(out)
    rank, world = rank_and_world()
    if shard is None and world > 1:
        shard = (rank, world)
    first, step = shard if shard is not None else (0, 1)
    if not 0 <= first < step:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}.")
    dataset = train if not isinstance(train, DataLoader) else train.dataset
    meta = {"format": INDEX_KIND, "version": INDEX_VERSION, "hf_attrib_version": __version__,
            "model": _model_info(attributor, identity, model_id, model_revision),
            "method": {"name": _method_name(attributor), "class": type(attributor).__name__,
                       "kwargs": method_kwargs_of(attributor, method_kwargs)},
            "identity": identity,
            "dataset": _dataset_info(dataset, n, dataset_id, dataset_revision, text_column),
            "features": {"dtype": dtype, "num_checkpoints": attributor.task.num_checkpoints,
                         "rows_per_shard": rows, "num_shards": count,
                         "row_factors": attributor.has_row_factors,
                         "dataloader": {"batch_size": loader.batch_size,
                                        "kwargs": jsonable(loader_kwargs)},
                         "example_ids": "row r is the training loader's r-th example; each "
                                        "shard's example_id tensor holds its dataset index"}}
    plan = jsonable({"identity": identity, "num_rows": n, "rows_per_shard": rows,
                     "num_shards": count, "dtype": dtype,
                     "num_checkpoints": attributor.task.num_checkpoints,
                     "example_ids_sha256": _ids_sha(indices),
                     "dataset_fingerprint": meta["dataset"]["fingerprint"],
                     "dataloader": meta["features"]["dataloader"],
                     "method": meta["method"]})
    plan_sha = _check_plan(out, plan)
    result = BuildResult(out, n, count)
    hashes = FileHashes()
    for s in range(first, count, step):
        part = indices[s * rows:(s + 1) * rows]
        receipt = _valid_receipt(out, s, count, plan_sha, hashes, attributor.needs_kernel)
        if receipt is not None and _same_inputs(receipt, loader, part, s, out):
            result.skipped.append(s)
            continue
        features, kernels, row_factor = featurize_shard(attributor, loader, part)
        _write_shard(out, s, count, features, kernels, row_factor, part, DTYPES[dtype],
                     plan_sha, inputs_sha256(_subloader(loader, part)), hashes)
        result.computed.append(s)
        logger.info("index shard %d/%d written (%d rows)", s + 1, count, len(part))
    if world > 1:
        torch.distributed.barrier()
    if world == 1 or rank == 0:
        result.complete = _merge(out, attributor, plan, plan_sha, meta, card, hashes)
    if world > 1:
        torch.distributed.barrier()
        result.complete = (out / INDEX_FILE).is_file()
    return result


def _ids_sha(indices: list[int]) -> str:
    import hashlib

    return hashlib.sha256(torch.tensor(indices, dtype=torch.int64).numpy().tobytes()).hexdigest()
