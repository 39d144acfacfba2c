"""Issue 11, item 8: dattri's call forms run unchanged and agree with hf_attrib's native API."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import yaml
from scipy import stats
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hf_attrib.model_utils as model_utils
from hf_attrib.func.hessian import ihvp_at_x_explicit, ihvp_at_x_lissa, ihvp_lissa
from hf_attrib.metrics import (
    MetricResult,
    calculate_lds_ground_truth,
    calculate_loo_ground_truth,
    lds,
    loo_corr,
    mislabel_detection_auc,
)
from hf_attrib.model_utils import retraining
from hf_attrib.model_utils.retrain import retrain_lds, retrain_loo

DT = torch.float64


# --------------------------------------------------------------------------------------------
# LiSSA: in_dims, batch_size, collate_fn
# --------------------------------------------------------------------------------------------
def mse_loss(xs, ys, theta):
    return torch.mean((xs @ theta - ys) ** 2)


def _regression(n: int = 60):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 2, generator=g, dtype=DT)
    theta = torch.randn(2, generator=g, dtype=DT)
    ys = xs @ theta + 0.05 * torch.randn(n, generator=g, dtype=DT)
    return xs, ys, theta


def test_lissa_dattri_call_forms_match_native_and_explicit():
    xs, ys, theta = _regression()
    vec = torch.randn(1, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert float(torch.linalg.eigvalsh(2 * xs.T @ xs / 60).max()) < 3.0  # below scaling
    kwargs = dict(argnums=2, batch_size=60, num_repeat=2, recursion_depth=60, scaling=4.0)
    # dattri's documented forms (its tests use exactly these calls)
    dattri_plain = ihvp_lissa(mse_loss, **kwargs)((xs, ys, theta), vec, in_dims=(0, 0, None))
    dattri_at_x = ihvp_at_x_lissa(mse_loss, *(xs, ys, theta), in_dims=(0, 0, None), **kwargs)(vec)
    native = ihvp_lissa(mse_loss, **kwargs)((xs, ys, theta), vec)  # in_dims defaulted
    explicit = ihvp_at_x_explicit(mse_loss, xs, ys, theta, argnums=2)(vec)
    torch.testing.assert_close(dattri_plain, native, rtol=0, atol=0)
    torch.testing.assert_close(dattri_at_x, native, rtol=0, atol=0)
    torch.testing.assert_close(native, explicit, rtol=1e-6, atol=1e-8)  # full batches: exact


def test_lissa_in_dims_samples_along_the_given_dimension():
    xs, ys, theta = _regression()
    vec = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    kwargs = dict(batch_size=10, num_repeat=1, recursion_depth=40, scaling=10.0, seed=5)

    def mse_columns(xs_t, ys, theta):  # examples along dimension 1 of the first argument
        return mse_loss(xs_t.T, ys, theta)

    rows = ihvp_at_x_lissa(mse_loss, xs, ys, theta, argnums=2, **kwargs)(vec)
    cols = ihvp_at_x_lissa(mse_columns, xs.T.contiguous(), ys, theta, argnums=2,
                           in_dims=(1, 0, None), **kwargs)(vec)
    torch.testing.assert_close(cols, rows, rtol=1e-12, atol=1e-12)  # same mini-batches

    # dattri's collate_fn receives the sampled tuple
    def collate(sampled):
        x_t, y, t = sampled
        return x_t.T, y, t

    collated = ihvp_at_x_lissa(mse_loss, xs.T.contiguous(), ys, theta, argnums=2,
                               in_dims=(1, 0, None), collate_fn=collate, **kwargs)(vec)
    torch.testing.assert_close(collated, rows, rtol=1e-12, atol=1e-12)


def test_lissa_in_dims_errors():
    xs, ys, theta = _regression()
    with pytest.raises(ValueError, match=r"in_dims\[2\] must be None"):
        ihvp_at_x_lissa(mse_loss, xs, ys, theta, argnums=2, in_dims=(0, 0, 0))
    with pytest.raises(ValueError, match="one per argument"):
        ihvp_at_x_lissa(mse_loss, xs, ys, theta, argnums=2, in_dims=(0, None))
    with pytest.raises(ValueError, match="different sizes"):
        ihvp_lissa(mse_loss, argnums=2, recursion_depth=1)((xs, ys[:10], theta),
                                                           torch.ones(2, dtype=DT))


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def test_lds_and_loo_corr_unpack_as_dattri_with_scipy_p_values():
    g = torch.Generator().manual_seed(3)
    n_train, n_test, m = 30, 5, 12
    score = torch.randn(n_train, n_test, generator=g)
    idx = torch.stack([torch.randperm(n_train, generator=g)[:15] for _ in range(m)])
    counts = torch.zeros(m, n_train).scatter_(1, idx, 1.0)
    gt = counts @ score + 2 * torch.randn(m, n_test, generator=g)

    lds_corr, lds_pval = lds(score, (gt, idx))  # dattri's form
    result = lds(score, (gt, idx), ci=0.9, n_boot=100)
    assert isinstance(result, MetricResult) and len(result) == 2
    assert torch.equal(lds_corr, result.per_example) and torch.equal(lds_pval, result.pvalue)
    assert result.mean == pytest.approx(float(lds_corr.mean())) and result.ci is not None
    for j in range(n_test):
        ref = stats.spearmanr((counts @ score)[:, j].numpy(), gt[:, j].numpy())
        assert float(lds_corr[j]) == pytest.approx(ref.statistic, rel=1e-10)
        assert float(lds_pval[j]) == pytest.approx(ref.pvalue, rel=1e-8)

    removed = torch.randperm(n_train, generator=g)[:10]
    loo_values = -0.5 * score[removed] + torch.randn(10, n_test, generator=g)
    corr, pval = loo_corr(score, (loo_values, removed))
    for j in range(n_test):
        ref = stats.pearsonr(score[removed, j].double().numpy(), -loo_values[:, j].numpy())
        assert float(corr[j]) == pytest.approx(ref.statistic, rel=1e-10)
        assert float(pval[j]) == pytest.approx(ref.pvalue, rel=1e-8)

    again = pickle.loads(pickle.dumps(result))
    assert again.mean == result.mean and torch.equal(again.pvalue, result.pvalue)
    with pytest.raises(AttributeError, match="immutable"):
        result.mean = 0.0


def test_mislabel_detection_auc_dattri_form():
    scores = torch.arange(100)
    noise_index = torch.zeros(100)  # a 0/1 float mask, as dattri's tests pass it
    noise_index[90:] = 1
    auc, (fpr, tpr, thresholds) = mislabel_detection_auc(scores, noise_index)
    assert auc == 1.0 and auc.item() == 1.0 and skm.auc(fpr, tpr) == auc
    assert torch.allclose(torch.tensor(auc, dtype=torch.float32), torch.tensor(1.0))

    g = torch.Generator().manual_seed(4)
    noisy = torch.rand(80, generator=g) < 0.3
    tied = torch.randint(0, 6, (80,), generator=g).float() + noisy.float()
    auc, (fpr, tpr, thresholds) = mislabel_detection_auc(tied, noisy.float())
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(noisy.numpy(), tied.numpy(),
                                              drop_intermediate=False)
    np.testing.assert_array_equal(fpr.numpy(), ref_fpr)
    np.testing.assert_array_equal(tpr.numpy(), ref_tpr)
    np.testing.assert_array_equal(thresholds.numpy(), ref_thr)
    assert auc == pytest.approx(skm.roc_auc_score(noisy.numpy(), tied.numpy()), abs=1e-12)
    assert auc == pytest.approx(skm.auc(fpr, tpr), abs=1e-12)
    # the native forms give the same number: bool mask, index list, 0/1 integer mask
    for form in (noisy, noisy.nonzero()[:, 0], noisy.nonzero()[:, 0].tolist(), noisy.long()):
        assert mislabel_detection_auc(tied, form) == auc
    assert json.loads(json.dumps({"auc": auc}))["auc"] == float(auc)
    with pytest.raises(ValueError, match="0/1 mask"):
        mislabel_detection_auc(tied, torch.full((80,), 0.5))


# --------------------------------------------------------------------------------------------
# Retraining and ground truth
# --------------------------------------------------------------------------------------------
N_TRAIN, N_TEST, FEAT = 24, 5, 3
calls: list[tuple[int, int | None]] = []


def _loaders():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(N_TRAIN, FEAT, generator=g), torch.randn(N_TRAIN, generator=g)
    xt, yt = torch.randn(N_TEST, FEAT, generator=g), torch.randn(N_TEST, generator=g)
    return (DataLoader(TensorDataset(x, y), batch_size=4),
            DataLoader(TensorDataset(xt, yt), batch_size=N_TEST))


def train_func(dataloader, seed=None, ridge=0.1):
    """Ridge regression in closed form: the model depends only on the subset's examples."""
    xs, ys = map(torch.cat, zip(*dataloader, strict=True))
    calls.append((xs.shape[0], seed))
    model = nn.Linear(FEAT, 1, bias=False)
    w = torch.linalg.solve(xs.T @ xs + ridge * torch.eye(FEAT), xs.T @ ys)
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model


def target_func(ckpt_path, dataloader):
    """dattri's form: (checkpoint path, test loader) -> one value per test example."""
    from safetensors.torch import load_file

    weight = load_file(ckpt_path)["weight"]
    xt, yt = next(iter(dataloader))
    return (xt @ weight[0] - yt) ** 2


def test_retrain_lds_and_ground_truth_match_direct_training(tmp_path):
    train, test = _loaders()
    calls.clear()
    retrain_lds(train_func, train, tmp_path / "lds", num_subsets=4, subset_ratio=0.5,
                num_runs_per_subset=2, seed=3, ridge=0.2)
    assert calls == [(12, 3 + i * 2 + j) for i in range(4) for j in range(2)]  # dattri's seeds
    metadata = yaml.safe_load((tmp_path / "lds" / "metadata.yml").read_text())
    assert metadata["num_subsets"] == 4 and metadata["num_runs_per_subset"] == 2

    target_values, indices = calculate_lds_ground_truth(target_func, tmp_path / "lds", test)
    masks = retraining.lds_subsets(N_TRAIN, 4, 0.5, seed=3)  # hf_attrib's own subsets
    assert torch.equal(indices, torch.stack([m.nonzero()[:, 0] for m in masks]))
    x, y = train.dataset.tensors
    for i in range(4):
        keep = indices[i]
        model = train_func(DataLoader(TensorDataset(x[keep], y[keep])), ridge=0.2)
        expected = (test.dataset.tensors[0] @ model.weight[0].detach()
                    - test.dataset.tensors[1]) ** 2
        torch.testing.assert_close(target_values[i], expected.double(), rtol=1e-5, atol=1e-6)
    corr, pval = lds(torch.randn(N_TRAIN, N_TEST), (target_values, indices))
    assert corr.shape == pval.shape == (N_TEST,)


def test_retrain_lds_split_with_start_id_equals_one_run(tmp_path):
    train, test = _loaders()
    retrain_lds(train_func, train, tmp_path / "one", num_subsets=4, seed=1)
    for start in (0, 2):
        retrain_lds(train_func, train, tmp_path / "split", num_subsets=2, start_id=start,
                    total_num_subsets=4, seed=1)
    one = calculate_lds_ground_truth(target_func, tmp_path / "one", test)
    split = calculate_lds_ground_truth(target_func, tmp_path / "split", test)
    assert torch.equal(one[1], split[1])
    torch.testing.assert_close(one[0], split[0])
    with pytest.raises(ValueError, match="must divide total_num_subsets"):
        retrain_lds(train_func, train, tmp_path / "bad", num_subsets=3, total_num_subsets=4)


def test_retrain_loo_and_ground_truth(tmp_path):
    train, test = _loaders()
    retrain_loo(train_func, train, tmp_path / "loo", indices=[0, 5, 7], seed=0)
    loo_values, removed = calculate_loo_ground_truth(target_func, tmp_path / "loo", test)
    assert removed.tolist() == [0, 5, 7] and loo_values.shape == (3, N_TEST)
    x, y = train.dataset.tensors
    keep = torch.tensor([k for k in range(N_TRAIN) if k != 5])
    model = train_func(DataLoader(TensorDataset(x[keep], y[keep])))
    expected = (test.dataset.tensors[0] @ model.weight[0].detach() - test.dataset.tensors[1]) ** 2
    torch.testing.assert_close(loo_values[1], expected.double(), rtol=1e-5, atol=1e-6)
    corr, pval = loo_corr(torch.randn(N_TRAIN, N_TEST), (loo_values, removed))
    assert corr.shape == pval.shape == (N_TEST,)


def test_ground_truth_reads_a_dattri_folder_inside_it_only(tmp_path):
    # dattri writes real YAML with absolute subset paths and .pt checkpoints; only the last
    # path component is used, so a crafted path cannot leave the folder
    root = tmp_path / "dattri"
    (root / "0").mkdir(parents=True)
    (root / "0" / "indices.txt").write_text("1\n3")
    (root / "0" / "model_weights_0.pt").write_bytes(b"")
    (root / "metadata.yml").write_text(yaml.safe_dump({
        "mode": "lds", "num_subsets": 1, "num_runs_per_subset": 1,
        "subset_dir_map": {0: "/somewhere/else/0"}}))
    seen = []
    values, indices = calculate_lds_ground_truth(
        lambda path, _: seen.append(path) or torch.ones(2), root, None)
    assert values.tolist() == [[1.0, 1.0]]
    assert seen == [root / "0" / "model_weights_0.pt"] and indices.tolist() == [[1, 3]]
    (root / "metadata.yml").write_text(yaml.safe_dump({
        "mode": "lds", "num_subsets": 1, "num_runs_per_subset": 1,
        "subset_dir_map": {0: ".."}}))
    with pytest.raises(ValueError, match="bad folder name"):
        calculate_lds_ground_truth(lambda path, _: torch.ones(2), root, None)


def test_model_utils_retrain_is_dattris_module_and_still_the_driver(monkeypatch):
    import hf_attrib.model_utils.retrain as dattri_module

    assert model_utils.retrain is dattri_module
    assert dattri_module.retrain_lds is retrain_lds is not retraining.retrain_lds
    monkeypatch.setattr(retraining, "retrain", lambda *a, **k: ("driver", a, k))
    assert model_utils.retrain("lds", "out", None, shard=(0, 2)) == (
        "driver", ("lds", "out", None), {"shard": (0, 2)})
