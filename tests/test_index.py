"""hf_attrib.index: build, open and query an attribution index (exactness, identity, resume)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from integrations_helpers import char_tokenizer, random_texts, text_datasets, tiny_bert, tiny_gpt2
from torch.utils.data import DataLoader

import hf_attrib.index.builder as builder
from hf_attrib.hub.errors import HubIntegrityError
from hf_attrib.index import Index, build
from hf_attrib.index.format import BUILD_DIR, INDEX_FILE, mmap_tensor, shard_file
from hf_attrib.index.hub import shards_for_rows
from hf_attrib.integrations.transformers import task_from_pretrained
from hf_attrib.loaders import SubsetSampler

FACTORED = {"proj_type": "factored", "proj_dim": 128}


@pytest.fixture(scope="module")
def data():
    return (Dataset.from_dict({"text": random_texts(22, 0)}),
            Dataset.from_dict({"text": random_texts(3, 1)}))


def _task(seed: int = 0, layers=None):
    return task_from_pretrained(tiny_gpt2(seed), "causal-lm", processor=char_tokenizer(),
                                layers=layers)


def _reference(att, task, train, test) -> torch.Tensor:
    return att.attribute(task.dataloader(train, batch_size=4), task.dataloader(test, batch_size=4))


@pytest.mark.parametrize("method", ["trak", "grad-dot"])
def test_query_equals_in_memory_attribute(tmp_path, data, method):
    """float32 storage: the index's scores are attribute()'s to float32 round-off; float16:
    to fp16 round-off of the stored training features; top-k are attribute()'s top-k."""
    train, test = data
    task = _task()
    att = task.attributor(method, projector_kwargs=FACTORED)
    ref = _reference(att, task, train, test)
    for dtype, tol in (("float32", 1e-5), ("float16", 2e-3)):
        out = tmp_path / dtype
        result = build(att, train, out=out, dtype=dtype, shard_rows=8, batch_size=4)
        assert result.complete and result.num_shards == 3 and result.computed == [0, 1, 2]
        index = Index.open(out, task=att)
        scores = index.scores(test)
        assert scores.shape == ref.shape
        assert (scores - ref).abs().max() <= tol * ref.abs().max()
        top = index.query(test, top_k=4)
        assert torch.equal(top.example_ids, ref.topk(4, dim=0).indices.T)
        assert torch.allclose(top.scores, ref.topk(4, dim=0).values.T, rtol=tol, atol=0)
    meta = json.loads((tmp_path / "float16" / INDEX_FILE).read_text())["attribution_index"]
    assert meta["features"]["dtype"] == "float16" and meta["dataset"]["num_rows"] == 22
    assert meta["sizes"]["bytes_per_example"] > 2 * meta["features"]["width"]


def test_query_rebuilds_the_recorded_attributor_and_returns_texts(tmp_path, data):
    """Opened with the task only: the method and options come from the index file."""
    train, test = data
    task = _task()
    att = task.attributor("trak", projector_kwargs=FACTORED, regularization=1e-3)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    index = Index.open(tmp_path / "i", task=task, dataset=train)
    got = index.query([test[0]["text"]], top_k=2)
    ref = _reference(att, task, train, test.select([0]))[:, 0]
    assert got.example_ids[0].tolist() == ref.topk(2).indices.tolist()
    assert got.texts == [[train[int(i)]["text"] for i in got.example_ids[0]]]
    with pytest.raises(ValueError, match="is not the one indexed"):
        Index.open(tmp_path / "i", task=task, dataset=train.select(range(5)))


def test_index_refuses_other_weights_layers_and_options(tmp_path, data):
    train, _ = data
    task = _task()
    build(task.attributor("trak", projector_kwargs=FACTORED), train, out=tmp_path / "i",
          shard_rows=8, batch_size=4)
    with pytest.raises(ValueError, match=r"checkpoint 0's weights.*built for"):
        Index.open(tmp_path / "i", task=_task(seed=1))
    with pytest.raises(ValueError, match="the layer selection"):
        Index.open(tmp_path / "i", task=_task(layers="last:1"))
    other = _task().attributor("trak", projector_kwargs={**FACTORED, "proj_seed": 7})
    with pytest.raises(ValueError, match="option projection"):
        Index.open(tmp_path / "i", task=other)


def test_killed_build_resumes_at_the_first_missing_shard(tmp_path, data, monkeypatch):
    """A crash while writing shard 2 (of 3): the rerun hash-checks shards 0-1, recomputes
    nothing of them, computes shard 2; the result equals an uninterrupted build."""
    train, test = data
    task = _task()
    att = task.attributor("trak", projector_kwargs=FACTORED)
    real_write, calls = builder._write_shard, []

    def dying_write(out, shard, *args):
        if shard == 2:
            raise KeyboardInterrupt("killed")
        return real_write(out, shard, *args)

    monkeypatch.setattr(builder, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    assert not (tmp_path / "i" / INDEX_FILE).exists()
    monkeypatch.setattr(builder, "_write_shard", real_write)
    real_featurize = builder.featurize_shard

    def counting(att_, loader, indices):
        calls.append(indices[0])
        return real_featurize(att_, loader, indices)

    monkeypatch.setattr(builder, "featurize_shard", counting)
    result = build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    assert result.skipped == [0, 1] and result.computed == [2] and calls == [16]
    assert result.complete
    build(att, train, out=tmp_path / "whole", shard_rows=8, batch_size=4)
    a = Index.open(tmp_path / "i", task=att).scores(test)
    b = Index.open(tmp_path / "whole", task=att).scores(test)
    assert torch.equal(a, b)
    # A finished shard changed on disk is not trusted: recomputed.
    shard = tmp_path / "i" / shard_file(0, 3)
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    calls.clear()
    assert build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4).computed == [0]


def test_shard_split_across_processes_writes_the_index_once_complete(tmp_path, data):
    train, test = data
    task = _task()
    att = task.attributor("grad-dot", projector_kwargs=FACTORED)
    first = build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4, shard=(0, 2))
    assert first.computed == [0, 2] and not first.complete
    assert not (tmp_path / "i" / INDEX_FILE).exists()
    with pytest.raises(ValueError, match="unfinished index build"):
        from hf_attrib.index.hub import push_index
        push_index(tmp_path / "i", "org/x")
    second = build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4, shard=(1, 2))
    assert second.computed == [1] and second.complete
    ref = _reference(att, task, train, test)
    assert torch.allclose(Index.open(tmp_path / "i", task=att).scores(test), ref, rtol=2e-3,
                          atol=2e-3 * float(ref.abs().max()))


def test_build_refuses_another_index_in_the_folder_and_bad_options(tmp_path, data):
    train, _ = data
    task = _task()
    build(task.attributor("grad-dot", projector_kwargs=FACTORED), train, out=tmp_path / "i",
          shard_rows=8, batch_size=4)
    with pytest.raises(ValueError, match=r"holds a build of another index.*method"):
        build(task.attributor("grad-cos", projector_kwargs=FACTORED), train,
              out=tmp_path / "i", shard_rows=8, batch_size=4)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an index build"):
        build(task, train, out=tmp_path / "other")
    with pytest.raises(ValueError, match="dtype must be one of"):
        build(task, train, out=tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="needs the training set at query time"):
        build(task, train, out=tmp_path / "x", method="if-cg")


def test_damaged_shard_and_missing_rows_are_clear_errors(tmp_path, data):
    train, test = data
    att = _task().attributor("grad-dot", projector_kwargs=FACTORED)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    index = Index.open(tmp_path / "i", task=att)
    assert index.example_ids().tolist() == list(range(22))
    assert shards_for_rows(index.index, "9:17") == [shard_file(1, 3), shard_file(2, 3)]
    assert index.query(test, top_k=3, rows="8:16").rows.min() >= 8
    (tmp_path / "i" / shard_file(2, 3)).unlink()
    with pytest.raises(Exception, match=r"missing: pull the shards of rows 16:22"):
        Index.open(tmp_path / "i", task=att).query(test, top_k=3)
    path = tmp_path / "i" / shard_file(0, 3)
    tensor = mmap_tensor(path, "checkpoint-0")
    assert tensor.dtype == torch.float16 and tensor.shape[0] == 8
    path.write_bytes(path.read_bytes()[:-2] + b"\x00\x01")
    with pytest.raises(HubIntegrityError, match="does not match the sha256"):
        Index.open(tmp_path / "i", task=att).query(test, top_k=3, rows="0:8")
    with pytest.raises(ValueError, match="outside the index's 22 rows"):
        index.query(test, rows="0:99")
    assert (tmp_path / "i" / BUILD_DIR / "plan.json").is_file()


def test_open_without_a_task_needs_a_recorded_model(tmp_path, data):
    train, _ = data
    build(_task().attributor("grad-dot", projector_kwargs=FACTORED), train, out=tmp_path / "i",
          shard_rows=8, batch_size=4)  # a model built from a config: no Hub id
    with pytest.raises(ValueError, match="does not record a loadable model"):
        Index.open(tmp_path / "i")


# --------------------------------------------------------------------------------------------
# Review fixes: resumed builds, confinement, changed shards, rows, subsets, TRAK's Q
# --------------------------------------------------------------------------------------------
def _examples(task, train, **kwargs) -> tuple[list, object]:
    """The task's collated-to-be examples as a plain list (a dataset without a fingerprint)."""
    hf = task.dataloader(train, batch_size=4, **kwargs)
    return [hf.dataset[i] for i in range(len(hf.dataset))], hf.collate_fn


def test_resumed_build_recomputes_shards_whose_inputs_changed(tmp_path, data, monkeypatch):
    """A plain DataLoader (no fingerprint) whose shard-1 examples are tokenised with another
    max_length, same size and ids: the rerun recomputes shard 1 only, and the index equals a
    fresh build on the new inputs (before: the old shard was reused, old and new mixed)."""
    train, test = data
    task = _task()
    att = task.attributor("grad-dot", projector_kwargs=FACTORED)
    full, collate = _examples(task, train)
    short, _ = _examples(task, train, max_length=5)
    mixed = full[:8] + short[8:16] + full[16:]
    assert all(len(a["input_ids"]) > len(b["input_ids"]) for a, b in zip(full, short))
    build(att, DataLoader(full, batch_size=4, collate_fn=collate), out=tmp_path / "i",
          shard_rows=8)
    real, calls = builder.featurize_shard, []
    monkeypatch.setattr(builder, "featurize_shard",
                        lambda a, loader, idx: calls.append(idx[0]) or real(a, loader, idx))
    loader = DataLoader(mixed, batch_size=4, collate_fn=collate)
    result = build(att, loader, out=tmp_path / "i", shard_rows=8)
    assert result.computed == [1] and result.skipped == [0, 2] and calls == [8]
    build(att, loader, out=tmp_path / "fresh", shard_rows=8)
    a = Index.open(tmp_path / "i", task=att).scores(test)
    assert torch.equal(a, Index.open(tmp_path / "fresh", task=att).scores(test))


def test_dataloader_settings_are_in_the_plan_and_used_for_queries(tmp_path, data):
    train, test = data
    task = _task()
    att = task.attributor("grad-dot", projector_kwargs=FACTORED)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4,
          dataloader_kwargs={"max_length": 5})
    meta = json.loads((tmp_path / "i" / INDEX_FILE).read_text())["attribution_index"]
    assert meta["features"]["dataloader"] == {"batch_size": 4, "kwargs": {"max_length": 5}}
    ref = att.attribute(task.dataloader(train, batch_size=4, max_length=5),
                        task.dataloader(test, batch_size=4, max_length=5))
    scores = Index.open(tmp_path / "i", task=att).scores(test)
    assert (scores - ref).abs().max() <= 2e-3 * ref.abs().max()
    with pytest.raises(ValueError, match=r"holds a build of another index.*dataloader"):
        build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4,
              dataloader_kwargs={"max_length": 7})


def test_resumed_build_hashes_each_file_once(tmp_path, data, monkeypatch):
    """Rerun of a finished build: each shard and kernel file is hashed once (receipt check),
    not again for the merge."""
    from collections import Counter

    train, _ = data
    att = _task().attributor("trak", projector_kwargs=FACTORED)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    hashed: Counter = Counter()
    real = builder.sha256_file
    monkeypatch.setattr(builder, "sha256_file", lambda p: hashed.update([str(p)]) or real(p))
    result = build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    assert result.skipped == [0, 1, 2] and result.complete
    assert sum("features/shard" in p for p in hashed) == 3
    assert sum("kernel-" in p for p in hashed) == 3
    assert max(hashed.values()) == 1, hashed


def test_receipts_cannot_name_files_outside_their_place(tmp_path, data):
    """A receipt naming a file elsewhere (a valid copy outside the folder), or a kernel
    replaced by a symlink out of the folder, is not trusted: the shard is recomputed."""
    train, _ = data
    att = _task().attributor("trak", projector_kwargs=FACTORED)
    out = tmp_path / "i"
    build(att, train, out=out, shard_rows=8, batch_size=4)
    (tmp_path / "evil.safetensors").write_bytes((out / shard_file(0, 3)).read_bytes())
    receipt_path = out / BUILD_DIR / "shard-00000.json"
    receipt = json.loads(receipt_path.read_text())
    receipt["shard"]["file"] = "../evil.safetensors"
    receipt_path.write_text(json.dumps(receipt))
    kernel = out / BUILD_DIR / "kernel-00001.safetensors"
    (tmp_path / "k1.safetensors").write_bytes(kernel.read_bytes())
    kernel.unlink()
    kernel.symlink_to(tmp_path / "k1.safetensors")
    result = build(att, train, out=out, shard_rows=8, batch_size=4)
    assert result.computed == [0, 1] and result.complete
    index = json.loads((out / INDEX_FILE).read_text())
    assert not any(".." in name for name in index["files"])
    assert not kernel.is_symlink()


def test_a_shard_changed_after_it_was_verified_is_refused(tmp_path, data):
    import os

    train, test = data
    att = _task().attributor("grad-dot", projector_kwargs=FACTORED)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    index = Index.open(tmp_path / "i", task=att)
    before = index.scores(test)  # every shard hash-checked here
    path = tmp_path / "i" / shard_file(1, 3)
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-8:] = b"\x00\x3c" * 4  # same size, other features
    path.write_bytes(bytes(data_bytes))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(HubIntegrityError, match="changed on disk after its sha256 was checked"):
        index.scores(test)
    assert index.scores(test, rows="0:8").shape == before[:8].shape  # other shards still read


def test_open_with_rows_makes_them_the_default(tmp_path, data):
    train, test = data
    att = _task().attributor("grad-dot", projector_kwargs=FACTORED)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    (tmp_path / "i" / shard_file(2, 3)).unlink()  # as after a pull of rows 8:16
    index = Index.open(tmp_path / "i", task=att, rows="8:16")
    assert index.rows == range(8, 16)
    got = index.query(test, top_k=3)
    assert got.rows.min() >= 8 and got.rows.max() < 16
    whole = Index.open(tmp_path / "i", task=att)
    assert torch.equal(index.scores(test), whole.scores(test, rows="8:16"))
    assert index.example_ids().tolist() == list(range(8, 16))


def test_index_of_a_subset_accepts_the_whole_dataset_for_texts(tmp_path, data):
    """Rows 0..11 of the index are dataset examples 4..15: the dataset given for texts is the
    whole one (22 examples), not one of 12."""
    train, test = data
    task = _task()
    att = task.attributor("grad-dot", projector_kwargs=FACTORED)
    examples, collate = _examples(task, train)
    subset = DataLoader(examples, batch_size=4, sampler=SubsetSampler(range(4, 16)),
                        collate_fn=collate)
    build(att, subset, out=tmp_path / "i", shard_rows=8, text_column="text")
    meta = json.loads((tmp_path / "i" / INDEX_FILE).read_text())["attribution_index"]
    assert meta["dataset"]["num_rows"] == 12 and meta["dataset"]["num_examples"] == 22
    index = Index.open(tmp_path / "i", task=att, dataset=train)
    got = index.query(test, top_k=3)
    ref = att.attribute(subset, task.dataloader(test, batch_size=4))
    assert torch.equal(got.example_ids, ref.topk(3, dim=0).indices.T + 4)
    assert got.texts == [[train[int(i)]["text"] for i in row] for row in got.example_ids]
    with pytest.raises(ValueError, match=r"is not the one indexed \(22 rows"):
        Index.open(tmp_path / "i", task=att, dataset=train.select(range(12)))


def test_trak_on_a_classifier_stores_its_per_example_factor(tmp_path):
    """TRAK on a sequence classifier weights each training example by 1 - p(correct): the
    index stores the factor and its scores equal attribute()'s (float32 storage) to 1e-5."""
    train, test = text_datasets(n_train=10, labels=True)
    task = task_from_pretrained(tiny_bert(), "sequence-classification",
                                processor=char_tokenizer())
    att = task.attributor("trak", projector_kwargs=FACTORED)
    assert att.has_row_factors
    ref = att.attribute(task.dataloader(train, batch_size=4), task.dataloader(test, batch_size=4))
    build(att, train, out=tmp_path / "i", dtype="float32", shard_rows=4, batch_size=4)
    factor = torch.cat([mmap_tensor(tmp_path / "i" / shard_file(s, 3), "row_factor")
                        for s in range(3)])
    assert factor.shape == (10,) and bool(((factor > 0) & (factor < 1)).all())
    assert float(factor.std()) > 0  # the factor matters: the scores are not a plain rescaling
    for opened in (Index.open(tmp_path / "i", task=att), Index.open(tmp_path / "i", task=task)):
        scores = opened.scores(test)
        assert (scores - ref).abs().max() <= 1e-5 * ref.abs().max()
    without = task.attributor("trak", projector_kwargs=FACTORED, correct_probability_func=None)
    with pytest.raises(ValueError, match="row_factor"):
        Index.open(tmp_path / "i", task=without)


def test_query_featurizing_errors_name_the_query(tmp_path, data):
    train, _ = data
    att = _task().attributor("grad-dot", projector_kwargs=FACTORED)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    index = Index.open(tmp_path / "i", task=att)
    ids = torch.full((5,), 10_000)  # token ids outside the vocabulary: the model raises
    bad = DataLoader([{"input_ids": ids, "labels": ids}] * 2, batch_size=2)
    with pytest.raises(ValueError, match="the query loader's first batch"):
        index.query(bad, top_k=1)


# --------------------------------------------------------------------------------------------
# Second review: rows a collate drops, the caller's attributor, fp16 overflow, damaged layout
# --------------------------------------------------------------------------------------------
def test_a_collate_that_drops_rows_is_refused_not_stored_as_garbage(tmp_path, data):
    """A collate_fn keeping 3 of 4 examples: before, the shard's last rows were uninitialised
    memory and every later row sat one place early (features credited to the wrong ids)."""
    train, _ = data
    task = _task()
    att = task.attributor("grad-dot", projector_kwargs=FACTORED)
    full, collate = _examples(task, train)
    dropping = DataLoader(full, batch_size=4, collate_fn=lambda rows: collate(rows[:-1]))
    with pytest.raises(ValueError, match="yielded 6 examples on this pass but 8"):
        build(att, dropping, out=tmp_path / "i", shard_rows=8)
    assert not (tmp_path / "i" / INDEX_FILE).exists()


def test_build_and_open_leave_the_callers_attributor_consistent(tmp_path, data):
    """attribute() on a subset, then an index of the whole set (which sets the attributor's
    TRAK state from the whole set's kernel), then attribute() on the subset again: the same
    scores (before: the whole set's kernel inverse with the subset's cached features)."""
    train, test = data
    task = _task()
    att = task.attributor("trak", projector_kwargs=FACTORED)
    part = task.dataloader(train.select(range(10)), batch_size=4)
    tests = task.dataloader(test, batch_size=4)
    first = att.attribute(part, tests)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    assert torch.allclose(att.attribute(part, tests), first, rtol=1e-5, atol=1e-7)
    Index.open(tmp_path / "i", task=att).scores(test)
    assert torch.allclose(att.attribute(part, tests), first, rtol=1e-5, atol=1e-7)


def test_features_that_overflow_float16_are_refused(tmp_path, data, monkeypatch):
    """Features beyond float16's 65504 became inf in the shard, and every score of the index
    NaN (ranked first by query) while the float32 kernel looked healthy."""
    train, test = data
    att = _task().attributor("grad-dot", projector_kwargs=FACTORED)
    real = att.featurize
    monkeypatch.setattr(att, "featurize",
                        lambda *a, **k: ((o, f * 1e6) for o, f in real(*a, **k)))
    with pytest.raises(ValueError, match=r"overflows the index dtype.*bfloat16"):
        build(att, train, out=tmp_path / "half", shard_rows=8, batch_size=4)
    build(att, train, out=tmp_path / "single", shard_rows=8, batch_size=4, dtype="float32")
    assert torch.isfinite(Index.open(tmp_path / "single", task=att).scores(test)).all()


def test_an_index_file_whose_shards_miss_rows_is_refused(tmp_path, data):
    """The index file is the root of trust: rows no shard holds (or a shard with fewer rows
    than recorded) were scored from uninitialised memory."""
    from safetensors.torch import load_file, save_file

    from hf_attrib.files import sha256_file
    from hf_attrib.index.format import FEATURES_KIND

    train, test = data
    att = _task().attributor("grad-dot", projector_kwargs=FACTORED)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4)
    path = tmp_path / "i" / INDEX_FILE
    good = json.loads(path.read_text())
    bad = json.loads(path.read_text())
    bad["kinds"][FEATURES_KIND]["num_rows"] = 30
    path.write_text(json.dumps(bad))
    with pytest.raises(HubIntegrityError, match="records 30 rows but its shards cover 0:8, "
                                                "8:16, 16:22"):
        Index.open(tmp_path / "i", task=att)
    # shard 2 rewritten with 5 of its 6 rows, its new sha256 recorded: the count is checked
    shard = tmp_path / "i" / shard_file(2, 3)
    tensors = {k: v[:5].contiguous() for k, v in load_file(str(shard)).items()}
    save_file(tensors, str(shard), {"format": builder.INDEX_KIND})
    good["files"][shard_file(2, 3)].update(size=shard.stat().st_size, sha256=sha256_file(shard))
    path.write_text(json.dumps(good))
    with pytest.raises(HubIntegrityError, match=r"holds 5 rows of .* records rows 16:22"):
        Index.open(tmp_path / "i", task=att).scores(test)


def test_text_column_chooses_the_column_tokenised(tmp_path):
    """A dataset with both ``text`` and ``review``: ``text_column="review"`` featurizes the
    reviews (before: ``text`` was tokenised while the card and the texts said ``review``)."""
    texts, reviews = random_texts(12, 3), random_texts(12, 4)
    train = Dataset.from_dict({"text": texts, "review": reviews})
    task = _task()
    att = task.attributor("grad-dot", projector_kwargs=FACTORED)
    build(att, train, out=tmp_path / "i", shard_rows=8, batch_size=4, text_column="review")
    index = Index.open(tmp_path / "i", task=att, dataset=train)
    query = random_texts(2, 5)
    ref = att.attribute(task.dataloader(Dataset.from_dict({"text": reviews}), batch_size=4),
                        task.dataloader(Dataset.from_dict({"text": query}), batch_size=4))
    assert (index.scores(query) - ref).abs().max() <= 2e-3 * ref.abs().max()
    assert index.query(query, top_k=2).texts[0][0] in reviews
    with pytest.raises(ValueError, match="give one column"):
        build(att, train, out=tmp_path / "j", text_column="review",
              dataloader_kwargs={"text_column": "text"})
