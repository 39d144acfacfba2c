"""Shared-window training of leave-one-out stacks (``train_stacked(example_loss_fn=...)``).

The window path must give every model exactly its own mini-batches: checked against the batch
orders (brute force), against a plain ``torch.optim`` loop per model, and against the
per-model path, for SGD with momentum/weight decay and Adam, a linear model and an MLP.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_attrib.model_utils.retraining import load_stacked, retrain_loo
from hf_attrib.model_utils.stacked_training import check_example_loss, train_stacked
from hf_attrib.model_utils.subsets import batch_orders, lds_subsets, loo_subsets, shared_windows

N_TRAIN, DIM, CLASSES = 37, 6, 3  # 37: the last mini-batch of an epoch is short
RECIPE = dict(epochs=3, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_TRAIN, DIM, generator=g), torch.randint(0, CLASSES, (N_TRAIN,),
                                                                 generator=g)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(DIM, CLASSES)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def _losses(model: nn.Module):
    def loss_fn(params, xb, yb):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    def example_loss_fn(params, xb, yb):
        logits = torch.func.functional_call(model, params, xb)
        return nn.functional.cross_entropy(logits, yb, reduction="none")

    return loss_fn, example_loss_fn


@pytest.mark.parametrize("left_out", [[0, 5, 36], [[3, 4], [10, 30], [0, 36]]])
def test_windows_hold_exactly_each_models_batches(left_out):
    """Brute force: window[member[m]] is model m's mini-batch j, in visiting order."""
    masks = torch.ones(len(left_out), N_TRAIN, dtype=torch.bool)
    for m, out in enumerate(left_out):
        masks[m, out] = False
    windows = shared_windows(masks, epochs=3, batch_size=8, seed=4, stream=2)
    orders = batch_orders(masks, epochs=3, seed=4, stream_ids=[2] * len(left_out))
    size = int(masks[0].sum())
    assert windows is not None and len(windows) == 3
    for e, batches in enumerate(windows):
        assert len(batches) == -(-size // 8)
        for j, (window, member) in enumerate(batches):
            assert window.numel() <= 8 + 2 * len(left_out)  # a short run of positions
            for m in range(len(left_out)):
                expected = orders[m, e, j * 8:(j + 1) * 8]
                assert torch.equal(window[member[m]], expected), (e, j, m)


def test_independent_subsets_do_not_use_windows():
    """Half subsets sharing a stream spread over the whole permutation: no windows."""
    masks = lds_subsets(N_TRAIN, 3, seed=1)
    assert shared_windows(masks, epochs=1, batch_size=8, seed=0, stream=0) is None


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_window_path_equals_per_model_path_and_plain_loop(kind, optimizer):
    model = _model(kind)
    loss_fn, example_loss_fn = _losses(model)
    x, y = _data()
    masks = loo_subsets(N_TRAIN, [0, 7, 8, 36])
    recipe = dict(RECIPE, optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01)
    streams = [3] * 4
    fast = train_stacked(model, loss_fn, x, y, masks, stream_ids=streams,
                         example_loss_fn=example_loss_fn, **recipe)
    slow = train_stacked(model, loss_fn, x, y, masks, stream_ids=streams, **recipe)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=0)
    # and model 1 against a plain torch.optim loop over its own batches
    order = batch_orders(masks[1:2], epochs=3, stream_ids=[3])[0]
    net = _model(kind)
    opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
           if optimizer == "sgd" else torch.optim.Adam(net.parameters(), lr=0.01,
                                                        weight_decay=1e-3))
    for epoch in order:
        for start in range(0, epoch.numel(), 8):
            idx = epoch[start:start + 8]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(fast[name][1], p.detach(), atol=1e-5, rtol=0)


def test_window_path_is_taken(monkeypatch):
    """The LOO stack really trains on windows (not silently on the per-model path)."""
    import hf_attrib.model_utils.stacked_training as st

    calls = []
    real = st._window_steps
    monkeypatch.setattr(st, "_window_steps", lambda *a: calls.append(1) or real(*a))
    model = _model("linear")
    loss_fn, example_loss_fn = _losses(model)
    x, y = _data()
    train_stacked(model, loss_fn, x, y, loo_subsets(N_TRAIN, [1, 2]), stream_ids=[0, 0],
                  example_loss_fn=example_loss_fn, **RECIPE)
    assert calls == [1]
    train_stacked(model, loss_fn, x, y, lds_subsets(N_TRAIN, 2), stream_ids=[0, 1],
                  example_loss_fn=example_loss_fn, **RECIPE)
    assert calls == [1]  # own streams: per-model path


def test_mismatched_example_loss_is_refused():
    model = _model("linear")
    loss_fn, _ = _losses(model)
    x, y = _data()

    def summed(params, xb, yb):  # per-example losses times the batch size: wrong scale
        logits = torch.func.functional_call(model, params, xb)
        return nn.functional.cross_entropy(logits, yb, reduction="none") * xb.shape[0]

    with pytest.raises(ValueError, match="differs from loss_fn"):
        check_example_loss(model, loss_fn, summed, x, y)
    with pytest.raises(ValueError, match="one loss per example"):
        check_example_loss(model, loss_fn, loss_fn, x, y)
    with pytest.raises(ValueError, match="differs from loss_fn"):
        train_stacked(model, loss_fn, x, y, loo_subsets(N_TRAIN, [1]), example_loss_fn=summed,
                      **RECIPE)


def test_retrain_loo_with_example_loss_matches_without(tmp_path):
    model = _model("mlp")
    loss_fn, example_loss_fn = _losses(model)
    x, y = _data()
    for folder, extra in (("fast", dict(example_loss_fn=example_loss_fn)), ("slow", {})):
        retrain_loo(tmp_path / folder, model, loss_fn, x, y, indices=range(6), block_size=4,
                    progress=False, **RECIPE, **extra)
    for kind in ("loo", "loo-full"):
        fast, ids_fast = load_stacked(tmp_path / "fast", kind)
        slow, ids_slow = load_stacked(tmp_path / "slow", kind)
        assert torch.equal(ids_fast, ids_slow)
        for name in fast:
            torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=0)


class _Flatten(nn.Module):
    """Images in, the first Linear sees them flattened (as the benchmark's models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 8), nn.ReLU(),
                                  nn.Linear(8, CLASSES))

    def forward(self, x):
        return self.body(x)


class _Scaled(nn.Module):
    """The first Linear does not see the raw input: the GEMM path must not be used."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.layer(2 * x)


@pytest.mark.parametrize("kind, taken", [("linear", True), ("mlp", True), ("flatten", True),
                                          ("scaled", False)])
def test_input_layer_runs_as_one_matrix_product(monkeypatch, kind, taken):
    import hf_attrib.model_utils.stacked_training as st

    torch.manual_seed(0)
    model = {"flatten": _Flatten, "scaled": _Scaled}.get(kind, lambda: _model(kind))()
    loss_fn, example_loss_fn = _losses(model)
    x, y = _data()
    if kind == "flatten":
        x = x.reshape(N_TRAIN, 2, 3)
    calls = []
    real = st._InputLayerGrad.__call__
    monkeypatch.setattr(st._InputLayerGrad, "__call__",
                        lambda self, *a: calls.append(1) or real(self, *a))
    masks = loo_subsets(N_TRAIN, [2, 9, 30])
    fast = train_stacked(model, loss_fn, x, y, masks, stream_ids=[0] * 3,
                         example_loss_fn=example_loss_fn, **RECIPE)
    steps = RECIPE["epochs"] * -(-(N_TRAIN - 1) // RECIPE["batch_size"])
    # every step, plus the one check on the first window
    assert len(calls) == (steps + 1 if taken else 0)
    slow = train_stacked(model, loss_fn, x, y, masks, stream_ids=[0] * 3, **RECIPE)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=0)


def test_benchmark_models_take_the_input_layer_path(monkeypatch):
    """MNIST's LR and MLP (dropout on) train their input layer as one GEMM, same models."""
    import hf_attrib.model_utils.stacked_training as st
    from hf_attrib.benchmark.builders import build_model, classification_functions
    from hf_attrib.benchmark.settings import get_setting

    calls = []
    real = st._InputLayerGrad.__call__
    monkeypatch.setattr(st._InputLayerGrad, "__call__",
                        lambda self, *a: calls.append(1) or real(self, *a))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 1, 28, 28, generator=g), torch.randint(0, 10, (30,), generator=g)
    for name in ("mnist_lr", "mnist_mlp"):
        model = build_model(get_setting(name))
        fns = classification_functions(model)
        calls.clear()
        masks = loo_subsets(30, [0, 29])
        kw = dict(epochs=1, batch_size=8, lr=0.05, stream_ids=[0, 0])
        fast = train_stacked(model, fns["train_loss"], x, y, masks,
                             example_loss_fn=fns["example_loss"], **kw)
        assert len(calls) == 5, name  # 4 steps + the check
        if name == "mnist_lr":  # no dropout: the per-model path gives the same models
            slow = train_stacked(model, fns["train_loss"], x, y, masks, **kw)
            for key in slow:
                torch.testing.assert_close(fast[key], slow[key], atol=1e-5, rtol=0)
