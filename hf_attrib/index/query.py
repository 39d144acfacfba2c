"""``Index.open(path_or_repo).query(test, top_k=...)``: which training examples, from an index.

A score is the in-memory attributor's, ``sum_c w_c <u_c(x_i), T_c(v_c(x))>``, with the training
features ``u_c`` read from the index shards (memory-mapped, one shard at a time) instead of
recomputed: only the test examples are featurized. Opening an index checks it against the
attributor that featurizes the queries (method, options, projection seeds, layers, and the
sha256 of the model's weights) and refuses one built for anything else.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hf_attrib.algorithm.base import FeatureAttributor
from hf_attrib.algorithm.cache_store import describe_differences
from hf_attrib.files import FileStamp, file_stamp
from hf_attrib.hub.errors import HubIntegrityError
from hf_attrib.hub.layout import INDEX_FILE, read_index, verified_path
from hf_attrib.index.builder import ROW_FACTOR, resolve_attributor
from hf_attrib.index.format import (
    FEATURES_KIND,
    INDEX_KIND,
    INDEX_VERSION,
    STATE_FILE,
    features_key,
    mmap_tensor,
    parse_rows,
)
from hf_attrib.task import AttributionTask

__all__ = ["Index", "QueryResult"]


@dataclass
class QueryResult:
    """The top-k training examples of each query.

    Attributes:
        scores: ``[m, k]`` scores, best first (positive: the example raises the target).
        rows: ``[m, k]`` index rows.
        example_ids: ``[m, k]`` the examples' dataset indices.
        texts: ``texts[j][r]`` the text of query ``j``'s ``r``-th example when the training
            dataset is at hand, else ``None``.
    """

    scores: Tensor
    rows: Tensor
    example_ids: Tensor
    texts: list[list[str]] | None = None


class Index:
    """An opened attribution index (see ``hf_attrib.index``); build it with ``build``.

    Attributes:
        path: the local index folder.
        meta: its ``attribution_index`` entry (model, method, dataset, features, sizes).
        attributor: the attributor that featurizes the queries.
        num_rows: training examples indexed.
        rows: the rows ``query``, ``scores`` and ``example_ids`` cover by default (all, or
            those given to ``open``: the rows whose shards were pulled).
    """

    def __init__(self, path: Path, index: dict[str, Any], attributor: FeatureAttributor,
                 dataset: Any = None, rows: Any = None) -> None:
        self.path = path
        self.index = index
        self.meta = index["attribution_index"]
        self.attributor = attributor
        self.dataset = dataset
        self.num_rows = int(index["kinds"][FEATURES_KIND]["num_rows"])
        self.rows = parse_rows(rows, self.num_rows)
        self._shards = _checked_layout(index["kinds"][FEATURES_KIND]["shards"], self.num_rows,
                                       path)
        # shard file -> (its confined path, its stamp when its sha256 was checked)
        self._verified: dict[str, tuple[Path, FileStamp]] = {}

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path_or_repo: str | Path, *,
             task: AttributionTask | FeatureAttributor | None = None, model: Any = None,
             dataset: Any = None, rows: Any = None, revision: str | None = None,
             endpoint: str | None = None, token: str | None = None,
             cache_dir: str | Path | None = None, device: str | None = None) -> Index:
        """Open a local index folder, or pull an index repo from the Hub and open it.

        Args:
            path_or_repo: an index folder (``build``'s ``out``, a ``pull``) or a Hub repo id.
            task: the task (or a configured attributor) the queries are featurized with.
                Default: ``task_from_pretrained`` on ``model``, or on the model id and
                revision the index records, with its task kind and layers.
            model: a model (or id / folder) to use instead of the recorded one.
            dataset: the training dataset, to return each example's text with the results.
            rows: the rows to search by default (``"a:b"``; default all); from the Hub, only
                their shards are pulled.
            revision, endpoint, token, cache_dir: for a repo id (see ``pull_index``).
            device: where the model runs (default its own device).

        Raises:
            ValueError: the index was built for another model, revision, layer set, method
                or projection than the task's (the message says which and what to do).
            HubIntegrityError: a file does not match its recorded sha256.
        """
        path = Path(path_or_repo)
        if not path.is_dir():
            from hf_attrib.index.hub import pull_index

            path = pull_index(str(path_or_repo), rows=rows, revision=revision,
                              endpoint=endpoint, token=token, cache_dir=cache_dir)
        index = read_index(path)
        meta = index.get("attribution_index")
        if not isinstance(meta, dict) or meta.get("format") != INDEX_KIND:
            raise ValueError(f"{path / INDEX_FILE} is not an attribution index (it is an "
                             "hf-attrib repo of another kind); build one with "
                             "`hf-attrib index build`.")
        if meta.get("version", 0) > INDEX_VERSION:
            raise ValueError(f"{path} is an attribution index of version {meta.get('version')}"
                             f"; this hf_attrib reads up to {INDEX_VERSION}: upgrade hf_attrib.")
        attributor = _query_attributor(meta, task, model, device)
        differences = describe_differences(meta.get("identity") or {},
                                           attributor.cache_identity())
        if differences:
            recorded = meta["model"].get("id") or "its model"
            rev = meta["model"].get("revision")
            raise ValueError(
                f"the index at {path} was not built for this model and attributor; it differs "
                "in " + "; ".join(differences) + f". Query it with the model it was built for "
                f"({recorded}{'@' + rev if rev else ''}, the same layers and method options), "
                "or build an index for this model with `hf-attrib index build`.")
        opened = cls(path, index, attributor, dataset, rows)
        opened._restore_state()
        if dataset is not None:
            opened._check_dataset(dataset)
        return opened

    def _restore_state(self) -> None:
        tensors: dict[str, Tensor] = {}
        if "state" in self.index["kinds"]:
            from safetensors.torch import load_file

            tensors = load_file(str(verified_path(self.path, self.index, STATE_FILE)),
                                device=str(self.attributor.device))
        for c in range(self.meta["features"]["num_checkpoints"]):
            prefix = features_key(c) + "/"
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.attributor.restore_state(c, own)

    def _check_dataset(self, dataset: Any) -> None:
        recorded = self.meta["dataset"]
        fingerprint = getattr(dataset, "_fingerprint", None)
        # The dataset's length, not the rows indexed: an index of a subset stores dataset
        # indices as example ids. (An index that predates num_examples indexed it whole.)
        length = recorded.get("num_examples") or recorded["num_rows"]
        if len(dataset) != length or (
                recorded.get("fingerprint") and fingerprint
                and fingerprint != recorded["fingerprint"]):
            raise ValueError(
                f"the dataset given ({len(dataset)} rows, fingerprint {fingerprint}) is not the "
                f"one indexed ({length} rows, fingerprint {recorded.get('fingerprint')}, id "
                f"{recorded.get('id')}): pass the training set the index was built on to get "
                "texts, or none.")

    # -- reading shards --------------------------------------------------------------------------
    def _shard(self, entry: Mapping[str, Any], name: str) -> Tensor:
        """Tensor ``name`` of a shard, memory-mapped. The shard's sha256 is checked once per
        opened index; every later use re-checks its size and mtime (cheap), so that a file
        changed after the check is refused, never read unverified."""
        file = entry["file"]
        if file not in self._verified:
            missing = (f"{self.path / file} is missing: pull the shards of rows "
                       f"{entry['start']}:{entry['stop']} with `hf-attrib index pull REPO "
                       f"--rows {entry['start']}:{entry['stop']}` (or query only the rows you "
                       "pulled).")
            # stat before hashing: a write during the hash changes the mtime
            stamp = file_stamp(self.path / file)
            path = verified_path(self.path, self.index, file, missing=missing)
            self._verified[file] = (path, stamp or file_stamp(path))
        path, stamp = self._verified[file]
        if file_stamp(path) != stamp:
            raise HubIntegrityError(
                f"{self.path / file} changed on disk after its sha256 was checked (its size or "
                "modification time differ), so it is not read: open the index again "
                "(Index.open) to check it anew, and if you did not change it, rebuild or pull "
                "the index again.")
        tensor = mmap_tensor(path, name)
        rows = entry["stop"] - entry["start"]
        if tensor.shape[0] != rows:
            raise HubIntegrityError(
                f"{self.path / file} holds {tensor.shape[0]} rows of {name!r} but the index "
                f"records rows {entry['start']}:{entry['stop']} ({rows}) for it: the index file "
                "and its shards do not belong together; rebuild or pull the index again.")
        return tensor

    def _blocks(self, tests: list[Tensor], rows: range) -> Iterator[tuple[range, Tensor]]:
        """``(rows, scores [len(rows), m])`` shard by shard over ``rows``."""
        for entry in self._shards:
            start, stop = max(entry["start"], rows.start), min(entry["stop"], rows.stop)
            if start >= stop:
                continue
            local = slice(start - entry["start"], stop - entry["start"])
            block: Tensor | None = None
            for c, test in enumerate(tests):
                feats = self._shard(entry, features_key(c))[local]
                part = feats.to(test.dtype) @ test.T
                block = part if block is None else block + part
            assert block is not None
            if self.meta["features"].get("row_factors"):  # as attribute() applies it
                block = block * self._shard(entry, ROW_FACTOR)[local].to(block.dtype)[:, None]
            yield range(start, stop), block

    def example_ids(self, rows: Any = None) -> Tensor:
        """The dataset index of each row of ``rows`` (default ``self.rows``)."""
        wanted = self._rows(rows)
        out = []
        for entry in self._shards:
            start, stop = max(entry["start"], wanted.start), min(entry["stop"], wanted.stop)
            if start < stop:
                ids = self._shard(entry, "example_id")
                out.append(ids[start - entry["start"]:stop - entry["start"]].clone())
        return torch.cat(out)

    # -- queries ---------------------------------------------------------------------------------
    def test_features(self, test: Any, batch_size: int = 8) -> list[Tensor]:
        """Per checkpoint, the query side ``w_c T_c(v_c)`` ``[m, width]`` of ``test`` (texts,
        a ``datasets.Dataset`` or a ``DataLoader``), float32 on the CPU."""
        loader = self._test_loader(test, batch_size)
        att = self.attributor
        out = []
        for c in range(self.meta["features"]["num_checkpoints"]):
            feats = torch.cat([f for _, f in att.featurize(loader, c, kind=att.test_kind,
                                                            role="query")])
            out.append(att.query_transform(c, feats).float().cpu())
        return out

    def scores(self, test: Any, rows: Any = None, batch_size: int = 8) -> Tensor:
        """Scores ``[len(rows), m]``: every indexed training example of ``rows`` (default
        ``self.rows``) against each query, as the in-memory attributor's ``attribute`` returns
        them."""
        wanted = self._rows(rows)
        tests = self.test_features(test, batch_size)
        out = torch.empty(len(wanted), tests[0].shape[0])
        for got, block in self._blocks(tests, wanted):
            out[got.start - wanted.start:got.stop - wanted.start] = block
        return out

    def query(self, test: Any, top_k: int = 10, rows: Any = None,
              batch_size: int = 8) -> QueryResult:
        """The ``top_k`` highest-scoring training examples of each query.

        Args:
            test: the queries: a text, a list of texts, a ``datasets.Dataset`` or a
                ``DataLoader`` built as the training loader was.
            top_k: examples per query.
            rows: search only these index rows (``"a:b"``; default ``self.rows``).
            batch_size: batch size for featurizing the queries.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        wanted = self._rows(rows)
        tests = self.test_features(test, batch_size)
        best_scores: Tensor | None = None
        best_rows: Tensor | None = None
        for got, block in self._blocks(tests, wanted):
            k = min(top_k, block.shape[0])
            values, where = block.topk(k, dim=0)  # [k, m]
            where = where + got.start
            if best_scores is not None:
                values = torch.cat([best_scores, values])
                where = torch.cat([best_rows, where])
                values, pick = values.topk(min(top_k, values.shape[0]), dim=0)
                where = where.gather(0, pick)
            best_scores, best_rows = values, where
        assert best_scores is not None and best_rows is not None
        scores, rows_t = best_scores.T.contiguous(), best_rows.T.contiguous()
        ids = self._ids_of(rows_t)
        return QueryResult(scores, rows_t, ids, self._texts(ids))

    def _rows(self, rows: Any) -> range:
        return self.rows if rows is None else parse_rows(rows, self.num_rows)

    def _ids_of(self, rows: Tensor) -> Tensor:
        out = torch.empty_like(rows)
        for entry in self._shards:
            inside = (rows >= entry["start"]) & (rows < entry["stop"])
            if bool(inside.any()):
                ids = self._shard(entry, "example_id")
                out[inside] = ids[rows[inside] - entry["start"]]
        return out

    def _texts(self, ids: Tensor) -> list[list[str]] | None:
        column = self.meta["dataset"].get("text_column")
        if self.dataset is None or column is None:
            return None
        # one batched read of the column (row by row reads whole rows, many times slower)
        flat = self.dataset.select_columns([column])[ids.reshape(-1).tolist()][column]
        k = ids.shape[1]
        return [[str(t) for t in flat[j * k:(j + 1) * k]] for j in range(ids.shape[0])]

    def _test_loader(self, test: Any, batch_size: int) -> Any:
        if isinstance(test, DataLoader):
            return test
        if isinstance(test, str):
            test = [test]
        if isinstance(test, Sequence) and all(isinstance(t, str) for t in test):
            from datasets import Dataset

            column = self.meta["dataset"].get("text_column") or "text"
            test = Dataset.from_dict({column: list(test)})
        maker = getattr(self.attributor.task, "dataloader", None)
        if not callable(maker):
            raise TypeError("queries must be a DataLoader built as the training loader was "
                            "(this task has no dataloader() for texts or datasets).")
        # tokenised as the training set was (its truncation), whatever the tokenizer's default
        recorded = (self.meta["features"].get("dataloader") or {}).get("kwargs") or {}
        extra = {k: recorded[k] for k in ("max_length", "text_column")
                 if recorded.get(k) is not None}
        return maker(test, batch_size=batch_size, **extra)


def _query_attributor(meta: Mapping[str, Any], task: Any, model: Any,
                      device: str | None) -> FeatureAttributor:
    """The attributor that featurizes queries: the given one, the method on the given task, or
    the method on the recorded model loaded with ``task_from_pretrained``."""
    kwargs = dict(meta["method"].get("kwargs") or {})
    # Recorded by name only; the task supplies its own (task.attributor does), and the
    # identity check (its "row_factor" option) refuses a query side without one.
    kwargs.pop("correct_probability_func", None)
    if isinstance(task, FeatureAttributor):
        return resolve_attributor(task)
    if task is None:
        from hf_attrib.integrations.transformers import task_from_pretrained

        recorded = meta["model"]
        source = model if model is not None else recorded.get("id")
        if source is None or recorded.get("task") is None:
            raise ValueError("the index does not record a loadable model (it was built from "
                             "a model without a Hub id or task kind): pass task=... (or "
                             "--model) to query it.")
        revision = recorded.get("revision") if model is None else None
        task = task_from_pretrained(source, task=recorded["task"], layers=recorded["layers"],
                                    revision=revision, device=device)
    if device is not None:
        kwargs["device"] = device
    return resolve_attributor(task, meta["method"]["name"], kwargs)


def _checked_layout(shards: list[Mapping[str, Any]], num_rows: int, path: Path
                    ) -> list[Mapping[str, Any]]:
    """``shards`` if they cover rows ``0:num_rows`` in order, without gap or overlap: the index
    file is the root of trust, and a row no shard holds would be scored as garbage."""
    expected = 0
    for entry in shards:
        if entry["start"] != expected or entry["stop"] <= entry["start"]:
            break
        expected = entry["stop"]
    else:
        if expected == num_rows:
            return shards
    spans = ", ".join(f"{e['start']}:{e['stop']}" for e in shards)
    raise HubIntegrityError(
        f"the index at {path} records {num_rows} rows but its shards cover {spans or 'none'}: "
        "they must run from 0 to num_rows without gaps; the index file is damaged, so rebuild "
        "or pull the index again.")
