r"""Arnoldi on a matvec (Schioppa et al., 2022): the top eigenpairs of a symmetric operator
(``arnoldi_eigen``) and the inverse on their span (``arnoldi_solve``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hf_attrib.func.hvp_engine import MatVec

__all__ = ["arnoldi_eigen", "arnoldi_solve"]


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


def arnoldi_solve(evals: Tensor, evecs: Tensor, vb: Tensor, regularization: float) -> Tensor:
    """``V diag(1 / (evals + regularization)) V^T`` applied to the rows of ``vb``.

    Args:
        evals: eigenvalues ``[m]``, e.g. from :func:`arnoldi_eigen`.
        evecs: eigenvectors ``[m, d]`` as rows.
        vb: right-hand sides ``[k, d]``.
        regularization: the ``lambda`` added to each eigenvalue.
    """
    coeff = vb @ evecs.T  # [k, top_k]
    return (coeff / (evals + regularization)) @ evecs
