"""Mislabeled-example detection from self-influence scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
from torch import Tensor

from hf_attrib.metrics.bootstrap import check_level, percentile_interval
from hf_attrib.metrics.result import AUCResult
from hf_attrib.metrics.stats import rankdata

__all__ = ["mislabel_detection_auc", "mislabel_detection_curve", "roc_curve"]


def _prepare(
    self_score: Tensor, noisy: Tensor | Sequence[int], n_train: int | None
) -> tuple[Tensor, Tensor]:
    """Return the float64 ``[n]`` scores and the boolean ``[n]`` noisy mask."""
    score = torch.as_tensor(self_score)
    if score.dim() == 2 and 1 in score.shape:
        score = score.reshape(-1)
    if score.dim() != 1:
        raise ValueError(
            f"self_score must be a 1-D [n_train] tensor, got shape {tuple(score.shape)}."
        )
    score = score.detach().to(device="cpu", dtype=torch.float64)
    n = score.numel()
    if n_train is not None and n_train != n:
        raise ValueError(f"n_train is {n_train} but self_score has {n} entries.")
    if torch.isnan(score).any():
        raise ValueError("self_score contains NaN.")
    noisy = torch.as_tensor(noisy).detach().cpu()
    if _is_mask(noisy, n):  # dattri's form: a 0/1 tensor, one entry per example
        noisy = noisy.bool()
    if noisy.dtype == torch.bool:
        if noisy.shape != (n,):
            raise ValueError(
                f"a noisy mask must have one entry per training example ({n}), got shape "
                f"{tuple(noisy.shape)}."
            )
        mask = noisy
    else:
        if noisy.numel() == 0:
            noisy = noisy.long()
        if noisy.is_floating_point() or noisy.dim() > 1:
            raise ValueError(
                "noisy must be a boolean or 0/1 mask with one entry per training example, or a "
                "1-D list/tensor of integer training indices."
            )
        noisy = noisy.reshape(-1).long()
        if noisy.numel() and (int(noisy.min()) < 0 or int(noisy.max()) >= n):
            raise ValueError(f"noisy indices must lie in [0, {n}), the rows of self_score.")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[noisy] = True
    n_noisy = int(mask.sum())
    if n_noisy == 0 or n_noisy == n:
        which = "no" if n_noisy == 0 else "every"
        raise ValueError(
            f"{which} training example is marked noisy; detection AUC needs both noisy and clean "
            "examples."
        )
    return score, mask


def _is_mask(noisy: Tensor, n: int) -> bool:
    """Whether ``noisy`` is a 0/1 mask over the ``n`` examples rather than a list of indices.

    A float tensor always is (indices are integers); an integer one when it has ``n > 2``
    entries, all 0 or 1 (as indices they would repeat, which no list of noisy examples does).
    """
    if noisy.dtype == torch.bool or noisy.dim() != 1 or noisy.numel() == 0:
        return False
    binary = bool(((noisy == 0) | (noisy == 1)).all())
    if noisy.is_floating_point():
        return binary and noisy.numel() == n
    return binary and noisy.numel() == n and n > 2


def roc_curve(score: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ROC curve of ``score`` against the boolean ``mask``, as ``sklearn.metrics.roc_curve``
    with ``drop_intermediate=False``: one point per distinct score, highest first, after
    ``(0, 0)`` at threshold ``inf``. Ties form one diagonal step, so the trapezoidal area under
    the curve is the average-rank AUC."""
    order = torch.sort(score, descending=True, stable=True).indices
    sorted_score, hits = score[order], mask[order].to(torch.float64)
    last_of_group = torch.ones_like(sorted_score, dtype=torch.bool)
    last_of_group[:-1] = sorted_score[1:] != sorted_score[:-1]
    tps = torch.cumsum(hits, 0)[last_of_group]
    fps = torch.cumsum(1 - hits, 0)[last_of_group]
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fps / fps[-1]])
    tpr = torch.cat([zero, tps / tps[-1]])
    inf = torch.full((1,), float("inf"), dtype=torch.float64)
    return fpr, tpr, torch.cat([inf, sorted_score[last_of_group]])


def _auc_columns(pos: Tensor, neg: Tensor) -> Tensor:
    """AUC per column from positive ``[p, b]`` and negative ``[q, b]`` scores (Mann-Whitney U)."""
    p, q = pos.shape[0], neg.shape[0]
    ranks = rankdata(torch.cat([pos, neg], dim=0))
    u = ranks[:p].sum(0) - p * (p + 1) / 2.0
    return u / (p * q)


def _counts(indices: Tensor, n: int) -> Tensor:
    """Row-wise multiplicities ``[b, n]`` of ``[b, k]`` resampled indices into ``range(n)``."""
    counts = torch.zeros(indices.shape[0], n, dtype=torch.float64)
    return counts.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float64))


@overload
def mislabel_detection_auc(
    self_score: Tensor,
    noisy: Tensor | Sequence[int],
    n_train: int | None = None,
    *,
    ci: None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> AUCResult: ...


@overload
def mislabel_detection_auc(
    self_score: Tensor,
    noisy: Tensor | Sequence[int],
    n_train: int | None = None,
    *,
    ci: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]: ...


def mislabel_detection_auc(
    self_score: Tensor,
    noisy: Tensor | Sequence[int],
    n_train: int | None = None,
    *,
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> AUCResult | tuple[float, tuple[float, float]]:
    """ROC AUC of detecting mislabeled training examples by their self-influence.

    A higher ``self_score`` means "more likely mislabeled". The AUC is the Mann-Whitney U
    statistic with average ranks for ties, equal to ``sklearn.metrics.roc_auc_score``.

    Args:
        self_score: ``[n_train]`` self-influence (or any suspiciousness) scores.
        noisy: the mislabeled examples, as a list/tensor of indices or a boolean or 0/1
            ``[n_train]`` mask (dattri's ``ground_truth``).
        n_train: optional number of training examples, checked against ``self_score``.
        ci: confidence level (e.g. ``0.95``) of a percentile-bootstrap interval, resampling
            noisy and clean examples separately; ``None`` for no interval.
        n_boot: number of bootstrap resamples.
        seed: seed of the bootstrap resampling.

    Returns:
        The AUC, or ``(auc, (low, high))`` when ``ci`` is given. Without ``ci`` the AUC is an
        :class:`AUCResult`: a float that also unpacks as dattri's return value,
        ``auc, (fpr, tpr, thresholds) = mislabel_detection_auc(score, noise_mask)`` (the ROC
        curve in ``sklearn.metrics.roc_curve``'s form, see :func:`roc_curve`).
    """
    score, mask = _prepare(self_score, noisy, n_train)
    pos, neg = score[mask], score[~mask]
    auc = float(_auc_columns(pos[:, None], neg[:, None])[0])
    if ci is None:
        return AUCResult(auc, roc_curve(score, mask))
    level = check_level(ci)
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive number of resamples, got {n_boot}.")
    # Resample noisy and clean examples separately, as multiplicities. Against the sorted clean
    # scores, a noisy example beats the clean ones before ``lo`` and ties those in [lo, hi), so
    # each resample's U statistic is a weighted sum that needs no new sort.
    neg_sorted = torch.sort(neg).values
    lo = torch.searchsorted(neg_sorted, pos, side="left")
    hi = torch.searchsorted(neg_sorted, pos, side="right")
    generator = torch.Generator().manual_seed(seed)
    p, q = pos.numel(), neg.numel()
    aucs = torch.empty(n_boot, dtype=torch.float64)
    chunk = max(1, 2**22 // (p + q))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        w = _counts(torch.randint(p, (size, p), generator=generator), p)
        v = _counts(torch.randint(q, (size, q), generator=generator), q)
        below = torch.cat([torch.zeros(size, 1, dtype=torch.float64), v.cumsum(1)], dim=1)
        wins = below[:, lo] + 0.5 * (below[:, hi] - below[:, lo])  # [size, p]
        aucs[start : start + size] = (w * wins).sum(1) / (p * q)
    return auc, percentile_interval(aucs, level)


def mislabel_detection_curve(
    self_score: Tensor, noisy: Tensor | Sequence[int], n_train: int | None = None
) -> tuple[Tensor, Tensor]:
    """Fraction of mislabeled examples found vs fraction of the training set inspected.

    Examples are inspected in decreasing order of ``self_score`` (ties in index order).

    Args:
        self_score: ``[n_train]`` self-influence (or any suspiciousness) scores.
        noisy: the mislabeled examples, as a list/tensor of indices or a boolean mask.
        n_train: optional number of training examples, checked against ``self_score``.

    Returns:
        ``(fraction_inspected, fraction_found)``, two float64 tensors of ``n_train + 1`` points
        from ``(0, 0)`` to ``(1, 1)``.
    """
    score, mask = _prepare(self_score, noisy, n_train)
    order = torch.sort(score, descending=True, stable=True).indices
    found = torch.cumsum(mask[order].to(torch.float64), 0) / mask.sum()
    zero = torch.zeros(1, dtype=torch.float64)
    inspected = torch.arange(score.numel() + 1, dtype=torch.float64) / score.numel()
    return inspected, torch.cat([zero, found])
