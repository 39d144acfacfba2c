"""Issue 11, item 4: no NaN or inf leaves an inverse-HVP solver or an influence attributor.

Divergent LiSSA, zero Arnoldi eigenvalues, singular or non-finite systems stop with an error
that names the option to change; half-precision models are attributed in float32.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib.algorithm import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from hf_attrib.func.hessian import (
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
)
from hf_attrib.func.solvers import lissa_recursion
from hf_attrib.task import AttributionTask

DT = torch.float64


def _spd(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g,
                                       dtype=DT))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T


def _estimate(message: str, what: str) -> float:
    match = re.search(re.escape(what) + r"\s*([-0-9.e+]+)", message)
    assert match, message
    return float(match.group(1))


# --------------------------------------------------------------------------------------------
# LiSSA
# --------------------------------------------------------------------------------------------
def test_lissa_scaling_below_top_eigenvalue_stops_early_with_an_estimate():
    a = _spd([0.5, 1.0, 2.0, 3.0])
    v = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    calls = []

    def sample(step):
        calls.append(step)
        return lambda m: m @ a

    with pytest.raises(FloatingPointError, match=r"scaling \(1\) exceeds the largest") as err:
        lissa_recursion(sample, v, recursion_depth=5000, scaling=1.0)
    message = str(err.value)
    assert "pass scaling=" in message
    assert _estimate(message, "estimated at") == pytest.approx(3.0, rel=0.02)
    assert _estimate(message, "pass scaling=") > 3.0  # the suggested value converges
    assert len(calls) < 100  # stopped within a few steps, not after 5000 (plus the probes)
    assert "negative curvature" not in message


def test_lissa_negative_curvature_asks_for_damping():
    # Scaling is above the top eigenvalue, but one eigenvalue is negative: each step grows that
    # direction by 1 + 0.05 / 4, so 3000 steps used to return ~1e16 without a word.
    a = _spd([-0.05, 0.5, 1.0, 2.0])
    v = torch.randn(1, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    with pytest.raises(FloatingPointError, match="negative curvature") as err:
        lissa_recursion(lambda _: (lambda m: m @ a), v, recursion_depth=3000, scaling=4.0)
    message = str(err.value)
    assert _estimate(message, "eigenvalue about") == pytest.approx(-0.05, rel=0.05)
    damping = _estimate(message, "pass damping=")
    scaling = _estimate(message, "pass scaling=")
    assert damping * scaling > 0.05
    # the suggested options converge (twice the damping: a contraction of 0.98 per step), to
    # the damped system's solution
    out = lissa_recursion(lambda _: (lambda m: m @ a), v, recursion_depth=1000,
                          scaling=scaling, damping=2 * damping)
    expected = torch.linalg.solve(a + 2 * damping * scaling * torch.eye(4, dtype=DT), v.T).T
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8)


def test_lissa_nan_iterate_is_an_error():
    a = _spd([0.5, 1.0])
    v = torch.randn(1, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        lissa_recursion(lambda _: (lambda m: m @ a * float("nan")), v, recursion_depth=10,
                        scaling=4.0)


def test_ihvp_lissa_on_a_model_names_scaling():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    w = torch.randn(3, generator=g, dtype=DT)

    def mse(w, x, y):
        return ((x @ w - y) ** 2).mean()

    top = float(torch.linalg.eigvalsh(2 * x.T @ x / 30).max())
    with pytest.raises(FloatingPointError, match="scaling") as err:
        ihvp_at_x_lissa(mse, w, x, y, batch_size=30, recursion_depth=500,
                        scaling=top / 3)(torch.ones(3, dtype=DT))
    assert _estimate(str(err.value), "estimated at") == pytest.approx(top, rel=0.05)


# --------------------------------------------------------------------------------------------
# Arnoldi, CG, explicit
# --------------------------------------------------------------------------------------------
def _softmax_problem(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=g)
    w = torch.randn(3, 4, generator=g, dtype=DT)
    return w, x, y


def _softmax_loss(w, x, y):
    # no L2: shifting every class's weights by one vector leaves the loss unchanged, so the
    # Hessian has a null space
    return F.cross_entropy(x @ w.T, y)


def test_arnoldi_zero_eigenvalues_at_zero_regularization_are_an_error():
    w, x, y = _softmax_problem()
    with pytest.raises(ValueError, match=r"1 of the \d+ Hessian eigenvalues kept are zero "
                                         r"after adding regularization=0") as err:
        ihvp_at_x_arnoldi(_softmax_loss, w, x, y, max_iter=12)
    assert "top_k <=" in str(err.value)
    # with regularization the same solve is finite and exact on the kept eigenpairs
    h = torch.autograd.functional.hessian(lambda t: _softmax_loss(t, x, y), w).reshape(12, 12)
    v = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(6))
    out = ihvp_at_x_arnoldi(_softmax_loss, w, x, y, max_iter=12, regularization=0.1)(
        v.reshape(3, 4))
    expected = torch.linalg.solve(h + 0.1 * torch.eye(12, dtype=DT), v)
    # Krylov sees one null direction of the three: compare on the range of H and that one
    assert torch.isfinite(out).all()
    evals, evecs = torch.linalg.eigh(h)
    rng = evecs[:, evals > 1e-8]
    torch.testing.assert_close(rng.T @ out.reshape(-1), rng.T @ expected, rtol=1e-6, atol=1e-8)


def test_cg_and_explicit_refuse_non_finite_or_singular_systems():
    def nan_curvature(t):  # sqrt of a negative number: NaN Hessian
        return torch.sqrt(t).sum()

    t = torch.tensor([-1.0, 2.0], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match="CG returned NaN/inf"):
            ihvp_at_x_cg(nan_curvature, t, max_iter=3)(torch.ones(2, dtype=DT))
    with pytest.raises(FloatingPointError, match="the Hessian returned NaN/inf"):
        ihvp_at_x_explicit(nan_curvature, t)

    def singular(t):  # Hessian [[2, 2], [2, 2]]
        return (t[0] + t[1]) ** 2

    with pytest.raises(ValueError, match=r"singular.*pass regularization > 0"):
        ihvp_at_x_explicit(singular, torch.ones(2, dtype=DT))(torch.ones(2, dtype=DT))


# --------------------------------------------------------------------------------------------
# Attributors
# --------------------------------------------------------------------------------------------
def _mlp_task(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    xt, yt = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)

    def loss(params, batch):
        xb, yb = batch
        return F.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    task = AttributionTask(loss, model, model.state_dict())
    train = DataLoader(TensorDataset(x.to(dtype), y), batch_size=16)
    test = DataLoader(TensorDataset(xt.to(dtype), yt), batch_size=8)
    return task, train, test


def test_lissa_attributor_divergence_names_scaling():
    task, train, test = _mlp_task()
    attributor = IFAttributorLiSSA(task, batch_size=16, recursion_depth=200, scaling=0.05)
    with pytest.raises(FloatingPointError, match=r"scaling \(0.05\) exceeds the largest "
                                                  r"eigenvalue.*pass scaling="):
        attributor.attribute(train, test)


def test_arnoldi_attributor_zero_eigenvalue_names_proj_dim_and_regularization():
    task, train, test = _mlp_task()
    d = sum(p.numel() for p in task.model.parameters())
    attributor = IFAttributorArnoldi(task, proj_dim=d, max_iter=d, regularization=0.0)
    with pytest.raises(ValueError, match=r"\d+ of the \d+ Hessian eigenvalues kept are zero.*"
                                         r"regularization.*proj_dim <="):
        attributor.attribute(train, test)


CURVATURE_CASES = [
    (IFAttributorCG, dict(regularization=0.3, max_iter=50)),
    (IFAttributorExplicit, dict(regularization=0.3)),
    (IFAttributorLiSSA, dict(batch_size=64, recursion_depth=50, damping=0.15, scaling=2.0)),
    (IFAttributorArnoldi, dict(proj_dim=83, regularization=0.3)),
]


@pytest.mark.parametrize(("cls", "kwargs"), CURVATURE_CASES,
                         ids=["cg", "explicit", "lissa", "arnoldi"])
def test_half_precision_models_score_like_float32(cls, kwargs):
    # H + 0.3 I is positive definite here (the Hessian's eigenvalues lie in [-0.17, 0.67]), so
    # the solves are well posed and the only difference is the precision of the weights.
    # Before: fp16 Arnoldi was 200% off, bf16 LiSSA 1.3%, and at regularization 0.1 fp16 CG
    # returned a NaN column and bf16 CG correlated 0.04 with float32.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no indefinite-CG warning: the system is SPD
        reference = cls(*_mlp_task()[:1], **kwargs).attribute(*_mlp_task()[1:])
        for dtype in (torch.float16, torch.bfloat16):
            task, train, test = _mlp_task(dtype)
            scores = cls(task, **kwargs).attribute(train, test)
            assert scores.dtype == torch.float32
            rel = float((scores - reference).norm() / reference.norm())
            assert rel < 1e-2, (dtype, rel)
            assert task.model[0].weight.dtype == dtype  # the user's model is left as it was


def test_half_precision_cg_has_no_nan_column_on_an_indefinite_system():
    task, train, test = _mlp_task(torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # indefinite at 0.1: CG warns, as in float32
        scores = IFAttributorCG(task, regularization=0.1, max_iter=50).attribute(train, test)
        self_scores = IFAttributorCG(task, regularization=0.1, max_iter=50).self_attribute(train)
    assert torch.isfinite(scores).all() and torch.isfinite(self_scores).all()
