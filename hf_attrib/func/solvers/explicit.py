"""The explicit solve: ``(H + lambda I)^{-1} V`` from a materialised ``d x d`` Hessian, and
the in-place steps that keep a big explicit Hessian at one copy of the matrix in memory
(``symmetrize_``, ``eigh_``)."""

from __future__ import annotations

import torch
from torch import Tensor

from hf_attrib.func.solvers.checks import check_finite_solution

__all__ = ["EXPLICIT_FIX", "eigh_", "solve_explicit", "symmetrize_"]

# Side of the square blocks symmetrize_ averages at a time (8 MiB of float64 scratch).
_SYM_BLOCK = 1024

# What to do when the explicit solve returns NaN/inf (see check_finite_solution).
EXPLICIT_FIX = ("H + regularization * I is (nearly) singular or the Hessian is not finite: pass "
                "regularization > 0, and check the loss and weights.")


def solve_explicit(hessian: Tensor, vb: Tensor, regularization: float) -> Tensor:
    """Solve ``(hessian + regularization * I) X^T = vb^T`` (in float64, returned in ``vb``'s dtype).

    Args:
        hessian: the ``[d, d]`` Hessian.
        vb: right-hand sides ``[k, d]``.
        regularization: the ``lambda`` added to the diagonal.

    Raises:
        ValueError: the system is singular.
        FloatingPointError: the solution is not finite.
    """
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
    return check_finite_solution(out, "the explicit inverse-HVP", EXPLICIT_FIX).to(vb.dtype)


def symmetrize_(matrix: Tensor, block: int = _SYM_BLOCK) -> Tensor:
    """``matrix <- (matrix + matrix^T) / 2`` in place, one pair of ``block x block`` tiles at a
    time, so the only extra memory is one tile (not a second ``d x d`` matrix).

    Returns:
        ``matrix`` itself.
    """
    d = matrix.shape[0]
    if matrix.dim() != 2 or matrix.shape[1] != d:
        raise ValueError(f"symmetrize_ needs a square matrix, got shape {tuple(matrix.shape)}.")
    for i in range(0, d, block):
        rows = slice(i, min(i + block, d))
        diag = matrix[rows, rows]
        diag.add_(diag.T.clone()).mul_(0.5)  # the clone: a tile cannot be added to its own view
        for j in range(i + block, d, block):
            cols = slice(j, min(j + block, d))
            upper, lower = matrix[rows, cols], matrix[cols, rows]
            upper.add_(lower.T).mul_(0.5)  # distinct memory: no aliasing
            lower.copy_(upper.T)
    return matrix


def _scipy_eigh(matrix: Tensor, in_place: bool) -> tuple[Tensor, Tensor] | None:
    """LAPACK through SciPy on ``matrix``'s own memory (destroyed), or ``None`` without SciPy.

    ``in_place``: ``dsyev`` (QR iteration), whose eigenvectors overwrite the matrix and whose
    workspace is ``O(d)``: peak one matrix, ~4x slower. Otherwise ``dsyevr`` (MRRR, the
    fastest here): the matrix is its workspace and the eigenvectors a second ``d x d``.
    """
    try:
        import scipy.linalg  # optional here: a dev/bench dependency, not a core one
    except ImportError:
        return None
    # The transpose of a C-ordered symmetric matrix is the same matrix in Fortran order:
    # LAPACK then works on this memory instead of a copy.
    array = matrix.detach().numpy().T
    values, vectors = scipy.linalg.eigh(array, overwrite_a=True, check_finite=False,
                                        driver="ev" if in_place else "evr")
    return torch.from_numpy(values), torch.from_numpy(vectors)


def eigh_(matrix: Tensor, max_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric ``matrix`` whose memory it may destroy, within a budget.

    On CPU with SciPy: when ``2 x`` the matrix fits in ``max_bytes`` (``None``: no limit), the
    fast ``dsyevr`` (peak: two matrices); otherwise ``dsyev`` in place (peak: one matrix plus
    ``O(d)``; about 4x slower). Elsewhere (CUDA, or no SciPy) ``torch.linalg.eigh`` (peak: about
    four matrices on CPU).

    Returns:
        ``(eigenvalues [d] ascending, eigenvectors [d, d] as columns)``, in ``matrix``'s dtype;
        the eigenvectors may be a (non-contiguous) view of ``matrix``'s memory.
    """
    fits_two = max_bytes is None or 2 * matrix.numel() * matrix.element_size() <= max_bytes
    if matrix.device.type == "cpu" and matrix.dtype in (torch.float32, torch.float64):
        result = _scipy_eigh(matrix, in_place=not fits_two)
        if result is not None:
            return result
    return torch.linalg.eigh(matrix)
