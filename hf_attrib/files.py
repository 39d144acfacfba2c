"""File helpers every on-disk format shares: sha256 of a file, confinement of a named file to
its folder, atomic writes of files and folders.

The attributor caches (``hf_attrib.algorithm.cache_store``), the Hub repo folders
(``hf_attrib.hub.layout``), the benchmark's source data (``hf_attrib.benchmark.data``) and the
attribution index (``hf_attrib.index.format``) all read files named by a manifest and write
files that a kill must never leave half-written; they do it through these functions, so there
is one version of each rule. Errors are the callers' (each names its own format and fix): the
helpers here answer questions (``None``/``False``) or raise ``OSError``.

This module sits at the bottom of the package (standard library only: ``hf-attrib --help``
imports the Hub layout, which must not import torch).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "FileStamp",
    "file_matches",
    "file_stamp",
    "fsync_dir",
    "leftover_folders",
    "replace_folder",
    "resolved_inside",
    "restore_replaced_folder",
    "sha256_file",
    "snapshot_roots",
    "write_atomic",
]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 (hex) of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: What identifies one version of a file: device, inode, size and modification time.
FileStamp = tuple[int, int, int, int]


def file_stamp(path: str | os.PathLike) -> FileStamp | None:
    """The file's :data:`FileStamp` (``None`` when it is absent): taken before its sha256 is
    checked and compared before each later read, so that a file replaced or edited since is
    refused instead of read unverified."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_matches(path: str | os.PathLike, size: int, sha256: str) -> bool:
    """Whether the file at ``path`` has ``size`` bytes and that sha256 (the size is compared
    first: a truncated file is found without reading it)."""
    return Path(path).stat().st_size == size and sha256_file(path) == sha256


def resolved_inside(folder: str | os.PathLike, name: str,
                    roots: Iterable[str | os.PathLike] = ()) -> Path | None:
    """``folder / name`` with symbolic links resolved, or ``None`` if that leaves ``folder``.

    Lexical checks of ``name`` (no ``..``, no absolute path) are the caller's, which knows its
    format's names; this decides where the file really is. ``roots``: further folders the
    resolved path may lie in (a Hugging Face cache snapshot's ``blobs``).
    """
    resolved = (Path(folder) / name).resolve()
    allowed = [Path(folder).resolve(), *(Path(r).resolve() for r in roots)]
    return resolved if any(resolved.is_relative_to(r) for r in allowed) else None


def snapshot_roots(folder: str | os.PathLike) -> list[Path]:
    """The folders a file of ``folder`` may resolve into: ``folder`` itself, plus the
    ``blobs`` folder of its repo when ``folder`` is a snapshot of the Hugging Face cache
    (``.../snapshots/<rev>``: its files are symbolic links into ``blobs``)."""
    folder = Path(folder)
    roots = [folder.resolve()]
    for snapshot in {folder.absolute(), roots[0]}:
        if snapshot.parent.name == "snapshots" and (snapshot.parent.parent / "blobs").is_dir():
            roots.append((snapshot.parent.parent / "blobs").resolve())
    return roots


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (new files, renames) durable; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, fsync it, rename it to ``path``:
    readers (and a resumed job) see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Folders replaced as a whole
# --------------------------------------------------------------------------------------------
def _old_prefix(path: Path) -> str:
    return f".{path.name}.old-"


def leftover_folders(path: str | os.PathLike) -> list[Path]:
    """The folders :func:`replace_folder` renamed ``path`` away to and did not delete (a kill
    between its renames, or during the deletion), oldest name first."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = _old_prefix(path)
    return sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink())


def restore_replaced_folder(path: str | os.PathLike) -> bool:
    """Undo a :func:`replace_folder` killed between its two renames: when ``path`` is missing
    and exactly one renamed-away folder of it is left, rename that one back.

    Returns:
        Whether a folder was restored. With several left (ambiguous: which one was whole?)
        nothing is touched.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        return False
    left = leftover_folders(path)
    if len(left) != 1:
        return False
    try:
        os.rename(left[0], path)
    except FileNotFoundError:  # another process restored (or replaced) it first
        return False
    fsync_dir(path.parent)
    return True


def replace_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished folder ``tmp`` to ``path`` (same parent), replacing a folder there.

    A folder cannot be renamed over a non-empty one: the old one is renamed away to
    ``.{name}.old-XXXXXXXX`` first, put back if the second rename fails, and deleted once the
    new one is in place. A kill between the two renames leaves no ``path``; readers and
    writers call :func:`restore_replaced_folder` first, which renames the old one back.
    """
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = path.parent / f"{_old_prefix(path)}{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
