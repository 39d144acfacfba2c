"""Names and paths of the hf_attrib Hub repositories (the spec is ``docs/hub.md``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_attrib.files import resolved_inside, sha256_file, snapshot_roots
from hf_attrib.hub.errors import HubIntegrityError, HubNotFoundError, HubPathError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "CHECKPOINTS_FORMAT",
    "DEFAULT_ORG",
    "DEFAULT_RESULTS_REPO",
    "GROUND_TRUTH_FORMAT",
    "INDEX_FILE",
    "check_folder",
    "check_relative",
    "checkpoints_repo_id",
    "confined_path",
    "dataset_repo_id",
    "file_entry",
    "indexed_names",
    "parse_index",
    "read_index",
    "save_safetensors",
    "setting_slug",
    "sha256_file",
    "shard_name",
    "verified_path",
]

DEFAULT_ORG = "hf-attrib"
DEFAULT_RESULTS_REPO = f"{DEFAULT_ORG}/attribution-results"
INDEX_FILE = "hf_attrib_index.json"
INDEX_FORMAT = "hf-attrib-index/1"
CHECKPOINTS_FORMAT = "hf-attrib-checkpoints/1"
# /2: the LDS subsets bit-packed (`masks_packed`); /1 exports stored them as bool `masks`.
GROUND_TRUTH_FORMAT = "hf-attrib-ground-truth/2"
RESULTS_FORMAT = "hf-attrib-results/1"
CHECKPOINTS_SUFFIX = "-checkpoints"
# The keys inside checkpoint shards (MODEL_IDS_KEY, BUFFER_PREFIX) are the block format's:
# hf_attrib.model_utils.block_store is their home. They stay importable from here, loaded on
# first use (this module is imported by `hf-attrib --help`, which must not import torch).
_BLOCK_FORMAT_NAMES = ("BUFFER_PREFIX", "MODEL_IDS_KEY")


def __getattr__(name: str) -> Any:
    if name in _BLOCK_FORMAT_NAMES:
        from hf_attrib.model_utils import block_store

        return getattr(block_store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def setting_slug(name: str) -> str:
    """``digits_lr`` -> ``digits-lr`` (repo names use dashes)."""
    return name.strip().lower().replace("_", "-")


def dataset_repo_id(setting: str, org: str = DEFAULT_ORG) -> str:
    """The dataset repo of a setting: ``<org>/<setting>``."""
    return f"{org}/{setting_slug(setting)}"


def checkpoints_repo_id(setting: str, org: str = DEFAULT_ORG) -> str:
    """The checkpoint repo of a setting: ``<org>/<setting>-checkpoints``."""
    return f"{org}/{setting_slug(setting)}{CHECKPOINTS_SUFFIX}"


def shard_name(kind: str, index: int, count: int) -> str:
    """``lds/shard-00000-of-00004.safetensors``."""
    return f"{kind}/shard-{index:05d}-of-{count:05d}.safetensors"


def file_entry(path: str | Path) -> dict[str, Any]:
    """``{"sha256": ..., "size": ...}`` of a file (recorded in the index)."""
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size}


# --------------------------------------------------------------------------------------------
# Confinement: every file an index names is a plain relative path inside its repo folder
# --------------------------------------------------------------------------------------------
# Characters refused in a repo path: backslash (a Windows separator: `..\\x` is `../x` there),
# ':' (drive letters `C:x`, NTFS streams), glob characters (names are also upload/download
# patterns, where `*` would match other files) and control characters.
_BAD_CHARS = re.compile(r"[\\:*?\[\]\x00-\x1f\x7f]")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIX = ("the index was edited or made by another tool: re-export the repo with `hf-attrib hub "
        "export` (or pull an intact copy with `hf-attrib hub pull`).")


def check_relative(name: object, where: str = INDEX_FILE) -> str:
    """Refuse a repo path that is not a plain relative POSIX path inside the repo folder.

    Lexical only (see :func:`confined_path` for symlinks). Refused: non-strings, empty names,
    absolute paths, ``.``/``..``/empty segments, backslashes, ``:``, glob and control
    characters.

    Args:
        name: the path as written in the index (``lds/shard-00000-of-00004.safetensors``).
        where: what names it, for the message (``"hf_attrib_index.json: files"``).

    Returns:
        ``name``, checked.

    Raises:
        HubPathError: naming the path, what is wrong with it and the fix.
    """
    why = None
    if not isinstance(name, str) or not name:
        why = "it is not a non-empty string"
    elif name.startswith("/"):
        why = "it is an absolute path"
    elif m := _BAD_CHARS.search(name):
        why = f"it contains {m.group()!r} (Windows separators and drives, glob and control " \
              "characters are not allowed)"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        why = "it has a '..', '.' or empty segment"
    if why is not None:
        raise HubPathError(f"{where} names {name!r}: {why}; every file of an "
                           "hf-attrib repo must be a relative path inside the repo folder "
                           f"(like 'lds/shard-00000-of-00004.safetensors'); {_FIX}")
    return name


def confined_path(folder: str | Path, name: object, where: str = INDEX_FILE) -> Path:
    """The resolved path of repo file ``name`` under ``folder``, refused if it leaves it.

    The one place that decides whether an index may name a file: :func:`check_relative` on the
    name, then the resolved path (symlinks followed) must lie inside the folder, or in the
    cache's ``blobs`` folder of the same repo for a Hugging Face cache snapshot.

    Raises:
        HubPathError: the name is unsafe, or a symlink leads outside the folder.
    """
    folder = Path(folder)
    check_relative(name, where)
    resolved = resolved_inside(folder, name, snapshot_roots(folder))
    if resolved is None:
        raise HubPathError(f"{folder / name} (named by {where}) leads outside the repo folder "
                           f"{folder} (to {(folder / name).resolve()}): a symlink points out of "
                           f"it; replace the link with the file itself, or {_FIX}")
    return resolved


# --------------------------------------------------------------------------------------------
# The index: parsed, validated, and the files it names verified
# --------------------------------------------------------------------------------------------
def _bad_index(source: str, why: str) -> HubIntegrityError:
    return HubIntegrityError(f"{source} is not a valid hf-attrib index ({why}); {_FIX}")


def _kind_names(kind: str, entry: Any) -> Iterator[tuple[str, object]]:
    """``(where, name)`` of every file a ``kinds`` entry names."""
    if not isinstance(entry, Mapping):
        yield f"kinds.{kind}", entry
        return
    if "file" in entry:
        yield f"kinds.{kind}.file", entry["file"]
    shards = entry.get("shards", [])
    for i, shard in enumerate(shards if isinstance(shards, list) else [shards]):
        yield f"kinds.{kind}.shards[{i}].file", (shard.get("file") if isinstance(shard, Mapping)
                                                 else shard)
    model_map = entry.get("model_map", {})
    for model, name in (model_map.items() if isinstance(model_map, Mapping) else [("", None)]):
        yield f"kinds.{kind}.model_map[{model!r}]", name


def indexed_names(index: Mapping[str, Any]) -> list[str]:
    """Every file a (validated) index names: its ``files`` and those of its ``kinds``."""
    names = dict.fromkeys(index.get("files", {}))
    for kind, entry in index.get("kinds", {}).items():
        names.update(dict.fromkeys(name for _, name in _kind_names(kind, entry)))
    return list(names)


def parse_index(text: str | bytes, source: str) -> dict[str, Any]:
    """Parse and validate the text of an ``hf_attrib_index.json``.

    Checked: JSON object of format ``hf-attrib-index/1``; ``files`` maps safe relative paths
    to ``{"sha256": <64 hex>, "size": <int>}``; every file named under ``kinds`` (single files,
    shards, ``model_map``) is a safe relative path listed in ``files`` (a file without a
    recorded hash could not be verified, so it is refused, never trusted).

    Args:
        text: the file's content.
        source: where it came from, for messages (a path or repo id).

    Raises:
        HubIntegrityError: not JSON, not an index, a malformed or missing hash entry.
        HubPathError: a named file is not a safe relative path.
    """
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad_index(source, f"not valid JSON: {err}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise _bad_index(source, f"format {found!r}, expected {INDEX_FORMAT!r}")
    files = index.get("files")
    if not isinstance(files, dict):
        raise _bad_index(source, "no 'files' mapping of file -> sha256")
    for name, entry in files.items():
        check_relative(name, f"{source}: files")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and _HEX64.fullmatch(entry["sha256"]) and type(entry.get("size")) is int
                and entry["size"] >= 0):
            raise _bad_index(source, f"files[{name!r}] is {entry!r}, not "
                                     "{'sha256': <64 lowercase hex digits>, 'size': <bytes>}")
    kinds = index.get("kinds", {})
    if not isinstance(kinds, dict):
        raise _bad_index(source, "'kinds' is not a mapping")
    for kind, entry in kinds.items():
        for where, name in _kind_names(kind, entry):
            check_relative(name, f"{source}: {where}")
            if name not in files:
                raise HubIntegrityError(
                    f"{source}: {where} names {name!r}, which has no entry in 'files': its "
                    f"sha256 is unknown, so it cannot be verified and is refused; {_FIX}")
    return index


def read_index(folder: str | Path) -> dict[str, Any]:
    """The validated ``hf_attrib_index.json`` of a repo folder (see :func:`parse_index`)."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise HubNotFoundError(
            f"{path} does not exist: {folder} is not an hf-attrib repo folder (export one with "
            "`hf-attrib hub export SETTING --out DIR` or pull one with `hf-attrib hub pull`).")
    return parse_index(confined_path(folder, INDEX_FILE).read_bytes(), str(path))


def verify_file(path: Path, entry: Mapping[str, Any], name: str, fix: str = _FIX) -> None:
    """Raise :class:`HubIntegrityError` unless ``path`` has the size and sha256 of ``entry``."""
    size = path.stat().st_size
    if size != entry["size"] or sha256_file(path) != entry["sha256"]:
        raise HubIntegrityError(
            f"{name} ({path}) does not match the sha256 recorded in {INDEX_FILE} "
            f"({size} bytes, {entry['size']} recorded): it is damaged or was changed after "
            f"the export; {fix}")


def verified_path(folder: str | Path, index: Mapping[str, Any], name: str,
                  missing: str | None = None) -> Path:
    """The path of repo file ``name``, confined to ``folder`` and checked against its sha256.

    Args:
        folder: the repo folder.
        index: its validated index (:func:`read_index`).
        name: the repo path.
        missing: what to say when the file is absent (default: pull or export it).

    Raises:
        HubPathError: ``name`` leaves the folder.
        HubIntegrityError: ``name`` has no hash in the index, or does not match it.
        HubNotFoundError: the file is not there.
    """
    path = confined_path(folder, name)
    entry = index.get("files", {}).get(name)
    if entry is None:
        raise HubIntegrityError(f"{name} has no entry in the 'files' of {Path(folder) / INDEX_FILE}"
                                f": its sha256 is unknown, so it is not read; {_FIX}")
    if not path.is_file():
        raise HubNotFoundError(missing or (
            f"{Path(folder) / name} is missing: pull it with `hf-attrib hub pull` (or export "
            "the setting again)."))
    verify_file(path, entry, name)
    return path


def check_folder(folder: str | Path) -> dict[str, Any]:
    """Check that a repo folder is complete and intact before it is pushed or handed out.

    Every file the index names must be inside the folder, present and match its sha256.

    Returns:
        The validated index.

    Raises:
        HubPathError, HubIntegrityError: naming the file and the fix (export again).
    """
    folder = Path(folder)
    index = read_index(folder)
    fix = "re-run `hf-attrib hub export` to write the repo folder again."
    for name in indexed_names(index):
        path = confined_path(folder, name)
        if not path.is_file():
            raise HubIntegrityError(f"{folder} is an incomplete export: {name}, named by its "
                                    f"{INDEX_FILE}, is missing; {fix}")
        verify_file(path, index["files"][name], name, fix)
    return index


#: The dataset index's record of its export's checkpoints repo (:func:`files_digest` of it).
PAIR_KEY = "checkpoints_files_sha256"


def files_digest(index: Mapping[str, Any]) -> str:
    """sha256 of a repo's file list (each name with its sha256): the dataset repo of an export
    records that of its checkpoints repo, so that readers pair only repos of one export."""
    import hashlib

    listing = {name: entry["sha256"] for name, entry in index["files"].items()}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def check_same_export(dataset_dir: str | Path, checkpoints_dir: str | Path) -> None:
    """Refuse a dataset repo and a checkpoints repo of different exports: the ground truth
    would be compared with scores of models it was not computed from, with no other sign.

    Raises:
        HubIntegrityError: the dataset index records other checkpoint files than those of
            ``checkpoints_dir`` (a push or pull that stopped between the two repos).
    """
    recorded = read_index(dataset_dir).get(PAIR_KEY)
    if recorded is None:  # an export from before pairs were recorded: nothing to compare
        return
    if files_digest(read_index(checkpoints_dir)) != recorded:
        raise HubIntegrityError(
            f"{dataset_dir} and {checkpoints_dir} are not of one export: the dataset repo's "
            "ground truth was computed with other models than the checkpoints repo holds (a "
            "push or a pull that stopped between the two repos?). Pull both again at one "
            "revision (a tag), or push the export folder again with `hf-attrib hub push`.")


# --------------------------------------------------------------------------------------------
# Byte-reproducible safetensors
# --------------------------------------------------------------------------------------------
def save_safetensors(tensors: Mapping[str, Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a reproducible header.

    safetensors writes ``__metadata__`` from a Rust ``HashMap`` whose order changes from call
    to call, so the same tensors gave different bytes (and a new Hub commit on every
    re-export). The header is rewritten with sorted metadata (the tensor entries and data are
    kept as written: their order is deterministic), padded to 8 bytes as safetensors does.
    """
    from safetensors.torch import save

    blob = save({k: tensors[k] for k in sorted(tensors)}, metadata=dict(metadata or {}))
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    if meta is not None:
        header = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n:])
