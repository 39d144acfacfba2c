"""Parameter flattening and per-sample gradients of ``hf_attrib.func.utils``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_attrib.func.utils import (
    add_batch_dim,
    batch_size_of,
    flatten_func,
    flatten_params,
    partial_param,
    per_sample_grad,
    unflatten_params,
)

B, FEAT, CLASSES = 7, 5, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEAT, 4), nn.Tanh(), nn.Linear(4, CLASSES)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, FEAT, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (B,), generator=g)
    return x, y


def _loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference: one torch.autograd.grad call per example."""
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# flatten / unflatten
# --------------------------------------------------------------------------------------------
def test_flatten_unflatten_round_trip():
    g = torch.Generator().manual_seed(0)
    params = {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(4, generator=g),
        "c": torch.randn(2, 2, 2, generator=g),
    }
    flat = flatten_params(params)
    assert flat.shape == (12 + 4 + 8,)
    # key order, row-major
    assert torch.equal(flat[:12], params["a"].reshape(-1))
    assert torch.equal(flat[12:16], params["b"])
    assert torch.equal(flat[16:], params["c"].reshape(-1))
    back = unflatten_params(flat, params)
    assert list(back) == ["a", "b", "c"]
    for k in params:
        assert torch.equal(back[k], params[k])
    # a batch of flat vectors [k, d] unflattens to [k, *shape]
    stacked = torch.stack([flat, 2 * flat])
    back2 = unflatten_params(stacked, params)
    assert back2["c"].shape == (2, 2, 2, 2)
    assert torch.equal(back2["c"][1], 2 * params["c"])
    # and it works under vmap
    back3 = torch.vmap(lambda f: unflatten_params(f, params)["a"])(stacked)
    assert torch.equal(back3, back2["a"])


def test_flatten_errors():
    with pytest.raises(ValueError, match="no parameters"):
        flatten_params({})
    with pytest.raises(ValueError, match="expected 4"):
        unflatten_params(torch.zeros(5), {"a": torch.zeros(2, 2)})


def test_flatten_params_keeps_gradient_path():
    model = _model()
    flat = flatten_params(dict(model.named_parameters()))
    assert flat.requires_grad
    flat.sum().backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


# --------------------------------------------------------------------------------------------
# flatten_func / partial_param
# --------------------------------------------------------------------------------------------
def test_flatten_func_with_model_and_dict():
    model = _model()
    x, y = _batch()
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = flatten_params(params)

    def loss(p, batch):
        xb, yb = batch
        return F.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb)

    expected = loss(params, (x, y))
    assert torch.equal(flatten_func(model)(loss)(flat, (x, y)), expected)
    assert torch.equal(flatten_func(params)(loss)(flat, (x, y)), expected)
    # the decorated function is differentiable in the flat vector and keeps its name
    g = torch.func.grad(flatten_func(model)(loss))(flat, (x, y))
    assert g.shape == flat.shape
    assert flatten_func(model)(loss).__name__ == "loss"

    # param_num selects the argument that is unflattened
    def loss_second(batch, p):
        return loss(p, batch)

    assert torch.equal(flatten_func(model, param_num=1)(loss_second)((x, y), flat), expected)


def test_partial_param_restricts_free_parameters():
    model = _model()
    x, y = _batch()
    full = dict(model.named_parameters())  # requires_grad: must be held fixed (detached)
    names = ["2.weight", "2.bias"]

    def loss(p, xb, yb):
        return F.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb)

    part = partial_param(full, names)(loss)
    sub = {k: full[k].detach().clone() for k in names}
    torch.testing.assert_close(part(sub, x, y), loss(full, x, y))
    grads = torch.func.grad(part)(sub, x, y)
    assert sorted(grads) == sorted(names)
    full_grads = torch.autograd.grad(loss(full, x, y), [full[k] for k in names])
    for k, ref in zip(names, full_grads):
        torch.testing.assert_close(grads[k], ref)
    # changing a free parameter changes the value; the fixed ones come from full_param
    # (shift one logit only: a shift of every bias would leave the softmax loss unchanged)
    sub2 = {**sub, "2.bias": sub["2.bias"] + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}
    assert not torch.allclose(part(sub2, x, y), part(sub, x, y))
    # the fixed entries are detached: no graph back to the model's parameters
    out = part(sub, x, y)
    assert not out.requires_grad

    def loss_second(xb, p, yb):
        return loss(p, xb, yb)

    torch.testing.assert_close(partial_param(full, names, param_num=1)(loss_second)(x, sub, y),
                               loss(full, x, y))
    with pytest.raises(KeyError, match="nope"):
        partial_param(full, ["nope"])


# --------------------------------------------------------------------------------------------
# add_batch_dim / batch_size_of
# --------------------------------------------------------------------------------------------
def test_add_batch_dim_and_batch_size_of():
    x, y = _batch()
    nested = {"x": x[0], "pair": (y[0], [x[0]]), "meta": "keep"}
    out = add_batch_dim(nested)
    assert out["x"].shape == (1, FEAT)
    assert out["pair"][0].shape == (1,)
    assert isinstance(out["pair"][1], list) and out["pair"][1][0].shape == (1, FEAT)
    assert out["meta"] == "keep"
    assert batch_size_of(x) == B
    assert batch_size_of((x, y)) == B
    assert batch_size_of({"meta": "skip", "y": y}) == B
    with pytest.raises(ValueError):
        batch_size_of(torch.tensor(1.0))
    with pytest.raises(TypeError):
        batch_size_of(["no", "tensors"])


# --------------------------------------------------------------------------------------------
# per_sample_grad
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 3, 1])
def test_per_sample_grad_tuple_batch_matches_loop(chunk_size):
    model = _model()
    x, y = _batch()
    params = {k: v.detach() for k, v in model.named_parameters()}
    seen = []

    @flatten_func(model)
    def loss(p, batch):
        xb, yb = batch
        seen.append((xb.shape, yb.shape))
        return F.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb)

    out = per_sample_grad(loss, flatten_params(params), (x, y), chunk_size=chunk_size)
    assert out.shape == (B, flatten_params(params).numel())
    torch.testing.assert_close(out, _loop_grads(model, x, y))
    # the function is called with a batch of one example
    assert seen and all(s == ((1, FEAT), (1,)) for s in seen)


def test_per_sample_grad_dict_batch_matches_loop():
    model = _model()
    x, y = _batch()
    theta = flatten_params({k: v.detach() for k, v in model.named_parameters()})

    @flatten_func(model)
    def loss(p, batch):
        assert batch["input"].shape == (1, FEAT)
        logits = torch.func.functional_call(model, p, (batch["input"],))
        return F.cross_entropy(logits, batch["label"])

    batch = {"input": x, "label": y}
    ref = _loop_grads(model, x, y)
    torch.testing.assert_close(per_sample_grad(loss, theta, batch), ref)
    torch.testing.assert_close(per_sample_grad(loss, theta, batch, chunk_size=2), ref)


def test_per_sample_grad_closed_form_linear_regression():
    # squared error of a linear model: per-example gradient is 2 (x.w - y) x
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, FEAT, generator=g, dtype=torch.float64)
    y = torch.randn(B, generator=g, dtype=torch.float64)
    w = torch.randn(FEAT, generator=g, dtype=torch.float64)

    def loss(theta, batch):
        xb, yb = batch
        return ((xb @ theta - yb) ** 2).mean()

    expected = 2 * (x @ w - y)[:, None] * x
    torch.testing.assert_close(per_sample_grad(loss, w, (x, y)), expected)
    # the per-example rows differ (not a broadcast batch-mean gradient)
    assert not torch.allclose(expected[0], expected[1])
    # mean of per-example gradients = gradient of the mean loss
    torch.testing.assert_close(per_sample_grad(loss, w, (x, y)).mean(0),
                               torch.func.grad(loss)(w, (x, y)))
