"""Percentile-bootstrap confidence intervals."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["bootstrap_mean_ci", "check_level", "percentile_interval"]


def check_level(level: float) -> float:
    """Validate a confidence level such as ``0.95`` and return it as a float."""
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"ci must be a confidence level strictly between 0 and 1, got {level}.")
    return level


def percentile_interval(statistics: Tensor, level: float) -> tuple[float, float]:
    """The ``(low, high)`` percentiles of bootstrap ``statistics`` enclosing ``level`` of them.

    Uses linear interpolation between order statistics, like ``numpy.percentile``.
    """
    level = check_level(level)
    alpha = (1.0 - level) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64, device=statistics.device)
    low, high = torch.quantile(statistics.to(torch.float64), q).tolist()
    return low, high


def bootstrap_mean_ci(
    values: Tensor, level: float = 0.95, *, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values``.

    NaN entries (examples where the metric is undefined) are dropped first, so the interval is
    the one of the ``nanmean``. Resampling uses its own ``torch.Generator`` seeded with ``seed``,
    so the result is deterministic and the global RNG is untouched.

    Args:
        values: a 1-D tensor of per-example values.
        level: confidence level, e.g. ``0.95``.
        n_boot: number of bootstrap resamples.
        seed: seed of the resampling generator.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no value is defined.
    """
    level = check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive number of resamples, got {n_boot}.")
    values = torch.as_tensor(values).reshape(-1).to(device="cpu", dtype=torch.float64)
    values = values[~torch.isnan(values)]
    n = values.numel()
    if n == 0:
        return math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(n_boot, dtype=torch.float64)
    chunk = max(1, 2**22 // n)  # bound the [chunk, n] index matrix to a few million entries
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        idx = torch.randint(n, (size, n), generator=generator)
        means[start : start + size] = values[idx].mean(1)
    return percentile_interval(means, level)
