"""Compact subsets in ground-truth blocks (issue 13, scope item 5; block format /2).

A LOO block stores the left-out example of each model (``__left_out__``), any other block its
subset masks bit-packed (``__subset_mask__``); the readers return what they returned for the
``/1`` blocks, which stored the kept indices (``__subset_indices__``) and are still read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hf_attrib.model_utils.block_store import (
    BLOCK_FORMAT,
    LEFT_OUT_KEY,
    SUBSET_INDICES_KEY,
    SUBSET_MASK_KEY,
    CorruptBlockError,
    decode_subsets,
    encode_subsets,
    load_stacked,
    load_subsets,
    pack_masks,
    read_block,
    subset_indices,
    unpack_masks,
    write_block,
)
from hf_attrib.model_utils.retraining import retrain_lds, retrain_loo
from hf_attrib.model_utils.subsets import lds_subsets, loo_subsets

N_TRAIN, DIM, CLASSES, BLOCK = 21, 3, 2, 4  # 21: the packed rows end in padding bits
LOO_INDICES = [0, 3, 7, 8, 15, 20]
RECIPE = dict(epochs=1, batch_size=8, lr=0.1)
V1 = "hf_attrib.retrain.block/1"


def _problem():
    torch.manual_seed(0)
    model = nn.Linear(DIM, CLASSES)

    def loss_fn(params, xb, yb):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    g = torch.Generator().manual_seed(1)
    return model, loss_fn, torch.randn(N_TRAIN, DIM, generator=g), \
        torch.randint(0, CLASSES, (N_TRAIN,), generator=g)


def _build_loo(out: Path) -> None:
    retrain_loo(out, *_problem(), indices=LOO_INDICES, block_size=BLOCK, progress=False,
                **RECIPE)


def _build_lds(out: Path) -> None:
    retrain_lds(out, *_problem(), num_models=5, block_size=BLOCK, progress=False, **RECIPE)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A LOO build (6 models in blocks of 4, plus loo-full) and an LDS build (5 models)."""
    out = tmp_path_factory.mktemp("compact")
    _build_loo(out)
    _build_lds(out)
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(built, out)
    return out


def _stored(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _reseal(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write a block with checksums computed here, independently of block_store (the
    documented sha256 over name, dtype, shape and bytes; one over the sorted metadata)."""
    meta = {k: v for k, v in meta.items() if k not in ("tensor_sha256", "block_sha256")}
    sums = {}
    for name, t in tensors.items():
        h = hashlib.sha256(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        sums[name] = h.hexdigest()
    meta["tensor_sha256"] = json.dumps(sums, sort_keys=True)
    meta["block_sha256"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    save_file(tensors, str(path), metadata=meta)


def _as_v1(path: Path) -> None:
    """Rewrite a /2 block as format /1 wrote it: the kept indices, int32 [M, k]."""
    tensors, meta = _stored(path)
    masks = decode_subsets(tensors, int(meta["n_train"]))
    for key in (LEFT_OUT_KEY, SUBSET_MASK_KEY):
        tensors.pop(key, None)
    tensors[SUBSET_INDICES_KEY] = masks.nonzero()[:, 1].reshape(len(masks), -1).to(torch.int32)
    _reseal(path, tensors, {**meta, "format": V1})


def _flip(path: Path, key: str) -> None:
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8:8 + size])[key]["data_offsets"]
    raw[8 + size + begin] ^= 0x01
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------ encodings
@pytest.mark.parametrize("n", [1, 7, 8, 9, 21])
def test_pack_masks_bit_layout_and_round_trip(n):
    masks = torch.rand(5, n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_masks(masks)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-n // 8))
    for m in range(5):  # example i is bit i % 8 of byte i // 8, least significant first
        for i in range(n):
            assert (int(packed[m, i // 8]) >> (i % 8)) & 1 == int(masks[m, i])
    assert torch.equal(unpack_masks(packed, n), masks)


def test_unpack_masks_refuses_wrong_shape_and_padding_bits():
    packed = pack_masks(torch.ones(2, 21, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"30 examples must be uint8 \[M, 4\], got "
                       r"torch.uint8 \[2, 3\]"):
        unpack_masks(packed, 30)
    packed[1, 2] |= 0x80  # bit of example 23 of a 21-example set
    with pytest.raises(ValueError, match="bits set past example 20"):
        unpack_masks(packed, 21)


def test_encode_subsets_picks_left_out_for_loo_and_masks_otherwise():
    loo = loo_subsets(N_TRAIN, LOO_INDICES)
    enc = encode_subsets(loo)
    assert list(enc) == [LEFT_OUT_KEY] and enc[LEFT_OUT_KEY].dtype == torch.int64
    assert enc[LEFT_OUT_KEY].tolist() == LOO_INDICES
    assert torch.equal(decode_subsets(enc, N_TRAIN), loo)
    for masks in (lds_subsets(N_TRAIN, 5), torch.ones(2, N_TRAIN, dtype=torch.bool)):
        enc = encode_subsets(masks)
        assert list(enc) == [SUBSET_MASK_KEY]
        assert torch.equal(decode_subsets(enc, N_TRAIN), masks)


# ------------------------------------------------------------------------------ blocks /2
@pytest.mark.parametrize(("kind", "key", "masks"), [
    ("loo", LEFT_OUT_KEY, loo_subsets(N_TRAIN, LOO_INDICES)),
    ("loo-full", SUBSET_MASK_KEY, torch.ones(1, N_TRAIN, dtype=torch.bool)),
    ("lds", SUBSET_MASK_KEY, lds_subsets(N_TRAIN, 5)),
])
def test_blocks_store_compact_subsets_and_read_back_as_before(built, kind, key, masks):
    got, ids = load_subsets(built, kind)
    assert torch.equal(got, masks) and ids.tolist() == list(range(len(masks)))
    for path in sorted((built / kind).glob("block-*.safetensors")):
        stored, meta = _stored(path)
        assert meta["format"] == BLOCK_FORMAT == "hf_attrib.retrain.block/2"
        assert key in stored and SUBSET_INDICES_KEY not in stored
        tensors, _ = read_block(path)  # the /1 view: the kept indices, int32
        block_ids = tensors["__model_ids__"].tolist()
        assert SUBSET_INDICES_KEY in tensors and key not in tensors
        want = subset_indices(masks[block_ids])
        assert tensors[SUBSET_INDICES_KEY].dtype == want.dtype == torch.int32
        assert torch.equal(tensors[SUBSET_INDICES_KEY], want)
        only, _ = read_block(path, ("__model_ids__", SUBSET_INDICES_KEY))
        assert sorted(only) == ["__model_ids__", SUBSET_INDICES_KEY]
        assert torch.equal(only[SUBSET_INDICES_KEY], want)
        raw, _ = read_block(path, (key,))  # asked for by its own name: as stored
        assert torch.equal(raw[key], stored[key])


@pytest.mark.parametrize(("kind", "key"), [("loo", LEFT_OUT_KEY), ("lds", SUBSET_MASK_KEY)])
def test_flipped_bit_in_compact_subsets_is_caught(copy, built, kind, key):
    path = copy / kind / "block-00001.safetensors"
    _flip(path, key)
    message = rf"tensor '{key}' does not match its checksum"
    for read in (lambda: read_block(path), lambda: load_subsets(copy, kind),
                 lambda: load_stacked(copy, kind)):
        with pytest.raises(CorruptBlockError, match=message) as err:
            read()
        assert err.value.key == key and err.value.path == path
    with pytest.warns(UserWarning, match=message + r".*Retraining block 1"):
        (_build_loo if kind == "loo" else _build_lds)(copy)
    (got, _), (want, _) = read_block(path), read_block(built / kind / path.name)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_consistent_checksums_but_bad_left_out_is_corrupt(copy):
    path = copy / "loo" / "block-00000.safetensors"
    tensors, meta = _stored(path)
    tensors[LEFT_OUT_KEY] = torch.tensor([0, 3, 7, N_TRAIN])  # past the last example
    _reseal(path, tensors, meta)
    with pytest.raises(CorruptBlockError, match=r"subsets cannot be decoded .*ids in \[0, 21\)"):
        load_subsets(copy, "loo")


def test_write_block_refuses_subsets_of_different_sizes(tmp_path):
    masks = torch.ones(2, 5, dtype=torch.bool)
    masks[0, :2] = False
    with pytest.raises(ValueError, match=r"subsets of different sizes \(\[3, 5\]\)"):
        write_block(tmp_path / "block-00000.safetensors", {"w": torch.zeros(2, 1)}, [0, 1],
                    [0, 1], masks, {"format": BLOCK_FORMAT})


def test_250_model_loo_block_of_a_7850_parameter_model_is_small(tmp_path):
    """MNIST-LR's LOO block: 250 x 7,850 float32 weights (7.85 MB) and, in /2, 250 int64
    left-out ids instead of 250 x 4,999 kept indices (5 MB as int32, 10 MB as int64)."""
    n, m = 5000, 250
    params = {"weight": torch.randn(m, 10, 784), "bias": torch.randn(m, 10)}
    masks = loo_subsets(n, list(range(m)))
    path = tmp_path / "block-00000.safetensors"
    write_block(path, params, list(range(m)), [0] * m, masks,
                {"format": BLOCK_FORMAT, "n_train": str(n)})
    assert path.stat().st_size < 8.2e6
    assert path.stat().st_size < m * 7850 * 4 + 10_000  # the weights and a few KB
    stored, _ = _stored(path)
    assert stored[LEFT_OUT_KEY].tolist() == list(range(m))


# ------------------------------------------------------------------------------ blocks /1
def test_v1_blocks_still_read_the_same(copy, built):
    for kind in ("loo", "loo-full", "lds"):
        for path in (copy / kind).glob("block-*.safetensors"):
            _as_v1(path)
            assert _stored(path)[1]["format"] == V1
        assert torch.equal(load_subsets(copy, kind)[0], load_subsets(built, kind)[0])
        got, want = load_stacked(copy, kind)[0], load_stacked(built, kind)[0]
        assert all(torch.equal(got[k], want[k]) for k in want)
        for path in (copy / kind).glob("block-*.safetensors"):
            (a, _), (b, _) = read_block(path), read_block(built / kind / path.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    path = copy / "loo" / "block-00000.safetensors"
    _flip(path, SUBSET_INDICES_KEY)  # the /1 key is still checked
    with pytest.raises(CorruptBlockError, match="'__subset_indices__' does not match"):
        load_subsets(copy, "loo")


def test_resume_accepts_v1_blocks_without_retraining(copy, built):
    """A build resumed over /1 blocks from an older version keeps them: their checksums and
    content (ids, streams, subsets) are verified as for /2 blocks, and nothing is retrained."""
    for kind in ("loo", "loo-full", "lds"):
        for path in (copy / kind).glob("block-*.safetensors"):
            _as_v1(path)
    before = {p: p.read_bytes() for p in copy.rglob("block-*.safetensors")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build_loo(copy)
        _build_lds(copy)
    assert {p: p.read_bytes() for p in copy.rglob("block-*.safetensors")} == before
    # A block missing from the /1 build is trained in /2; the build reads as one.
    (copy / "loo" / "block-00001.safetensors").unlink()
    _build_loo(copy)
    assert LEFT_OUT_KEY in _stored(copy / "loo" / "block-00001.safetensors")[0]
    assert SUBSET_INDICES_KEY in _stored(copy / "loo" / "block-00000.safetensors")[0]
    assert torch.equal(load_subsets(copy, "loo")[0], load_subsets(built, "loo")[0])
    got, want = load_stacked(copy, "loo")[0], load_stacked(built, "loo")[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # The subsets are still compared with the build's: a /1 block of other subsets is refused.
    path = copy / "loo" / "block-00000.safetensors"
    tensors, meta = _stored(path)
    tensors[SUBSET_INDICES_KEY] = tensors[SUBSET_INDICES_KEY].flip(0).contiguous()
    _reseal(path, tensors, meta)
    with pytest.raises(ValueError, match=r"different configuration \(subset_indices"):
        _build_loo(copy)
