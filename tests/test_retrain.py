"""Tests of stacked retraining (hf_attrib.model_utils: subsets, stacked_training, block_store)
and the resumable driver (retraining)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

import hf_attrib.model_utils.retraining as rt
from hf_attrib.model_utils.block_store import load_stacked, load_subsets, parse_model_range
from hf_attrib.model_utils.retraining import RetrainBuild, retrain, retrain_lds, retrain_loo
from hf_attrib.model_utils.stacked_training import evaluate_stacked, train_stacked
from hf_attrib.model_utils.subsets import batch_orders, derive_seed, lds_subsets, loo_subsets

N_TRAIN, DIM, CLASSES = 40, 5, 3
RECIPE = dict(epochs=3, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _data(n: int = N_TRAIN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _lr() -> tuple[nn.Module, rt.LossFn]:
    torch.manual_seed(0)
    model = nn.Linear(DIM, CLASSES)

    def loss_fn(params, xb, yb):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    return model, loss_fn


def _plain_loop(model, x, y, order, batch_size, make_opt) -> dict[str, torch.Tensor]:
    """Train a copy of ``model`` with a torch.optim optimizer over the given [epochs, k] order."""
    model = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    for epoch_order in order:
        for start in range(0, epoch_order.numel(), batch_size):
            idx = epoch_order[start:start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------- subsets


def test_lds_subsets_deterministic_and_sized():
    masks = lds_subsets(101, num_models=7, fraction=0.3, seed=3)
    assert masks.dtype == torch.bool and masks.shape == (7, 101)
    assert (masks.sum(1) == round(0.3 * 101)).all()
    assert torch.equal(masks, lds_subsets(101, num_models=7, fraction=0.3, seed=3))
    # row j depends on (seed, j) only
    assert torch.equal(masks[4], lds_subsets(101, num_models=5, fraction=0.3, seed=3)[4])
    assert not torch.equal(masks, lds_subsets(101, num_models=7, fraction=0.3, seed=4))
    assert len({tuple(r.nonzero().flatten().tolist()) for r in masks}) == 7


def test_loo_subsets():
    masks = loo_subsets(6, [4, 0])
    assert masks.shape == (2, 6) and masks.dtype == torch.bool
    assert masks.sum().item() == 10 and not masks[0, 4] and not masks[1, 0]
    assert torch.equal(loo_subsets(4), ~torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices must lie"):
        loo_subsets(4, [4])


# ---------------------------------------------------------------------------- train_stacked


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_single_stacked_model_equals_plain_torch_loop(optimizer):
    model, loss_fn = _lr()
    x, y = _data()
    mask = lds_subsets(N_TRAIN, 1, seed=1)
    kwargs = dict(RECIPE, optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01)
    stacked = train_stacked(model, loss_fn, x, y, mask, model_ids=[5], **kwargs)
    order = batch_orders(mask, epochs=RECIPE["epochs"], stream_ids=[5])[0]
    if optimizer == "sgd":
        def make_opt(ps):
            return torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        def make_opt(ps):
            return torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3)
    plain = _plain_loop(model, x, y, order, RECIPE["batch_size"], make_opt)
    _assert_close({n: p[0] for n, p in stacked.items()}, plain)
    # the model itself is untouched and the result moved away from it
    assert not torch.allclose(stacked["weight"][0], model.weight)


def test_batch_order_is_subset_restriction_of_stream_permutation():
    full = batch_orders(torch.ones(1, N_TRAIN, dtype=torch.bool), epochs=2, stream_ids=[0])[0]
    loo = batch_orders(loo_subsets(N_TRAIN, [7]), epochs=2, stream_ids=[0])[0]
    for e in range(2):
        assert sorted(full[e].tolist()) == list(range(N_TRAIN))
        assert torch.equal(full[e][full[e] != 7], loo[e])


@pytest.mark.parametrize("init", ["model", "seeded"])
def test_stack_member_equals_model_trained_alone(init):
    model, loss_fn = _lr()
    x, y = _data()
    masks = lds_subsets(N_TRAIN, 4, seed=2)
    ids = [10, 11, 12, 13]
    stacked = train_stacked(model, loss_fn, x, y, masks, model_ids=ids, init=init, **RECIPE)
    for k in range(4):
        alone = train_stacked(model, loss_fn, x, y, masks[k:k + 1], model_ids=[ids[k]],
                              init=init, **RECIPE)
        _assert_close({n: p[k] for n, p in stacked.items()}, {n: p[0] for n, p in alone.items()})
    if init == "seeded":  # independent initializations per model
        assert not torch.allclose(stacked["weight"][0], stacked["weight"][1], atol=1e-2)


def test_seeded_init_restores_global_rng():
    model, loss_fn = _lr()
    x, y = _data()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_stacked(model, loss_fn, x, y, lds_subsets(N_TRAIN, 2), init="seeded", epochs=1,
                  batch_size=8, lr=0.1)
    assert torch.equal(torch.rand(3), expected)


def test_unequal_subset_sizes_error(tmp_path):
    model, loss_fn = _lr()
    x, y = _data()
    masks = torch.cat([lds_subsets(N_TRAIN, 1), loo_subsets(N_TRAIN, [0])])
    with pytest.raises(ValueError, match="equal size"):
        train_stacked(model, loss_fn, x, y, masks, epochs=1, batch_size=8, lr=0.1)
    build = RetrainBuild(model=model, loss_fn=loss_fn, x=x, y=y, masks=masks, **RECIPE)
    with pytest.raises(ValueError, match=r"equal size.*20 examples: models \[0\]"):
        retrain("mixed", tmp_path, build, block_size=2, progress=False)
    assert not list((tmp_path / "mixed").iterdir())


def test_changing_buffers_error_and_dropout_runs():
    x, y = _data()
    bn = nn.Sequential(nn.Linear(DIM, 4), nn.BatchNorm1d(4), nn.Linear(4, CLASSES))
    before = {n: b.clone() for n, b in bn.named_buffers()}

    def bn_loss(params, xb, yb):
        return nn.functional.cross_entropy(torch.func.functional_call(bn, params, xb), yb)

    with pytest.raises(ValueError, match=r"running_mean.*strategy=.sequential."):
        train_stacked(bn, bn_loss, x, y, lds_subsets(N_TRAIN, 2), epochs=1, batch_size=8,
                      lr=0.1, strategy="stacked")
    _assert_equal(before, dict(bn.named_buffers()))  # the probe restored the buffers
    # the default (auto) trains it sequentially and never touches the model's own buffers
    params, buffers = train_stacked(bn, bn_loss, x, y, lds_subsets(N_TRAIN, 2), epochs=1,
                                    batch_size=8, lr=0.1, return_buffers=True)
    assert params["0.weight"].shape == (2, 4, DIM) and buffers["1.running_mean"].shape == (2, 4)
    assert buffers["1.num_batches_tracked"].tolist() == [3, 3]  # 20 examples / 8 per batch
    _assert_equal(before, dict(bn.named_buffers()))

    drop = nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, CLASSES))
    drop.eval()

    def drop_loss(params, xb, yb):
        return nn.functional.cross_entropy(torch.func.functional_call(drop, params, xb), yb)

    masks = lds_subsets(N_TRAIN, 2)
    a = train_stacked(drop, drop_loss, x, y, masks, epochs=1, batch_size=8, lr=0.1)
    b = train_stacked(drop, drop_loss, x, y, masks, epochs=1, batch_size=8, lr=0.1)
    _assert_equal(a, b)  # deterministic for a fixed stack
    assert not drop.training  # mode restored


def test_evaluate_stacked_matches_per_model_forward():
    model, loss_fn = _lr()
    x, y = _data()
    params = train_stacked(model, loss_fn, x, y, lds_subsets(N_TRAIN, 3), init="seeded",
                           epochs=1, batch_size=8, lr=0.1)
    xt, yt = _data(9, seed=1)

    def margin(params, xb, yb):
        logits = torch.func.functional_call(model, params, xb)
        correct = logits.gather(1, yb[:, None])[:, 0]
        others = logits.scatter(1, yb[:, None], float("-inf")).logsumexp(1)
        return correct - others

    values = evaluate_stacked(model, params, xt, yt, margin, chunk=4)
    assert values.shape == (3, 9)
    for m in range(3):
        expected = margin({n: p[m] for n, p in params.items()}, xt, yt)
        torch.testing.assert_close(values[m], expected)


# ---------------------------------------------------------------------------- driver


def _build(num_models: int = 7) -> RetrainBuild:
    model, loss_fn = _lr()
    x, y = _data()
    return RetrainBuild(model=model, loss_fn=loss_fn, x=x, y=y,
                        masks=lds_subsets(N_TRAIN, num_models), **RECIPE)


_REAL_TRAIN_STACKED = rt.train_stacked


class _Crash(Exception):
    """A simulated kill in the middle of a build."""


def _count_calls(monkeypatch, fail_after: int | None = None) -> list[list[int]]:
    calls: list[list[int]] = []
    real = _REAL_TRAIN_STACKED

    def counting(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise _Crash("simulated crash")
        calls.append(list(kwargs["model_ids"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(rt, "train_stacked", counting)
    return calls


def test_kill_and_resume_is_bitwise_identical(tmp_path, monkeypatch):
    build = _build()
    full = retrain("lds", tmp_path / "full", build, block_size=2, progress=False)
    assert full.trained == [0, 1, 2, 3] and full.skipped == []
    reference, ref_ids = load_stacked(tmp_path / "full", "lds")
    assert ref_ids.tolist() == list(range(7)) and reference["weight"].shape == (7, CLASSES, DIM)

    out = tmp_path / "resumed"
    calls = _count_calls(monkeypatch, fail_after=2)
    with pytest.raises(_Crash):
        retrain("lds", out, build, block_size=2, progress=False)
    assert calls == [[0, 1], [2, 3]]
    # a partial write of block 2 left behind by the crash
    stale = out / "lds" / ".block-00002.safetensors.999.deadbeef.tmp"
    stale.write_bytes(b"partial garbage")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "lds").glob("block-*")}
    assert sorted(mtimes) == ["block-00000.safetensors", "block-00001.safetensors"]

    calls = _count_calls(monkeypatch)
    result = retrain("lds", out, build, block_size=2, progress=False)
    assert calls == [[4, 5], [6]]
    assert result.trained == [2, 3] and result.skipped == [0, 1]
    assert not stale.exists()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "lds").glob("block-0000[01]*")} == mtimes
    resumed, ids = load_stacked(out, "lds")
    _assert_equal(resumed, reference)
    assert torch.equal(ids, ref_ids)
    # a third run trains nothing
    calls = _count_calls(monkeypatch)
    assert retrain("lds", out, build, block_size=2, progress=False).trained == []
    assert calls == []


def test_shards_and_model_ranges_compose_to_full_build(tmp_path):
    build = _build()
    retrain("lds", tmp_path / "full", build, block_size=2, progress=False)
    a = retrain("lds", tmp_path / "sharded", build, block_size=2, shard=(0, 2), progress=False)
    b = retrain("lds", tmp_path / "sharded", build, block_size=2, shard=(1, 2), progress=False)
    assert a.trained == [0, 2] and b.trained == [1, 3]
    _assert_equal(load_stacked(tmp_path / "sharded", "lds")[0],
                  load_stacked(tmp_path / "full", "lds")[0])
    r = retrain("lds", tmp_path / "ranged", build, block_size=2, models=slice(3, 5),
                progress=False)
    assert r.trained == [1, 2]  # blocks covering ids 3 and 4
    params, ids = load_stacked(tmp_path / "ranged", "lds", models="2:6")
    assert ids.tolist() == [2, 3, 4, 5]
    assert torch.equal(params["bias"], load_stacked(tmp_path / "full", "lds")[0]["bias"][2:6])
    masks, mask_ids = load_subsets(tmp_path / "ranged", "lds", models=(2, 6))
    assert torch.equal(masks, build.masks[2:6]) and mask_ids.tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize(("models", "build", "hub"), [
    ("2:6", (2, 6), (2, 6)),
    (":3", (0, 3), (0, 3)),
    ("4:", (4, 10), (4, 2**62)),
    ("-3:", (7, 10), (-3, 2**62)),       # a build counts from the end; the Hub refuses it
    ("5:50", (5, 10), (5, 50)),          # a build clamps; the Hub checks against its index
    (slice(1, 4), (1, 4), (1, 4)),
    ((2, 2), (2, 2), (2, 2)),
])
def test_parse_model_range_for_builds_and_hub_shards(models, build, hub):
    assert parse_model_range(models, 10) == build
    assert parse_model_range(models) == hub
    assert parse_model_range(None, 10) == (0, 10)


@pytest.mark.parametrize(("models", "message"), [
    ("3", "must look like 'a:b'"),
    (slice(0, 6, 2), r"contiguous range \(slice step 1\)"),
])
def test_parse_model_range_errors(models, message):
    for num_models in (10, None):
        with pytest.raises(ValueError, match=message):
            parse_model_range(models, num_models)
    with pytest.raises(ValueError, match=r"models=\(4, 11\) must satisfy 0 <= a <= b <= 10"):
        parse_model_range((4, 11), 10)


def test_load_stacked_names_missing_blocks(tmp_path):
    build = _build()
    retrain("lds", tmp_path, build, block_size=2, models=(0, 2), progress=False)
    with pytest.raises(FileNotFoundError, match=r"models 2\.\.6 are missing") as err:
        load_stacked(tmp_path, "lds")
    assert "models=slice(2, 7)" in str(err.value)
    os.remove(tmp_path / "lds" / "block-00000.safetensors")
    retrain("lds", tmp_path, build, block_size=2, models=(4, 6), progress=False)
    missing = r"models 0\.\.3, 6 are missing \(blocks \[0, 1, 3\]\)"
    with pytest.raises(FileNotFoundError, match=missing):
        load_stacked(tmp_path, "lds")
    with pytest.raises(FileNotFoundError, match=r"no retrain blocks|does not exist"):
        load_stacked(tmp_path, "other")


def test_mismatched_build_is_rejected(tmp_path):
    build = _build()
    retrain("lds", tmp_path, build, block_size=2, models=(0, 2), progress=False)
    other = _build()
    other.lr = 0.5
    with pytest.raises(ValueError, match="different configuration"):
        retrain("lds", tmp_path, other, block_size=2, models=(0, 2), progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        retrain("lds", tmp_path, build, block_size=3, models=(0, 2), progress=False)


def test_retrain_wrappers(tmp_path):
    model, loss_fn = _lr()
    x, y = _data()
    res = retrain_lds(tmp_path, model, loss_fn, x, y, num_models=3, block_size=2,
                      progress=False, **RECIPE)
    assert res.trained == [0, 1]
    masks, _ = load_subsets(tmp_path, "lds")
    assert torch.equal(masks, lds_subsets(N_TRAIN, 3))

    out = retrain_loo(tmp_path, model, loss_fn, x, y, indices=[3, 8, 20], block_size=2,
                      progress=False, **RECIPE)
    assert set(out) == {"loo", "loo-full"}
    loo, loo_ids = load_stacked(tmp_path, "loo")
    full, _ = load_stacked(tmp_path, "loo-full")
    assert loo_ids.tolist() == [0, 1, 2] and full["weight"].shape[0] == 1
    masks, _ = load_subsets(tmp_path, "loo")
    assert torch.equal(masks, loo_subsets(N_TRAIN, [3, 8, 20]))
    # common randomness: LOO models stay close to the full model
    diff = (loo["weight"] - full["weight"]).abs().max()
    assert 0 < diff < 0.2


# ---------------------------------------------------------------------------- BatchNorm


IMG = 8


def _images(n: int = N_TRAIN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, IMG, IMG, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _bn_net(dropout: float = 0.0) -> tuple[nn.Module, rt.LossFn]:
    """A tiny conv net with BatchNorm (running statistics change in training mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(dropout),
                          nn.Flatten(), nn.Linear(4 * (IMG - 2) ** 2, CLASSES))

    def loss_fn(params, xb, yb):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    return model, loss_fn


def _margin_fn(model):
    def margin(params, xb, yb):
        logits = torch.func.functional_call(model, params, xb)
        correct = logits.gather(1, yb[:, None])[:, 0]
        return correct - logits.scatter(1, yb[:, None], float("-inf")).logsumexp(1)

    return margin


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batchnorm_model_trains_sequentially_like_plain_torch_loop(optimizer):
    model, loss_fn = _bn_net(dropout=0.2)
    before = {n: b.clone() for n, b in model.state_dict().items()}
    x, y = _images()
    mask = lds_subsets(N_TRAIN, 1, seed=1)
    lr = 0.1 if optimizer == "sgd" else 0.01
    kwargs = dict(RECIPE, optimizer=optimizer, lr=lr)
    params, buffers = train_stacked(model, loss_fn, x, y, mask, model_ids=[5],
                                    return_buffers=True, **kwargs)
    assert set(buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}

    # plain PyTorch: a copy in training mode, torch.optim, the documented order and dropout seed
    net = copy.deepcopy(model).train()
    if optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-3)
    torch.manual_seed(derive_seed("dropout", 0, 5))
    for epoch_order in batch_orders(mask, epochs=RECIPE["epochs"], stream_ids=[5])[0]:
        for start in range(0, epoch_order.numel(), RECIPE["batch_size"]):
            idx = epoch_order[start:start + RECIPE["batch_size"]]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    _assert_close({n: p[0] for n, p in params.items()}, dict(net.named_parameters()))
    _assert_close({n: b[0] for n, b in buffers.items()}, dict(net.named_buffers()))
    assert buffers["1.num_batches_tracked"].item() == RECIPE["epochs"] * 3
    assert not torch.allclose(buffers["1.running_mean"][0], torch.zeros(4))
    # the model itself is untouched (parameters and running statistics) and in eval mode again
    _assert_equal(before, model.state_dict())
    model.eval()
    with pytest.warns(UserWarning, match="return_buffers=True"):
        alone = train_stacked(model, loss_fn, x, y, mask, model_ids=[5], **kwargs)
    assert not model.training
    _assert_equal(alone, params)


def test_batchnorm_block_member_equals_model_trained_alone():
    model, loss_fn = _bn_net(dropout=0.3)
    x, y = _images()
    masks = lds_subsets(N_TRAIN, 3, seed=2)
    ids = [10, 11, 12]
    kwargs = dict(RECIPE, epochs=2, init="seeded", return_buffers=True)
    params, buffers = train_stacked(model, loss_fn, x, y, masks, model_ids=ids, **kwargs)
    for k in range(3):
        p, b = train_stacked(model, loss_fn, x, y, masks[k:k + 1], model_ids=[ids[k]], **kwargs)
        _assert_equal({n: t[k:k + 1] for n, t in params.items()}, p)
        _assert_equal({n: t[k:k + 1] for n, t in buffers.items()}, b)
    assert not torch.allclose(params["0.weight"][0], params["0.weight"][1], atol=1e-2)
    assert not torch.allclose(buffers["1.running_var"][0], buffers["1.running_var"][1])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sequential_strategy_matches_stacked_without_buffers(optimizer):
    model, loss_fn = _lr()
    x, y = _data()
    masks = lds_subsets(N_TRAIN, 3, seed=4)
    kwargs = dict(RECIPE, optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01,
                  init="seeded", model_ids=[3, 4, 5])
    stacked = train_stacked(model, loss_fn, x, y, masks, strategy="stacked", **kwargs)
    sequential = train_stacked(model, loss_fn, x, y, masks, strategy="sequential", **kwargs)
    _assert_close(stacked, sequential)
    with pytest.raises(ValueError, match="strategy must be"):
        train_stacked(model, loss_fn, x, y, masks, strategy="vmap", **kwargs)


def test_sequential_rejects_loss_fn_that_drops_buffers():
    model, _ = _bn_net()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x, y = _images()

    def params_only(params, xb, yb):  # routes parameters only: the model's own stats would move
        params = {n: p for n, p in params.items() if "running" not in n and "tracked" not in n}
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    with pytest.raises(ValueError, match="whole mapping"):
        train_stacked(model, params_only, x, y, lds_subsets(N_TRAIN, 2), epochs=1,
                      batch_size=8, lr=0.1)
    _assert_equal(before, dict(model.named_buffers()))


def _bn_build(num_models: int = 5) -> RetrainBuild:
    model, loss_fn = _bn_net(dropout=0.1)
    x, y = _images()
    return RetrainBuild(model=model, loss_fn=loss_fn, x=x, y=y,
                        masks=lds_subsets(N_TRAIN, num_models), **dict(RECIPE, epochs=2))


def test_batchnorm_kill_and_resume_is_bitwise_identical(tmp_path, monkeypatch):
    build = _bn_build()
    assert build.resolve_strategy() == "sequential"
    assert build.fingerprint() == build.fingerprint("sequential") != build.fingerprint("stacked")
    retrain("lds", tmp_path / "full", build, block_size=2, progress=False)
    ref_params, ref_buffers, ref_ids = load_stacked(tmp_path / "full", "lds", with_buffers=True)
    assert ref_ids.tolist() == list(range(5))
    assert ref_buffers["1.running_mean"].shape == (5, 4)
    assert ref_buffers["1.num_batches_tracked"].tolist() == [6] * 5
    # the default return stays (params, ids), parameters only
    params, ids = load_stacked(tmp_path / "full", "lds")
    assert set(params) == {"0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"}
    _assert_equal(params, ref_params)
    with safe_open(str(tmp_path / "full" / "lds" / "block-00000.safetensors"), "pt") as f:
        assert "__buffer__.1.running_var" in set(f.keys())
        assert f.metadata()["strategy"] == "sequential"

    out = tmp_path / "resumed"
    calls = _count_calls(monkeypatch, fail_after=1)
    with pytest.raises(_Crash):
        retrain("lds", out, build, block_size=2, progress=False)
    assert calls == [[0, 1]]
    (out / "lds" / ".block-00001.safetensors.999.deadbeef.tmp").write_bytes(b"partial")
    calls = _count_calls(monkeypatch)
    result = retrain("lds", out, build, block_size=2, progress=False)
    assert calls == [[2, 3], [4]] and result.skipped == [0]
    params, buffers, ids = load_stacked(out, "lds", with_buffers=True)
    _assert_equal(params, ref_params)
    _assert_equal(buffers, ref_buffers)
    assert torch.equal(ids, ref_ids)
    # a build forced onto the stacked path cannot train (or resume) it
    stacked = _bn_build()
    stacked.strategy = "stacked"
    with pytest.raises(ValueError, match="running_mean"):
        retrain("lds", out, stacked, block_size=2, progress=False)
    # stacked builds have no buffers to load
    retrain("lds", tmp_path / "lr", _build(3), block_size=2, progress=False)
    assert load_stacked(tmp_path / "lr", "lds", with_buffers=True)[1] == {}


def test_evaluate_stacked_with_buffers_matches_per_model_eval_forward():
    model, loss_fn = _bn_net(dropout=0.2)
    x, y = _images()
    params, buffers = train_stacked(model, loss_fn, x, y, lds_subsets(N_TRAIN, 3), epochs=2,
                                    batch_size=8, lr=0.1, init="seeded", return_buffers=True)
    xt, yt = _images(9, seed=1)
    margin = _margin_fn(model)
    values = evaluate_stacked(model, params, xt, yt, margin, chunk=4, model_chunk=2,
                              buffers=buffers)
    assert values.shape == (3, 9)
    for m in range(3):
        net = copy.deepcopy(model)
        net.load_state_dict({**{n: p[m] for n, p in params.items()},
                             **{n: b[m] for n, b in buffers.items()}})
        net.eval()
        with torch.no_grad():
            logits = net(xt)
        correct = logits.gather(1, yt[:, None])[:, 0]
        expected = correct - logits.scatter(1, yt[:, None], float("-inf")).logsumexp(1)
        torch.testing.assert_close(values[m], expected)
    # without its buffers every model would use the model's own (initial) statistics
    assert not torch.allclose(evaluate_stacked(model, params, xt, yt, margin), values)
    with pytest.raises(ValueError, match="stacked over the 3 models"):
        evaluate_stacked(model, params, xt, yt, margin,
                         buffers={n: b[:2] for n, b in buffers.items()})
