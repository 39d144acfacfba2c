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

This module is the function API only; the pieces live in ``hf_attrib.func.hvp_engine`` (the
HVP engine and its memory gauge) and ``hf_attrib.func.solvers`` (one module per solver), and
each ``ihvp_at_x_<alg>`` / ``ihvp_<alg>`` pair is derived from one solver by ``_at_x`` and
``_with_inputs``. The engine and solver names that used to live here (``batched_cg``,
``HessianSum``, ``linearization_bytes``, ...) are re-exported for code that imports them from
here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from hf_attrib.func.hvp_engine import (
    HessianSum,
    MatVec,
    as_batch,
    check_mode,
    flat_objective,
    hessian_columns,
    hvp_operator,
    linearization_bytes,
    regularized,
)
from hf_attrib.func.solvers import (
    CG_FIX,
    arnoldi_eigen,
    arnoldi_solve,
    batched_cg,
    block_cg,
    check_eigenvalues,
    check_finite_solution,
    lissa_recursion,
    solve_explicit,
)

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


# --------------------------------------------------------------------------------------------
# The two call forms, derived from a solve on rows
# --------------------------------------------------------------------------------------------
def _at_x(x: Sequence[Any], argnums: int, solve: MatVec) -> Callable[[Tensor], Tensor]:
    """The ``*_at_x`` form of ``solve`` (right-hand sides as rows ``[k, d]``, in the dtype of
    ``x[argnums]``): ``v`` is one vector shaped like ``x[argnums]`` or a batch of them, and the
    result has ``v``'s layout."""
    shape, dtype = x[argnums].shape, x[argnums].dtype

    def at_x_func(v: Tensor) -> Tensor:
        vb, restore = as_batch(v, shape)
        return restore(solve(vb.to(dtype)))

    return at_x_func


def _with_inputs(ihvp_at_x: Callable[..., Callable[[Tensor], Tensor]], func: Callable[..., Tensor],
                 argnums: int, **options: Any) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """The ``ihvp_*`` form of an ``ihvp_at_x_*`` one: the inputs come with each ``v``,
    ``ihvp_func(x, v) = ihvp_at_x(func, *x, argnums=argnums, **options)(v)``."""

    def ihvp_func(x: Sequence[Any], v: Tensor) -> Tensor:
        return ihvp_at_x(func, *x, argnums=argnums, **options)(v)

    return ihvp_func


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
    check_mode(mode)

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
    objective, theta = flat_objective(func, x, argnums)
    return _at_x(x, argnums, regularized(hvp_operator(objective, theta, mode), regularization))


# --------------------------------------------------------------------------------------------
# Explicit
# --------------------------------------------------------------------------------------------
def ihvp_explicit(
    func: Callable[..., Tensor], argnums: int = 0, regularization: float = 0.0
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """IHVP by materialising the ``d x d`` Hessian and solving; exact, for small ``d``."""
    return _with_inputs(ihvp_at_x_explicit, func, argnums, regularization=regularization)


def ihvp_at_x_explicit(
    func: Callable[..., Tensor], *x: Any, argnums: int = 0, regularization: float = 0.0
) -> Callable[[Tensor], Tensor]:
    """IHVP at fixed inputs: the Hessian is built and kept once."""
    objective, theta = flat_objective(func, x, argnums)
    hessian = torch.func.hessian(objective)(theta)
    check_finite_solution(hessian, "the Hessian", "Check the loss and the weights at these "
                          "inputs (half-precision models overflow; use float32).")
    return _at_x(x, argnums, lambda vb: solve_explicit(hessian, vb, regularization))


# --------------------------------------------------------------------------------------------
# Conjugate gradients
# --------------------------------------------------------------------------------------------
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
    check_mode(mode)
    return _with_inputs(ihvp_at_x_cg, func, argnums, max_iter=max_iter, tol=tol, mode=mode,
                        regularization=regularization, block=block)


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
    objective, theta = flat_objective(func, x, argnums)
    op = regularized(hvp_operator(objective, theta, mode), regularization)
    solver = block_cg if block else batched_cg

    def solve(vb: Tensor) -> Tensor:
        return check_finite_solution(solver(op, vb, max_iter=max_iter, tol=tol), "CG", CG_FIX)

    return _at_x(x, argnums, solve)


# --------------------------------------------------------------------------------------------
# LiSSA: mini-batches sampled from the arguments, as dattri does
# --------------------------------------------------------------------------------------------
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
        objective, theta = flat_objective(func, call, argnums)
        return hvp_operator(objective, theta, mode)

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
    check_mode(mode)
    options = dict(argnums=argnums, batch_size=batch_size, num_repeat=num_repeat,
                   recursion_depth=recursion_depth, damping=damping, scaling=scaling,
                   collate_fn=collate_fn, mode=mode, seed=seed)

    # Not _with_inputs: dattri's call form also takes in_dims with each call.
    def ihvp_func(x: Sequence[Any], v: Tensor,
                  in_dims: Sequence[int | None] | None = None) -> Tensor:
        return ihvp_at_x_lissa(func, *x, in_dims=in_dims, **options)(v)

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
    check_mode(mode)
    _lissa_in_dims(x, argnums, in_dims)  # fail at construction, not at the first call

    def solve(vb: Tensor) -> Tensor:
        sampler = _lissa_batch_sampler(func, x, argnums, batch_size, mode, collate_fn, seed,
                                       in_dims)
        return lissa_recursion(sampler, vb, recursion_depth, num_repeat, damping, scaling)

    return _at_x(x, argnums, solve)


# --------------------------------------------------------------------------------------------
# Arnoldi
# --------------------------------------------------------------------------------------------
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
    check_mode(mode)
    return _with_inputs(ihvp_at_x_arnoldi, func, argnums, max_iter=max_iter, tol=tol, mode=mode,
                        regularization=regularization, top_k=top_k,
                        norm_constant=norm_constant, seed=seed)


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
    objective, theta = flat_objective(func, x, argnums)
    op = hvp_operator(objective, theta, mode)
    evals, evecs = arnoldi_eigen(
        lambda v: op(v) / norm_constant, theta.numel(), max_iter=max_iter, top_k=top_k,
        tol=tol, seed=seed, dtype=theta.dtype, device=theta.device,
    )
    evals = evals * norm_constant
    check_eigenvalues(evals, regularization, "top_k")
    return _at_x(x, argnums, lambda vb: arnoldi_solve(evals, evecs, vb, regularization))
