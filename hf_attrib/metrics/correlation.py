"""Correlation of attribution scores with ground truth from retrained models: LDS and LOO.

Sign convention shared by every metric here: ``score`` is a ``[n_train, n_test]`` tensor and
``score[i, j]`` estimates how much *including* training example ``i`` *raises* the target
(e.g. the loss or a margin) on test example ``j``. Scores are treated as additive, so
``score[S, j].sum()`` predicts the target of a model trained on the subset ``S``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hf_attrib.metrics.bootstrap import bootstrap_mean_ci, check_level
from hf_attrib.metrics.result import MetricResult
from hf_attrib.metrics.stats import correlation_pvalue, pearson, spearman

__all__ = ["lds", "loo_corr", "subset_mask"]

_SAME_SET = "the scores and the ground truth must come from the same training set"


def _as_score(score: Tensor) -> Tensor:
    score = torch.as_tensor(score).detach()
    if score.dim() != 2:
        raise ValueError(
            f"score must be a 2-D [n_train, n_test] tensor, got shape {tuple(score.shape)}; "
            "for a single test example use score[:, None]."
        )
    device = score.device if score.device.type != "mps" else torch.device("cpu")
    return score.to(device=device, dtype=torch.float64)


def _unpack(ground_truth: Sequence[Tensor], sizes: tuple[int, ...], what: str) -> list[Tensor]:
    if isinstance(ground_truth, Tensor) or len(ground_truth) not in sizes:
        raise ValueError(f"ground_truth must be a tuple {what}.")
    return [torch.as_tensor(t).detach() for t in ground_truth]


def _check_targets(values: Tensor, n_test: int, name: str, device: torch.device) -> Tensor:
    if values.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D [n_models, n_test] tensor, got shape {tuple(values.shape)}."
        )
    if values.shape[1] != n_test:
        raise ValueError(
            f"ground truth has {values.shape[1]} test examples but the score has {n_test} "
            f"columns: the scores and the ground truth must be for the same test set."
        )
    return values.to(device=device, dtype=torch.float64)


def _check_indices(indices: Tensor, n_train: int, name: str) -> None:
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= n_train:
        raise ValueError(
            f"{name} must lie in [0, {n_train}), got values from {low} to {high}: the score has "
            f"{n_train} rows and {_SAME_SET}."
        )


def subset_mask(subsets: Tensor, n_train: int) -> Tensor:
    """Turn subsets given as a mask or as index rows into a ``[m, n_train]`` count matrix.

    Args:
        subsets: a boolean (or 0/1) mask ``[m, n_train]``, or an integer tensor
            ``[m, subset_size]`` of training indices per subset (an index repeated in a row is
            counted that many times). An integer ``[m, n_train]`` tensor holding only 0s and 1s
            is read as a mask.
        n_train: the number of training examples (rows of the score).

    Returns:
        A float64 ``[m, n_train]`` tensor whose row ``k`` counts how often each training
        example is in subset ``k``.
    """
    subsets = torch.as_tensor(subsets)
    if subsets.dim() != 2:
        raise ValueError(
            "subsets must be a 2-D boolean mask [n_models, n_train] or an integer index tensor "
            f"[n_models, subset_size], got shape {tuple(subsets.shape)}."
        )
    is_binary = bool(((subsets == 0) | (subsets == 1)).all())
    as_mask = subsets.dtype == torch.bool or subsets.is_floating_point()
    as_mask = as_mask or (subsets.shape[1] == n_train and is_binary and n_train > 2)
    if as_mask:
        if subsets.shape[1] != n_train:
            raise ValueError(
                f"ground truth has {subsets.shape[1]} training examples but the score has "
                f"{n_train} rows: {_SAME_SET}."
            )
        if not is_binary:
            raise ValueError("a floating-point subset mask must hold only 0s and 1s.")
        return subsets.to(torch.float64)
    _check_indices(subsets, n_train, "subset indices")
    counts = torch.zeros(subsets.shape[0], n_train, dtype=torch.float64, device=subsets.device)
    return counts.scatter_add_(1, subsets.long(), torch.ones_like(subsets, dtype=torch.float64))


def _result(per_example: Tensor, n_obs: int, ci: float | None, n_boot: int,
            seed: int) -> MetricResult:
    per_example = per_example.cpu()
    mean = float(per_example.nanmean()) if per_example.numel() else float("nan")
    interval = None
    if ci is not None:
        interval = bootstrap_mean_ci(per_example, check_level(ci), n_boot=n_boot, seed=seed)
    return MetricResult(per_example=per_example, mean=mean, ci=interval,
                        pvalue=correlation_pvalue(per_example, n_obs))


def lds(
    score: Tensor,
    ground_truth: Sequence[Tensor],
    *,
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> MetricResult:
    """Linear datamodeling score (Park et al. 2023, TRAK).

    For each test example ``j``, the Spearman rank correlation over the ``m`` retrained models
    between the predicted target ``score[S_k, j].sum()`` and the measured target
    ``target_values[k, j]`` of the model trained on subset ``S_k``.

    Args:
        score: ``[n_train, n_test]`` attribution scores (positive = including the example
            raises the target).
        ground_truth: ``(target_values, subsets)``: ``target_values`` is ``[m, n_test]``, the
            target of each of ``m`` models on each test example; ``subsets`` is a boolean/0-1
            mask ``[m, n_train]`` or an integer index tensor ``[m, subset_size]`` of the
            training examples each model was trained on.
        ci: confidence level (e.g. ``0.95``) of a percentile-bootstrap interval of the mean over
            test examples; ``None`` for no interval.
        n_boot: number of bootstrap resamples.
        seed: seed of the bootstrap resampling.

    Returns:
        A :class:`MetricResult`: per-test-example correlations (NaN where a column is
        constant), their ``nanmean``, the optional interval and the p-values. It unpacks as
        dattri's ``(correlations, p-values)``: ``lds_corr, lds_pval = lds(score, gt)``.
    """
    score = _as_score(score)
    n_train, n_test = score.shape
    target_values, subsets = _unpack(ground_truth, (2,), "(target_values, subsets)")
    target_values = _check_targets(target_values, n_test, "target_values", score.device)
    counts = subset_mask(subsets, n_train).to(score.device)
    if counts.shape[0] != target_values.shape[0]:
        raise ValueError(
            f"ground truth has {target_values.shape[0]} models' target values but "
            f"{counts.shape[0]} subsets; there must be one subset per model."
        )
    if counts.shape[0] < 2:
        raise ValueError(f"LDS needs at least 2 retrained models, got {counts.shape[0]}.")
    predicted = counts @ score  # [m, n_test]
    return _result(spearman(predicted, target_values), counts.shape[0], ci, n_boot, seed)


def loo_corr(
    score: Tensor,
    ground_truth: Sequence[Tensor],
    *,
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> MetricResult:
    """Pearson correlation of scores with leave-one-out retraining effects.

    The actual effect of including training example ``i`` on test example ``j`` is
    ``full_values[j] - loo_values[r, j]`` for ``i = removed_indices[r]``. Pearson correlation is
    shift-invariant per test column, so ``full_values`` is optional: without it the scores are
    correlated with ``-loo_values``, which gives the same number.

    Args:
        score: ``[n_train, n_test]`` attribution scores (positive = including the example
            raises the target).
        ground_truth: ``(loo_values, removed_indices)`` or
            ``(loo_values, removed_indices, full_values)``: ``loo_values`` is ``[k, n_test]``,
            the target of the model trained without ``removed_indices[r]`` (``[k]`` integer
            indices into the training set); ``full_values`` is ``[n_test]``, the target of the
            model trained on everything.
        ci: confidence level (e.g. ``0.95``) of a percentile-bootstrap interval of the mean over
            test examples; ``None`` for no interval.
        n_boot: number of bootstrap resamples.
        seed: seed of the bootstrap resampling.

    Returns:
        A :class:`MetricResult`: per-test-example correlations (NaN where a column is
        constant), their ``nanmean``, the optional interval and the p-values. It unpacks as
        dattri's ``(correlations, p-values)``: ``corr, pval = loo_corr(score, gt)``.
    """
    score = _as_score(score)
    n_train, n_test = score.shape
    parts = _unpack(
        ground_truth,
        (2, 3),
        "(loo_values, removed_indices) or (loo_values, removed_indices, full_values)",
    )
    loo_values = _check_targets(parts[0], n_test, "loo_values", score.device)
    removed = parts[1].reshape(-1) if parts[1].dim() == 0 else parts[1]
    if removed.dim() != 1 or removed.is_floating_point() or removed.dtype == torch.bool:
        raise ValueError(
            "removed_indices must be a 1-D integer tensor of training indices, got "
            f"dtype {removed.dtype} and shape {tuple(removed.shape)}."
        )
    if removed.numel() != loo_values.shape[0]:
        raise ValueError(
            f"ground truth has {loo_values.shape[0]} leave-one-out models but "
            f"{removed.numel()} removed indices; there must be one removed index per model."
        )
    if removed.numel() < 2:
        raise ValueError(f"loo_corr needs at least 2 leave-one-out models, got {removed.numel()}.")
    _check_indices(removed, n_train, "removed_indices")
    effect = -loo_values
    if len(parts) == 3:
        full = parts[2].to(device=score.device, dtype=torch.float64).reshape(-1)
        if full.numel() != n_test:
            raise ValueError(
                f"full_values has {full.numel()} entries but the score has {n_test} columns; "
                "it must hold one target value per test example."
            )
        effect = full + effect
    predicted = score[removed.to(score.device).long()]
    return _result(pearson(predicted, effect), removed.numel(), ci, n_boot, seed)
