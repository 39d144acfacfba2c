"""The on-disk layout of an attribution index (a Hub model repo folder).

::

    hf_attrib_index.json                     what the index is (below) and the sha256 of every file
    README.md                                the repo card
    features/shard-00000-of-00025.safetensors  rows [0, 4096): one [rows, width] tensor per
    features/shard-00001-of-00025.safetensors  checkpoint ("checkpoint-0", ...) and
    ...                                        "example_id" (each row's dataset index)
    state.safetensors                        the method's query-time state (TRAK: the kernel
                                             inverse per checkpoint), absent when it has none
    .build/                                  build bookkeeping (plan, per-shard receipts and
                                             kernel sums); never pushed

``hf_attrib_index.json`` is an ``hf-attrib-index/1`` file (``hf_attrib.hub.layout``: ``files``
maps every file to its sha256 and size, ``kinds`` names the shards), so the Hub code pushes,
pulls and verifies an index like any hf-attrib repo. Its ``attribution_index`` entry says what
was indexed: model (id, revision, task, layers, weights sha256), method and options, the
projection, the dataset (id, revision, fingerprint) and the feature dtype and width.

Every write is atomic (a temporary file in the same folder, fsynced, renamed over the target),
so a killed build leaves whole files or none. Shards are read memory-mapped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hf_attrib.files import write_atomic  # its home; re-exported (indexes import it here)
from hf_attrib.hub.layout import INDEX_FILE, save_safetensors, shard_name

__all__ = [
    "BUILD_DIR",
    "DTYPES",
    "FEATURES_KIND",
    "INDEX_FILE",
    "INDEX_KIND",
    "INDEX_VERSION",
    "STATE_FILE",
    "features_key",
    "mmap_tensor",
    "parse_rows",
    "save_tensors_atomic",
    "shard_file",
    "write_atomic",
    "write_json_atomic",
]

#: ``attribution_index.format`` of an index file.
INDEX_KIND = "hf_attrib.attribution-index"
#: Version of the layout this package writes (and the highest it reads).
INDEX_VERSION = 1
#: The ``kinds`` entry of the feature shards.
FEATURES_KIND = "features"
#: The method's query-time state.
STATE_FILE = "state.safetensors"
#: Build bookkeeping, never pushed (not named by the index).
BUILD_DIR = ".build"
#: Storage dtypes of the features.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# safetensors dtype names -> (NumPy dtype of the bytes, torch dtype to view them as)
_SAFETENSORS = {"F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16),
                "F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64),
                "I64": (np.int64, torch.int64)}


def shard_file(index: int, count: int) -> str:
    """``features/shard-00003-of-00025.safetensors``."""
    return shard_name(FEATURES_KIND, index, count)


def features_key(checkpoint: int) -> str:
    """The tensor name of checkpoint ``checkpoint``'s features in a shard."""
    return f"checkpoint-{checkpoint}"


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON data to ``path`` atomically (sorted keys: the same data, the same bytes)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_tensors_atomic(tensors: Mapping[str, Tensor], path: Path,
                        metadata: Mapping[str, str] | None = None) -> None:
    """``hub.layout.save_safetensors`` (reproducible bytes), written atomically."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_safetensors(cpu, tmp, metadata))


def mmap_tensor(path: Path, name: str) -> Tensor:
    """Tensor ``name`` of a safetensors file, memory-mapped (copy-on-write: the file is
    never written), so reading a shard costs page cache, not a copy in memory."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    entry = header.get(name)
    if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS:
        raise KeyError(f"{path} holds no tensor {name!r} of a supported dtype; rebuild the "
                       "index (`hf-attrib index build`) or pull an intact copy.")
    np_dtype, torch_dtype = _SAFETENSORS[entry["dtype"]]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if int(np.prod(shape)) * np.dtype(np_dtype).itemsize != end - begin:
        raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}; "
                         "the file is damaged: rebuild or pull it again.")
    if end == begin:
        return torch.empty(shape, dtype=torch_dtype)
    array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + size + begin, shape=shape)
    tensor = torch.from_numpy(array)
    return tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor


def parse_rows(rows: Any, total: int) -> range:
    """``None``, ``"a:b"``, ``(a, b)``, a ``slice`` or a ``range`` -> the rows ``range(a, b)``."""
    if rows is None:
        return range(total)
    if isinstance(rows, str):
        try:
            a_text, b_text = rows.split(":")
            a = int(a_text) if a_text else 0
            b = int(b_text) if b_text else total
        except ValueError:
            raise ValueError(f"rows {rows!r}: expected 'a:b' (e.g. 0:10000).") from None
    elif isinstance(rows, (slice, range)):
        a, b = rows.start or 0, total if rows.stop is None else rows.stop
    else:
        a, b = rows
    if not 0 <= a < b <= total:
        raise ValueError(f"rows {a}:{b} are outside the index's {total} rows (need "
                         f"0 <= a < b <= {total}).")
    return range(a, b)
