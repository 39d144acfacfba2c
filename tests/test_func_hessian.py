"""HVP / IHVP solvers of ``hf_attrib.func.hessian`` against closed forms on small problems."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from hf_attrib.func.hessian import (
    hvp,
    hvp_at_x,
    ihvp_arnoldi,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
)
from hf_attrib.func.solvers import arnoldi_eigen, batched_cg, block_cg, lissa_recursion

DT = torch.float64
N, FEAT, CLASSES = 40, 4, 3
# Per-coordinate L2 strengths of the logistic losses: keep every Hessian well conditioned
# (spectrum inside [0.4, 1)) and, being distinct, make its eigenvalues simple. A uniform L2 on
# the softmax loss leaves an eigenvalue of multiplicity FEAT (shifting all class weights by one
# vector does not change the logits), which a single-start Krylov method such as Arnoldi cannot
# resolve.
REG_MULTI = torch.linspace(0.4, 0.6, CLASSES * FEAT, dtype=torch.float64).reshape(CLASSES, FEAT)
REG_BIN = torch.linspace(0.4, 0.6, FEAT, dtype=torch.float64)
SCALING = 0.9  # LiSSA scaling: above the top eigenvalue of both Hessians (checked below)
DEPTH = 30  # LiSSA recursion depth: contraction <= 1 - 0.44 / SCALING ~ 0.51 per step


def softmax_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multinomial logistic regression with a 2-D weight ``[CLASSES, FEAT]``, L2-regularised."""
    return F.cross_entropy(x @ w.T, y) + 0.5 * (REG_MULTI * w**2).sum()


def binary_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary logistic regression with a 1-D weight ``[FEAT]`` and labels in {-1, 1}."""
    return F.softplus(-y * (x @ w)).mean() + 0.5 * (REG_BIN * w**2).sum()


def binary_loss_w_second(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return binary_loss(w, x, y)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, FEAT, generator=g, dtype=DT)
    y_multi = torch.randint(0, CLASSES, (N,), generator=g)
    y_bin = torch.randint(0, 2, (N,), generator=g).to(DT) * 2 - 1
    w_multi = torch.randn(CLASSES, FEAT, generator=g, dtype=DT)
    w_bin = torch.randn(FEAT, generator=g, dtype=DT)
    return x, y_multi, y_bin, w_multi, w_bin


def _dense_hessian(func, args, argnums):
    """Brute-force ``[d, d]`` Hessian with torch.autograd.functional.hessian."""
    args = list(args)
    theta = args[argnums]

    def f(t):
        call = list(args)
        call[argnums] = t
        return func(*call)

    h = torch.autograd.functional.hessian(f, theta)
    d = theta.numel()
    return h.reshape(d, d)


@pytest.fixture(scope="module")
def multi():
    x, y, _, w, _ = _data()
    h = _dense_hessian(softmax_loss, (w, x, y), 0)
    return w, x, y, h


@pytest.fixture(scope="module")
def binary():
    x, _, y, _, w = _data()
    h = _dense_hessian(binary_loss, (w, x, y), 0)
    return w, x, y, h


# --------------------------------------------------------------------------------------------
# Paper Demo 2
# --------------------------------------------------------------------------------------------
def test_paper_demo_2():
    torch.manual_seed(0)
    from hf_attrib.func.hessian import ihvp_at_x_cg, ihvp_cg

    def f(x, param):
        return torch.sin(x / param).sum()

    x = torch.randn(2)
    param = torch.randn(1)
    v = torch.randn(5, 2)
    ihvp_func = ihvp_cg(f, argnums=0, max_iter=2)
    ihvp_result_1 = ihvp_func((x, param), v)
    ihvp_at_x_func = ihvp_at_x_cg(f, x, param, argnums=0, max_iter=2)
    ihvp_result_2 = ihvp_at_x_func(v)
    assert torch.allclose(ihvp_result_1, ihvp_result_2)

    # The Hessian is diag(-sin(x / p) / p^2): two CG steps solve the 2-d system exactly.
    assert ihvp_result_1.shape == (5, 2)
    diag = -torch.sin(x / param) / param**2
    assert torch.allclose(ihvp_result_1, v / diag, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# HVP
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_hvp_matches_autograd_hessian_2d_param(multi, mode, reg):
    w, x, y, h = multi
    d = w.numel()
    system = h + reg * torch.eye(d, dtype=DT)
    g = torch.Generator().manual_seed(1)
    v1 = torch.randn(CLASSES, FEAT, generator=g, dtype=DT)
    vk = torch.randn(5, CLASSES, FEAT, generator=g, dtype=DT)

    at_x = hvp_at_x(softmax_loss, (w, x, y), argnums=0, mode=mode, regularization=reg)
    plain = hvp(softmax_loss, argnums=0, mode=mode, regularization=reg)
    for fn in (at_x, lambda v: plain((w, x, y), v)):
        out1 = fn(v1)
        assert out1.shape == v1.shape
        torch.testing.assert_close(out1.reshape(-1), system @ v1.reshape(-1))
        outk = fn(vk)
        assert outk.shape == vk.shape
        torch.testing.assert_close(outk.reshape(5, d), vk.reshape(5, d) @ system.T)
        # the flat [k, d] layout is accepted too and keeps its layout
        flat = fn(vk.reshape(5, d))
        assert flat.shape == (5, d)
        torch.testing.assert_close(flat, outk.reshape(5, d))


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_hvp_1d_param_and_argnums(binary, mode):
    w, x, y, h = binary
    v = torch.randn(3, FEAT, dtype=DT, generator=torch.Generator().manual_seed(2))
    out = hvp_at_x(binary_loss, (w, x, y), argnums=0, mode=mode)(v)
    torch.testing.assert_close(out, v @ h.T)
    out_single = hvp(binary_loss, mode=mode)((w, x, y), v[0])
    torch.testing.assert_close(out_single, h @ v[0])
    # the same Hessian, differentiating the second argument
    out2 = hvp(binary_loss_w_second, argnums=1, mode=mode, regularization=0.5)((x, w, y), v)
    torch.testing.assert_close(out2, v @ (h + 0.5 * torch.eye(FEAT, dtype=DT)).T)


def test_hvp_non_quadratic_differs_between_points(binary):
    # guards against an HVP that ignores x (e.g. evaluated at a cached point)
    w, x, y, h = binary
    v = torch.ones(FEAT, dtype=DT)
    other = hvp(binary_loss)((w + 1.0, x, y), v)
    h_other = _dense_hessian(binary_loss, (w + 1.0, x, y), 0)
    torch.testing.assert_close(other, h_other @ v)
    assert not torch.allclose(other, h @ v)


# --------------------------------------------------------------------------------------------
# IHVP: explicit, CG, LiSSA, Arnoldi
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reg", [0.0, 0.2])
def test_ihvp_explicit_equals_solve(multi, reg):
    w, x, y, h = multi
    d = w.numel()
    v = torch.randn(4, CLASSES, FEAT, dtype=DT, generator=torch.Generator().manual_seed(3))
    expected = torch.linalg.solve(h + reg * torch.eye(d, dtype=DT), v.reshape(4, d).T).T
    out = ihvp_explicit(softmax_loss, regularization=reg)((w, x, y), v)
    assert out.shape == v.shape
    torch.testing.assert_close(out.reshape(4, d), expected)
    out_at_x = ihvp_at_x_explicit(softmax_loss, w, x, y, regularization=reg)(v[1])
    torch.testing.assert_close(out_at_x.reshape(-1), expected[1])


def _solvers(d: int):
    """(name, ihvp_X factory, ihvp_at_x_X factory, tolerance) for every iterative solver."""
    return [
        ("cg", lambda f, a, **k: ihvp_cg(f, argnums=a, max_iter=3 * d, tol=1e-12, **k),
         lambda f, *x, a, **k: ihvp_at_x_cg(f, *x, argnums=a, max_iter=3 * d, tol=1e-12, **k),
         1e-8),
        ("lissa",
         lambda f, a, **k: ihvp_lissa(f, argnums=a, batch_size=N, recursion_depth=DEPTH,
                                      scaling=SCALING, **k),
         lambda f, *x, a, **k: ihvp_at_x_lissa(f, *x, argnums=a, batch_size=N,
                                               recursion_depth=DEPTH, scaling=SCALING, **k),
         1e-7),
        ("arnoldi", lambda f, a, **k: ihvp_arnoldi(f, argnums=a, max_iter=d, **k),
         lambda f, *x, a, **k: ihvp_at_x_arnoldi(f, *x, argnums=a, max_iter=d, **k),
         1e-8),
    ]


@pytest.mark.parametrize(
    ("solver", "mode"),
    [("cg", "rev-rev"), ("cg", "rev-fwd"), ("arnoldi", "rev-rev"), ("arnoldi", "rev-fwd"),
     ("lissa", "rev-rev")],  # LiSSA rev-fwd: test_lissa_rev_fwd (slow per step, kept short)
)
def test_iterative_ihvp_matches_explicit_both_call_forms(multi, solver, mode):
    w, x, y, h = multi
    d = w.numel()
    evals = torch.linalg.eigvalsh(h)
    # the premises of the tolerances: well conditioned, scaling above the top eigenvalue
    assert 0.4 <= evals.min() and evals.max() < SCALING
    _, plain, at_x, tol = next(s for s in _solvers(d) if s[0] == solver)
    v = torch.randn(3, CLASSES, FEAT, dtype=DT, generator=torch.Generator().manual_seed(4))
    expected = torch.linalg.solve(h, v.reshape(3, d).T).T.reshape(3, CLASSES, FEAT)

    out_plain = plain(softmax_loss, 0, mode=mode)((w, x, y), v)
    out_at_x = at_x(softmax_loss, w, x, y, a=0, mode=mode)(v)
    assert out_plain.shape == v.shape
    torch.testing.assert_close(out_plain, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(out_at_x, out_plain, rtol=1e-10, atol=1e-10)
    # single right-hand side
    torch.testing.assert_close(at_x(softmax_loss, w, x, y, a=0, mode=mode)(v[2]), expected[2],
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("solver", ["explicit", "cg", "lissa", "arnoldi"])
def test_ihvp_argnums_1(binary, solver):
    w, x, y, h = binary
    v = torch.randn(2, FEAT, dtype=DT, generator=torch.Generator().manual_seed(5))
    expected = torch.linalg.solve(h, v.T).T
    if solver == "explicit":
        plain, at_x, tol = (lambda f, a, **k: ihvp_explicit(f, argnums=a),
                            lambda f, *x, a, **k: ihvp_at_x_explicit(f, *x, argnums=a), 1e-10)
    else:
        _, plain, at_x, tol = next(s for s in _solvers(FEAT) if s[0] == solver)
    out = plain(binary_loss_w_second, 1)((x, w, y), v)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    out2 = at_x(binary_loss_w_second, x, w, y, a=1)(v)
    torch.testing.assert_close(out2, out, rtol=1e-10, atol=1e-10)


def test_ihvp_cg_regularization(multi):
    w, x, y, h = multi
    d = w.numel()
    v = torch.randn(d, dtype=DT, generator=torch.Generator().manual_seed(6))
    out = ihvp_cg(softmax_loss, max_iter=3 * d, tol=1e-12, regularization=0.7)(
        (w, x, y), v.reshape(CLASSES, FEAT))
    expected = torch.linalg.solve(h + 0.7 * torch.eye(d, dtype=DT), v)
    torch.testing.assert_close(out.reshape(-1), expected, rtol=1e-8, atol=1e-8)


def test_ihvp_cg_few_iterations_is_not_exact(multi):
    # sanity: the agreement above comes from iterating, not from a hidden direct solve
    w, x, y, h = multi
    d = w.numel()
    v = torch.randn(d, dtype=DT, generator=torch.Generator().manual_seed(6))
    out = ihvp_cg(softmax_loss, max_iter=1)((w, x, y), v.reshape(CLASSES, FEAT))
    assert not torch.allclose(out.reshape(-1), torch.linalg.solve(h, v), rtol=1e-3, atol=1e-3)



def test_ihvp_cg_block_solves_all_rows_in_one_space(multi):
    # d = 12 parameters, 4 independent right-hand sides: the block Krylov space after 3
    # iterations is the whole space, so block CG is exact there, where plain CG is not.
    w, x, y, h = multi
    d = w.numel()
    v = torch.randn(4, d, dtype=DT, generator=torch.Generator().manual_seed(6))
    expected = torch.linalg.solve(h + 0.1 * torch.eye(d, dtype=DT), v.T).T
    batch = v.reshape(4, CLASSES, FEAT)
    out = ihvp_cg(softmax_loss, max_iter=d // 4, tol=0.0, regularization=0.1, block=True)(
        (w, x, y), batch)
    torch.testing.assert_close(out.reshape(4, d), expected, rtol=1e-8, atol=1e-8)
    out2 = ihvp_at_x_cg(softmax_loss, w, x, y, max_iter=d // 4, tol=0.0, regularization=0.1,
                        block=True)(batch)
    torch.testing.assert_close(out2, out, rtol=1e-10, atol=1e-10)
    plain = ihvp_cg(softmax_loss, max_iter=d // 4, tol=0.0, regularization=0.1)((w, x, y), batch)
    assert not torch.allclose(plain.reshape(4, d), expected, rtol=1e-3, atol=1e-3)


def _spd(d: int, seed: int, low: float = 0.0, high: float = 1.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return q @ torch.diag(torch.logspace(low, high, d, dtype=DT)) @ q.T, q


def test_block_cg_finite_termination_and_cost():
    d, k = 24, 6
    a, _ = _spd(d, 13, 0, 2)  # condition number 100
    b = torch.randn(k, d, generator=torch.Generator().manual_seed(14), dtype=DT)
    calls = []

    def matvec(m):
        calls.append(m.shape[0])
        return m @ a

    out = block_cg(matvec, b, max_iter=d // k, tol=0.0)
    torch.testing.assert_close(out, torch.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-8)
    assert calls == [k] * (d // k)  # one call of k rows per iteration
    # stops early on convergence
    calls.clear()
    block_cg(matvec, b, max_iter=100, tol=1e-10)
    assert len(calls) <= d // k + 1


def test_block_cg_rank_deficient_right_hand_sides():
    # repeated, scaled and zero rows: the breakdown-free block drops dependent directions
    # (the plain block recursion would invert a singular matrix)
    d = 20
    a, _ = _spd(d, 15)
    u, w = torch.randn(2, d, generator=torch.Generator().manual_seed(16), dtype=DT)
    b = torch.stack([u, u, -2 * u, torch.zeros(d, dtype=DT), w, u + w])
    calls = []

    def matvec(m):
        calls.append(m.shape[0])
        return m @ a

    out = block_cg(matvec, b, max_iter=d, tol=1e-11)
    torch.testing.assert_close(out, torch.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-8)
    assert calls[0] == 2 and max(calls) <= 2  # the block spans two directions, not six
    assert torch.equal(out[3], torch.zeros(d, dtype=DT))
    # nothing to solve: no matvec at all
    calls.clear()
    for empty in (torch.zeros(3, d, dtype=DT), torch.zeros(0, d, dtype=DT)):
        assert torch.equal(block_cg(matvec, empty), empty)
    assert calls == []


def test_block_cg_converged_rows_leave_the_block():
    d = 16
    a, q = _spd(d, 17)
    b = torch.stack([q[:, 0], torch.randn(d, generator=torch.Generator().manual_seed(18),
                                          dtype=DT)])
    b[0] *= 3.0  # an eigenvector: solved exactly by the first block
    calls = []

    def matvec(m):
        calls.append(m.shape[0])
        return m @ a

    out = block_cg(matvec, b, max_iter=100, tol=1e-10)
    torch.testing.assert_close(out, torch.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-8)
    assert calls[0] == 2 and all(c == 1 for c in calls[1:])


@pytest.mark.parametrize("solver", [batched_cg, block_cg])
def test_cg_warns_on_indefinite_systems(solver):
    d = 10
    a, _ = _spd(d, 19)
    a = a - 3 * torch.eye(d, dtype=DT)  # eigenvalues in [-2, 7]: indefinite
    b = torch.randn(3, d, generator=torch.Generator().manual_seed(20), dtype=DT)
    with pytest.warns(RuntimeWarning, match="not positive definite.*Raise regularization"):
        out = solver(lambda m: m @ a, b, max_iter=d)
    if solver is block_cg:  # the diverging block recursion is abandoned for plain CG
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(out, batched_cg(lambda m: m @ a, b, max_iter=d))
    spd = a + 3 * torch.eye(d, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solver(lambda m: m @ spd, b, max_iter=d)

def test_lissa_rev_fwd(binary):
    w, x, y, h = binary
    assert torch.linalg.eigvalsh(h).max() < SCALING
    v = torch.randn(2, FEAT, dtype=DT, generator=torch.Generator().manual_seed(13))
    out = ihvp_at_x_lissa(binary_loss, w, x, y, batch_size=N, recursion_depth=DEPTH,
                          scaling=SCALING, mode="rev-fwd")(v)
    torch.testing.assert_close(out, torch.linalg.solve(h, v.T).T, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("damping", [0.05, 0.3])
def test_lissa_damping_targets_damped_system(binary, damping):
    w, x, y, h = binary
    scaling = SCALING
    v = torch.randn(3, FEAT, dtype=DT, generator=torch.Generator().manual_seed(7))
    out = ihvp_lissa(binary_loss, batch_size=N, recursion_depth=DEPTH, damping=damping,
                     scaling=scaling)((w, x, y), v)
    system = h + damping * scaling * torch.eye(FEAT, dtype=DT)
    torch.testing.assert_close(out, torch.linalg.solve(system, v.T).T, rtol=1e-7, atol=1e-7)
    # and it is *not* the undamped inverse
    assert not torch.allclose(out, torch.linalg.solve(h, v.T).T, rtol=1e-3, atol=1e-3)


def test_lissa_recursion_closed_form():
    # deterministic matvec: LiSSA's fixed point is (A + damping*scaling*I)^{-1} v
    g = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))
    a = q @ torch.diag(torch.linspace(0.5, 3.0, 6, dtype=DT)) @ q.T
    v = torch.randn(2, 6, generator=g, dtype=DT)
    out = lissa_recursion(lambda _: (lambda m: m @ a), v, recursion_depth=400, num_repeat=2,
                          damping=0.01, scaling=4.0)
    expected = torch.linalg.solve(a + 0.04 * torch.eye(6, dtype=DT), v.T).T
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="scaling"):
        lissa_recursion(lambda _: (lambda m: m @ a), v, recursion_depth=1, scaling=0.0)


def test_lissa_minibatches_average_to_full_hessian(binary):
    # batch_size < n: each step sees the Hessian of a random half of the data; the estimator is
    # unbiased for the (converged) Neumann series, and averaging repeats brings it close to the
    # full-batch inverse (the trivial answer v / scaling is 20% off here).
    w, x, y, h = binary
    v = torch.randn(FEAT, dtype=DT, generator=torch.Generator().manual_seed(9))
    kwargs = dict(batch_size=N // 2, recursion_depth=DEPTH, num_repeat=8, scaling=SCALING)
    out = ihvp_lissa(binary_loss, seed=3, **kwargs)((w, x, y), v)
    expected = torch.linalg.solve(h, v)
    assert (v / SCALING - expected).norm() > 0.15 * expected.norm()
    assert (out - expected).norm() < 0.08 * expected.norm()
    # it really subsamples: not the deterministic full-batch answer
    assert (out - expected).norm() > 1e-4 * expected.norm()
    # same seed -> same mini-batch sequence -> same result; another seed -> another one
    again = ihvp_at_x_lissa(binary_loss, w, x, y, seed=3, **kwargs)(v)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    other = ihvp_at_x_lissa(binary_loss, w, x, y, seed=4, **kwargs)(v)
    assert not torch.allclose(other, out)


@pytest.mark.parametrize(("top_k", "reg"), [(1, 0.0), (5, 0.25), (11, 0.0)])
def test_arnoldi_top_k_equals_eigh_reconstruction(multi, top_k, reg):
    w, x, y, h = multi
    d = w.numel()
    evals, evecs = torch.linalg.eigh(h)
    order = torch.argsort(evals.abs(), descending=True)[:top_k]
    lam, u = evals[order], evecs[:, order]
    inv_k = u @ torch.diag(1.0 / (lam + reg)) @ u.T
    v = torch.randn(3, d, dtype=DT, generator=torch.Generator().manual_seed(10))
    out = ihvp_at_x_arnoldi(softmax_loss, w, x, y, max_iter=d, top_k=top_k,
                            regularization=reg)(v.reshape(3, CLASSES, FEAT))
    torch.testing.assert_close(out.reshape(3, d), v @ inv_k, rtol=1e-7, atol=1e-8)
    out_plain = ihvp_arnoldi(softmax_loss, max_iter=d, top_k=top_k, regularization=reg)(
        (w, x, y), v.reshape(3, CLASSES, FEAT))
    torch.testing.assert_close(out_plain, out, rtol=1e-10, atol=1e-10)


def test_arnoldi_eigen_on_matrix_and_norm_constant(multi):
    w, x, y, h = multi
    d = w.numel()
    evals, vecs = arnoldi_eigen(lambda m: m @ h, d, max_iter=d, top_k=3, dtype=DT)
    ref = torch.linalg.eigvalsh(h).flip(0)[:3]
    torch.testing.assert_close(evals, ref, rtol=1e-8, atol=1e-10)
    # eigenvectors: orthonormal rows with H u = lambda u
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(3, dtype=DT), rtol=0, atol=1e-8)
    torch.testing.assert_close(vecs @ h, evals[:, None] * vecs, rtol=0, atol=1e-8)
    # norm_constant rescales the operator during the run only
    v = torch.randn(CLASSES, FEAT, dtype=DT, generator=torch.Generator().manual_seed(11))
    a = ihvp_at_x_arnoldi(softmax_loss, w, x, y, max_iter=d)(v)
    b = ihvp_at_x_arnoldi(softmax_loss, w, x, y, max_iter=d, norm_constant=50.0)(v)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_batched_cg_random_spd():
    g = torch.Generator().manual_seed(12)
    d, k = 30, 4
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    a = q @ torch.diag(torch.logspace(0, 1, d, dtype=DT)) @ q.T  # condition number 10
    b = torch.randn(k, d, generator=g, dtype=DT)
    calls = []

    def matvec(m):
        calls.append(m.shape)
        return m @ a

    out = batched_cg(matvec, b, max_iter=100, tol=1e-10)
    torch.testing.assert_close(out, torch.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-8)
    # every iteration is one batched call for the rows still active; it stops on convergence
    assert calls[0] == (k, d) and all(s[0] <= k and s[1] == d for s in calls)
    assert len(calls) < 100
    # rows are independent: solving one row alone gives the same answer
    torch.testing.assert_close(batched_cg(lambda m: m @ a, b[2:3], max_iter=100, tol=1e-10),
                               out[2:3], rtol=1e-8, atol=1e-10)
    # a zero right-hand side stays zero (no division by zero)
    z = batched_cg(lambda m: m @ a, torch.zeros(2, d, dtype=DT), max_iter=5)
    assert torch.equal(z, torch.zeros(2, d, dtype=DT))
    # an eigenvector right-hand side converges in one step and leaves the later products
    calls.clear()
    mixed = torch.stack([q[:, 0], b[0]])
    out = batched_cg(matvec, mixed, max_iter=100, tol=1e-10)
    torch.testing.assert_close(out, torch.linalg.solve(a, mixed.T).T, rtol=1e-8, atol=1e-8)
    assert calls[0] == (2, d) and calls[1] == (1, d)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _vector_valued(w, x, y):
    return F.softplus(-y * (x @ w))  # not reduced


@pytest.mark.parametrize(
    "make",
    [
        lambda w, x, y: hvp(_vector_valued)((w, x, y), w),
        lambda w, x, y: hvp(_vector_valued, mode="rev-fwd")((w, x, y), w),
        lambda w, x, y: ihvp_explicit(_vector_valued)((w, x, y), w),
        lambda w, x, y: ihvp_cg(_vector_valued)((w, x, y), w),
        lambda w, x, y: ihvp_at_x_arnoldi(_vector_valued, w, x, y, max_iter=2)(w),
        lambda w, x, y: ihvp_lissa(_vector_valued, batch_size=N, recursion_depth=2)((w, x, y),
                                                                                     w),
    ],
)
def test_non_scalar_function_raises(binary, make):
    w, x, y, _ = binary
    with pytest.raises(ValueError, match="scalar"):
        make(w, x, y)


@pytest.mark.parametrize(
    "call",
    [
        lambda w, x, y, v: hvp(binary_loss)((w, x, y), v),
        lambda w, x, y, v: hvp_at_x(binary_loss, (w, x, y), mode="rev-fwd")(v),
        lambda w, x, y, v: ihvp_explicit(binary_loss)((w, x, y), v),
        lambda w, x, y, v: ihvp_cg(binary_loss)((w, x, y), v),
        lambda w, x, y, v: ihvp_at_x_arnoldi(binary_loss, w, x, y, max_iter=FEAT)(v),
        lambda w, x, y, v: ihvp_lissa(binary_loss, batch_size=N, recursion_depth=2)((w, x, y),
                                                                                    v),
    ],
)
@pytest.mark.parametrize("bad_shape", [(FEAT + 1,), (2, FEAT + 1), (2, 2, FEAT)])
def test_bad_v_shape_raises(binary, call, bad_shape):
    w, x, y, _ = binary
    with pytest.raises(ValueError, match="v must have shape"):
        call(w, x, y, torch.zeros(bad_shape, dtype=DT))


@pytest.mark.parametrize(
    "make",
    [
        lambda: hvp(binary_loss, mode="fwd-fwd"),
        lambda: ihvp_cg(binary_loss, mode="fwd"),
        lambda: ihvp_lissa(binary_loss, mode="rev"),
        lambda: ihvp_arnoldi(binary_loss, mode="forward"),
    ],
)
def test_bad_mode_raises_at_construction(make):
    with pytest.raises(ValueError, match="mode"):
        make()


def test_bad_mode_raises_at_x(binary):
    w, x, y, _ = binary
    with pytest.raises(ValueError, match="mode"):
        hvp_at_x(binary_loss, (w, x, y), mode="fwd-rev")
    with pytest.raises(ValueError, match="mode"):
        ihvp_at_x_cg(binary_loss, w, x, y, mode="fwd-rev")
    with pytest.raises(ValueError, match="mode"):
        ihvp_at_x_arnoldi(binary_loss, w, x, y, mode="fwd-rev")
    with pytest.raises(ValueError, match="mode"):
        ihvp_at_x_lissa(binary_loss, w, x, y, mode="fwd-rev")


# --------------------------------------------------------------------------------------------
# The function API over the engine (func.hvp_engine) and the solvers (func.solvers)
# --------------------------------------------------------------------------------------------
def test_engine_and_solver_names_still_import_from_func_hessian():
    from hf_attrib.func import hessian, hvp_engine, solvers

    for name in ("HessianSum", "hessian_columns", "linearization_bytes", "MatVec"):
        assert getattr(hessian, name) is getattr(hvp_engine, name)
    for name in ("arnoldi_eigen", "batched_cg", "block_cg", "check_eigenvalues",
                 "check_finite_solution", "lissa_recursion"):
        assert getattr(hessian, name) is getattr(solvers, name)


@pytest.mark.parametrize("solver", ["explicit", "cg", "lissa", "arnoldi"])
def test_ihvp_pair_takes_the_same_options(solver):
    import inspect

    from hf_attrib.func import hessian

    def options(fn, skip):
        return {name: p.default for name, p in inspect.signature(fn).parameters.items()
                if name not in skip}

    given_with_v = options(getattr(hessian, f"ihvp_{solver}"), {"func"})
    at_x = options(getattr(hessian, f"ihvp_at_x_{solver}"), {"func", "x", "in_dims"})
    assert given_with_v == at_x


# --------------------------------------------------------------------------------------------
# The explicit Hessian's in-place building blocks (one d x d matrix in memory)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("d", "block"), [(1, 4), (10, 3), (17, 4), (33, 64), (40, 1)])
def test_symmetrize_in_place_equals_average_with_transpose(d, block):
    from hf_attrib.func.solvers.explicit import symmetrize_

    a = torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=DT)
    expected = (a + a.T) / 2
    ptr = a.data_ptr()
    out = symmetrize_(a, block=block)
    assert out is a and a.data_ptr() == ptr  # in place
    assert torch.equal(a, a.T)
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="square"):
        symmetrize_(torch.zeros(3, 4))


def test_hessian_columns_into_a_preallocated_matrix_equals_autograd_hessian(multi):
    from hf_attrib.func.hvp_engine import flat_objective, hessian_columns, hvp_operator

    w, x, y, expected = multi  # the autograd Hessian
    objective, theta = flat_objective(softmax_loss, (w, x, y), 0)
    d = theta.numel()
    torch.testing.assert_close(torch.func.hessian(objective)(theta), expected)
    out = torch.full((d, d), float("nan"), dtype=torch.float64)
    ptr = out.data_ptr()
    got = hessian_columns(hvp_operator(objective, theta, "rev-rev"), d, range(d), 5, DT, "cpu",
                          out=out)
    assert got.data_ptr() == ptr  # filled in place, every row written (no NaN left)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # a share of the rows (one process's) into its own block
    part = hessian_columns(hvp_operator(objective, theta, "rev-rev"), d, range(3, 8), 2, DT,
                           "cpu", out=torch.empty(5, d, dtype=torch.float64))
    torch.testing.assert_close(part, expected[3:8], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ["fast", "in-place", "torch"])
def test_eigh_in_place_routes_reconstruct_the_matrix(route, monkeypatch):
    import sys

    from hf_attrib.func.solvers.explicit import eigh_

    d = 37
    g = torch.Generator().manual_seed(1)
    b = torch.randn(d, d, generator=g, dtype=DT)
    a = (b + b.T) / 2
    work = a.clone()
    if route == "torch":  # no SciPy: torch.linalg.eigh
        monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    # budget: None (no limit) -> fast driver; one matrix only -> in place
    max_bytes = a.numel() * 8 if route == "in-place" else None
    values, vectors = eigh_(work, max_bytes)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, a, rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(d, dtype=DT), rtol=0, atol=1e-10)
    if route == "in-place":  # the eigenvectors overwrote the matrix: no second d x d
        assert vectors.untyped_storage().data_ptr() == work.untyped_storage().data_ptr()


def test_explicit_attributor_in_place_route_gives_the_same_scores():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from hf_attrib.algorithm import IFAttributorExplicit
    from hf_attrib.task import AttributionTask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def loss(params, batch):
        inputs, labels = batch
        return F.cross_entropy(torch.func.functional_call(model, params, inputs), labels)

    g = torch.Generator().manual_seed(2)
    train = DataLoader(TensorDataset(torch.randn(24, 5, generator=g),
                                     torch.randint(0, 3, (24,), generator=g)), batch_size=8)
    test = DataLoader(TensorDataset(torch.randn(4, 5, generator=g),
                                    torch.randint(0, 3, (4,), generator=g)), batch_size=4)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    d = sum(p.numel() for p in model.parameters())
    scores = {}
    # 2 matrices fit -> fast driver; only 1 fits -> in place
    for name, budget in (("fast", 2 * d * d * 8), ("in-place", d * d * 8)):
        attributor = IFAttributorExplicit(task, regularization=0.1, max_hessian_bytes=budget)
        attributor.cache(train)
        scores[name] = attributor.attribute(train, test)
    # the closed form from the autograd Hessian of the mean training loss
    fns = task.functions()
    x_all, y_all = train.dataset.tensors
    hessian = torch.func.hessian(fns.loss)(fns.theta, (x_all, y_all)).double()
    train_g = torch.stack([torch.func.grad(fns.loss)(fns.theta, (x_all[i:i + 1], y_all[i:i + 1]))
                           for i in range(24)]).double()
    x_t, y_t = test.dataset.tensors
    test_g = torch.stack([torch.func.grad(fns.loss)(fns.theta, (x_t[i:i + 1], y_t[i:i + 1]))
                          for i in range(4)]).double()
    inverse = torch.linalg.inv(hessian + 0.1 * torch.eye(d, dtype=torch.float64))
    expected = (-(train_g @ inverse @ test_g.T) / 24).float()
    for got in scores.values():
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores["in-place"], scores["fast"], rtol=1e-5, atol=1e-8)
