r"""Conjugate gradients on a matvec: ``batched_cg`` (one recursion per right-hand side, all
advanced by one batched product per iteration) and ``block_cg`` (one shared Krylov space).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from hf_attrib.func.hvp_engine import MatVec

__all__ = ["CG_FIX", "batched_cg", "block_cg"]

# What to do when a CG solve returns NaN/inf (see check_finite_solution).
CG_FIX = ("The Hessian-vector products overflowed or are NaN: check the loss and the weights "
          "(half-precision HVPs overflow; use float32), and pass regularization > 0 when "
          "H is singular or indefinite.")


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
