"""The result types of the metrics: per-test-example correlations (LDS, LOO) and AUC.

Both unpack as dattri's return values, so ported code runs unchanged, and keep the richer
attributes of hf_attrib::

    corr, pval = lds(score, ground_truth)            # dattri's form
    result = lds(score, ground_truth, ci=0.95)       # result.mean, result.ci, result.per_example
    auc, (fpr, tpr, thresholds) = mislabel_detection_auc(self_score, noise_mask)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor

__all__ = ["AUCResult", "LDSResult", "MetricResult"]


class MetricResult(tuple):
    """A metric per test example: the pair ``(per_example, pvalue)`` with its mean and interval.

    It is a 2-tuple, so ``corr, pval = lds(...)`` unpacks as dattri's
    ``(correlations, p-values)``; the attributes below carry the rest. Immutable.

    Attributes:
        per_example: ``[n_test]`` float64 tensor, NaN where the metric is undefined for that test
            example (e.g. a constant column, for which no correlation exists). Item 0.
        pvalue: ``[n_test]`` float64 tensor of two-sided p-values of the correlations (the test
            of ``scipy.stats.spearmanr`` / ``pearsonr``), NaN where the correlation is. Item 1.
        mean: the mean of ``per_example`` over the examples where it is defined (``nanmean``).
        ci: ``(low, high)`` percentile-bootstrap confidence interval of ``mean`` over test
            examples, or ``None`` when no interval was asked for.
    """

    mean: float
    ci: tuple[float, float] | None

    def __new__(cls, per_example: Tensor, mean: float, ci: tuple[float, float] | None = None,
                pvalue: Tensor | None = None) -> MetricResult:
        self = super().__new__(cls, (per_example, pvalue))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "ci", ci)
        return self

    @property
    def per_example(self) -> Tensor:
        return self[0]

    @property
    def pvalue(self) -> Tensor | None:
        return self[1]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"MetricResult is immutable (cannot set {name!r}).")

    def __float__(self) -> float:
        return self.mean

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.per_example, self.mean, self.ci, self.pvalue))

    def __repr__(self) -> str:
        return (f"MetricResult(mean={self.mean!r}, ci={self.ci!r}, "
                f"per_example={self.per_example!r}, pvalue={self.pvalue!r})")


LDSResult = MetricResult
"""Alias of :class:`MetricResult`, the type returned by ``lds`` and ``loo_corr``."""


class AUCResult(float):
    """An AUC that also unpacks as dattri's ``(auc, (fpr, tpr, thresholds))``.

    It is the AUC itself (a ``float``: compare, format and store it as one); iterating it
    yields the AUC and its ROC curve, so ``auc, (fpr, tpr, thresholds) = result`` works as with
    dattri's ``mislabel_detection_auc``.

    Attributes:
        roc: ``(fpr, tpr, thresholds)``, float64 tensors as ``sklearn.metrics.roc_curve`` gives
            them (``drop_intermediate=False``): one point per distinct score, from ``(0, 0)``
            at threshold ``inf``; ``torch.trapezoid(tpr, fpr)`` equals the AUC.
    """

    roc: tuple[Tensor, Tensor, Tensor]

    def __new__(cls, auc: float, roc: tuple[Tensor, Tensor, Tensor]) -> AUCResult:
        self = super().__new__(cls, auc)
        self.roc = roc
        return self

    def __iter__(self) -> Iterator[Any]:
        return iter((self, self.roc))

    def item(self) -> float:
        """The AUC as a plain float (dattri returns a 0-d tensor; ``.item()`` keeps working)."""
        return float(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (float(self), self.roc))

    def __repr__(self) -> str:
        return float.__repr__(self)
