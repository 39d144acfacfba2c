"""The result type shared by the per-test-example metrics (LDS, LOO correlation)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["LDSResult", "MetricResult"]


@dataclass(frozen=True)
class MetricResult:
    """A metric computed per test example, with its mean and an optional bootstrap interval.

    Attributes:
        per_example: ``[n_test]`` float64 tensor, NaN where the metric is undefined for that test
            example (e.g. a constant column, for which no correlation exists).
        mean: the mean of ``per_example`` over the examples where it is defined (``nanmean``).
        ci: ``(low, high)`` percentile-bootstrap confidence interval of ``mean`` over test
            examples, or ``None`` when no interval was asked for.
    """

    per_example: Tensor
    mean: float
    ci: tuple[float, float] | None = None

    def __float__(self) -> float:
        return self.mean


LDSResult = MetricResult
"""Alias of :class:`MetricResult`, the type returned by ``lds`` and ``loo_corr``."""
