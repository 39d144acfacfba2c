r"""LiSSA on sampled mini-batch matvecs: the stochastic Neumann recursion of Agarwal et al.
(2017), stopped with a diagnosis (power-iteration eigenvalue estimates) when it diverges.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hf_attrib.func.hvp_engine import MatVec
from hf_attrib.func.solvers.checks import round_up

__all__ = ["lissa_recursion"]

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
    new_scaling = round_up(1.5 * max(top, scaling))
    text = (head + f"The recursion converges only when scaling ({scaling:g}) exceeds the largest "
            f"eigenvalue of the mini-batch Hessians, estimated at {top:.4g} by "
            f"{_POWER_ITERS} power iterations; pass scaling={new_scaling:g} or more")
    if bottom < 0 and damping * new_scaling <= -bottom:
        new_damping = round_up(1.5 * -bottom / new_scaling)
        text += (f". The Hessian also has negative curvature (eigenvalue about {bottom:.3g}), "
                 f"which only damping offsets: pass damping={new_damping:g} or more (so that "
                 "damping * scaling exceeds its magnitude; LiSSA then solves "
                 "H + damping * scaling * I)")
    return FloatingPointError(text + ".")
