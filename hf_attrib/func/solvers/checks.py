"""No NaN or inf leaves a solver: the checks every inverse-HVP runs on its result.

``check_finite_solution`` refuses a result with NaN/inf rows, ``check_eigenvalues`` the
eigenvalues an eigen-solver would divide by when they are zero or not finite; both name the
option that fixes it, with a value (``round_up`` keeps that value readable).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_eigenvalues", "check_finite_solution", "round_up"]

# An eigenvalue (plus regularization) counts as zero below this many ulps of the largest one:
# HVPs in float32 resolve eigenvalues down to ~1e-6 of the top one, and a Krylov run returns
# a null direction as an eigenvalue of that size, whose inverse is round-off, not curvature.
_ZERO_EIGEN_ULPS = 1000


def round_up(value: float) -> float:
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
        suggestion = round_up(1e-3 * top) if top > 0 else 1e-3
        raise ValueError(
            f"{count} of the {values.numel()} Hessian eigenvalues kept are zero after adding "
            f"regularization={regularization:g} (|eigenvalue + regularization| <= {cutoff:.2g}, "
            f"round-off next to the top eigenvalue {top:.3g}), so (H + regularization * I)^-1 "
            f"is infinite along them. Pass regularization > 0 (e.g. regularization="
            f"{suggestion:g}, 1e-3 x the top eigenvalue), or keep fewer eigenpairs "
            f"({keep_option} <= {values.numel() - count})."
        )


# --------------------------------------------------------------------------------------------
