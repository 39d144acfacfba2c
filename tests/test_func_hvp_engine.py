"""The HVP engine of ``hf_attrib.func.hvp_engine``: ``HessianSum`` against autograd Hessians,
and the memory gauge (``linearization_bytes``) that sizes its caches and vmap chunks."""

from __future__ import annotations

import pytest
import torch

from hf_attrib.func.hvp_engine import HessianSum, linearization_bytes


# --------------------------------------------------------------------------------------------
# HessianSum: a Hessian summed over batches, linearisations kept within a budget
# --------------------------------------------------------------------------------------------
def _sum_problem():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(12, generator=g, dtype=torch.float64)
    batches = [(torch.randn(n, 4, generator=g, dtype=torch.float64), w)
               for n, w in ((5, 0.2), (7, 0.5), (3, 0.3))]

    def objective(t, x):  # a non-quadratic objective: its Hessian depends on the data
        return torch.tanh(x @ t.reshape(4, 3)).pow(2).sum()

    return theta, batches, objective


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
@pytest.mark.parametrize("budget", [0, 2**30], ids=["nothing-kept", "all-kept"])
def test_hessian_sum_equals_weighted_autograd_hessians(mode, budget):
    theta, batches, objective = _sum_problem()
    ref = sum(w * torch.autograd.functional.hessian(lambda t, x=x: objective(t, x), theta)
              for x, w in batches)
    op = HessianSum(objective, theta, batches, mode=mode, cache_bytes=budget, rhs_chunk_size=2)
    v = torch.randn(5, 12, dtype=torch.float64)
    for _ in range(2):  # the second call reuses whatever was kept
        torch.testing.assert_close(op(v), v @ ref.T)
    torch.testing.assert_close(op(v[:1]), v[:1] @ ref.T)  # a single vector skips vmap
    kept = len(op._ops)
    assert kept == (3 if (mode == "rev-rev" and budget > 0) else 0)


def test_hessian_sum_keeps_only_what_fits_the_budget():
    theta, batches, objective = _sum_problem()
    sizes = [linearization_bytes(lambda t, x=x: objective(t, x), theta) for x, _ in batches]
    assert all(s > 0 for s in sizes)
    assert sizes[1] > sizes[2]  # more rows, more activations
    op = HessianSum(objective, theta, batches, cache_bytes=sizes[0] + sizes[2])
    op(torch.randn(2, 12, dtype=torch.float64))
    assert sorted(op._ops) == [0, 2]  # batch 1 does not fit after batch 0; batch 2 does


def test_hessian_sum_merges_small_mean_batches_only_when_shapes_allow():
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(12, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (5, 7, 3)]
    n = sum(x.shape[0] for x in xs)

    def mean_objective(t, batch):  # a mean over the batch's rows, like a training loss
        return torch.tanh(batch["x"] @ t.reshape(4, 3)).pow(2).sum(1).mean()

    full = torch.cat(xs)
    ref = torch.autograd.functional.hessian(lambda t: mean_objective(t, {"x": full}), theta)
    batches = [({"x": x}, x.shape[0] / n) for x in xs]
    op = HessianSum(mean_objective, theta, batches, merge_batches=True)
    assert len(op.batches) == 1 and op.batches[0][0]["x"].shape == (n, 4)
    v = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(op(v), v @ ref.T)
    # Different trailing shapes (e.g. text padded per batch) cannot be concatenated.
    ragged = [({"x": x, "pad": torch.zeros(x.shape[0], i)}, x.shape[0] / n)
              for i, x in enumerate(xs)]
    op = HessianSum(mean_objective, theta, ragged, merge_batches=True)
    assert len(op.batches) == 3
    torch.testing.assert_close(op(v), v @ ref.T)


def test_linearization_bytes_counts_only_what_depends_on_theta():
    x = torch.randn(64, 256, dtype=torch.float64)
    w = torch.randn(256, 256, dtype=torch.float64)

    def late(t):  # a large constant computation, then a small one through theta
        h = torch.tanh(torch.tanh(x @ w) @ w)  # [64, 256] twice, independent of theta
        return (h[:, :4] @ t).pow(2).sum()

    def early(t):  # theta enters first: everything after it depends on it
        return torch.tanh(torch.tanh((x[:, :4] @ t[:, None]).expand(64, 256) @ w) @ w).sum()

    t = torch.randn(4, dtype=torch.float64)
    small, large = linearization_bytes(late, t), linearization_bytes(early, t)
    assert 0 < small < 64 * 8 * 3 * 4  # a few [64]-sized results
    assert large > 4 * 64 * 256 * 8  # the [64, 256] activations after theta
