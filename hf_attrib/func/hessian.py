r"""Hessian-vector products and inverse-Hessian-vector products (paper Section 3.2).

For a scalar function ``f(*x)`` and the argument ``x[argnums]`` (any shape, treated as a flat
vector :math:`\theta \in \mathbb{R}^d`):

* ``hvp``:  :math:`v \mapsto (H + \lambda I) v` with :math:`H = \nabla^2_\theta f`,
* ``ihvp_<alg>``: :math:`v \mapsto (H + \lambda I)^{-1} v`, for ``alg`` in ``explicit``
  (solve with the materialised Hessian), ``cg`` (conjugate gradients), ``lissa`` (the
  stochastic Neumann recursion of Agarwal et al.) and ``arnoldi`` (top eigenpairs from an
  Arnoldi/Lanczos run, Schioppa et al.).

Each comes in two call forms, as in the paper's Demo 2:

* ``ihvp_cg(f, argnums=0, max_iter=2)((x, param), v)``: the inputs are given with ``v``;
* ``ihvp_at_x_cg(f, x, param, argnums=0, max_iter=2)(v)``: the inputs are fixed first, so
  work that depends only on them (the linearisation, the Hessian, the Arnoldi basis) is done
  once and reused for every ``v``.

``v`` is one vector shaped like ``x[argnums]`` or a batch ``[k, *x[argnums].shape]``; all ``k``
right-hand sides are solved together (one vectorised HVP per iteration), never one by one;
``ihvp_cg(..., block=True)`` goes further and solves them in one shared Krylov space
(``block_cg``).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "HessianSum",
    "arnoldi_eigen",
    "batched_cg",
    "block_cg",
    "check_eigenvalues",
    "check_finite_solution",
    "hessian_columns",
    "hvp",
    "hvp_at_x",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_at_x_cg",
    "ihvp_at_x_explicit",
    "ihvp_at_x_lissa",
    "ihvp_cg",
    "ihvp_explicit",
    "ihvp_lissa",
    "linearization_bytes",
    "lissa_recursion",
]

_MODES = ("rev-rev", "rev-fwd")
# Right-hand sides per vmapped HVP call: their tangents (chunk x linearisation size) stay near
# _VMAP_BYTES, but at least _MIN_VMAP vectors go together while that fits _VMAP_FLOOR_BYTES.
# Measured on 2 idle cores: the digits MLP (500 examples) costs 2.9 us per (vector, example)
# at 11-33 vectors a call, 4.1 us at 176; a layer-restricted GPT-2 HVP 27 ms per vector alone,
# 17 ms in calls of 8 and 16 ms in calls of 16.
_VMAP_BYTES = 96 * 2**20
_MIN_VMAP = 8
_VMAP_FLOOR_BYTES = 2**30
# Largest linearisation that small Hessian batches are merged into (see _merge_small_batches).
_MERGED_BYTES = 16 * 2**20
MatVec = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Plumbing: flatten the differentiated argument and batch v
# --------------------------------------------------------------------------------------------
def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")


def _flat_objective(func: Callable[..., Tensor], x: Sequence[Any], argnums: int):
    """``theta -> func(*x)`` with ``x[argnums]`` replaced by ``theta.reshape(shape)``."""
    if not isinstance(x, (tuple, list)):
        raise TypeError("x must be a tuple of the function's arguments, e.g. (x, param).")
    shape = x[argnums].shape
    args = list(x)

    def objective(theta: Tensor) -> Tensor:
        call = list(args)
        call[argnums] = theta.reshape(shape)
        out = func(*call)
        if out.dim() != 0:
            raise ValueError(
                f"the function must return a scalar to have a Hessian; got shape "
                f"{tuple(out.shape)}. Reduce it (e.g. .sum() or .mean())."
            )
        return out

    return objective, x[argnums].reshape(-1)


def _as_batch(v: Tensor, shape: torch.Size) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``v`` as ``[k, d]`` and return a function that restores its original layout."""
    d = shape.numel()
    if v.shape == shape:
        return v.reshape(1, d), lambda out: out.reshape(shape)
    if v.dim() >= 1 and v.shape[1:] == shape:
        k = v.shape[0]
        return v.reshape(k, d), lambda out: out.reshape(k, *shape)
    if v.dim() == 2 and v.shape[1] == d:
        return v, lambda out: out
    raise ValueError(
        f"v must have shape {tuple(shape)} or [k, {', '.join(map(str, shape))}]; "
        f"got {tuple(v.shape)}."
    )


def _hvp_operator(objective: Callable[[Tensor], Tensor], theta: Tensor, mode: str) -> MatVec:
    """A batched Hessian-vector product ``V [k, d] -> H V`` at ``theta``.

    ``rev-rev`` builds the reverse-mode linearisation of the gradient once (``vjp``) and reuses
    it; ``rev-fwd`` pushes tangents forward through the gradient (``jvp``), which needs less
    memory for large ``k``. A single vector skips ``vmap`` (its batching costs more than the
    product itself on small models, and Arnoldi/Lanczos runs are all single vectors).
    """
    _check_mode(mode)
    grad_fn = torch.func.grad(objective)
    if mode == "rev-rev":
        _, vjp_fn = torch.func.vjp(grad_fn, theta)

        def one(v: Tensor) -> Tensor:
            return vjp_fn(v)[0]
    else:
        def one(v: Tensor) -> Tensor:
            return torch.func.jvp(grad_fn, (theta,), (v,))[1]

    batched = torch.func.vmap(one)

    def matvec(v: Tensor) -> Tensor:
        return one(v[0])[None] if v.shape[0] == 1 else batched(v)

    return matvec


def _chunked(matvec: MatVec, chunk: int, out: Tensor | None = None) -> MatVec:
    """``matvec`` applied ``chunk`` rows at a time (vmap over too many tangents at once spills
    out of cache and runs slower per vector, see ``_VMAP_BYTES``), written into ``out`` when it
    has the right shape (a caller that consumes each product at once can reuse one buffer).
    """

    def chunked(v: Tensor) -> Tensor:
        if v.shape[0] <= chunk:
            return matvec(v)
        result = out if out is not None and out.shape == v.shape else torch.empty_like(v)
        for start in range(0, v.shape[0], chunk):
            result[start:start + chunk] = matvec(v[start:start + chunk])
        return result

    return chunked


class _ParamDependentBytes(TorchDispatchMode):
    """Sums the bytes of every intermediate result that depends on ``theta``.

    Only those carry tangents in an HVP (and are saved by its linearisation): with a few
    layers selected, everything computed before them is a constant of the product.
    """

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.total = 0
        # id -> weak reference: the id alone could be reused by a later, unrelated tensor
        # (and tensors cannot live in a WeakSet: their == is elementwise).
        self._dependent: dict[int, weakref.ref] = {id(theta): weakref.ref(theta)}

    def _depends(self, t: Any) -> bool:
        ref = self._dependent.get(id(t)) if isinstance(t, Tensor) else None
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(self._depends(t) for t in tree_flatten((args, kwargs or {}))[0]):
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    self.total += t.numel() * t.element_size()
                    self._dependent[id(t)] = weakref.ref(t)
        return out


def linearization_bytes(objective: Callable[[Tensor], Tensor], theta: Tensor) -> int:
    """Estimate the memory of an HVP of ``objective`` at ``theta``, per right-hand side.

    ``torch.func`` transforms do not support saved-tensor hooks, so the tensors an HVP keeps
    cannot be counted directly. Instead one forward pass runs under a dispatch mode that sums
    the intermediate results depending on ``theta``; the HVP (forward, backward and their
    tangents) is taken as three times that. It sizes both the ``rev-rev`` linearisation kept
    between products and the tangents of one more vector in a vmapped product.
    """
    gauge = _ParamDependentBytes(theta)
    with torch.no_grad(), gauge:
        objective(theta)
    return 3 * gauge.total


def _vmap_chunk(linearization: int, cap: int) -> int:
    """Vectors per vmapped HVP call for a linearisation of ``linearization`` bytes."""
    chunk = _VMAP_BYTES // max(linearization, 1)
    if _MIN_VMAP * linearization <= _VMAP_FLOOR_BYTES:
        chunk = max(chunk, _MIN_VMAP)
    return max(1, min(cap, chunk))


def _concat_batches(batches: Sequence[Any]) -> Any | None:
    """Concatenate batches along the first dimension, or ``None`` when their structures or
    trailing shapes differ (e.g. text padded per batch) or a leaf is not a tensor."""
    leaves, specs = zip(*(tree_flatten(b) for b in batches), strict=True)
    if any(spec != specs[0] for spec in specs):
        return None
    merged = []
    for column in zip(*leaves, strict=True):
        if not all(isinstance(t, Tensor) and t.dim() > 0 for t in column):
            return None
        if any(t.shape[1:] != column[0].shape[1:] for t in column):
            return None
        merged.append(torch.cat(column))
    return tree_unflatten(merged, specs[0])


def _merge_small_batches(objective: Callable[[Tensor, Any], Tensor], theta: Tensor,
                         batches: list[tuple[Any, float]]
                         ) -> tuple[list[tuple[Any, float]], list[int]]:
    """Merge consecutive small batches into ones of up to ``_MERGED_BYTES`` of linearisation.

    On small models an HVP costs mostly per-call overhead, so one product over five batches of
    100 takes about five times as long as one over a batch of 500; a Lanczos run (one vector
    at a time) gains the most. Weights add up: the loss of a batch is its examples' mean and
    each weight is the batch's share of the training set.

    Returns:
        The new ``(batch, weight)`` list and each entry's linearisation size (a merged batch's
        is the sum of its parts', an upper bound), so that nothing is measured twice.
    """
    sizes = [linearization_bytes(lambda t, b=b: objective(t, b), theta) for b, _ in batches]
    out: list[tuple[Any, float]] = []
    out_sizes: list[int] = []
    group: list[int] = []

    def flush() -> None:
        merged = _concat_batches([batches[i][0] for i in group]) if len(group) > 1 else None
        if merged is None:
            out.extend(batches[i] for i in group)
            out_sizes.extend(sizes[i] for i in group)
        else:
            out.append((merged, sum(batches[i][1] for i in group)))
            out_sizes.append(sum(sizes[i] for i in group))

    for i, size in enumerate(sizes):
        if group and sum(sizes[j] for j in group) + size > _MERGED_BYTES:
            flush()
            group = []
        group.append(i)
    flush()
    return out, out_sizes


class HessianSum:
    r"""``V [k, d] -> \sum_b w_b H_b V``: a Hessian summed over data batches, linearised once.

    Each term is the Hessian of ``objective(theta, batch_b)``. In ``rev-rev`` mode the
    per-batch linearisations are built on first use and kept while their estimated memory
    (:func:`linearization_bytes`) fits ``cache_bytes``, so iterative solvers (CG, Arnoldi,
    the explicit Hessian's column sweeps) pay for each forward/backward pass once rather than
    once per iteration; batches beyond the budget are re-linearised on every product.

    Right-hand sides go through ``vmap`` in chunks sized by :func:`_vmap_chunk`: wide enough
    to amortise per-call overhead, narrow enough that the tangents stay in the CPU caches.

    Args:
        objective: ``(theta [d], batch) -> scalar``.
        theta: the flat parameters ``[d]``.
        batches: ``(batch, weight)`` pairs.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` (``rev-fwd`` keeps nothing between products).
        cache_bytes: memory budget for kept linearisations.
        rhs_chunk_size: most right-hand sides pushed through one vectorised product.
        merge_batches: concatenate consecutive small batches (same structure and trailing
            shapes) into one term with the summed weight. Valid when ``objective`` is the mean
            over a batch's examples and each weight is proportional to its batch size, as for
            a training-set Hessian with weights ``B_b / n``.
    """

    def __init__(self, objective: Callable[[Tensor, Any], Tensor], theta: Tensor,
                 batches: Sequence[tuple[Any, float]], mode: str = "rev-rev",
                 cache_bytes: int = 2**30, rhs_chunk_size: int = 256,
                 merge_batches: bool = False) -> None:
        _check_mode(mode)
        self.objective = objective
        self.theta = theta
        self.batches = list(batches)
        # Linearisation sizes, measured on first use (or while deciding what to merge).
        self._sizes: list[int | None] = [None] * len(self.batches)
        if merge_batches and len(self.batches) > 1:
            self.batches, self._sizes = _merge_small_batches(objective, theta, self.batches)
        self.mode = mode
        self.rhs_chunk_size = rhs_chunk_size
        self._ops: dict[int, MatVec] = {}
        self._chunks: dict[int, int] = {}
        self._budget = cache_bytes if mode == "rev-rev" else 0

    def _operator(self, b: int) -> tuple[MatVec, int]:
        if b in self._ops:
            return self._ops[b], self._chunks[b]
        batch = self.batches[b][0]

        def objective(t: Tensor) -> Tensor:
            return self.objective(t, batch)

        op = _hvp_operator(objective, self.theta, self.mode)
        if b not in self._chunks:
            size = self._sizes[b]
            if size is None:
                size = linearization_bytes(objective, self.theta)
            self._chunks[b] = _vmap_chunk(size, self.rhs_chunk_size)
            if size <= self._budget:
                self._budget -= size
                self._ops[b] = op
        return op, self._chunks[b]

    def __call__(self, v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        for b, (_, weight) in enumerate(self.batches):
            op, chunk = self._operator(b)
            for start in range(0, v.shape[0], chunk):
                rows = slice(start, start + chunk)
                out[rows] += weight * op(v[rows])
        return out


def hessian_columns(matvec: MatVec, dim: int, columns: range, chunk: int,
                    dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Columns ``columns`` of the ``dim x dim`` matrix behind ``matvec``, as float64 rows
    ``[len(columns), dim]``: products with basis vectors, ``chunk`` at a time, so memory stays
    bounded (``torch.func.hessian`` would push all ``dim`` tangents through at once)."""
    blocks = [torch.zeros(0, dim, dtype=torch.float64, device=device)]
    for start in range(columns.start, columns.stop, chunk):
        stop = min(start + chunk, columns.stop)
        basis = torch.zeros(stop - start, dim, dtype=dtype, device=device)
        basis[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=device)
        blocks.append(matvec(basis).double())
    return torch.cat(blocks)


def _regularized(matvec: MatVec, regularization: float) -> MatVec:
    if regularization == 0.0:
        return matvec
    return lambda v: matvec(v) + regularization * v


# --------------------------------------------------------------------------------------------
# No NaN or inf leaves a solver
# --------------------------------------------------------------------------------------------
# An eigenvalue (plus regularization) counts as zero below this many ulps of the largest one:
# HVPs in float32 resolve eigenvalues down to ~1e-6 of the top one, and a Krylov run returns
# a null direction as an eigenvalue of that size, whose inverse is round-off, not curvature.
_ZERO_EIGEN_ULPS = 1000


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits (a readable option value)."""
    if not math.isfinite(value) or value <= 0:
        return value
    scale = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / scale) * scale


def check_finite_solution(out: Tensor, solver: str, fix: str) -> Tensor:
    """Return ``out`` (rows = right-hand sides) if every entry is finite, else raise.

    Raises:
        FloatingPointError: naming ``solver``, the first bad row and ``fix``.
    """
    if bool(torch.isfinite(out.sum())):  # one reduction; exact test only when it fails
        return out
    rows = out.reshape(out.shape[0], -1) if out.dim() > 1 else out.reshape(1, -1)
    bad = ~torch.isfinite(rows).all(dim=1)
    if not bool(bad.any()):
        return out  # the sum overflowed, the entries are finite
    raise FloatingPointError(
        f"{solver} returned NaN/inf for {int(bad.sum())} of {rows.shape[0]} right-hand "
        f"side(s) (first: row {int(bad.nonzero()[0, 0])}). {fix}"
    )


def check_eigenvalues(evals: Tensor, regularization: float, keep_option: str) -> None:
    """Refuse eigenvalues (after adding ``regularization``) that are zero or not finite.

    Dividing by them would return inf, or round-off amplified beyond any meaning.

    Args:
        evals: the kept eigenvalues.
        regularization: the value added to each before inverting.
        keep_option: the option that sets how many are kept (``top_k``, ``proj_dim``).

    Raises:
        FloatingPointError: an eigenvalue is NaN/inf.
        ValueError: ``k`` of them are zero, naming ``regularization`` and ``keep_option``.
    """
    if evals.numel() == 0:
        return
    if not bool(torch.isfinite(evals).all()):
        raise FloatingPointError(
            "the Hessian eigenvalues are NaN/inf: the Hessian-vector products overflowed. Check "
            "the loss and the weights (half-precision models overflow; use float32)."
        )
    values = evals.double()
    top = float(values.abs().max())
    cutoff = _ZERO_EIGEN_ULPS * torch.finfo(evals.dtype).eps * top
    zero = (values + regularization).abs() <= cutoff
    count = int(zero.sum())
    if count:
        suggestion = _round_up(1e-3 * top) if top > 0 else 1e-3
        raise ValueError(
            f"{count} of the {values.numel()} Hessian eigenvalues kept are zero after adding "
            f"regularization={regularization:g} (|eigenvalue + regularization| <= {cutoff:.2g}, "
            f"round-off next to the top eigenvalue {top:.3g}), so (H + regularization * I)^-1 "
            f"is infinite along them. Pass regularization > 0 (e.g. regularization="
            f"{suggestion:g}, 1e-3 x the top eigenvalue), or keep fewer eigenpairs "
            f"({keep_option} <= {values.numel() - count})."
        )


# --------------------------------------------------------------------------------------------
# HVP
# --------------------------------------------------------------------------------------------
def hvp(
    func: Callable[..., Tensor],
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """Hessian-vector product of ``func`` with respect to argument ``argnums``.

    Returns:
        ``hvp_func(x, v)`` computing :math:`(\\nabla^2 f(x) + \\lambda I) v`; ``x`` is the tuple
        of ``func``'s arguments and ``v`` a vector or ``[k, ...]`` batch.
    """
    _check_mode(mode)

    def hvp_func(x: Sequence[Any], v: Tensor) -> Tensor:
        return hvp_at_x(func, x, argnums=argnums, mode=mode, regularization=regularization)(v)

    return hvp_func


def hvp_at_x(
    func: Callable[..., Tensor],
    x: Sequence[Any],
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """Hessian-vector product at fixed inputs ``x``; the linearisation is built once."""
    objective, theta = _flat_objective(func, x, argnums)
    op = _regularized(_hvp_operator(objective, theta, mode), regularization)
    shape = x[argnums].shape

    def hvp_at_x_func(v: Tensor) -> Tensor:
        vb, restore = _as_batch(v, shape)
        return restore(op(vb.to(theta.dtype)))

    return hvp_at_x_func


# --------------------------------------------------------------------------------------------
# Explicit
# --------------------------------------------------------------------------------------------
_EXPLICIT_FIX = ("H + regularization * I is (nearly) singular or the Hessian is not finite: pass "
                 "regularization > 0, and check the loss and weights.")


def _solve_explicit(hessian: Tensor, vb: Tensor, regularization: float) -> Tensor:
    d = hessian.shape[0]
    system = hessian + regularization * torch.eye(d, dtype=hessian.dtype, device=hessian.device)
    # The Hessian is symmetric, so solve in float64 for stability and return in v's dtype.
    try:
        out = torch.linalg.solve(system.double(), vb.double().T).T
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"H + regularization * I is singular at regularization={regularization:g} (the "
            "Hessian has zero eigenvalues, e.g. from a softmax's shift invariance): pass "
            "regularization > 0."
        ) from err
    return check_finite_solution(out, "the explicit inverse-HVP", _EXPLICIT_FIX).to(vb.dtype)


def ihvp_explicit(
    func: Callable[..., Tensor], argnums: int = 0, regularization: float = 0.0
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """IHVP by materialising the ``d x d`` Hessian and solving; exact, for small ``d``."""

    def ihvp_func(x: Sequence[Any], v: Tensor) -> Tensor:
        return ihvp_at_x_explicit(func, *x, argnums=argnums, regularization=regularization)(v)

    return ihvp_func


def ihvp_at_x_explicit(
    func: Callable[..., Tensor], *x: Any, argnums: int = 0, regularization: float = 0.0
) -> Callable[[Tensor], Tensor]:
    """IHVP at fixed inputs: the Hessian is built and kept once."""
    objective, theta = _flat_objective(func, x, argnums)
    hessian = torch.func.hessian(objective)(theta)
    check_finite_solution(hessian, "the Hessian", "Check the loss and the weights at these "
                          "inputs (half-precision models overflow; use float32).")
    shape = x[argnums].shape

    def ihvp_at_x_func(v: Tensor) -> Tensor:
        vb, restore = _as_batch(v, shape)
        return restore(_solve_explicit(hessian, vb.to(theta.dtype), regularization))

    return ihvp_at_x_func


# --------------------------------------------------------------------------------------------
# Conjugate gradients
# --------------------------------------------------------------------------------------------
def _warn_indefinite(solver: str, consequence: str = "") -> None:
    warnings.warn(
        f"{solver} met non-positive curvature: H + regularization * I is not positive definite "
        f"along its search directions, so the result is not (H + regularization * I)^-1 v"
        f"{consequence}. Raise regularization above the magnitude of the most negative Hessian "
        "eigenvalue (see func.hessian.arnoldi_eigen), or use the Arnoldi solver, which inverts "
        "only the top eigenpairs.",
        RuntimeWarning,
        stacklevel=3,
    )


def batched_cg(matvec: MatVec, b: Tensor, max_iter: int = 10, tol: float = 1e-7,
               warn_indefinite: bool = True) -> Tensor:
    """Solve ``A X = B`` for ``k`` right-hand sides at once with conjugate gradients.

    Each row of ``b`` runs its own CG recursion (its own step sizes), but every iteration makes
    a single batched call ``matvec(P) -> A P`` for all rows. Rows stop updating once their
    residual norm is below ``tol``. A row's result does not depend on the other rows. Warns
    (``RuntimeWarning``) when a search direction has non-positive curvature.

    Args:
        matvec: ``[k, d] -> [k, d]``, a symmetric positive-definite operator applied row-wise.
        b: right-hand sides ``[k, d]``.
        max_iter: iteration cap.
        tol: absolute residual-norm tolerance.
        warn_indefinite: warn on non-positive curvature.
    """
    # Updates are in place: on CPU every fresh [k, d] temporary is new memory to fault in,
    # which cost as much as the HVPs on a 17k-parameter MLP.
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _row_dots(r, r)
    warned = not warn_indefinite
    for it in range(max_iter):
        active = rs.sqrt() > tol
        if not bool(active.any()):
            break
        if bool(active.all()):
            ap = matvec(p)
        else:  # converged rows cost nothing more: HVPs only for the active ones
            ap = torch.zeros_like(p)
            ap[active] = matvec(p[active])
        curvature = _row_dots(p, ap)
        if not warned and bool((active & (curvature <= 0)).any()):
            _warn_indefinite("CG")
            warned = True
        safe = active & (curvature != 0)
        alpha = torch.where(safe, rs / torch.where(safe, curvature, 1.0), 0.0)
        x.addcmul_(alpha[:, None], p)
        if it == max_iter - 1:
            break
        r.addcmul_(alpha[:, None], ap, value=-1.0)
        rs_new = _row_dots(r, r)
        beta = torch.where(safe, rs_new / torch.where(safe, rs, 1.0), 0.0)
        p.mul_(beta[:, None]).add_(r)
        rs = torch.where(safe, rs_new, rs)
    return x


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` without the ``[k, d]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _orthonormal_rows(z: Tensor, rank_tol: float) -> Tensor:
    """A basis (rows, orthonormal up to round-off) of the span of ``z``'s rows, numerically
    dependent directions dropped.

    Rows are scaled to unit norm first, so a nearly converged right-hand side (small residual)
    keeps its directions; a direction is dropped when its singular value is below ``rank_tol``
    times the largest (never below what ``z``'s precision resolves through the Gram matrix).
    The ``[k, d]`` products stay in ``z``'s dtype; only the ``k x k`` eigenproblem is float64.
    ``z`` is overwritten (callers pass a fresh tensor).
    """
    if z.shape[0] == 0:
        return z
    rank_tol = max(rank_tol, 10 * torch.finfo(z.dtype).eps ** 0.5)
    z = z.div_(z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny))
    s, u = torch.linalg.eigh((z @ z.T).double())
    keep = s > (rank_tol**2) * s[-1].clamp_min(torch.finfo(torch.float64).tiny)
    return (u[:, keep] / s[keep].sqrt()).T.to(z.dtype) @ z


def _symmetric_solver(matrix: Tensor, rtol: float) -> tuple[Callable[[Tensor], Tensor], bool]:
    """``rhs -> matrix^+ rhs`` for a symmetric ``matrix`` (eigenvalues within ``rtol`` of the
    largest magnitude count as zero: round-off, not curvature), and whether it is positive
    semi-definite up to that tolerance."""
    evals, evecs = torch.linalg.eigh(matrix)
    cutoff = rtol * evals.abs().max()
    keep = evals.abs() > cutoff
    inverse = (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T
    return (lambda rhs: inverse @ rhs), bool(evals.min() >= -cutoff)


def block_cg(matvec: MatVec, b: Tensor, max_iter: int = 10, tol: float = 1e-7,
             rank_tol: float = 1e-4) -> Tensor:
    r"""Solve ``A X = B`` for ``k`` right-hand sides in one shared Krylov space (block CG).

    O'Leary's (1980) block conjugate gradients, in the breakdown-free form of Ji & Li (2017).
    With the rows of ``B`` as right-hand sides, iteration :math:`j` searches along an
    orthonormal block :math:`P_j` (rows) spanning the current residuals, made
    :math:`A`-conjugate to the previous block:

    .. math::
        \alpha = (P A P^\top)^{-1} P R^\top,\quad X \mathrel{+}= \alpha^\top P,\quad
        R \mathrel{-}= \alpha^\top A P,\quad
        P \leftarrow \operatorname{orth}\big(R - (A P\, R^\top)^\top (P A P^\top)^{-1} P\big).

    After :math:`j` iterations each row minimises its :math:`A`-norm error over the block
    Krylov space :math:`\operatorname{span}\{B, AB, \dots, A^{j-1}B\}`, of dimension up to
    :math:`jk` where one-by-one CG reaches :math:`j`: on Hessians whose gradients share a
    dominant subspace, 2-3 block iterations match 10-20 plain ones. An iteration costs one
    ``matvec`` of at most ``k`` rows, fewer once residuals are (numerically) dependent: those
    directions are dropped (``rank_tol``), as are the rows of converged right-hand sides.

    Unlike ``batched_cg``, a row's result depends on the other rows (they share the search
    space) until converged. Needs ``A`` symmetric positive definite, more strictly than CG: on
    an indefinite ``A`` the shared recursion diverges (measured on a network Hessian), so at
    the first block with non-positive curvature it warns (``RuntimeWarning``) and solves with
    ``batched_cg`` instead, whose independent recursions degrade gracefully.

    Args:
        matvec: ``[m, d] -> [m, d]``, a symmetric positive-definite operator applied row-wise.
        b: right-hand sides ``[k, d]``.
        max_iter: iteration cap (each is one ``matvec`` call).
        tol: absolute residual-norm tolerance per right-hand side.
        rank_tol: relative singular-value threshold below which search directions are dropped.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    active = r.norm(dim=1) > tol
    p = _orthonormal_rows(r[active], rank_tol)
    for it in range(max_iter):
        if p.shape[0] == 0:
            break
        ap = matvec(p)
        # [k, d] products in b's dtype; the small m x m systems are solved in float64.
        curvature = (p @ ap.T).double()
        # P A P^T from b's precision: eigenvalues below its round-off are not curvature
        solve, positive = _symmetric_solver((curvature + curvature.T) / 2,
                                            100 * torch.finfo(b.dtype).eps)
        if not positive:
            _warn_indefinite("Block CG", "; it falls back to plain CG (one recursion per "
                             "right-hand side), which degrades more gracefully")
            return batched_cg(matvec, b, max_iter=max_iter, tol=tol, warn_indefinite=False)
        alpha = solve((p @ r.T).double()).to(b.dtype)  # [m, k]
        x.addmm_(alpha.T, p)  # in place, as in batched_cg
        if it == max_iter - 1:
            break  # the next residual and search block would go unused
        r.addmm_(alpha.T, ap, alpha=-1.0)
        active = r.norm(dim=1) > tol
        if not bool(active.any()):
            break
        beta = solve((ap @ r[active].T).double()).to(b.dtype)
        p = _orthonormal_rows(torch.addmm(r[active], beta.T, p, alpha=-1.0), rank_tol)
    return x


_CG_FIX = ("The Hessian-vector products overflowed or are NaN: check the loss and the weights "
          "(half-precision HVPs overflow; use float32), and pass regularization > 0 when "
          "H is singular or indefinite.")


def ihvp_cg(
    func: Callable[..., Tensor],
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
    block: bool = False,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """IHVP by conjugate gradients (Martens, 2010), all right-hand sides solved together.

    ``block=False`` runs one CG recursion per right-hand side (``batched_cg``, rows
    independent); ``block=True`` solves them in one shared Krylov space (``block_cg``: far
    fewer iterations on a positive-definite ``H + regularization * I``, rows coupled).
    """
    _check_mode(mode)

    def ihvp_func(x: Sequence[Any], v: Tensor) -> Tensor:
        return ihvp_at_x_cg(
            func, *x, argnums=argnums, max_iter=max_iter, tol=tol, mode=mode,
            regularization=regularization, block=block,
        )(v)

    return ihvp_func


def ihvp_at_x_cg(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
    block: bool = False,
) -> Callable[[Tensor], Tensor]:
    """CG IHVP at fixed inputs; the HVP linearisation is built once (``block`` as in
    ``ihvp_cg``)."""
    objective, theta = _flat_objective(func, x, argnums)
    op = _regularized(_hvp_operator(objective, theta, mode), regularization)
    shape = x[argnums].shape
    solver = block_cg if block else batched_cg

    def ihvp_at_x_func(v: Tensor) -> Tensor:
        vb, restore = _as_batch(v, shape)
        out = solver(op, vb.to(theta.dtype), max_iter=max_iter, tol=tol)
        return restore(check_finite_solution(out, "CG", _CG_FIX))

    return ihvp_at_x_func


# --------------------------------------------------------------------------------------------
# LiSSA
# --------------------------------------------------------------------------------------------
# A convergent recursion (every mini-batch Hessian with eigenvalues in [0, (2 - damping) *
# scaling]) keeps ||h_t|| <= min(t + 1, 1 / damping) * ||v||. The iterate is stopped once it
# exceeds that bound by this factor (slack for mini-batch noise), long before it overflows.
_LISSA_SLACK = 10.0
# Power iterations (per sampled mini-batch, _LISSA_PROBE_BATCHES of them) behind the eigenvalue
# estimate printed when LiSSA diverges: ~100 mini-batch HVPs, a fraction of one recursion.
_POWER_ITERS = 15
_LISSA_PROBE_BATCHES = 3


def lissa_recursion(
    sample_matvec: Callable[[int], MatVec],
    v: Tensor,
    recursion_depth: int,
    num_repeat: int = 1,
    damping: float = 0.0,
    scaling: float = 50.0,
) -> Tensor:
    r"""The LiSSA estimator of :math:`(H + \text{damping}\cdot\text{scaling}\, I)^{-1} v`.

    Runs :math:`h_0 = v,\; h_t = v + (1 - \text{damping})\, h_{t-1} - \tilde H_t h_{t-1} / s`
    for ``recursion_depth`` steps, where :math:`\tilde H_t` is the Hessian of a freshly
    sampled mini-batch (``sample_matvec(t)``), and returns :math:`h_T / s`, averaged over
    ``num_repeat`` runs. It converges when :math:`\|H\| / s < 1`; choose ``scaling`` above the
    largest Hessian eigenvalue.

    Divergence is caught as it happens: once an iterate is NaN/inf, or its norm exceeds
    ``10 * min(t + 1, 1 / damping) * ||v||`` (a convergent recursion stays below a tenth of
    that), a ``FloatingPointError`` stops the run. Its message gives power-iteration estimates
    of the mini-batch Hessians' largest and most negative eigenvalues and the ``scaling`` (and
    ``damping``) that would converge.

    Args:
        sample_matvec: ``step -> (V [k, d] -> H_batch V)``; each product is consumed before
            the next call, so a sampler may write them all into one buffer.
        v: right-hand sides ``[k, d]``.
        recursion_depth: steps per recursion.
        num_repeat: independent recursions averaged.
        damping: see above.
        scaling: see above.

    Raises:
        FloatingPointError: the recursion diverges (``scaling`` below the largest eigenvalue,
            or negative curvature that ``damping`` does not offset).
    """
    if scaling <= 0:
        raise ValueError("LiSSA scaling must be positive (and above the top Hessian eigenvalue).")
    v_norm = torch.linalg.vector_norm(v, dim=1)
    estimate = torch.zeros_like(v)
    step = 0
    for repeat in range(num_repeat):
        h = v.clone()
        for t in range(recursion_depth):
            # in place (see batched_cg): only the HVP allocates
            hv = sample_matvec(step)(h)
            h.mul_(1.0 - damping).add_(v).sub_(hv, alpha=1.0 / scaling)
            step += 1
            limit = _LISSA_SLACK * (t + 2 if damping <= 0 else min(t + 2, 1.0 / damping))
            norms = torch.linalg.vector_norm(h, dim=1)
            if not bool((norms <= limit * v_norm).all()):  # False for NaN too
                raise _lissa_divergence(sample_matvec, v, norms / v_norm.clamp_min(1e-30),
                                        limit, t, repeat, recursion_depth, damping, scaling)
        estimate.add_(h, alpha=1.0 / scaling)
    return estimate.div_(num_repeat)


def _power_iteration(matvec: MatVec, start: Tensor, shift: float = 0.0,
                     iters: int = _POWER_ITERS) -> float:
    """Rayleigh-quotient estimate of the largest-magnitude eigenvalue of ``A - shift * I``."""
    q = start / torch.linalg.vector_norm(start)
    value = float("nan")
    for _ in range(iters):
        w = matvec(q[None])[0] - shift * q
        value = float(q @ w)
        norm = torch.linalg.vector_norm(w)
        if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
            break
        q = w / norm
    return value


def _extreme_eigenvalues(matvec: MatVec, start: Tensor) -> tuple[float, float]:
    """Estimates ``(largest, smallest)`` eigenvalue of a symmetric operator: power iteration
    finds the one of largest magnitude, a second one shifted by it finds the other end."""
    dominant = _power_iteration(matvec, start)
    other = _power_iteration(matvec, start, shift=dominant) + dominant
    return max(dominant, other), min(dominant, other)


def _lissa_divergence(sample_matvec: Callable[[int], MatVec], v: Tensor, growth: Tensor,
                      limit: float, t: int, repeat: int, recursion_depth: int,
                      damping: float, scaling: float) -> FloatingPointError:
    """The error raised when the LiSSA recursion diverges, with eigenvalue estimates."""
    finite = torch.isfinite(growth)
    if bool(finite.all()):
        row = int(growth.argmax())
        what = (f"its norm reached {float(growth[row]):.3g} x |v| (right-hand side {row}), "
                f"above the {limit:.3g} x |v| a convergent recursion stays under")
    else:
        row = int((~finite).nonzero()[0, 0])
        what = f"it became NaN/inf (right-hand side {row})"
    gen = torch.Generator().manual_seed(0)
    top, bottom = -math.inf, math.inf
    for b in range(_LISSA_PROBE_BATCHES):
        start = torch.randn(v.shape[1], generator=gen, dtype=torch.float64)
        high, low = _extreme_eigenvalues(sample_matvec(-1 - b), start.to(v))
        top, bottom = max(top, high), min(bottom, low)
    head = (f"LiSSA diverged at recursion step {t + 1} of {recursion_depth} (repeat "
            f"{repeat + 1}): {what}. ")
    if not (math.isfinite(top) and math.isfinite(bottom)):
        return FloatingPointError(
            head + "The Hessian-vector products themselves are NaN/inf: check the loss and the "
            "model's weights (a half-precision model overflows; use float32).")
    new_scaling = _round_up(1.5 * max(top, scaling))
    text = (head + f"The recursion converges only when scaling ({scaling:g}) exceeds the largest "
            f"eigenvalue of the mini-batch Hessians, estimated at {top:.4g} by "
            f"{_POWER_ITERS} power iterations; pass scaling={new_scaling:g} or more")
    if bottom < 0 and damping * new_scaling <= -bottom:
        new_damping = _round_up(1.5 * -bottom / new_scaling)
        text += (f". The Hessian also has negative curvature (eigenvalue about {bottom:.3g}), "
                 f"which only damping offsets: pass damping={new_damping:g} or more (so that "
                 "damping * scaling exceeds its magnitude; LiSSA then solves "
                 "H + damping * scaling * I)")
    return FloatingPointError(text + ".")


def _lissa_in_dims(x: Sequence[Any], argnums: int,
                   in_dims: Sequence[int | None] | None) -> list[int | None]:
    """The dimension sampled in each argument (``None``: shared by every step), checked.

    Default: dimension 0 of every tensor argument but ``argnums`` that has one.
    """
    if in_dims is None:
        return [0 if i != argnums and isinstance(a, Tensor) and a.dim() > 0 else None
                for i, a in enumerate(x)]
    dims = list(in_dims)
    if len(dims) != len(x):
        raise ValueError(f"in_dims has {len(dims)} entries but there are {len(x)} arguments; "
                         "give one per argument (None for an argument not sampled).")
    if dims[argnums] is not None:
        raise ValueError(f"in_dims[{argnums}] must be None: argument argnums={argnums} is the "
                         "one differentiated, not data to sample mini-batches from.")
    for i, (a, dim) in enumerate(zip(x, dims, strict=True)):
        if dim is not None and not (isinstance(a, Tensor) and -a.dim() <= dim < a.dim()):
            raise ValueError(f"in_dims[{i}]={dim} is not a dimension of argument {i}; pass "
                             "None for arguments that are not sampled.")
    return dims


def _lissa_batch_sampler(
    func: Callable[..., Tensor],
    x: Sequence[Any],
    argnums: int,
    batch_size: int,
    mode: str,
    collate_fn: Callable[..., Any] | None,
    seed: int,
    in_dims: Sequence[int | None] | None = None,
) -> Callable[[int], MatVec]:
    """Sample ``batch_size`` entries (without replacement) along ``in_dims`` per step."""
    dims = _lissa_in_dims(x, argnums, in_dims)
    sizes = {i: x[i].shape[d] for i, d in enumerate(dims) if d is not None}
    if in_dims is None and not sizes:
        raise ValueError(
            "ihvp_lissa samples mini-batches from the data arguments (every argument but "
            "argnums), which must be tensors sharing their first (batch) dimension; pass "
            "in_dims=(...) to choose the dimension of each (None: not sampled)."
        )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "the sampled arguments have different sizes along their in_dims dimension "
            f"({', '.join(f'argument {i}: {n}' for i, n in sizes.items())}); they must "
            "index the same examples."
        )
    n = next(iter(sizes.values()), 0)
    gen = torch.Generator().manual_seed(seed)

    def sample_matvec(_: int) -> MatVec:
        call = list(x)
        if n:
            idx = torch.randperm(n, generator=gen)[:batch_size]
            for i, d in enumerate(dims):
                if d is not None:
                    call[i] = x[i].index_select(d, idx.to(x[i].device))
        if collate_fn is not None:
            call = list(collate_fn(tuple(call)))  # dattri's form: the sampled tuple
        objective, theta = _flat_objective(func, call, argnums)
        return _hvp_operator(objective, theta, mode)

    return sample_matvec


def ihvp_lissa(
    func: Callable[..., Tensor],
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable[..., Any] | None = None,
    mode: str = "rev-rev",
    seed: int = 0,
) -> Callable[..., Tensor]:
    """IHVP by LiSSA (Agarwal et al., 2017); see ``lissa_recursion`` for the estimator.

    The call forms are dattri's: ``ihvp_lissa(func, ...)(x, v, in_dims=None)``. Each recursion
    step samples ``batch_size`` entries, without replacement, along dimension ``in_dims[i]``
    of every argument ``x[i]`` (``None``: the argument is shared, not sampled; ``in_dims``
    defaults to dimension 0 of every tensor argument but ``argnums``), and
    ``collate_fn(sampled_tuple)`` may rebuild the argument tuple from them. The result
    approximates ``(H + damping * scaling * I)^{-1} v``.

    Differences from dattri: the mini-batch sequence is seeded (``seed``) and shared by the
    right-hand sides (dattri draws an unseeded sequence per right-hand side), and a single
    ``v`` keeps its shape (dattri returns ``[1, d]``). Divergence raises a
    ``FloatingPointError`` instead of returning NaN or huge values (see ``lissa_recursion``).
    """
    _check_mode(mode)

    def ihvp_func(x: Sequence[Any], v: Tensor,
                  in_dims: Sequence[int | None] | None = None) -> Tensor:
        return ihvp_at_x_lissa(
            func, *x, in_dims=in_dims, argnums=argnums, batch_size=batch_size,
            num_repeat=num_repeat, recursion_depth=recursion_depth, damping=damping,
            scaling=scaling, collate_fn=collate_fn, mode=mode, seed=seed,
        )(v)

    return ihvp_func


def ihvp_at_x_lissa(
    func: Callable[..., Tensor],
    *x: Any,
    in_dims: Sequence[int | None] | None = None,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable[..., Any] | None = None,
    mode: str = "rev-rev",
    seed: int = 0,
) -> Callable[[Tensor], Tensor]:
    """LiSSA IHVP at fixed inputs (``in_dims`` and ``collate_fn`` as in ``ihvp_lissa``).

    Every call replays the same mini-batch sequence (``seed``).
    """
    _check_mode(mode)
    shape = x[argnums].shape
    _lissa_in_dims(x, argnums, in_dims)  # fail at construction, not at the first call

    def ihvp_at_x_func(v: Tensor) -> Tensor:
        vb, restore = _as_batch(v, shape)
        sampler = _lissa_batch_sampler(func, x, argnums, batch_size, mode, collate_fn, seed,
                                       in_dims)
        out = lissa_recursion(sampler, vb.to(x[argnums].dtype), recursion_depth, num_repeat,
                              damping, scaling)
        return restore(out)

    return ihvp_at_x_func


# --------------------------------------------------------------------------------------------
# Arnoldi
# --------------------------------------------------------------------------------------------
def arnoldi_eigen(
    matvec: MatVec,
    dim: int,
    max_iter: int = 100,
    top_k: int | None = None,
    tol: float = 1e-7,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Top eigenpairs of a symmetric operator from an Arnoldi run (Schioppa et al., 2022).

    Builds an orthonormal Krylov basis ``Q`` (``max_iter`` vectors from a seeded random start,
    re-orthogonalised twice for stability), projects the operator onto it, and diagonalises
    the small projected matrix.

    Args:
        matvec: ``[k, d] -> [k, d]``.
        dim: ``d``.
        max_iter: Krylov dimension (capped at ``d``).
        top_k: how many eigenpairs to keep, largest magnitude first (``None``: all found).
        tol: stop early when the next basis vector's norm falls below it.

    Returns:
        ``(eigenvalues [k], eigenvectors [k, d])``, eigenvectors as rows.
    """
    max_iter = min(max_iter, dim)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    # The basis lives in one preallocated matrix: rows 0..i are a view, never re-stacked.
    basis = torch.empty(max_iter + 1, dim, dtype=dtype, device=q.device)
    basis[0] = q / q.norm()
    size = 1
    proj = torch.zeros(max_iter + 1, max_iter, dtype=torch.float64)
    for i in range(max_iter):
        w = matvec(basis[i][None])[0]
        q_mat = basis[: i + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice ("twice is enough")
            coeff = q_mat @ w
            w = w - coeff @ q_mat
            proj[: i + 1, i] += coeff.double().cpu()
        norm = w.norm()
        proj[i + 1, i] = norm.double().cpu()
        if norm < tol:
            break
        basis[i + 1] = w / norm
        size += 1
    m = min(size, max_iter)
    small = proj[:m, :m]
    small = (small + small.T) / 2  # the operator is symmetric: keep the symmetric part
    evals, evecs = torch.linalg.eigh(small)
    order = torch.argsort(evals.abs(), descending=True)
    if top_k is not None:
        order = order[:top_k]
    evals, evecs = evals[order], evecs[:, order]
    q_mat = basis[:m].double()
    vectors = (evecs.T.to(q_mat.device) @ q_mat).to(dtype)
    return evals.to(dtype=dtype, device=vectors.device), vectors


def _arnoldi_solve(evals: Tensor, evecs: Tensor, vb: Tensor, regularization: float) -> Tensor:
    coeff = vb @ evecs.T  # [k, top_k]
    return (coeff / (evals + regularization)) @ evecs


def ihvp_arnoldi(
    func: Callable[..., Tensor],
    argnums: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    top_k: int | None = None,
    norm_constant: float = 1.0,
    seed: int = 0,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """IHVP from the Hessian's top eigenpairs: ``V diag(1/(lambda + reg)) V^T v``.

    A Krylov method finds one direction per distinct eigenvalue: for a Hessian with a repeated
    eigenvalue, the other directions of that eigenspace are missed even with ``max_iter >= d``.
    """
    _check_mode(mode)

    def ihvp_func(x: Sequence[Any], v: Tensor) -> Tensor:
        return ihvp_at_x_arnoldi(
            func, *x, argnums=argnums, max_iter=max_iter, tol=tol, mode=mode,
            regularization=regularization, top_k=top_k, norm_constant=norm_constant, seed=seed,
        )(v)

    return ihvp_func


def ihvp_at_x_arnoldi(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    max_iter: int = 100,
    top_k: int | None = None,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    seed: int = 0,
) -> Callable[[Tensor], Tensor]:
    """Arnoldi IHVP at fixed inputs: the eigenpairs are computed once and reused.

    ``norm_constant`` divides the operator during the run (for Hessians with a very large
    spectrum); eigenvalues are rescaled back afterwards.
    """
    objective, theta = _flat_objective(func, x, argnums)
    op = _hvp_operator(objective, theta, mode)
    evals, evecs = arnoldi_eigen(
        lambda v: op(v) / norm_constant, theta.numel(), max_iter=max_iter, top_k=top_k,
        tol=tol, seed=seed, dtype=theta.dtype, device=theta.device,
    )
    evals = evals * norm_constant
    check_eigenvalues(evals, regularization, "top_k")
    shape = x[argnums].shape

    def ihvp_at_x_func(v: Tensor) -> Tensor:
        vb, restore = _as_batch(v, shape)
        return restore(_arnoldi_solve(evals, evecs, vb.to(theta.dtype), regularization))

    return ihvp_at_x_func
