"""Damaged ground-truth blocks and failed writes (issue 11, item 2).

Every retrain block carries checksums; a flipped bit is reported by file and tensor key when
read, and retrained (never used) when a build resumes. A full disk is a clear error that
leaves no partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import hf_attrib.model_utils.block_store as block_store
import hf_attrib.model_utils.retraining as rt
from hf_attrib.model_utils.block_store import (
    CorruptBlockError,
    load_stacked,
    load_subsets,
    read_block,
)
from hf_attrib.model_utils.retraining import RetrainBuild, retrain
from hf_attrib.model_utils.subsets import lds_subsets

N_TRAIN, DIM, CLASSES, NUM_MODELS, BLOCK = 40, 5, 3, 7, 2
RECIPE = dict(epochs=2, batch_size=8, lr=0.1, momentum=0.9)
DAMAGED = "block-00001.safetensors"  # models 2 and 3


def _build(**overrides) -> RetrainBuild:
    torch.manual_seed(0)
    model = nn.Linear(DIM, CLASSES)

    def loss_fn(params, xb, yb):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, DIM, generator=g)
    y = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
    return RetrainBuild(model=model, loss_fn=loss_fn, x=x, y=y,
                        masks=lds_subsets(N_TRAIN, NUM_MODELS), **{**RECIPE, **overrides})


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """An intact build (4 blocks); tests copy it before damaging the copy."""
    out = tmp_path_factory.mktemp("clean")
    retrain("lds", out, _build(), block_size=BLOCK, progress=False)
    return out


@pytest.fixture
def copy(clean, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(clean, out)
    return out


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return size, json.loads(raw[8:8 + size])


def _flip_data_byte(path: Path, key: str, byte: int = 1) -> None:
    """Flip one bit of byte ``byte`` inside the data region of tensor ``key``."""
    size, header = _header(path)
    begin, end = header[key]["data_offsets"]
    assert 0 <= byte < end - begin
    raw = bytearray(path.read_bytes())
    raw[8 + size + begin + byte] ^= 0x10
    path.write_bytes(bytes(raw))


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the parsed header and write it back at the same length (valid file)."""
    size, header = _header(path)
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + text.ljust(size, b" ") + raw[8 + size:])


def _count_calls(monkeypatch) -> list[list[int]]:
    calls: list[list[int]] = []
    real = rt.train_stacked

    def counting(*args, **kwargs):
        calls.append(list(kwargs["model_ids"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(rt, "train_stacked", counting)
    return calls


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("block-*") if p.name != DAMAGED}


def _assert_same_build(out: Path, clean: Path) -> None:
    got, got_ids = load_stacked(out, "lds")
    ref, ref_ids = load_stacked(clean, "lds")
    assert got.keys() == ref.keys() and torch.equal(got_ids, ref_ids)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert torch.equal(load_subsets(out, "lds")[0], _build().masks)
    _assert_same_block(out / "lds" / DAMAGED, clean / "lds" / DAMAGED)


def _assert_same_block(path: Path, reference: Path) -> None:
    """Same tensors, bitwise, and same metadata (checksums included); safetensors writes the
    metadata entries in an arbitrary order, so the files' bytes may differ."""
    (got, got_meta), (ref, ref_meta) = read_block(path), read_block(reference)
    assert got_meta == ref_meta and got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def _resume_repairs(out: Path, clean: Path, monkeypatch, warning: str) -> None:
    """Resuming retrains exactly the damaged block, leaves the others alone, equals clean."""
    before = _mtimes(out / "lds")
    calls = _count_calls(monkeypatch)
    with pytest.warns(UserWarning, match=warning + r".*Retraining block 1 \(models 2\.\.3\)"):
        result = retrain("lds", out, _build(), block_size=BLOCK, progress=False)
    assert calls == [[2, 3]]
    assert result.repaired == [1] and result.trained == [1] and result.skipped == [0, 2, 3]
    assert _mtimes(out / "lds") == before
    assert not list((out / "lds").glob(".*.tmp"))
    _assert_same_build(out, clean)


# ---------------------------------------------------------------------------- checksums


def test_checksums_are_sha256_of_name_dtype_shape_bytes(clean):
    """The stored sums match an independent computation (the documented format)."""
    path = clean / "lds" / DAMAGED
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sums = json.loads(meta["tensor_sha256"])
    assert sorted(sums) == sorted(tensors) == [
        "__model_ids__", "__stream_ids__", "__subset_mask__", "bias", "weight"]
    for name, t in tensors.items():
        h = hashlib.sha256(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        assert sums[name] == h.hexdigest(), name
    body = {k: v for k, v in meta.items() if k != "block_sha256"}
    assert meta["block_sha256"] == hashlib.sha256(
        json.dumps(body, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("key", ["weight", "__subset_mask__"])
def test_flipped_bit_read_is_error_naming_file_and_key(copy, key):
    path = copy / "lds" / DAMAGED
    _flip_data_byte(path, key)
    message = (rf"{DAMAGED}: tensor '{key}' does not match its checksum.*delete .*{DAMAGED} "
               r"and re-run .*retrain\(\).*hf-attrib bench ground-truth SETTING --kind lds")
    with pytest.raises(CorruptBlockError, match=message) as err:
        load_stacked(copy, "lds")
    assert err.value.key == key and err.value.path == path
    with pytest.raises(CorruptBlockError, match=message):
        read_block(path)
    if key == "__subset_mask__":
        with pytest.raises(CorruptBlockError, match=message):
            load_subsets(copy, "lds")
    else:  # load_subsets reads (and checks) only the ids and subsets, which are intact
        assert torch.equal(load_subsets(copy, "lds")[0], _build().masks)


@pytest.mark.parametrize("key", ["weight", "__subset_mask__"])
def test_flipped_bit_resume_retrains_only_that_block(copy, clean, monkeypatch, key):
    _flip_data_byte(copy / "lds" / DAMAGED, key)
    _resume_repairs(copy, clean, monkeypatch, f"tensor '{key}' does not match its checksum")


@pytest.mark.parametrize(("change", "key"), [
    (lambda h: h["weight"].update(dtype="I32"), "weight"),  # same bytes, another dtype
    (lambda h: h["weight"].update(shape=[BLOCK, DIM, CLASSES]), "weight"),  # same numel
    (lambda h: h["__metadata__"].update(fingerprint="0" * 32), "metadata"),
])
def test_changed_header_is_detected(copy, clean, monkeypatch, change, key):
    path = copy / "lds" / DAMAGED
    _rewrite_header(path, change)
    with pytest.raises(CorruptBlockError, match="does not match its checksum") as err:
        read_block(path)
    assert err.value.key == key
    with pytest.raises(CorruptBlockError, match=DAMAGED):
        load_stacked(copy, "lds")
    _resume_repairs(copy, clean, monkeypatch, "does not match its checksum")


def test_truncated_block(copy, clean, monkeypatch):
    path = copy / "lds" / DAMAGED
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptBlockError, match=rf"{DAMAGED} is not a readable safetensors "
                       r"file.*truncated or corrupt.*delete"):
        load_subsets(copy, "lds")
    _resume_repairs(copy, clean, monkeypatch, "is not a readable safetensors file")


def test_corrupt_block_of_another_configuration_is_not_overwritten(copy, monkeypatch):
    """Damaged tensors but intact metadata: a different recipe is still refused."""
    path = copy / "lds" / DAMAGED
    _flip_data_byte(path, "weight")
    damaged = path.read_bytes()
    calls = _count_calls(monkeypatch)
    with pytest.raises(ValueError, match=r"different configuration.*fingerprint"):
        retrain("lds", copy, _build(lr=0.5), block_size=BLOCK, models=(2, 4), progress=False)
    assert calls == [] and path.read_bytes() == damaged


# ---------------------------------------------------------------------------- legacy blocks


def _strip_checksums(path: Path) -> None:
    """Rewrite a block as versions before checksums wrote it."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    legacy = {k: v for k, v in meta.items() if k not in ("tensor_sha256", "block_sha256")}
    save_file(tensors, str(path), metadata=legacy)


def test_legacy_block_without_checksums_is_unverifiable(copy, clean, monkeypatch):
    _strip_checksums(copy / "lds" / DAMAGED)
    message = rf"{DAMAGED} has no checksums .*cannot be verified.*delete .*{DAMAGED} and re-run"
    with pytest.raises(CorruptBlockError, match=message) as err:
        load_stacked(copy, "lds")
    assert err.value.key is None
    with pytest.raises(CorruptBlockError, match=message):
        load_subsets(copy, "lds")
    _resume_repairs(copy, clean, monkeypatch, "has no checksums")


def test_foreign_file_is_still_refused(copy):
    path = copy / "lds" / DAMAGED
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="is not a retrain block") as err:
        retrain("lds", copy, _build(), block_size=BLOCK, progress=False)
    assert not isinstance(err.value, CorruptBlockError)


# ---------------------------------------------------------------------------- disk full


class _FullDisk:
    """A file whose write stores part of the data, then fails as a full disk does."""

    def __init__(self, f, fail_in: str) -> None:
        self.f, self.fail_in = f, fail_in

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        if self.fail_in == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    def flush(self) -> None:
        self.f.flush()
        if self.fail_in == "flush":
            raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self) -> int:
        return self.f.fileno()


def _patch_open(monkeypatch, fail_in: str, after: int = 0, err: int = errno.ENOSPC) -> None:
    """Make the block writer's ``open`` fail (``fail_in``) for every write after ``after``."""
    opened = []

    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        opened.append(path)
        if len(opened) <= after:
            return f
        if err != errno.ENOSPC:
            f.close()
            raise OSError(err, "Input/output error")
        return _FullDisk(f, fail_in)

    monkeypatch.setattr(block_store, "open", fake_open, raising=False)


@pytest.mark.parametrize("fail_in", ["write", "flush"])
def test_disk_full_is_clear_and_leaves_no_partial_file(tmp_path, clean, monkeypatch, fail_in):
    _patch_open(monkeypatch, fail_in, after=2)
    folder = tmp_path / "lds"
    with pytest.raises(OSError, match=r"the disk is full") as err:
        retrain("lds", tmp_path, _build(), block_size=BLOCK, progress=False)
    size = (clean / "lds" / "block-00002.safetensors").stat().st_size
    assert err.value.errno == errno.ENOSPC
    message = str(err.value)
    assert f"block-00002.safetensors needs {size:,} bytes" in message
    assert str(folder) in message and "another out_dir (CLI: --out)" in message
    # the two finished blocks are kept, nothing else: no block 2, no temporary file
    assert sorted(p.name for p in folder.iterdir()) == [
        "block-00000.safetensors", "block-00001.safetensors"]
    monkeypatch.undo()
    assert retrain("lds", tmp_path, _build(), block_size=BLOCK, progress=False).trained == [2, 3]
    name = "block-00002.safetensors"
    _assert_same_block(folder / name, clean / "lds" / name)


def test_other_write_errors_pass_through_and_clean_up(tmp_path, monkeypatch):
    _patch_open(monkeypatch, "write", err=errno.EIO)
    with pytest.raises(OSError, match="Input/output error") as err:
        retrain("lds", tmp_path, _build(), block_size=BLOCK, progress=False)
    assert err.value.errno == errno.EIO
    assert list((tmp_path / "lds").iterdir()) == []
