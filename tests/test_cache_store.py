"""Persistent caches: save_cache / load_cache for every registered method.

The saved-and-loaded attributor must score exactly as the one that computed the cache, without
computing a single training gradient (guards below raise if it does), and a cache that does
not fit (other weights, layers, projection) or was tampered with must be refused by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib.algorithm import (
    FeatureAttributor,
    IFAttributorExplicit,
    RPSAttributor,
    TRAKAttributor,
    cache_store,
    influence_function,
    make_attributor,
    method_names,
)
from hf_attrib.algorithm import base as algorithm_base
from hf_attrib.algorithm.cache_store import (
    CacheIntegrityError,
    describe_differences,
    read_cache,
    write_cache,
)
from hf_attrib.loaders import SubsetSampler, loader_fingerprint
from hf_attrib.task import AttributionTask, CheckpointFunctions

N_TRAIN, N_TEST, DIM, HIDDEN, CLASSES = 24, 5, 4, 6, 3

# Small, fast settings per registered method (task checkpoints: 2, or 1 where the method
# takes one). A method registered without an entry here fails test_every_method_is_covered.
SETTINGS = {
    "trak": (2, {"projector_kwargs": {"proj_dim": 16, "proj_type": "sparse", "proj_seed": 3},
                 "regularization": 1e-3}),
    "tracin": (2, {"weight_list": [0.1, 0.2], "projector_kwargs": {"proj_dim": 20,
                                                                   "proj_type": "normal"}}),
    "grad-dot": (1, {}),
    "grad-cos": (1, {}),
    "if-explicit": (2, {"regularization": 1e-2}),
    "if-cg": (2, {"regularization": 1.0, "max_iter": 5}),
    "if-lissa": (2, {"batch_size": 8, "recursion_depth": 10, "damping": 1e-2,
                     "scaling": 20.0}),
    "if-arnoldi": (2, {"proj_dim": 8, "max_iter": 20, "regularization": 1e-2}),
    "if-ekfac": (2, {"fisher": "empirical"}),
    "if-kfac": (2, {"fisher": "empirical", "damping": 1e-2}),
    "rps": (1, {"final_linear_layer_name": "2", "fit_max_iter": 200}),
}


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def _checkpoints(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return [{k: v.clone() for k, v in _model().state_dict().items()} for _ in range(count)]


def _task(checkpoints) -> AttributionTask:
    model = _model()

    def loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    def margin(params, batch):
        x, y = batch
        logp = torch.log_softmax(torch.func.functional_call(model, params, x), -1)
        correct = logp.gather(1, y[:, None])[:, 0]
        return (correct - torch.log1p(-correct.exp())).mean()

    return AttributionTask(loss, model, checkpoints, target_func=margin)


def _loaders(seed: int = 1) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N_TRAIN, DIM, generator=g), torch.randint(0, CLASSES, (N_TRAIN,),
                                                                  generator=g)
    xt, yt = torch.randn(N_TEST, DIM, generator=g), torch.randint(0, CLASSES, (N_TEST,),
                                                                   generator=g)
    return (DataLoader(TensorDataset(x, y), batch_size=8),
            DataLoader(TensorDataset(xt, yt), batch_size=4))


def _build(name: str, checkpoints=None, **overrides):
    count, options = SETTINGS[name]
    task = _task(checkpoints if checkpoints is not None else _checkpoints(count))
    return make_attributor(name, task, **{**options, **overrides})


def _no_training_gradients(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every way of computing the training set's cached results raise; returns the log
    of feature calls that were allowed (test features, and self-influence's test side)."""
    allowed: list[str] = []
    features = FeatureAttributor._features

    def guarded(self, fns, batch, kind, offset, role):
        if role == "train" and kind == self.train_kind:
            raise AssertionError("training features recomputed after load_cache")
        allowed.append(f"{role}:{kind}")
        return features(self, fns, batch, kind, offset, role)

    def forbidden(what: str):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} called after load_cache")
        return fail

    monkeypatch.setattr(FeatureAttributor, "_features", guarded)
    # the loss side is only ever differentiated for training features (targets: margin)
    monkeypatch.setattr(CheckpointFunctions, "loss_grads", forbidden("loss_grads"))
    monkeypatch.setattr(influence_function, "hessian_columns", forbidden("hessian_columns"))
    monkeypatch.setattr(influence_function, "arnoldi_eigen", forbidden("arnoldi_eigen"))
    monkeypatch.setattr(TRAKAttributor, "_prepare", forbidden("TRAK's kernel"))
    monkeypatch.setattr(RPSAttributor, "_fitted_representers", forbidden("RPS fit"))
    monkeypatch.setattr(RPSAttributor, "_representers", forbidden("RPS representers"))
    return allowed


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(a.abs().max()) or 1.0
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * scale)


def test_every_method_is_covered():
    assert set(method_names()) == set(SETTINGS), "add the new method to SETTINGS"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_round_trip_scores_equal_without_training_gradients(name, tmp_path, monkeypatch):
    train, test = _loaders()
    original = _build(name)
    scores = original.attribute(train, test)
    self_scores = original.self_attribute(train)
    original.save_cache(tmp_path / "cache")

    # a fresh task and attributor on the same checkpoints, and fresh loaders (same data)
    fresh = _build(name, checkpoints=[{k: v.clone() for k, v in c.items()}
                                      for c in _checkpoints(SETTINGS[name][0])])
    fresh.load_cache(tmp_path / "cache")
    _no_training_gradients(monkeypatch)
    train2, test2 = _loaders()
    _same(scores, fresh.attribute(train2, test2))
    _same(self_scores, fresh.self_attribute(train2))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_guards_catch_a_recomputed_cache(name, monkeypatch):
    """Without load_cache the guarded attributor must fail: the guards can detect."""
    train, test = _loaders()
    attributor = _build(name)
    _no_training_gradients(monkeypatch)
    with pytest.raises(AssertionError, match="after load_cache"):
        attributor.attribute(train, test)


def test_factored_projection_round_trips_and_its_seed_is_checked(tmp_path, monkeypatch):
    train, test = _loaders()
    options = {"proj_type": "factored", "factor_dim": 3, "proj_seed": 1}
    original = _build("trak", projector_kwargs=options)
    scores = original.attribute(train, test)
    original.save_cache(tmp_path / "c")
    with pytest.raises(ValueError, match=r"option projection: .*'seed': 1.*'seed': 2"):
        _build("trak", projector_kwargs={**options, "proj_seed": 2}).load_cache(tmp_path / "c")
    fresh = _build("trak", projector_kwargs=options)
    fresh.load_cache(tmp_path / "c")
    _no_training_gradients(monkeypatch)
    _same(scores, fresh.attribute(train, test))


def test_loaded_cache_is_saved_again_and_survives(tmp_path, monkeypatch):
    train, test = _loaders()
    original = _build("if-explicit")
    scores = original.attribute(train, test)
    original.save_cache(tmp_path / "a")
    middle = _build("if-explicit")
    middle.load_cache(tmp_path / "a")
    middle.save_cache(tmp_path / "b")  # before any attribute call: nothing bound yet
    last = _build("if-explicit")
    last.load_cache(tmp_path / "b")
    _no_training_gradients(monkeypatch)
    _same(scores, last.attribute(train, test))


def test_regularization_may_change_after_load_for_explicit(tmp_path):
    train, test = _loaders()
    _build("if-explicit", regularization=1e-2).cache(train)
    a = _build("if-explicit", regularization=1e-2)
    a.cache(train)
    a.save_cache(tmp_path / "c")
    b = _build("if-explicit", regularization=0.5)
    b.load_cache(tmp_path / "c")
    _same(_build("if-explicit", regularization=0.5).attribute(train, test),
          b.attribute(train, test))


def test_features_left_out_by_max_cache_bytes_are_recomputed(tmp_path):
    train, test = _loaders()
    original = _build("trak", max_cache_bytes=0)  # streamed: no features kept
    scores = original.attribute(train, test)
    original.save_cache(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert [e["features"] for e in manifest["checkpoints"]] == [False, False]
    assert all(e["state"] == ["effective_regularization", "kernel_inverse"]
               for e in manifest["checkpoints"])
    fresh = _build("trak")
    fresh.load_cache(tmp_path / "c")
    _same(scores, fresh.attribute(train, test))


def test_train_loader_of_another_size_is_refused(tmp_path):
    train, test = _loaders()
    original = _build("tracin")
    original.cache(train)
    original.save_cache(tmp_path / "c")
    fresh = _build("tracin")
    fresh.load_cache(tmp_path / "c")
    smaller = DataLoader(torch.utils.data.Subset(train.dataset, range(10)), batch_size=8)
    with pytest.raises(ValueError, match=r"yields 10 examples, but the cache loaded from .* "
                                         r"was built on 24"):
        fresh.attribute(smaller, test)


@pytest.fixture()
def saved(tmp_path):
    """A TRAK cache (2 checkpoints) and the checkpoints it was built on."""
    train, _ = _loaders()
    checkpoints = _checkpoints(2)
    attributor = _build("trak", checkpoints=checkpoints)
    attributor.cache(train)
    attributor.save_cache(tmp_path / "cache")
    return tmp_path / "cache", checkpoints


def test_tampered_file_is_refused_by_name(saved):
    path, _ = saved
    shard = next(path.glob("tensors-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheIntegrityError, match=rf"{shard.name} .* does not match the "
                                                  r"size/sha256 recorded in cache.json"):
        _build("trak").load_cache(path)


def test_other_weights_are_refused(saved):
    path, checkpoints = saved
    other = [{k: v.clone() for k, v in c.items()} for c in checkpoints]
    other[1]["0.weight"][0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"checkpoint 1's weights .*Re-run cache\(train_loader\)"):
        _build("trak", checkpoints=other).load_cache(path)


def test_other_layer_selection_is_refused(saved):
    path, checkpoints = saved
    with pytest.raises(ValueError, match=r"the layer selection: the cache holds gradients "
                                         r"through \[0.weight \(6, 4\).*this attributor "
                                         r"selects \[2.weight \(3, 6\), 2.bias \(3,\)\]"):
        _build("trak", checkpoints=checkpoints, layer_name="2").load_cache(path)


def test_other_proj_dim_is_refused(saved):
    path, checkpoints = saved
    with pytest.raises(ValueError, match=r"option projection: cache .*'proj_dim': 16.*this "
                                         r"attributor .*'proj_dim': 12"):
        _build("trak", checkpoints=checkpoints,
               projector_kwargs={"proj_dim": 12, "proj_type": "sparse",
                                 "proj_seed": 3}).load_cache(path)


def test_other_dtype_is_refused(saved):
    path, checkpoints = saved
    half = [{k: v.double() for k, v in c.items()} for c in checkpoints]
    attributor = _build("trak", checkpoints=half)
    attributor.task.model.double()
    with pytest.raises(ValueError, match=r"the parameters' dtypes: cache \['float32'\], this "
                                         r"model \['float64'\]"):
        attributor.load_cache(path)


def test_other_method_is_refused(saved):
    path, checkpoints = saved
    with pytest.raises(ValueError, match=r"the method: the cache was built by "
                                         r"TRAKAttributor, this attributor is TracInAttributor"):
        _build("tracin", checkpoints=checkpoints).load_cache(path)


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "cache.json").read_text())
    edit(manifest)
    (path / "cache.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd",
                                  "sub/tensors-00000-of-00001.safetensors"])
def test_file_names_leading_out_are_refused(saved, name):
    path, _ = saved

    def rename(manifest):
        first = next(iter(manifest["files"]))
        manifest["files"][name] = manifest["files"].pop(first)

    _edit_manifest(path, rename)
    with pytest.raises(CacheIntegrityError, match="not a tensor file inside the cache folder"):
        read_cache(path)


def test_symlink_leading_out_is_refused(saved, tmp_path):
    path, _ = saved
    shard = next(path.glob("tensors-*.safetensors"))
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(CacheIntegrityError, match="a link leading out"):
        read_cache(path)


def test_interrupted_save_leaves_the_old_cache(saved, monkeypatch):
    path, checkpoints = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    train, _ = _loaders()
    other = _build("trak", checkpoints=checkpoints, regularization=1.0)
    other.cache(train)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(cache_store, "sha256_file", crash)  # after the first shard is written
        other.save_cache(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache"]  # no temporary left
    _build("trak", checkpoints=checkpoints).load_cache(path)  # still a valid cache


def test_save_replaces_an_old_cache_but_never_a_foreign_folder(saved, tmp_path):
    path, checkpoints = saved
    train, _ = _loaders()
    other = _build("trak", checkpoints=checkpoints, regularization=1.0)
    other.cache(train)
    other.save_cache(path)  # an hf_attrib cache: replaced
    _build("trak", checkpoints=checkpoints, regularization=1.0).load_cache(path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"is not an hf_attrib cache .*'notes.txt'.*Pass a new "
                                         r"path"):
        other.save_cache(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_save_before_cache_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"nothing cached to save: call cache\(train_loader\)"):
        _build("if-cg").save_cache(tmp_path / "c")
    with pytest.raises(ValueError, match=r"nothing cached to save"):
        _build("rps").save_cache(tmp_path / "c")


def test_large_tensors_are_split_across_files(tmp_path):
    tensors = {"a": torch.arange(40.0).reshape(10, 4), "b": torch.tensor(3.0),
               "c": torch.arange(6, dtype=torch.int64)}
    write_cache(tmp_path / "c", tensors, {"num_train": 1}, max_shard_bytes=48)
    files = sorted(p.name for p in (tmp_path / "c").glob("*.safetensors"))
    assert len(files) >= 4 and files[0] == f"tensors-00000-of-{len(files):05d}.safetensors"
    reader = read_cache(tmp_path / "c")
    assert len(reader.manifest["tensors"]["a"]["parts"]) == 4  # 3 rows of 16 bytes per file
    for name, value in tensors.items():
        assert torch.equal(reader.tensor(name), value)


@pytest.mark.slow  # a second Python process: ~10 s on a busy 2-core machine
def test_fresh_process_does_not_recompute(tmp_path):
    """Another Python process loads the cache and scores without training gradients."""
    train, test = _loaders()
    checkpoints = _checkpoints(2)
    original = _build("trak", checkpoints=checkpoints)
    expected = original.attribute(train, test)
    original.save_cache(tmp_path / "cache")
    torch.save({"checkpoints": checkpoints, "expected": expected}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_cache_store as t
        from hf_attrib.task import CheckpointFunctions
        from hf_attrib.algorithm import FeatureAttributor, TRAKAttributor
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        attributor = t._build("trak", checkpoints=inputs["checkpoints"])
        attributor.load_cache({str(tmp_path / "cache")!r})
        features = FeatureAttributor._features
        def guarded(self, fns, batch, kind, offset, role):
            assert role == "test", "training features recomputed"
            return features(self, fns, batch, kind, offset, role)
        FeatureAttributor._features = guarded
        TRAKAttributor._prepare = None  # calling it would fail
        train, test = t._loaders()
        scores = attributor.attribute(train, test)
        torch.testing.assert_close(scores, inputs["expected"], rtol=1e-6, atol=1e-7)
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-2000:]


def test_manifest_records_what_the_lead_asked_for(saved):
    path, _ = saved
    manifest = json.loads((path / "cache.json").read_text())
    assert manifest["format_version"] == 1 and manifest["hf_attrib_version"]
    identity = manifest["identity"]
    assert identity["method"] == "TRAKAttributor"
    assert identity["options"]["projection"]["seed"] == 3
    assert identity["options"]["regularization"] == 1e-3
    assert [p[0] for p in identity["parameters"]] == ["0.weight", "0.bias", "2.weight",
                                                      "2.bias"]
    assert len(identity["weights_sha256"]) == 2 and identity["weights_sha256"][0] != \
        identity["weights_sha256"][1]
    assert identity["projectors"][0]["class"] == "SparseProjector"
    assert manifest["num_train"] == N_TRAIN
    assert set(manifest["files"]) == {p.name for p in path.glob("*.safetensors")}


def test_explicit_round_trip_keeps_float64_eigenvectors(tmp_path):
    train, _ = _loaders()
    original = _build("if-explicit")
    original.cache(train)
    original.save_cache(tmp_path / "c")
    fresh = _build("if-explicit")
    fresh.load_cache(tmp_path / "c")
    assert isinstance(fresh, IFAttributorExplicit)
    for c in range(2):
        for a, b in zip(original._states[c], fresh._states[c], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# The training set a cache was built on
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["other data", "re-sorted", "rebatched"])
def test_train_loader_of_the_same_size_but_other_batches_is_refused(saved, change):
    """A cache credits its features to the train loader's rows: same count is not enough."""
    path, checkpoints = saved
    train, test = _loaders()
    if change == "other data":
        other, _ = _loaders(seed=7)
    elif change == "re-sorted":
        other = DataLoader(train.dataset, batch_size=8,
                           sampler=SubsetSampler(range(N_TRAIN - 1, -1, -1)))
    else:
        other = DataLoader(train.dataset, batch_size=6)
    fresh = _build("trak", checkpoints=checkpoints)
    fresh.load_cache(path)
    with pytest.raises(ValueError, match=r"the train loader's batches differ from those the "
                                         r"cache loaded from .* was built on .*Pass the "
                                         r"training loader the cache was built with"):
        fresh.attribute(other, test)
    with pytest.raises(ValueError, match=r"batches differ"):
        fresh.self_attribute(other)
    fresh.attribute(train, test)  # the right one is still taken


def test_rps_checks_the_train_loader_too(tmp_path):
    train, test = _loaders()
    original = _build("rps")
    original.cache(train)
    original.save_cache(tmp_path / "c")
    fresh = _build("rps")
    fresh.load_cache(tmp_path / "c")
    other, _ = _loaders(seed=7)
    with pytest.raises(ValueError, match=r"batches differ"):
        fresh.attribute(other, test)


def test_manifest_without_a_train_fingerprint_is_refused(saved):
    path, checkpoints = saved
    _edit_manifest(path, lambda m: m.pop("train_fingerprint"))
    with pytest.raises(CacheIntegrityError, match=r"no valid train_fingerprint .*rebuild the "
                                                  r"cache"):
        _build("trak", checkpoints=checkpoints).load_cache(path)


def test_fingerprint_is_saved_again_from_a_loaded_cache(tmp_path):
    train, _ = _loaders()
    original = _build("if-explicit")
    original.cache(train)
    original.save_cache(tmp_path / "a")
    middle = _build("if-explicit")
    middle.load_cache(tmp_path / "a")
    middle.save_cache(tmp_path / "b")  # no loader bound: the loaded fingerprint is kept
    recorded = [json.loads((tmp_path / f / "cache.json").read_text())["train_fingerprint"]
                for f in ("a", "b")]
    assert recorded[0] == recorded[1] == loader_fingerprint(train)[1]


def test_loader_fingerprint_sees_data_order_structure_and_batching():
    x = torch.arange(12.0).reshape(6, 2)
    y = torch.arange(6)
    base = loader_fingerprint(DataLoader(TensorDataset(x, y), batch_size=3))
    assert base[0] == 6
    assert base == loader_fingerprint(DataLoader(TensorDataset(x.clone(), y), batch_size=3))
    changed = x.clone()
    changed[5, 1] += 1
    others = [
        DataLoader(TensorDataset(changed, y), batch_size=3),                     # a value
        DataLoader(TensorDataset(x.double(), y), batch_size=3),                  # a dtype
        DataLoader(TensorDataset(x, y), batch_size=2),                           # batching
        DataLoader(TensorDataset(x, y), batch_size=3, sampler=[1, 0, 2, 3, 4, 5]),  # order
        [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}],                   # structure
    ]
    digests = {base[1]} | {loader_fingerprint(o)[1] for o in others}
    assert len(digests) == 1 + len(others)
    # keys of a mapping in another insertion order: the same batch
    one = [{"a": x, "b": ["t1", 2]}]
    assert loader_fingerprint(one) == loader_fingerprint([{"b": ["t1", 2], "a": x}])
    assert loader_fingerprint(one) != loader_fingerprint([{"a": x, "b": ["t1", 3]}])


def test_hf_task_kind_and_target_are_part_of_the_identity(tmp_path):
    train, _ = _loaders()
    checkpoints = _checkpoints(2)
    original = _build("trak", checkpoints=checkpoints)
    original.task.task_kind = "text-classification"  # as an integrations task carries it
    original.cache(train)
    original.save_cache(tmp_path / "c")
    options = json.loads((tmp_path / "c" / "cache.json").read_text())["identity"]["options"]
    assert options["task_kind"] == "text-classification" and options["task_target"] == "default"
    other = _build("trak", checkpoints=checkpoints)
    other.task.task_kind = "token-classification"
    with pytest.raises(ValueError, match=r"option task_kind: cache 'text-classification', this "
                                         r"attributor 'token-classification'"):
        other.load_cache(tmp_path / "c")
    plain = _build("trak", checkpoints=checkpoints)  # no task_kind: refused too
    with pytest.raises(ValueError, match=r"option task_kind: cache 'text-classification', this "
                                         r"attributor '<unset>'"):
        plain.load_cache(tmp_path / "c")


# --------------------------------------------------------------------------------------------
# Manifest consistency
# --------------------------------------------------------------------------------------------
def test_split_tensor_whose_parts_miss_rows_is_refused(tmp_path):
    write_cache(tmp_path / "c", {"a": torch.arange(40.0).reshape(10, 4)}, {"num_train": 1},
                max_shard_bytes=48)
    _edit_manifest(tmp_path / "c", lambda m: m["tensors"]["a"]["parts"].pop())  # rows 9:10
    reader = read_cache(tmp_path / "c")
    with pytest.raises(CacheIntegrityError, match=r"tensor 'a' .*its pieces do not make the "
                                                  r"shape \[10, 4\]"):
        reader.tensor("a")


def test_weights_sha256_lists_are_compared_whole(saved):
    identity = {"method": "M", "num_checkpoints": 2, "weights_sha256": ["a" * 64, "b" * 64]}
    assert describe_differences(identity, identity) == []
    emptied = describe_differences({**identity, "weights_sha256": []}, identity)
    assert [d.split(" (")[0] for d in emptied] == ["checkpoint 0's weights",
                                                  "checkpoint 1's weights"]
    assert describe_differences({**identity, "weights_sha256": None}, identity)
    path, checkpoints = saved
    _edit_manifest(path, lambda m: m["identity"].update(weights_sha256=[]))
    with pytest.raises(ValueError, match=r"checkpoint 0's weights .*checkpoint 1's weights"):
        _build("trak", checkpoints=checkpoints).load_cache(path)


def test_unknown_identity_entries_are_compared():
    assert describe_differences({"method": "M", "extra": 1}, {"method": "M"}) == [
        "extra: cache 1, this attributor '<unset>'"]


# --------------------------------------------------------------------------------------------
# Interrupted saves and other processes
# --------------------------------------------------------------------------------------------
def _kill_between_renames(path: Path, suffix: str = "0badc0de") -> Path:
    """The state a save killed between its two renames leaves: the old cache renamed away,
    nothing at ``path``."""
    aside = path.parent / f".{path.name}.old-{suffix}"
    path.rename(aside)
    return aside


def test_cache_left_aside_by_a_killed_save_is_restored_on_read(saved):
    path, checkpoints = saved
    aside = _kill_between_renames(path)
    _build("trak", checkpoints=checkpoints).load_cache(path)
    assert path.is_dir() and not aside.exists()


def test_cache_left_aside_by_a_killed_save_is_restored_then_replaced_on_write(saved):
    path, checkpoints = saved
    train, _ = _loaders()
    _kill_between_renames(path)
    other = _build("trak", checkpoints=checkpoints, regularization=1.0)
    other.cache(train)
    other.save_cache(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache"]  # nothing left aside
    _build("trak", checkpoints=checkpoints, regularization=1.0).load_cache(path)


def test_two_caches_left_aside_are_not_guessed_between(saved):
    path, _ = saved
    aside = _kill_between_renames(path)
    shutil.copytree(aside, path.parent / f".{path.name}.old-11111111")
    with pytest.raises(FileNotFoundError, match=r"2 earlier caches were left aside by "
                                                r"interrupted saves.*rename the intact one"):
        read_cache(path)


def _as_other_rank(attributor, monkeypatch, rank0_wrote: bool) -> None:
    """Make ``attributor`` rank 1 of 2, with rank 0's outcome ``rank0_wrote``."""
    monkeypatch.setattr(attributor, "_world", lambda: (1, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(algorithm_base, "all_reduce_sum",
                        lambda t: t + (1 if rank0_wrote else 0))


def test_other_ranks_raise_when_rank_0_failed_even_over_an_old_cache(saved, monkeypatch):
    path, checkpoints = saved  # an earlier cache.json is there
    train, _ = _loaders()
    other = _build("trak", checkpoints=checkpoints, regularization=1.0)
    other.cache(train)
    _as_other_rank(other, monkeypatch, rank0_wrote=False)
    with pytest.raises(OSError, match=r"rank 0 did not write the cache"):
        other.save_cache(path)
    _as_other_rank(other, monkeypatch, rank0_wrote=True)
    assert other.save_cache(path) == path


def test_empty_tensors_round_trip(tmp_path):
    """A tensor of 0 rows beside a split one (before: ZeroDivisionError in the file plan)."""
    tensors = {"empty": torch.zeros(0, 4), "a": torch.arange(40.0).reshape(10, 4)}
    write_cache(tmp_path / "c", tensors, {"num_train": 1}, max_shard_bytes=48)
    reader = read_cache(tmp_path / "c")
    for name, value in tensors.items():
        assert torch.equal(reader.tensor(name), value)


def test_a_cache_replaced_after_it_was_read_is_refused(tmp_path):
    """read_cache hashes every file, tensors are read later: a save_cache replacing the folder
    in between must not slip its files in under the first manifest (same names, other data)."""
    write_cache(tmp_path / "c", {"a": torch.zeros(3, 4)}, {"num_train": 1})
    reader = read_cache(tmp_path / "c")
    write_cache(tmp_path / "c", {"a": torch.ones(3, 4)}, {"num_train": 1})
    with pytest.raises(CacheIntegrityError, match="changed on disk after read_cache"):
        reader.tensor("a")
    assert torch.equal(read_cache(tmp_path / "c").tensor("a"), torch.ones(3, 4))
