"""The explicit solve: ``(H + lambda I)^{-1} V`` from a materialised ``d x d`` Hessian."""

from __future__ import annotations

import torch
from torch import Tensor

from hf_attrib.func.solvers.checks import check_finite_solution

__all__ = ["EXPLICIT_FIX", "solve_explicit"]

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
