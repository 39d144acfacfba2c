"""The same attributors on CUDA: scores equal the CPU ones (run with ``pytest -m gpu``).

Without CUDA every test here is skipped (and deselected by default: ``-m 'not gpu'``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib.algorithm import (
    GradCosAttributor,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    RPSAttributor,
    TracInAttributor,
    TRAKAttributor,
)
from hf_attrib.func.projection import fast_jl_available
from hf_attrib.task import AttributionTask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _task():
    torch.manual_seed(0)
    model = _Net().eval()

    def loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    train = DataLoader(TensorDataset(torch.randn(30, 6), torch.randint(0, 3, (30,))),
                       batch_size=8)
    test = DataLoader(TensorDataset(torch.randn(6, 6), torch.randint(0, 3, (6,))), batch_size=3)
    return model, loss, train, test


CASES = [
    (IFAttributorExplicit, dict(regularization=0.1)),
    (IFAttributorLiSSA, dict(batch_size=30, recursion_depth=100, damping=0.02, scaling=5.0)),
    (IFAttributorArnoldi, dict(proj_dim=20, max_iter=40, regularization=0.1)),
    (TracInAttributor, dict()),
    (GradCosAttributor, dict()),
    (TRAKAttributor, dict(projector_kwargs={"proj_type": "identity"}, regularization=0.1)),
    (RPSAttributor, dict(final_linear_layer_name="head", l2_strength=0.01)),
]


def _assert_cuda_equals_cpu(cls, kwargs):
    results = {}
    for device in ("cpu", "cuda"):
        model, loss, train, test = _task()
        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        attributor = cls(task=task, device=device, **kwargs)
        attributor.cache(train)
        results[device] = (attributor.attribute(train, test).cpu(),
                           attributor.self_attribute(train).cpu())
    scale = results["cpu"][0].abs().max().item()
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-3,
                               atol=1e-4 * scale)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-3,
                               atol=1e-4 * results["cpu"][1].abs().max().item())


@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_cuda_scores_equal_cpu_scores(cls, kwargs):
    _assert_cuda_equals_cpu(cls, kwargs)


def _smallest_hessian_eigenvalue() -> float:
    """Of the training loss's Hessian (the one IF solves with), from the explicit matrix."""
    model, loss, train, _ = _task()
    fns = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict()).functions()
    hessian = torch.func.hessian(fns.loss)(fns.theta, train.dataset.tensors)
    return float(torch.linalg.eigvalsh(hessian.double()).min())


def test_cuda_if_cg_equals_cpu_on_a_positive_definite_system():
    # CG solves (H + regularization I) x = v only when that matrix is positive definite; on
    # an indefinite one the truncated iteration depends on round-off, so devices diverge.
    # The tanh network's Hessian is indefinite: regularize 0.1 above its lowest eigenvalue.
    regularization = max(0.0, -_smallest_hessian_eigenvalue()) + 0.1
    _assert_cuda_equals_cpu(IFAttributorCG, dict(regularization=regularization, max_iter=200,
                                                 tol=1e-10))


def test_attributor_device_follows_a_cuda_model():
    model, loss, train, test = _task()
    model.to("cuda")
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task=task)  # no device: the model's
    assert attributor.device.type == "cuda"
    assert attributor.attribute(train, test).device.type == "cuda"


def test_model_spread_over_devices_needs_an_explicit_device():
    model, loss, _train, _test = _task()
    model.head.to("cuda")
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    with pytest.raises(ValueError, match=r"several devices .*Pass device="):
        TracInAttributor(task=task)
    assert TracInAttributor(task=task, device="cuda").device.type == "cuda"


@pytest.mark.skipif(not fast_jl_available(), reason="needs the fast_jl extra")
def test_trak_uses_fast_jl_on_cuda_and_is_deterministic():
    model, loss, train, test = _task()
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    runs = []
    for _ in range(2):
        attributor = TRAKAttributor(task=task, device="cuda", projector_kwargs={"proj_dim": 512})
        runs.append(attributor.attribute(train, test))
        assert type(attributor._projectors[0]).__name__ == "FastJLProjector"
    torch.testing.assert_close(runs[0], runs[1])


# --------------------------------------------------------------------------------------------
# The dense projector's on-device generator (issue 14, scope 3)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["normal", "rademacher"])
def test_dense_map_on_cuda_equals_the_cpu_map(kind):
    from hf_attrib.func.projection import DenseProjector, dense_block

    for seed, eid, start, rows, p in [(0, 0, 0, 500, 64), (9, 3, 2**33, 100, 37)]:
        cpu = dense_block(seed, eid, kind, start, start + rows, p)
        cuda = dense_block(seed, eid, kind, start, start + rows, p, "cuda")
        assert cuda.is_cuda
        if kind == "rademacher":  # integer steps only: the same bits
            assert torch.equal(cuda.cpu(), cpu)
        else:  # log/sqrt/cos/sin: float32 round-off
            torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)
    # the projector: same outputs on both devices, whatever the block size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5000, generator=g)
    ref = DenseProjector(5000, 256, seed=2, kind=kind)(x, ensemble_id=1)
    for rows in (None, 700):
        out = DenseProjector(5000, 256, seed=2, kind=kind, block_rows=rows)(x.cuda(),
                                                                            ensemble_id=1)
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_auto_projector_on_cuda_without_fast_jl_is_the_dense_generator():
    from hf_attrib.func.projection import make_projector

    projector = make_projector(5000, 100, device="cuda")  # 100: not a multiple of 512
    assert type(projector).__name__ == "DenseProjector" and projector.kind == "normal"
    x = torch.randn(4, 5000, device="cuda", dtype=torch.bfloat16)
    out = projector(x)
    assert out.dtype == torch.bfloat16 and out.is_cuda and bool(torch.isfinite(out).all())
