"""Tests of hf_attrib.metrics against scipy and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from hf_attrib.metrics import (
    LDSResult,
    MetricResult,
    bootstrap_mean_ci,
    lds,
    loo_corr,
    mislabel_detection_auc,
    mislabel_detection_curve,
    pearson,
    rankdata,
    spearman,
    subset_mask,
)


def _scipy_columns(fn, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    out = []
    for j in range(x.shape[1]):
        a, b = x[:, j].numpy(), y[:, j].numpy()
        if np.all(a == a[0]) or np.all(b == b[0]):
            out.append(np.nan)  # scipy warns and returns nan for a constant input
        else:
            out.append(fn(a, b)[0])
    return np.array(out)


def _assert_close_nan(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- helpers


def test_rankdata_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (30, 7), generator=g).double()
    np.testing.assert_allclose(rankdata(x).numpy(), stats.rankdata(x.numpy(), axis=0))
    v = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    np.testing.assert_allclose(rankdata(v).numpy(), stats.rankdata(v.numpy()))


def test_spearman_pearson_match_scipy():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 6, (25, 8), generator=g).double()  # many ties
    y = torch.randn(25, 8, generator=g, dtype=torch.float64) + 0.3 * x
    y[:, 2] = torch.randint(0, 3, (25,), generator=g).double()
    x[:, 5] = 4.0  # constant column -> nan
    _assert_close_nan(spearman(x, y), _scipy_columns(stats.spearmanr, x, y))
    _assert_close_nan(pearson(x, y), _scipy_columns(stats.pearsonr, x, y))
    assert math.isnan(float(spearman(x, y)[5])) and math.isnan(float(pearson(x, y)[5]))
    r = spearman(x[:, 0], y[:, 0])
    assert r.dim() == 0
    assert float(r) == pytest.approx(stats.spearmanr(x[:, 0], y[:, 0])[0], rel=1e-12)


def test_correlation_helpers_nan_and_shape_errors():
    x = torch.randn(10, 2, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    y[3, 1] = float("nan")
    assert math.isnan(float(spearman(x, y)[1])) and not math.isnan(float(spearman(x, y)[0]))
    assert math.isnan(float(pearson(x, y)[1]))
    with pytest.raises(ValueError, match="same"):
        pearson(x, y[:, :1])
    with pytest.raises(ValueError, match="at least 2"):
        spearman(x[:1], y[:1])


# --------------------------------------------------------------------------- LDS


def _lds_data(seed: int = 0, n_train: int = 40, n_test: int = 6, m: int = 30):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(n_train, n_test, generator=g)
    mask = torch.rand(m, n_train, generator=g) < 0.5
    targets = torch.randn(m, n_test, generator=g, dtype=torch.float64)
    return score, mask, targets


def _lds_reference(score, counts, targets) -> np.ndarray:
    predicted = counts.double() @ score.double()
    return _scipy_columns(stats.spearmanr, predicted, targets)


def test_lds_matches_scipy_with_mask_and_indices():
    score, mask, targets = _lds_data()
    expected = _lds_reference(score, mask, targets)
    result = lds(score, (targets, mask))
    assert isinstance(result, MetricResult) and LDSResult is MetricResult
    _assert_close_nan(result.per_example, expected)
    assert result.mean == pytest.approx(np.nanmean(expected), rel=1e-12)
    assert result.ci is None and float(result) == result.mean

    # the same subsets as integer index rows (fixed subset size, like the usual LDS setups)
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(40, generator=g)[:20] for _ in range(30)])
    counts = torch.zeros(30, 40).scatter_(1, idx, 1.0)
    expected = _lds_reference(score, counts, targets)
    _assert_close_nan(lds(score, (targets, idx)).per_example, expected)
    _assert_close_nan(lds(score, (targets, counts.bool())).per_example, expected)
    _assert_close_nan(lds(score, (targets, counts.long())).per_example, expected)  # 0/1 ints


def test_lds_ties_and_constant_column():
    score, mask, _ = _lds_data(seed=1)
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 3, (30, 6), generator=g).double()  # heavy ties
    targets[:, 4] = 1.0
    expected = _lds_reference(score, mask, targets)
    result = lds(score, (targets, mask))
    _assert_close_nan(result.per_example, expected)
    assert math.isnan(float(result.per_example[4]))
    assert result.mean == pytest.approx(np.nanmean(expected), rel=1e-12)


def test_lds_is_one_for_an_additive_model():
    """If targets are exactly additive in the training examples, the true scores give LDS 1."""
    g = torch.Generator().manual_seed(4)
    n_train, n_test, m = 50, 5, 40
    true_effect = torch.randn(n_train, n_test, generator=g, dtype=torch.float64)
    mask = torch.rand(m, n_train, generator=g) < 0.5
    bias = torch.randn(n_test, generator=g, dtype=torch.float64)
    targets = mask.double() @ true_effect + bias
    result = lds(true_effect, (targets, mask))
    np.testing.assert_allclose(result.per_example.numpy(), np.ones(n_test), rtol=1e-12)
    assert result.mean == pytest.approx(1.0)
    # any monotone distortion of the targets keeps Spearman at 1; flipping the sign gives -1
    assert lds(true_effect, (torch.exp(targets), mask)).mean == pytest.approx(1.0)
    assert lds(-true_effect, (targets, mask)).mean == pytest.approx(-1.0)


def test_lds_bootstrap_ci():
    g = torch.Generator().manual_seed(5)
    n_train, n_test, m = 60, 200, 20
    true_effect = torch.randn(n_train, n_test, generator=g, dtype=torch.float64)
    mask = torch.rand(m, n_train, generator=g) < 0.5
    targets = mask.double() @ true_effect + 3 * torch.randn(m, n_test, generator=g).double()
    a = lds(true_effect, (targets, mask), ci=0.95, n_boot=500, seed=7)
    b = lds(true_effect, (targets, mask), ci=0.95, n_boot=500, seed=7)
    assert a.ci is not None and a.ci == b.ci
    low, high = a.ci
    assert low < a.mean < high
    narrow = lds(true_effect, (targets, mask), ci=0.5, n_boot=500, seed=7).ci
    assert low <= narrow[0] < narrow[1] <= high
    assert lds(true_effect, (targets, mask), ci=0.95, n_boot=500, seed=8).ci != a.ci


def test_lds_shape_errors():
    score, mask, targets = _lds_data()
    with pytest.raises(ValueError, match="39 training examples but the score has 40 rows"):
        lds(score, (targets, mask[:, :39]))
    with pytest.raises(ValueError, match="must lie in"):
        lds(score, (targets, torch.full((30, 5), 40)))
    with pytest.raises(ValueError, match="5 test examples but the score has 6 columns"):
        lds(score, (targets[:, :5], mask))
    with pytest.raises(ValueError, match="one subset per model"):
        lds(score, (targets[:29], mask))
    with pytest.raises(ValueError, match="2-D"):
        lds(score[:, 0], (targets, mask))
    with pytest.raises(ValueError, match="tuple"):
        lds(score, (targets,))
    with pytest.raises(ValueError, match="between 0 and 1"):
        lds(score, (targets, mask), ci=95)


def test_subset_mask_counts_indices():
    idx = torch.tensor([[0, 2, 2], [1, 3, 4]])
    expected = torch.tensor([[1.0, 0, 2, 0, 0], [0, 1, 0, 1, 1]], dtype=torch.float64)
    assert torch.equal(subset_mask(idx, 5), expected)


# --------------------------------------------------------------------------- LOO


def test_loo_corr_matches_scipy_pearson():
    g = torch.Generator().manual_seed(6)
    n_train, n_test, k = 30, 5, 12
    score = torch.randn(n_train, n_test, generator=g)
    removed = torch.randperm(n_train, generator=g)[:k]
    full = torch.randn(n_test, generator=g, dtype=torch.float64)
    loo = full - 0.5 * score[removed].double() + torch.randn(k, n_test, generator=g).double()
    loo[:, 3] = 2.0  # constant column -> nan
    effect = full - loo
    expected = _scipy_columns(stats.pearsonr, score[removed].double(), effect)
    with_full = loo_corr(score, (loo, removed, full))
    without_full = loo_corr(score, (loo, removed))
    _assert_close_nan(with_full.per_example, expected)
    _assert_close_nan(without_full.per_example, expected)
    assert with_full.mean == pytest.approx(np.nanmean(expected), rel=1e-12)
    assert with_full.mean > 0  # the sign convention: removing a helpful example lowers the target
    ci = loo_corr(score, (loo, removed), ci=0.9, n_boot=200, seed=1).ci
    assert ci is not None and ci[0] <= with_full.mean <= ci[1]


def test_loo_corr_errors():
    score = torch.randn(10, 3)
    loo = torch.randn(4, 3)
    removed = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="one removed index per model"):
        loo_corr(score, (loo, removed[:3]))
    with pytest.raises(ValueError, match="must lie in"):
        loo_corr(score, (loo, torch.tensor([0, 1, 2, 10])))
    with pytest.raises(ValueError, match="2 test examples but the score has 3 columns"):
        loo_corr(score, (loo[:, :2], removed))
    with pytest.raises(ValueError, match="full_values"):
        loo_corr(score, (loo, removed, torch.zeros(4)))
    with pytest.raises(ValueError, match="tuple"):
        loo_corr(score, (loo, removed, torch.zeros(3), torch.zeros(3)))


# --------------------------------------------------------------------------- mislabel detection


def test_mislabel_auc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(8)
    n = 200
    noisy_mask = torch.rand(n, generator=g) < 0.2
    score = torch.randint(0, 10, (n,), generator=g).float() + 2 * noisy_mask.float()  # ties
    expected = roc_auc_score(noisy_mask.numpy(), score.numpy())
    assert mislabel_detection_auc(score, noisy_mask) == pytest.approx(expected, abs=1e-12)
    indices = torch.nonzero(noisy_mask).squeeze(1)
    assert mislabel_detection_auc(score, indices) == pytest.approx(expected, abs=1e-12)
    assert mislabel_detection_auc(score, indices.tolist(), n_train=n) == pytest.approx(
        expected, abs=1e-12
    )
    continuous = torch.randn(n, generator=g, dtype=torch.float64)
    assert mislabel_detection_auc(continuous, noisy_mask) == pytest.approx(
        roc_auc_score(noisy_mask.numpy(), continuous.numpy()), abs=1e-12
    )


def test_mislabel_auc_ci_and_errors():
    g = torch.Generator().manual_seed(9)
    noisy_mask = torch.rand(300, generator=g) < 0.1
    score = torch.randn(300, generator=g) + noisy_mask.float()
    auc, (low, high) = mislabel_detection_auc(score, noisy_mask, ci=0.95, n_boot=300, seed=2)
    assert low < auc < high
    assert mislabel_detection_auc(score, noisy_mask, ci=0.95, n_boot=300, seed=2) == (
        auc,
        (low, high),
    )
    separated = noisy_mask.double() + 0.1 * torch.rand(300, generator=g, dtype=torch.float64)
    assert mislabel_detection_auc(separated, noisy_mask, ci=0.9, n_boot=50) == (1.0, (1.0, 1.0))
    with pytest.raises(ValueError, match="every training example"):
        mislabel_detection_auc(score, torch.ones(300, dtype=torch.bool))
    with pytest.raises(ValueError, match="no training example"):
        mislabel_detection_auc(score, [])
    with pytest.raises(ValueError, match="n_train"):
        mislabel_detection_auc(score, [1, 2], n_train=299)
    with pytest.raises(ValueError, match="must lie in"):
        mislabel_detection_auc(score, [1, 300])
    with pytest.raises(ValueError, match="one entry per training example"):
        mislabel_detection_auc(score, noisy_mask[:10])


def test_mislabel_detection_curve():
    score = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.5])
    inspected, found = mislabel_detection_curve(score, [2, 3])
    np.testing.assert_allclose(inspected.numpy(), np.linspace(0, 1, 6))
    # inspection order: 0, 2, 4, 3, 1
    expected = torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
    assert torch.equal(found, expected)


def test_bootstrap_mean_ci_ignores_nan_and_is_deterministic():
    g = torch.Generator().manual_seed(10)
    values = torch.randn(100, generator=g, dtype=torch.float64)
    with_nan = torch.cat([values, torch.full((5,), float("nan"), dtype=torch.float64)])
    a = bootstrap_mean_ci(with_nan, 0.95, n_boot=400, seed=3)
    assert a == bootstrap_mean_ci(values, 0.95, n_boot=400, seed=3)
    assert a[0] < float(values.mean()) < a[1]
    assert all(math.isnan(v) for v in bootstrap_mean_ci(torch.tensor([float("nan")])))
