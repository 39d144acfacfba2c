"""Random (JL) and Arnoldi projections of ``hf_attrib.func.projection``."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from hf_attrib.func.projection import (
    DENSE_GENERATOR,
    DenseProjector,
    FastJLProjector,
    IdentityProjector,
    SparseProjector,
    arnoldi_project,
    dense_block,
    dense_keys,
    fast_jl_available,
    make_projector,
    random_project,
)

KINDS = ["normal", "rademacher", "sparse"]


def _build(kind: str, d: int, p: int, seed: int = 0, **kwargs):
    if kind == "sparse":
        return SparseProjector(d, p, seed, **kwargs)
    return DenseProjector(d, p, seed, kind=kind, **kwargs)


def _features(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``n`` vectors with a shared low-rank part: pairwise cosines spread over about [-0.8, 0.8]
    (so inner products are far from 0 and a map that zeroes them fails)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, d, generator=g)
    return torch.randn(n, 4, generator=g) @ base + torch.randn(n, d, generator=g)


def _check_jl(x: torch.Tensor, y: torch.Tensor, p: int) -> None:
    r"""JL check of the projections ``y`` of ``x`` onto ``p`` dimensions, over every pair.

    For unit ``u, v`` with cosine ``c`` and a JL map with ``E[P^T P] = I``, ``<Pu, Pv>`` has mean
    ``c`` and standard deviation ``sigma = sqrt((1 + c^2) / p)`` (Gaussian entries; Rademacher and
    count-sketch maps are at most that for dense vectors). We require every one of the
    ``n (n + 1) / 2`` pairs (norms included) to lie within ``5 sigma`` (union bound: failure
    probability ~ 1e-4 for 210 pairs), i.e. ``|<Px,Py> - <x,y>| <= 5 sqrt((1+c^2)/p) |x||y|``
    (0.16 to 0.22 at p = 1024), and the root-mean-square standardised error to be in
    [0.5, 2]: a mis-scaled map (e.g. a missing ``1/sqrt(p)``) or one that keeps too little or
    (suspiciously) too much of the geometry fails.
    """
    x = x.double()
    y = y.double()
    norms = x.norm(dim=1)
    outer = norms[:, None] * norms[None, :]
    cos = (x @ x.T) / outer
    err = ((y @ y.T) - (x @ x.T)) / outer
    iu = torch.triu_indices(x.shape[0], x.shape[0])
    z = (err / ((1 + cos**2) / p).sqrt())[iu[0], iu[1]]
    assert z.abs().max() <= 5.0, f"worst pair is {z.abs().max():.2f} sigma off"
    rms = z.pow(2).mean().sqrt()
    assert 0.5 <= rms <= 2.0, f"RMS standardised error {rms:.2f}"
    # the relative error of the norms, the classic JL statement
    rel = (y.norm(dim=1) ** 2 / norms**2 - 1).abs()
    assert rel.max() <= 5 * (2 / p) ** 0.5


# --------------------------------------------------------------------------------------------
# Random projections: determinism, batching, linearity, JL
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_determinism_across_instances_and_calls(kind):
    d, p = 700, 48
    x = _features(5, d)
    a = _build(kind, d, p, seed=3)
    b = _build(kind, d, p, seed=3)
    out = a(x, ensemble_id=2)
    assert out.shape == (5, p)
    assert torch.equal(out, a(x, ensemble_id=2))  # across calls
    assert torch.equal(out, b(x, ensemble_id=2))  # across separately built projectors
    assert torch.equal(a(x), a(x, ensemble_id=0))  # default ensemble id is 0
    # a different ensemble member or seed is a different map
    assert not torch.allclose(out, a(x, ensemble_id=3), atol=1e-2)
    assert not torch.allclose(out, _build(kind, d, p, seed=4)(x, ensemble_id=2), atol=1e-2)
    # and asking for another member in between does not perturb this one
    assert torch.equal(out, b(x, ensemble_id=2))


@pytest.mark.parametrize("kind", KINDS)
def test_batching_invariance_and_linearity(kind):
    d, p = 900, 40
    x = _features(6, d, seed=1)
    proj = _build(kind, d, p, seed=1)
    whole = proj(x, ensemble_id=1)
    tol = dict(rtol=1e-5, atol=1e-6 * whole.abs().max().item())  # float32 rounding
    rows = torch.cat([proj(x[i : i + 1], ensemble_id=1) for i in range(6)])
    torch.testing.assert_close(rows, whole, **tol)
    torch.testing.assert_close(proj(x[3:5], ensemble_id=1), whole[3:5], **tol)
    # linear: P(a x + b y) = a P x + b P y, and P 0 = 0
    combo = proj(2.0 * x[:1] - 3.0 * x[1:2], ensemble_id=1)
    torch.testing.assert_close(combo, 2.0 * whole[:1] - 3.0 * whole[1:2], rtol=1e-5,
                               atol=1e-5 * whole.abs().max().item())
    assert torch.equal(proj(torch.zeros(2, d)), torch.zeros(2, p))


@pytest.mark.parametrize("kind", KINDS)
def test_jl_inner_products_preserved(kind):
    d, p = 5000, 1024
    x = _features(20, d, seed=2)
    _check_jl(x, _build(kind, d, p, seed=0)(x, ensemble_id=0), p)


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_over_seeds(kind):
    # E[<Pu, Pv>] = <u, v>: average over S independent maps; the mean's standard deviation is
    # sqrt((1 + c^2) / (p S)) and we allow 4.5 of them for each of the 6 pairs.
    d, p, seeds = 256, 32, 200
    x = _features(3, d, seed=3).double()
    x = x / x.norm(dim=1, keepdim=True)
    gram = x @ x.T
    acc = torch.zeros(3, 3, dtype=torch.float64)
    for s in range(seeds):
        y = _build(kind, d, p, seed=s)(x.float()).double()
        acc += y @ y.T
    mean = acc / seeds
    sd = ((1 + gram**2) / (p * seeds)).sqrt()
    assert ((mean - gram).abs() <= 4.5 * sd).all(), (mean - gram) / sd
    # a single map is not that accurate: the averaging is doing the work
    assert ((y @ y.T - gram).abs() > 4.5 * sd).any()


@pytest.mark.parametrize("kind", ["normal", "rademacher"])
def test_dense_block_rows_does_not_change_the_map(kind):
    # The d x p matrix is generated block by block and never materialised; the block size is a
    # memory knob only, the map itself is a function of (seed, ensemble_id).
    d, p = 2500, 32
    x = _features(4, d, seed=4)
    big = DenseProjector(d, p, seed=5, kind=kind)  # one block
    assert big.block_rows >= d
    ref = big(x, ensemble_id=1)
    for rows in (1, 100, 1000, 1024, 1500):
        small = DenseProjector(d, p, seed=5, kind=kind, block_rows=rows)
        # float32 sums in another order: equal up to rounding of the output's scale
        torch.testing.assert_close(small(x, ensemble_id=1), ref, rtol=1e-5,
                                   atol=1e-6 * ref.abs().max().item())


def test_dense_kinds_entries():
    # Rademacher: every entry of the (scaled) map is +-1/sqrt(p); Gaussian: not.
    d, p = 64, 16
    eye = torch.eye(d)
    rad = DenseProjector(d, p, kind="rademacher")(eye)
    torch.testing.assert_close(rad.abs(), torch.full((d, p), p**-0.5))
    gauss = DenseProjector(d, p, kind="normal")(eye)
    assert gauss.abs().std() > 0.1 * p**-0.5
    torch.testing.assert_close(gauss.pow(2).mean(), torch.tensor(1.0 / p), rtol=0.15, atol=0)


# --------------------------------------------------------------------------------------------
# The dense maps' counter-based generator
# --------------------------------------------------------------------------------------------
_M = 2**64


def _mix_ref(x: int) -> int:
    """splitmix64's finaliser on Python ints (mod 2**64): the reference for the int64 tensors'
    wrapping arithmetic and masked shifts."""
    x %= _M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % _M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % _M
    return x ^ (x >> 31)


def _entry_ref(seed: int, ensemble_id: int, kind: str, i: int, j: int, p: int) -> float:
    """Entry ``(i, j)`` of the unscaled dense map, from its definition, in float64."""
    row_key, col_key = (k % _M for k in dense_keys(seed, ensemble_id))
    half = (p + 1) // 2
    row = _mix_ref(row_key + (i + 1) * 0x9E3779B97F4A7C15)
    col = _mix_ref(col_key + (j % half + 1) * 0x9E3779B97F4A7C15)
    word = _mix_ref(row + col)
    if kind == "rademacher":
        return -1.0 if (word >> (63 if j < half else 31)) & 1 else 1.0
    u1 = ((word >> 40) + 0.5) / 2**24
    u2 = ((word & (2**24 - 1)) + 0.5) / 2**24
    radius = math.sqrt(-2 * math.log(u1))
    return radius * (math.cos if j < half else math.sin)(2 * math.pi * u2)


@pytest.mark.parametrize("kind", ["normal", "rademacher"])
@pytest.mark.parametrize(("seed", "ensemble_id", "start", "p"),
                         [(0, 0, 0, 8), (7, 3, 1000, 7), (-5, 2**40, 2**40 - 3, 5),
                          (2**70, -1, 2**50, 4)])
def test_dense_generator_matches_its_definition(kind, seed, ensemble_id, start, p):
    # The int64 tensor ops (wrapping multiply, masked logical shift) give exactly the words of
    # the mod-2**64 definition, for extreme seeds and counters too.
    block = dense_block(seed, ensemble_id, kind, start, start + 3, p)
    ref = torch.tensor([[_entry_ref(seed, ensemble_id, kind, start + r, j, p) for j in range(p)]
                        for r in range(3)])
    if kind == "rademacher":
        assert torch.equal(block, ref)
    else:
        torch.testing.assert_close(block, ref, rtol=2e-6, atol=2e-6)


def test_dense_generator_is_pinned():
    # Stored projections stay valid only while the generator does: a change must bump
    # DENSE_GENERATOR (and these values).
    assert DENSE_GENERATOR == "splitmix64-boxmuller-v1"
    assert dense_block(0, 0, "rademacher", 0, 2, 8).tolist() == [
        [-1, 1, 1, 1, -1, -1, -1, 1], [-1, 1, 1, 1, 1, -1, 1, -1]]
    torch.testing.assert_close(dense_block(0, 0, "normal", 0, 1, 6)[0], torch.tensor(
        [-0.29526213, 1.06604743, 0.78662807, 0.84682149, -0.53624099, -0.88913208]))


def test_dense_generator_same_in_a_fresh_process():
    code = ("from hf_attrib.func.projection import dense_block;"
            "print(dense_block(11, 2, 'normal', 500, 540, 33).double().sum().item(),"
            " dense_block(11, 2, 'rademacher', 500, 540, 33).sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    here = (dense_block(11, 2, "normal", 500, 540, 33).double().sum().item(),
            dense_block(11, 2, "rademacher", 500, 540, 33).sum().item())
    assert (float(out[0]), float(out[1])) == here


@pytest.mark.parametrize("kind", ["normal", "rademacher"])
def test_dense_generator_rows_are_a_function_of_the_row(kind):
    # any row range is a slice of a bigger block, bit for bit; odd p splits at ceil(p/2)
    whole = dense_block(4, 1, kind, 0, 300, 37)
    assert torch.equal(dense_block(4, 1, kind, 123, 200, 37), whole[123:200])
    assert torch.equal(dense_block(4, 1, kind, 299, 300, 37), whole[299:])
    assert not torch.equal(dense_block(4, 2, kind, 0, 300, 37), whole)  # another member
    assert not torch.equal(dense_block(5, 1, kind, 0, 300, 37), whole)  # another seed


def test_dense_generator_moments():
    # 1.5M entries: the standard errors are ~1e-3 (mean), ~1.2e-3 (variance), ~5e-3 (4th
    # moment); tolerances are ~5 of them.
    rows, p = 3000, 512
    gauss = dense_block(3, 1, "normal", 0, rows, p).double()
    n = gauss.numel()
    assert abs(gauss.mean()) < 5 / n**0.5
    assert abs(gauss.var() - 1) < 5 * (2 / n) ** 0.5
    assert abs(gauss.pow(4).mean() - 3) < 5 * (96 / n) ** 0.5  # Gaussian kurtosis, not 2.4
    assert abs((gauss.abs() < 1).double().mean() - 0.682689) < 5 * (0.22 / n) ** 0.5
    assert bool(torch.isfinite(gauss).all()) and gauss.abs().max() < 5.9
    rad = dense_block(3, 1, "rademacher", 0, rows, p)
    assert set(rad.unique().tolist()) == {-1.0, 1.0}
    assert abs(rad.double().mean()) < 5 / n**0.5
    for mat in (gauss, rad.double()):
        # entries are uncorrelated across columns (cos/sin halves included) and across rows
        cols = torch.corrcoef(mat.T)
        off = cols[~torch.eye(p, dtype=torch.bool)]
        assert abs(off.pow(2).mean() * rows - 1) < 0.05  # E[r^2] = 1/rows for independent
        assert off.abs().max() < 6 / rows**0.5
        row_corr = torch.corrcoef(mat[:200])
        off = row_corr[~torch.eye(200, dtype=torch.bool)]
        assert abs(off.pow(2).mean() * p - 1) < 0.1


def test_sparse_structure():
    # count-sketch: each input coordinate lands in at most nnz buckets, entries +-1/sqrt(nnz)
    d, p, nnz = 200, 50, 4
    cols = SparseProjector(d, p, seed=0, nnz=nnz)(torch.eye(d))
    nonzero = (cols != 0).sum(dim=1)
    assert (nonzero <= nnz).all() and (nonzero >= 1).all()
    assert (nonzero == nnz).float().mean() > 0.8  # bucket collisions are rare
    # entries are sums of +-1/sqrt(nnz) terms
    scaled = cols * nnz**0.5
    torch.testing.assert_close(scaled, scaled.round(), rtol=0, atol=1e-5)


def test_identity_projector_and_validation():
    x = _features(3, 30)
    assert torch.equal(IdentityProjector(30)(x), x)
    assert torch.equal(make_projector(30, 10, proj_type="identity")(x), x)
    assert torch.equal(make_projector(30, None)(x), x)
    assert torch.equal(random_project(x, 3, proj_dim=10, proj_type="identity")(x), x)
    with pytest.raises(ValueError, match="d=30"):
        DenseProjector(30, 8)(torch.zeros(2, 31))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        DenseProjector(30, 8)(torch.zeros(2, 3, 10))
    with pytest.raises(ValueError, match="proj_type"):
        make_projector(30, 8, proj_type="gaussian")
    with pytest.raises(ValueError):
        DenseProjector(30, 8, kind="sparse")
    with pytest.raises(ValueError):
        DenseProjector(30, 0)


# --------------------------------------------------------------------------------------------
# random_project (paper Demo 3)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_random_project_call_form(kind):
    train_grads = _features(8, 1200, seed=6)
    test_grads = _features(3, 1200, seed=7)
    project = random_project(train_grads, train_grads.shape[0], proj_dim=64, proj_seed=11,
                             proj_type=kind)
    proj_train = project(train_grads, ensemble_id=0)
    proj_test = project(test_grads, ensemble_id=0)
    assert proj_train.shape == (8, 64) and proj_test.shape == (3, 64)
    ref = _build(kind, 1200, 64, seed=11)
    assert torch.equal(proj_train, ref(train_grads, ensemble_id=0))
    assert torch.equal(project(train_grads, ensemble_id=4), ref(train_grads, ensemble_id=4))
    # a projector built from d alone, in another "process", agrees
    again = random_project(1200, proj_dim=64, proj_seed=11, proj_type=kind)
    assert torch.equal(again(test_grads, ensemble_id=0), proj_test)


def test_random_project_dict_features_and_half():
    g = torch.Generator().manual_seed(8)
    feats = {"layer.weight": torch.randn(5, 6, 7, generator=g), "layer.bias": torch.randn(5, 6,
                                                                                           generator=g)}
    flat = torch.cat([feats["layer.weight"].reshape(5, -1), feats["layer.bias"]], dim=1)
    project = random_project(feats, 5, proj_dim=16, proj_seed=1, proj_type="normal")
    assert project.projector.feature_dim == 48
    out = project(feats, ensemble_id=0)
    assert torch.equal(out, project(flat, ensemble_id=0))
    half = random_project(feats, 5, proj_dim=16, proj_seed=1, proj_type="normal",
                          use_half_precision=True)(feats)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------
# arnoldi_project
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "reg"), [(3, 0.0), (6, 0.5), (10, 0.0)])
def test_arnoldi_project_kernel_on_quadratic(k, reg):
    # f(t) = 1/2 t^T A t + b^T t has Hessian A everywhere
    d = 10
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 10.0, d, dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    b = torch.randn(d, generator=g, dtype=torch.float64)

    def f(t):
        return 0.5 * t @ a @ t + b @ t

    theta = torch.randn(d, generator=g, dtype=torch.float64)
    grads = torch.randn(4, d, generator=g, dtype=torch.float64)
    other = torch.randn(3, d, generator=g, dtype=torch.float64)
    project = arnoldi_project(d, f, (theta,), proj_dim=k, max_iter=d, regularization=reg)
    pg, po = project(grads), project(other)
    assert pg.shape == (4, k)
    # g^T (H + reg)^{-1} g' restricted to the top-k eigenspace of H
    top = q[:, -k:]  # eigenvalues ascending
    kernel = top @ torch.diag(1.0 / (lam[-k:] + reg)) @ top.T
    torch.testing.assert_close(pg @ po.T, grads @ kernel @ other.T, rtol=1e-8, atol=1e-10)
    if k == d and reg == 0.0:  # full rank: the exact influence kernel
        torch.testing.assert_close(pg @ po.T, grads @ torch.linalg.inv(a) @ other.T)
    # a feature tensor instead of d, and the parameter alone instead of a tuple
    same = arnoldi_project(grads, f, theta, proj_dim=k, max_iter=d, regularization=reg)
    torch.testing.assert_close(same(grads) @ same(other).T, pg @ po.T, rtol=1e-8, atol=1e-10)


def test_arnoldi_project_argnums_and_errors():
    d = 6
    lam = torch.arange(1.0, d + 1, dtype=torch.float64)

    def f(data, t):
        return 0.5 * (lam * t**2).sum() + (data * t).sum()

    project = arnoldi_project(d, f, (torch.ones(d, dtype=torch.float64),
                                     torch.zeros(d, dtype=torch.float64)), argnums=1,
                              proj_dim=2, max_iter=d)
    e = torch.eye(d, dtype=torch.float64)
    # top-2 eigenvectors are e_6, e_5 with eigenvalues 6, 5
    kern = project(e) @ project(e).T
    expected = torch.zeros(d, d, dtype=torch.float64)
    expected[5, 5], expected[4, 4] = 1 / 6, 1 / 5
    torch.testing.assert_close(kern, expected, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="feature_dim"):
        arnoldi_project(d + 1, f, (torch.ones(d), torch.zeros(d)), argnums=1)


# --------------------------------------------------------------------------------------------
# fast_jl (CUDA)
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_fast_jl_determinism_and_jl_bound():
    if not torch.cuda.is_available() or not fast_jl_available():
        pytest.skip("needs CUDA and the fast_jl extension")
    d, p = 5000, 1024
    x = _features(20, d, seed=10).cuda()
    a = FastJLProjector(d, p, seed=0)
    b = FastJLProjector(d, p, seed=0)
    out = a(x, ensemble_id=0)
    assert out.shape == (20, p) and out.is_cuda
    assert torch.equal(out, a(x, ensemble_id=0))
    assert torch.equal(out, b(x, ensemble_id=0))
    assert not torch.allclose(out, a(x, ensemble_id=1), atol=1e-2)
    _check_jl(x.cpu(), out.cpu(), p)
    # the make_projector / random_project route picks it on CUDA
    project = random_project(x, 20, proj_dim=p, device="cuda", proj_type="fast_jl")
    assert torch.equal(project(x), out)
