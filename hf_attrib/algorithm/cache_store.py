"""Persistent attributor caches: a folder of safetensors files and a ``cache.json`` manifest.

``attributor.save_cache(folder)`` writes what ``cache()`` computed (training features per
checkpoint, per-example row factors, per-checkpoint states such as kernel inverses or
eigendecompositions) and ``attributor.load_cache(folder)`` restores it in another attributor,
in another process, so that ``attribute``/``self_attribute`` do not recompute the training set.
This module is the format; the attributors decide what goes in it.

Layout of a cache folder::

    cache.json                              the manifest (below)
    tensors-00000-of-00002.safetensors      the tensors, packed into files of at most
    tensors-00001-of-00002.safetensors      2 GiB (a larger tensor is split along rows)

The manifest records the format version, the hf_attrib version, an ``identity`` (the method,
its options that change the cached results, the selected parameters with their shapes, the
number of checkpoints and a sha256 of each checkpoint's weights: see
:func:`weights_fingerprint`), the number of training examples, what each checkpoint holds,
where every tensor lives (``tensors``) and the size and sha256 of every file (``files``).

Reading (:func:`read_cache`) refuses a file whose sha256 or size differs from the manifest's
(:class:`CacheIntegrityError`, naming the file), a file name that is not a plain name inside
the folder (``..``, an absolute path, a symbolic link leading out), and a manifest of an
unknown format. Writing (:func:`write_cache`) is atomic: the folder is written under a
temporary name in the same parent, every file is fsynced, and only then is an existing cache
replaced (renamed away, the new one renamed in, the old one deleted); on any error the old
cache is left as it was, and a process killed between the two renames leaves the old cache
renamed aside, which the next read or write renames back (``hf_attrib.files``). An existing
folder that is not an hf_attrib cache is never replaced. A split tensor whose recorded pieces
do not cover all its rows is refused.

The manifest also records ``train_fingerprint``, a sha256 over the training loader's batches
(``hf_attrib.loaders.loader_fingerprint``): a loaded cache is only used with a train loader of
the same fingerprint (``BaseAttributor.load_cache``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hf_attrib import __version__
from hf_attrib.files import (
    FileStamp,
    file_matches,
    file_stamp,
    fsync_dir,
    leftover_folders,
    replace_folder,
    resolved_inside,
    restore_replaced_folder,
    sha256_file,
)
from hf_attrib.model_utils.block_store import tensor_bytes

__all__ = [
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_SHARD_BYTES",
    "CacheIntegrityError",
    "CacheReader",
    "describe_differences",
    "jsonable",
    "read_cache",
    "weights_fingerprint",
    "write_cache",
]

#: The manifest's ``format`` value.
CACHE_FORMAT = "hf_attrib.attributor-cache"
#: Version of the layout this module writes (and the highest it reads).
CACHE_FORMAT_VERSION = 1
#: The manifest's file name inside a cache folder.
MANIFEST_NAME = "cache.json"
#: Largest tensor file written (bytes of tensor data; a larger tensor is split along rows).
MAX_SHARD_BYTES = 2 * 2**30

# The only file names a cache folder may hold besides the manifest: plain names, no path
# separators, no leading dot (so no "..", no hidden temporary files).
_TENSOR_FILE = re.compile(r"tensors-\d{5}-of-\d{5}\.safetensors")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REBUILD = ("Delete the folder and re-run cache(train_loader) and save_cache(folder) to "
            "rebuild it.")


class CacheIntegrityError(ValueError):
    """A cache folder's file is missing, corrupted, edited, or points outside the folder."""


# --------------------------------------------------------------------------------------------
# Fingerprints and JSON values
# --------------------------------------------------------------------------------------------
def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model`` (names, dtypes, shapes, bytes).

    All the weights, not only the selected ones: a training feature (the gradient through the
    selected layers) depends on every layer of the model, so a cache built for other weights
    anywhere in the model is stale. Names are visited in sorted order, so the fingerprint does
    not depend on module registration order. Costs one read of the weights (a 124M-parameter
    model: about half a second on a CPU).
    """
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode())
        h.update(tensor_bytes(value))
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """``value`` as JSON data, as it reads back from ``cache.json`` (tuples become lists,
    tensors and NumPy scalars plain numbers/lists, callables their qualified name, other
    objects their ``repr``), so that a saved option and a current one compare equal exactly
    when they are the same."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Tensor):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        return jsonable(value.item())
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"
    return repr(value)


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a saved cache identity and an attributor's, one phrase each.

    Both are the ``identity`` mappings attributors build (``method``, ``parameters``,
    ``options``, ``num_checkpoints``, ``weights_sha256``, ``projectors``), as JSON data.
    """
    out: list[str] = []
    if saved.get("method") != current.get("method"):
        out.append(f"the method: the cache was built by {saved.get('method')}, this attributor "
                   f"is {current.get('method')}")
    s_params, c_params = saved.get("parameters"), current.get("parameters")
    if s_params != c_params and _without_dtypes(s_params) == _without_dtypes(c_params):
        out.append("the parameters' dtypes: cache "
                   f"{sorted({p[2] for p in s_params})}, this model "
                   f"{sorted({p[2] for p in c_params})} (load the model in the dtype the cache "
                   "was built with)")
    elif s_params != c_params:
        out.append("the layer selection: the cache holds gradients through "
                   f"{_parameters(saved.get('parameters'))}, this attributor selects "
                   f"{_parameters(current.get('parameters'))}")
    s_opts, c_opts = saved.get("options") or {}, current.get("options") or {}
    for key in sorted(set(s_opts) | set(c_opts)):
        if s_opts.get(key, "<unset>") != c_opts.get(key, "<unset>"):
            out.append(f"option {key}: cache {s_opts.get(key, '<unset>')!r}, this attributor "
                       f"{c_opts.get(key, '<unset>')!r}")
    if saved.get("num_checkpoints") != current.get("num_checkpoints"):
        out.append(f"the number of checkpoints: cache {saved.get('num_checkpoints')}, this "
                   f"task {current.get('num_checkpoints')}")
    else:
        out += _weights_differences(saved.get("weights_sha256"),
                                    current.get("weights_sha256"))
        s_proj, c_proj = saved.get("projectors"), current.get("projectors")
        if s_proj != c_proj:
            out.append(f"the projection: cache {s_proj}, this attributor {c_proj} (a projector "
                       "resolved on another device, e.g. proj_type='auto' is sparse on a CPU "
                       "and dense on a GPU: pass proj_type explicitly)")
    known = {"method", "parameters", "options", "num_checkpoints", "weights_sha256",
             "projectors"}
    for key in sorted((set(saved) | set(current)) - known):  # a newer identity's entries
        if saved.get(key, "<unset>") != current.get(key, "<unset>"):
            out.append(f"{key}: cache {saved.get(key, '<unset>')!r}, this attributor "
                       f"{current.get(key, '<unset>')!r}")
    return out


def _weights_differences(saved: Any, current: Any) -> list[str]:
    """The checkpoints whose weights sha256 differ, the two lists compared whole (a missing
    or shorter list is a difference, never a match)."""
    if saved == current:
        return []
    if not isinstance(saved, list) or not isinstance(current, list):
        return [f"the checkpoints' weights sha256 (cache {saved!r}, this task {current!r})"]
    out = []
    for i in range(max(len(saved), len(current))):
        s = saved[i] if i < len(saved) else "<none>"
        c = current[i] if i < len(current) else "<none>"
        if s != c:
            out.append(f"checkpoint {i}'s weights (sha256 {str(s)[:12]}... in the cache, "
                       f"{str(c)[:12]}... in this task)")
    return out


def _without_dtypes(params: Any) -> Any:
    """``[[name, shape], ...]`` of ``[[name, shape, dtype], ...]`` (else ``params``)."""
    if isinstance(params, list) and all(isinstance(p, list) and len(p) == 3 for p in params):
        return [p[:2] for p in params]
    return params


def _parameters(params: Any) -> str:
    if not isinstance(params, list):
        return repr(params)
    shown = [f"{p[0]} {tuple(p[1])}" if isinstance(p, list) and len(p) >= 2 else repr(p)
             for p in params[:6]]
    more = f" and {len(params) - 6} more" if len(params) > 6 else ""
    return "[" + ", ".join(shown) + more + "]"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def write_cache(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                manifest: Mapping[str, Any], *, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``tensors`` and ``manifest`` as a cache folder at ``path``, atomically.

    Args:
        path: the cache folder. If it exists it must be an hf_attrib cache (it is replaced,
            only once the new one is completely written) or empty.
        tensors: the named tensors (moved to the CPU; any dtype safetensors stores).
        manifest: JSON data describing them; ``format``, ``format_version``, ``tensors`` and
            ``files`` are added.
        max_shard_bytes: most tensor bytes per file.

    Returns:
        The folder's path.

    Raises:
        ValueError: ``path`` exists and is not an hf_attrib cache folder (or is a file).
    """
    path = Path(path)
    restore_replaced_folder(path)  # a save killed between its renames left the old cache aside
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        layout, files = _write_tensors(tmp, tensors, max_shard_bytes)
        full = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
                "hf_attrib_version": __version__, **jsonable(dict(manifest)),
                "tensors": layout, "files": files}
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
            json.dump(full, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in leftover_folders(path):  # earlier saves killed while deleting the old cache
        shutil.rmtree(stale, ignore_errors=True)
    return path


def _check_replaceable(path: Path) -> None:
    """Refuse to write over anything but an hf_attrib cache folder or an empty folder
    (``save_cache`` replaces the whole folder; it must never delete a user's files)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ValueError(f"{path} exists and is not a folder; save_cache writes a folder: "
                         "pass a new path.")
    if not path.exists():
        return
    names = sorted(p.name for p in path.iterdir())
    foreign = [n for n in names if n != MANIFEST_NAME and not _TENSOR_FILE.fullmatch(n)]
    if foreign or (names and MANIFEST_NAME not in names):
        raise ValueError(
            f"{path} exists and is not an hf_attrib cache (it holds {foreign[:5] or names[:5]}"
            f"{' ...' if len(foreign or names) > 5 else ''}); save_cache replaces the folder it "
            "writes, so it only overwrites an earlier cache or an empty folder. Pass a new "
            "path.")


def _plan(tensors: Mapping[str, Tensor], max_bytes: int
          ) -> list[list[tuple[str, str, int, int]]]:
    """Files as lists of ``(tensor name, key in the file, first row, stop row)``: tensors are
    packed in order into files of at most ``max_bytes``; a larger tensor is split along its
    first dimension (a 0-d or 1-row tensor is never split)."""
    files: list[list[tuple[str, str, int, int]]] = [[]]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        rows = t.shape[0] if t.dim() else 1
        if nbytes <= max_bytes or rows <= 1:
            pieces = [(name, name, 0, rows)]
        else:
            step = max(1, max_bytes // max(1, nbytes // rows))
            pieces = [(name, f"{name}@{i}", start, min(start + step, rows))
                      for i, start in enumerate(range(0, rows, step))]
        row_bytes = nbytes // max(1, rows)  # a tensor of 0 rows is one empty piece
        for piece in pieces:
            size = (piece[3] - piece[2]) * row_bytes
            if files[-1] and used + size > max_bytes:
                files.append([])
                used = 0
            files[-1].append(piece)
            used += size
    return files if files[0] else []


def _write_tensors(folder: Path, tensors: Mapping[str, Tensor], max_bytes: int
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import save_file

    plan = _plan(tensors, max_bytes)
    layout: dict[str, Any] = {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
               "parts": []} for name, t in tensors.items()}
    files: dict[str, Any] = {}
    for i, pieces in enumerate(plan):
        file_name = f"tensors-{i:05d}-of-{len(plan):05d}.safetensors"
        content = {}
        for name, key, start, stop in pieces:
            t = tensors[name].detach().cpu()
            whole = key == name
            # a piece is copied: safetensors refuses tensors sharing storage in one file
            content[key] = t.contiguous() if whole else t[start:stop].contiguous().clone()
            layout[name]["parts"].append({"file": file_name, "key": key, "rows": stop - start})
        target = folder / file_name
        save_file(content, str(target), metadata={"format": CACHE_FORMAT})
        del content
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
        files[file_name] = {"sha256": sha256_file(target), "size": target.stat().st_size}
    return layout, files


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class CacheReader:
    """A verified cache folder: its manifest, and its tensors read on demand.

    Built by :func:`read_cache`, which has checked every file's size and sha256.

    Attributes:
        path: the folder.
        manifest: the parsed ``cache.json``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any],
                 files: dict[str, tuple[Path, FileStamp]]) -> None:
        self.path = path
        self.manifest = manifest
        self._files = files  # name -> (path, its stamp when its sha256 was checked)

    def names(self) -> list[str]:
        """Names of the tensors in the cache."""
        return list(self.manifest["tensors"])

    def __contains__(self, name: str) -> bool:
        return name in self.manifest["tensors"]

    def tensor(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """The tensor ``name`` on ``device`` (its pieces joined when it was split).

        Raises:
            KeyError: no tensor of that name.
            CacheIntegrityError: the stored pieces do not make the recorded dtype and shape.
        """
        entry = self.manifest["tensors"][name]
        out: Tensor | None = None
        row = 0
        for part in entry["parts"]:
            piece = self._part(part, device)
            self._check_piece(name, piece, entry, row, part["rows"])
            if len(entry["parts"]) == 1:
                out = piece
            else:  # copied into place: the tensor never exists twice in memory
                if out is None:
                    out = piece.new_empty(entry["shape"])
                out[row:row + part["rows"]] = piece
            row += part["rows"]
        # Pieces that stop short of the last row would leave new_empty's uninitialised rows.
        covered = row == (entry["shape"][0] if entry["shape"] else 1)
        if out is None or list(out.shape) != entry["shape"] or not covered:
            raise CacheIntegrityError(
                f"tensor {name!r} in {self.path}: its pieces do not make the shape "
                f"{entry['shape']} that {MANIFEST_NAME} records. {_REBUILD}")
        return out

    def _part(self, part: Mapping[str, Any], device: torch.device | str) -> Tensor:
        from safetensors import safe_open

        path, stamp = self._files[part["file"]]
        if file_stamp(path) != stamp:
            raise CacheIntegrityError(
                f"{path} changed on disk after read_cache checked its sha256 (another "
                "save_cache replaced the folder?), so it is not read: load the cache again.")
        with safe_open(str(path), framework="pt",
                       device=str(device)) as f:
            if part["key"] not in set(f.keys()):
                raise CacheIntegrityError(
                    f"{part['file']} in {self.path} has no tensor {part['key']!r}, which "
                    f"{MANIFEST_NAME} lists. {_REBUILD}")
            return f.get_tensor(part["key"])

    def _check_piece(self, name: str, piece: Tensor, entry: Mapping[str, Any], row: int,
                     rows: Any) -> None:
        shape = entry["shape"]
        expected = shape if len(entry["parts"]) == 1 else [rows, *shape[1:]]
        if (str(piece.dtype).removeprefix("torch.") != entry["dtype"]
                or list(piece.shape) != expected or (shape and row + piece.shape[0] > shape[0])):
            raise CacheIntegrityError(
                f"tensor {name!r} in {self.path} is stored as {piece.dtype} "
                f"{list(piece.shape)}, but {MANIFEST_NAME} records {entry['dtype']} {shape}. "
                f"{_REBUILD}")


def read_cache(path: str | os.PathLike) -> CacheReader:
    """Open the cache folder ``path``, checking its manifest and every file's size and sha256.

    Raises:
        FileNotFoundError: no folder or no ``cache.json`` there.
        ValueError: the manifest is not valid JSON, not an hf_attrib cache, or of a newer
            format.
        CacheIntegrityError: a file is missing, differs from its recorded size/sha256, or
            its name leads outside the folder.
    """
    folder = Path(path)
    restore_replaced_folder(folder)  # a save killed between its renames left it aside
    if not folder.is_dir():
        left = leftover_folders(folder)
        hint = (f" ({len(left)} earlier caches were left aside by interrupted saves, e.g. "
                f"{left[0].name}: rename the intact one to {folder.name})" if left else "")
        raise FileNotFoundError(f"no cache folder at {folder}{hint}; write one with "
                                "attributor.save_cache(folder) after cache(train_loader).")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST_NAME}: it is not an hf_attrib "
                                "cache (write one with attributor.save_cache(folder)).")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}). {_REBUILD}") from None
    _check_manifest(manifest, manifest_path)
    files = {name: _verified(folder, name, entry) for name, entry in manifest["files"].items()}
    for name, entry in manifest["tensors"].items():
        for part in entry["parts"]:
            if part["file"] not in files:
                raise CacheIntegrityError(
                    f"{MANIFEST_NAME} in {folder} places tensor {name!r} in {part['file']!r}, "
                    f"which its 'files' list does not hold (so its sha256 is unknown). "
                    f"{_REBUILD}")
    return CacheReader(folder, manifest, files)


def _check_manifest(manifest: Any, source: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{source} is not an hf_attrib attributor cache manifest (no "
                         f"'format': {CACHE_FORMAT!r}). {_REBUILD}")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise ValueError(f"{source} has no valid format_version. {_REBUILD}")
    if version > CACHE_FORMAT_VERSION:
        raise ValueError(
            f"{source} is a cache of format version {version}, written by hf_attrib "
            f"{manifest.get('hf_attrib_version', '?')}; this hf_attrib reads up to version "
            f"{CACHE_FORMAT_VERSION}. Upgrade hf_attrib, or rebuild the cache with this one.")
    files, tensors = manifest.get("files"), manifest.get("tensors")
    ok = isinstance(files, dict) and isinstance(tensors, dict) and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str)
        and _HEX64.fullmatch(e["sha256"]) and type(e.get("size")) is int
        for e in files.values()) and all(
        isinstance(e, dict) and isinstance(e.get("parts"), list)
        and all(isinstance(p, dict) and isinstance(p.get("file"), str)
                and isinstance(p.get("key"), str) and type(p.get("rows")) is int
                for p in e["parts"])
        and isinstance(e.get("shape"), list) and all(type(d) is int for d in e["shape"])
        and isinstance(e.get("dtype"), str)
        for e in tensors.values())
    if not ok:
        raise ValueError(f"{source} is malformed: 'files' must map file names to "
                         "{'sha256': <64 hex digits>, 'size': <bytes>} and 'tensors' tensor "
                         f"names to their dtype, shape and parts. {_REBUILD}")


def _verified(folder: Path, name: str, entry: Mapping[str, Any]) -> tuple[Path, FileStamp]:
    """``folder / name`` and its stamp, refused unless it is a tensor file directly inside
    ``folder`` (after resolving symbolic links) whose size and sha256 are those recorded. The
    stamp is taken before hashing, so a file replaced since (a concurrent ``save_cache``) is
    refused when read."""
    target = resolved_inside(folder, name) if _TENSOR_FILE.fullmatch(name) else None
    if target is None or target.parent != folder.resolve():
        raise CacheIntegrityError(
            f"{MANIFEST_NAME} in {folder} names the file {name!r}, which is not a tensor file "
            "inside the cache folder (a path, '..', or a link leading out); a cache may only "
            f"name its own tensors-NNNNN-of-NNNNN.safetensors files. {_REBUILD}")
    stamp = file_stamp(target) if target.is_file() else None
    if stamp is None:
        raise CacheIntegrityError(f"cache file {name} is missing from {folder}. {_REBUILD}")
    if not file_matches(target, entry["size"], entry["sha256"]):
        raise CacheIntegrityError(
            f"cache file {name} ({target}) does not match the size/sha256 recorded in "
            f"{MANIFEST_NAME}: it was corrupted or edited after save_cache. {_REBUILD}")
    return target, stamp
