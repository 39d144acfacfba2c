"""The shared file helpers (hf_attrib.files): atomic writes, confinement, folder replacement."""

from __future__ import annotations

import hashlib

import pytest

from hf_attrib.files import (
    file_matches,
    replace_folder,
    resolved_inside,
    restore_replaced_folder,
    sha256_file,
    write_atomic,
)


def test_sha256_file_and_file_matches(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3_000_000)  # several chunks
    digest = hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert sha256_file(path, chunk=1 << 20) == digest
    assert file_matches(path, 3_000_000, digest)
    assert not file_matches(path, 2_999_999, digest)
    assert not file_matches(path, 3_000_000, "0" * 64)


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_atomic(path, lambda tmp: tmp.write_text("old"))

    def half(tmp):
        tmp.write_text("partial")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]  # no temporary left


def test_resolved_inside_refuses_links_leading_out(tmp_path):
    folder, outside = tmp_path / "repo", tmp_path / "secret"
    folder.mkdir()
    outside.write_text("s")
    (folder / "ok").write_text("o")
    (folder / "link").symlink_to(outside)
    assert resolved_inside(folder, "ok") == (folder / "ok").resolve()
    assert resolved_inside(folder, "link") is None
    assert resolved_inside(folder, "../secret") is None
    assert resolved_inside(folder, "link", roots=[tmp_path]) == outside.resolve()


def test_replace_folder_and_restore_after_a_kill(tmp_path):
    path, new = tmp_path / "c", tmp_path / ".c.partial"
    path.mkdir()
    (path / "v").write_text("1")
    new.mkdir()
    (new / "v").write_text("2")
    replace_folder(new, path)
    assert (path / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert not restore_replaced_folder(path)  # nothing to do: the folder is there
    path.rename(tmp_path / ".c.old-12345678")  # killed between the renames
    assert restore_replaced_folder(path) and (path / "v").read_text() == "2"
