"""Column-wise rank and correlation helpers in torch (float64).

Every function here works on the columns of ``[m, n]`` tensors: column ``j`` of ``x`` is paired
with column ``j`` of ``y``, and the result has one entry per column. They follow
``scipy.stats`` conventions (average ranks for ties, NaN for a constant column or one that
contains NaN) without depending on scipy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["correlation_pvalue", "pearson", "rankdata", "spearman"]


def _as_columns(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x).detach()
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 1-D or 2-D [m, n] tensor, got shape {tuple(x.shape)}.")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}.")
    device = x.device if x.device.type != "mps" else torch.device("cpu")  # mps has no float64
    return x.to(device=device, dtype=torch.float64)


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = _as_columns(x, "x"), _as_columns(y, "y")
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same [m, n] shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.shape[0] < 2:
        raise ValueError(f"a correlation needs at least 2 rows (observations), got {x.shape[0]}.")
    return x, y.to(x.device)


def rankdata(x: Tensor) -> Tensor:
    """Rank each column of ``x`` from 1 to ``m``, giving tied values their average rank.

    Matches ``scipy.stats.rankdata(x, axis=0)`` (method ``"average"``). NaNs rank after every
    number, each as its own value; callers that need NaN propagation check for NaNs themselves.

    Args:
        x: a ``[m]`` or ``[m, n]`` tensor.

    Returns:
        A float64 tensor of ranks with the shape of ``x``.
    """
    x_in = torch.as_tensor(x)
    cols = _as_columns(x_in, "x")
    m, n = cols.shape
    if m == 0:
        return cols.reshape(x_in.shape)
    values, order = torch.sort(cols, dim=0, stable=True)
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[1:] = values[1:] != values[:-1]
    group = torch.cumsum(new_group.long(), dim=0) - 1  # 0-based group id within each column
    flat_group = (group + torch.arange(n, device=cols.device) * m).reshape(-1)
    positions = torch.arange(m, dtype=torch.float64, device=cols.device).unsqueeze(1).expand(m, n)
    sums = torch.zeros(m * n, dtype=torch.float64, device=cols.device)
    counts = torch.zeros_like(sums)
    sums.scatter_add_(0, flat_group, positions.reshape(-1))
    counts.scatter_add_(0, flat_group, torch.ones_like(positions).reshape(-1))
    sorted_ranks = (sums[flat_group] / counts[flat_group] + 1.0).reshape(m, n)
    ranks = torch.empty_like(sorted_ranks).scatter_(0, order, sorted_ranks)
    return ranks.reshape(x_in.shape)


def _pearson_columns(x: Tensor, y: Tensor) -> Tensor:
    constant = (x.amax(0) == x.amin(0)) | (y.amax(0) == y.amin(0))
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    # Scale each column first so that huge or tiny values neither overflow nor underflow.
    xc = xc / xc.abs().amax(0).clamp_min(torch.finfo(torch.float64).tiny)
    yc = yc / yc.abs().amax(0).clamp_min(torch.finfo(torch.float64).tiny)
    r = (xc * yc).sum(0) / torch.sqrt((xc * xc).sum(0) * (yc * yc).sum(0))
    r = r.clamp(-1.0, 1.0)
    has_nan = torch.isnan(x).any(0) | torch.isnan(y).any(0)
    return torch.where(constant | has_nan, torch.full_like(r, float("nan")), r)


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation between matching columns of ``x`` and ``y``.

    Args:
        x: a ``[m]`` or ``[m, n]`` tensor (``m`` observations of ``n`` variables).
        y: a tensor of the same shape.

    Returns:
        A float64 tensor of ``n`` correlations (a 0-d tensor for 1-D inputs); NaN where a column
        of either input is constant or contains NaN, as ``scipy.stats.pearsonr`` gives.
    """
    squeeze = torch.as_tensor(x).dim() == 1
    x, y = _check_pair(x, y)
    r = _pearson_columns(x, y)
    return r[0] if squeeze else r


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman rank correlation between matching columns of ``x`` and ``y``.

    The Pearson correlation of the average ranks, exactly as ``scipy.stats.spearmanr`` computes
    it (ties get their average rank).

    Args:
        x: a ``[m]`` or ``[m, n]`` tensor (``m`` observations of ``n`` variables).
        y: a tensor of the same shape.

    Returns:
        A float64 tensor of ``n`` correlations (a 0-d tensor for 1-D inputs); NaN where a column
        of either input is constant or contains NaN.
    """
    squeeze = torch.as_tensor(x).dim() == 1
    x, y = _check_pair(x, y)
    has_nan = torch.isnan(x).any(0) | torch.isnan(y).any(0)
    r = _pearson_columns(rankdata(x), rankdata(y))
    r = torch.where(has_nan, torch.full_like(r, float("nan")), r)
    return r[0] if squeeze else r


def _betainc(a: Tensor, b: Tensor, x: Tensor, y: Tensor, max_iter: int = 10_000) -> Tensor:
    """Regularised incomplete beta function ``I_x(a, b)`` (float64, elementwise), given
    ``y = 1 - x`` computed without cancellation.

    Lentz's continued fraction, evaluated where it converges fast (``x < (a + 1) / (a + b +
    2)``) and through ``I_x(a, b) = 1 - I_{1-x}(b, a)`` elsewhere; it needs about
    ``sqrt(max(a, b))`` terms, so a few hundred even for 10^5 observations.
    """
    tiny, eps = 1e-300, 1e-15
    swap = x > (a + 1) / (a + b + 2)
    a, b = torch.where(swap, b, a), torch.where(swap, a, b)
    x, y = torch.where(swap, y, x), torch.where(swap, x, y)
    log_front = (a * torch.log(x) + b * torch.log(y) + torch.lgamma(a + b) - torch.lgamma(a)
                 - torch.lgamma(b))
    c = torch.ones_like(x)
    d = 1 - (a + b) * x / (a + 1)
    d = 1 / torch.where(d.abs() < tiny, tiny, d)
    h = d.clone()
    for m in range(1, max_iter + 1):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + aa * d
            d = 1 / torch.where(d.abs() < tiny, tiny, d)
            c = 1 + aa / c
            c = torch.where(c.abs() < tiny, tiny, c)
            step = d * c
            h = h * step
        if bool(((step - 1).abs() < eps).all()):
            break
    value = torch.exp(log_front) * h / a
    return torch.where(swap, 1 - value, value)


def correlation_pvalue(r: Tensor, n: int) -> Tensor:
    """Two-sided p-values of correlations ``r`` computed from ``n`` observations each.

    The test of ``scipy.stats.pearsonr`` (exact under normality) and ``spearmanr`` (its
    t-approximation): ``t = r sqrt((n - 2) / (1 - r^2))`` on ``n - 2`` degrees of freedom,
    ``p = I_{1 - r^2}((n - 2) / 2, 1 / 2)``. NaN where ``r`` is NaN; 1 when ``n <= 2`` (two
    points always lie on a line).

    Args:
        r: correlations, any shape.
        n: number of observations behind each.

    Returns:
        A float64 tensor shaped like ``r``.
    """
    r = torch.as_tensor(r, dtype=torch.float64)
    if n <= 2:
        return torch.where(torch.isnan(r), r, torch.ones_like(r))
    r2 = (r * r).clamp(0.0, 1.0)
    x = ((1 - r) * (1 + r)).clamp(0.0, 1.0)  # 1 - r^2, accurate near |r| = 1
    half_df = torch.full_like(x, (n - 2) / 2)
    tiny = math.ulp(0.0)  # keep the logs finite; the exact ends are set below
    p = _betainc(half_df, torch.full_like(x, 0.5), x.clamp_min(tiny), r2.clamp_min(tiny))
    p = p.clamp(0.0, 1.0)
    p = torch.where(x <= 0, torch.zeros_like(p), torch.where(x >= 1, torch.ones_like(p), p))
    return torch.where(torch.isnan(r), r, p)
