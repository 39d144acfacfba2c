"""Bad inputs give a clear error or the right answer, never a silently wrong score (issue 11).

Loaders (the examples counted are the examples yielded; non-sequential samplers refused;
batches that do not fit the loss named), the device (follows the model; meta refused;
fast_jl probed) and impossible projection options. References are brute force: per-example
gradients by plain autograd, one example at a time.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from hf_attrib.algorithm import (
    GradCosAttributor,
    GradDotAttributor,
    IFAttributorExplicit,
    TracInAttributor,
)
from hf_attrib.algorithm.base import BaseAttributor, FeatureAttributor
from hf_attrib.func import projection
from hf_attrib.func.projection import fast_jl_available, make_projector
from hf_attrib.loaders import SubsetSampler, loader_indices
from hf_attrib.task import AttributionTask

N_TRAIN = 10


@pytest.fixture
def problem():
    """A 3 -> 2 logistic regression, its task, 10 training and 4 test examples."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)

    def loss(params, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    x, y = torch.randn(N_TRAIN, 3), torch.randint(0, 2, (N_TRAIN,))
    xt, yt = torch.randn(4, 3), torch.randint(0, 2, (4,))
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    test = DataLoader(TensorDataset(xt, yt), batch_size=3)
    return task, model, TensorDataset(x, y), test


def _grads(model: nn.Module, dataset, indices) -> torch.Tensor:
    """Per-example loss gradients ``[len(indices), d]`` by plain autograd."""
    rows = []
    for i in indices:
        x, y = dataset[i]
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def _grad_dot(model, train_set, train_indices, test_loader) -> torch.Tensor:
    test_set = test_loader.dataset
    return -_grads(model, train_set, train_indices) @ _grads(
        model, test_set, range(len(test_set))).T


class _FixedBatches:
    """A custom batch sampler with a fixed order, declared sequential (the escape hatch)."""

    hf_attrib_sequential = True

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _ShufflingBatches:
    """A batch sampler whose every pass yields a new permutation."""

    def __iter__(self):
        return iter(torch.randperm(N_TRAIN).split(4))

    def __len__(self):
        return 3


class _ReversedBatchSampler(BatchSampler):
    """A BatchSampler subclass that reorders (its sampler is a SequentialSampler)."""

    def __iter__(self):
        return reversed(list(super().__iter__()))


# ------------------------------------------------------------------------------------------
# Loaders: the examples counted are the examples yielded
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cached", [True, False])
def test_drop_last_scores_only_the_yielded_examples(problem, cached):
    task, model, train_set, test = problem
    train = DataLoader(train_set, batch_size=4, drop_last=True)  # yields 8 of 10
    attributor = GradDotAttributor(task=task)
    if cached:
        attributor.cache(train)
    else:  # cached on another loader object: train features computed in attribute()
        attributor.cache(DataLoader(train_set, batch_size=4, drop_last=True))
    reference = _grad_dot(model, train_set, range(8), test)
    scores = attributor.attribute(train, test)
    assert scores.shape == (8, 4)
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attributor.self_attribute(train), reference.new_tensor(
        [-(g @ g) for g in _grads(model, train_set, range(8))]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_sampler", [
    _FixedBatches([[0, 1, 2], [3, 4], [7, 8]]),
    [[0, 1, 2], [3, 4], [7, 8]],
    BatchSampler(SequentialSampler(range(7)), batch_size=3, drop_last=True),
], ids=["declared", "list", "batchsampler-drop-last"])
def test_custom_batch_sampler_scores_only_the_yielded_examples(problem, batch_sampler):
    task, model, train_set, test = problem
    train = DataLoader(train_set, batch_sampler=batch_sampler)
    yielded = [i for batch in batch_sampler for i in batch]
    attributor = GradDotAttributor(task=task)
    attributor.cache(train)
    scores = attributor.attribute(train, test)
    torch.testing.assert_close(scores, _grad_dot(model, train_set, yielded, test),
                               rtol=1e-5, atol=1e-6)
    # the test side may use one too
    test_set = test.dataset
    flipped = attributor.attribute(train, DataLoader(test_set, batch_sampler=[[0, 1], [2]]))
    torch.testing.assert_close(flipped, scores[:, :3])


def test_subset_sampler_and_plain_batches_are_accepted(problem):
    task, model, train_set, test = problem
    order = [9, 2, 5, 0]
    loaders = [DataLoader(train_set, batch_size=3, sampler=SubsetSampler(order)),
               [train_set[order[:3]], train_set[order[3:]]]]  # a plain list of batches
    reference = _grad_dot(model, train_set, order, test)
    for train in loaders:
        attributor = GradDotAttributor(task=task)
        torch.testing.assert_close(attributor.attribute(train, test), reference,
                                   rtol=1e-5, atol=1e-6)


def test_loader_checks_live_in_hf_attrib_loaders(problem):
    """The fix a refused loader is offered is importable from the low layer it names, and the
    former homes still export the same objects."""
    import hf_attrib
    import hf_attrib.algorithm.base as base
    import hf_attrib.benchmark.utils as benchmark_utils
    import hf_attrib.loaders as loaders

    _, _, train_set, _ = problem
    random = DataLoader(train_set, batch_size=4, sampler=SubsetRandomSampler(range(N_TRAIN)))
    with pytest.raises(ValueError, match=r"sampler=hf_attrib\.loaders\.SubsetSampler\(indices\)"):
        loaders.check_loader(random, "train")
    assert hf_attrib.SubsetSampler is benchmark_utils.SubsetSampler is loaders.SubsetSampler
    for name in ("check_loader", "count_examples", "loader_indices"):
        assert getattr(base, name) is getattr(loaders, name)
    assert loaders.count_examples(DataLoader(train_set, batch_size=4, drop_last=True)) == 8


def test_influence_function_uses_the_count_of_yielded_examples(problem):
    """-1/n and the Hessian's training set are the 8 examples drop_last leaves, not 10."""
    task, model, train_set, test = problem
    train = DataLoader(train_set, batch_size=4, drop_last=True)
    attributor = IFAttributorExplicit(task=task, regularization=0.1)
    attributor.cache(train)
    assert attributor._n_cache == 8
    fns = task.functions(0)
    x, y = train_set[:8]
    hessian = torch.func.hessian(fns.loss)(fns.theta, (x, y)).double()
    inverse = torch.linalg.inv(hessian + 0.1 * torch.eye(hessian.shape[0], dtype=torch.float64))
    g_train = _grads(model, train_set, range(8)).double()
    g_test = _grads(model, test.dataset, range(4)).double()
    reference = -(g_train @ inverse @ g_test.T) / 8
    torch.testing.assert_close(attributor.attribute(train, test).double(), reference,
                               rtol=1e-4, atol=1e-7)


class _GrowingLoader:
    """Yields one more batch on each pass: a loader that is not the same twice."""

    def __init__(self, dataset):
        self.dataset, self.passes = dataset, 0

    def __iter__(self):
        self.passes += 1
        return iter([self.dataset[i:i + 2] for i in range(0, 2 * self.passes, 2)])


def test_loader_that_changes_between_passes_is_refused(problem):
    task, _, train_set, _ = problem
    with pytest.raises(ValueError, match="yielded more than 2 examples on this pass but 2"):
        GradDotAttributor(task=task).cache(_GrowingLoader(train_set))


# ------------------------------------------------------------------------------------------
# Loaders: only a fixed, sequential order
# ------------------------------------------------------------------------------------------
REFUSED = [
    (lambda ds: DataLoader(ds, batch_size=4, shuffle=True), r"sampler \(RandomSampler\) shuffles"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(N_TRAIN))),
     r"sampler \(SubsetRandomSampler\) does not yield a fixed sequential order.*SubsetSampler"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * N_TRAIN, 5)),
     r"sampler \(WeightedRandomSampler\).*hf_attrib_sequential = True"),
    (lambda ds: DataLoader(ds, batch_size=None, sampler=RandomSampler(ds)),
     r"sampler \(RandomSampler\) shuffles"),
    (lambda ds: DataLoader(ds, batch_sampler=_ShufflingBatches()),
     r"batch_sampler \(_ShufflingBatches\) does not yield a fixed sequential order"),
    (lambda ds: DataLoader(ds, batch_sampler=_ReversedBatchSampler(SequentialSampler(ds), 4,
                                                                   False)),
     r"batch_sampler \(_ReversedBatchSampler\)"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=DistributedSampler(
        ds, num_replicas=2, rank=0, shuffle=False)),
     r"sampler \(DistributedSampler\).*give every process the same full loader"),
]


@pytest.mark.parametrize(("make", "match"), REFUSED,
                         ids=["shuffle", "subset-random", "weighted", "unbatched-random",
                              "shuffling-batch-sampler", "reordering-batchsampler-subclass",
                              "distributed"])
@pytest.mark.parametrize("role", ["train", "test"])
def test_non_sequential_samplers_are_refused(problem, make, match, role):
    task, _, train_set, test = problem
    bad = make(train_set)
    train, test = (bad, test) if role == "train" else (
        DataLoader(train_set, batch_size=4), bad)
    with pytest.raises(ValueError, match=f"the {role} loader's {match}"):
        GradDotAttributor(task=task).attribute(train, test)


# ------------------------------------------------------------------------------------------
# Batches that do not fit the loss / target
# ------------------------------------------------------------------------------------------
def test_test_batches_of_another_structure_are_named(problem):
    task, _, train_set, _ = problem
    train = DataLoader(train_set, batch_size=4)
    features_only = DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2)
    with pytest.raises(ValueError, match=r"the test loader's first batch \(structure: list of 1: "
                       r"\(tensor\[2, 3\] float32\)\) does not fit loss_func, which raised "
                       r"ValueError: not enough values to unpack") as info:
        GradDotAttributor(task=task).attribute(train, features_only)
    assert isinstance(info.value.__cause__, ValueError)  # the original error is chained
    wrong_width = DataLoader(TensorDataset(torch.randn(4, 5), torch.zeros(4).long()),
                             batch_size=2)
    with pytest.raises(ValueError, match=r"test loader's first batch .*tensor\[2, 5\].*"
                       r"RuntimeError: mat1 and mat2"):
        GradDotAttributor(task=task).attribute(train, wrong_width)


def test_train_batches_of_another_structure_are_named(problem):
    task, _, train_set, test = problem
    x, y = train_set[:]
    three = DataLoader(TensorDataset(x, y, y), batch_size=4)
    with pytest.raises(ValueError, match=r"the train loader's first batch \(structure: list of "
                       r"3: .*\) does not fit loss_func, which raised ValueError: too many"):
        GradDotAttributor(task=task).attribute(three, test)
    dicts = [{"features": x[:5], "labels": y[:5]}]
    with pytest.raises(ValueError, match=r"train loader's first batch \(structure: dict with 2 "
                       r"keys \{'features': tensor\[5, 3\] float32"):
        GradDotAttributor(task=task).cache(dicts)


def test_a_failing_later_batch_and_target_func_are_named(problem):
    task, model, train_set, _ = problem

    def margin(params, batch):
        x, y = batch
        logits = torch.func.functional_call(model, params, (x,))
        return logits.gather(1, y[:, None]).sum()

    target_task = AttributionTask(task.loss_func, model, model.state_dict(), target_func=margin)
    test = [train_set[:2], train_set[2:4], (train_set[4:6][0], torch.tensor([[0], [1]]))]
    with pytest.raises(ValueError, match=r"the test loader's batch starting at example 4 .* "
                       r"does not fit target_func"):
        GradDotAttributor(task=target_task).attribute(DataLoader(train_set, batch_size=5), test)


# ------------------------------------------------------------------------------------------
# Device follows the model
# ------------------------------------------------------------------------------------------
def test_device_defaults_to_the_models(problem):
    task, model, _, _ = problem
    for cls in (BaseAttributor, FeatureAttributor, TracInAttributor):
        assert inspect.signature(cls.__init__).parameters["device"].default is None, cls
    for cls in (GradDotAttributor, GradCosAttributor, TracInAttributor):
        assert cls(task=task).device == next(model.parameters()).device
    assert task.model_device() == torch.device("cpu")


def test_meta_model_is_refused_with_the_fix(problem):
    task, _, _, _ = problem
    meta = nn.Linear(3, 2, device="meta")
    meta_task = AttributionTask(task.loss_func, meta, task.checkpoints[0])
    for device in (None, "cpu"):
        with pytest.raises(ValueError, match=r"'meta' device .*from_pretrained\(\.\.\., "
                           r"device_map=None\).*to_empty"):
            GradDotAttributor(task=meta_task, device=device)


def test_meta_model_materialised_by_checkpoints_load_func_works(problem):
    _, model, train_set, test = problem
    meta = nn.Linear(3, 2, device="meta")

    def load(module, checkpoint):
        module = module.to_empty(device="cpu")
        module.load_state_dict(checkpoint)
        return module

    def loss(params, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(meta_task.model, params, (x,)), y)

    meta_task = AttributionTask(loss, meta, dict(model.state_dict()), checkpoints_load_func=load)
    attributor = GradDotAttributor(task=meta_task)
    assert attributor.device == torch.device("cpu")
    train = DataLoader(train_set, batch_size=4)
    torch.testing.assert_close(attributor.attribute(train, test),
                               _grad_dot(model, train_set, range(N_TRAIN), test),
                               rtol=1e-5, atol=1e-6)


def test_fast_jl_is_unavailable_as_an_empty_namespace_package(tmp_path, monkeypatch):
    (tmp_path / "fast_jl").mkdir()  # any folder of that name imports as a namespace package
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fast_jl", raising=False)
    monkeypatch.setattr(projection, "_FAST_JL_WORKS", None)
    assert fast_jl_available() is False  # no CUDA here
    monkeypatch.setattr(projection, "_FAST_JL_WORKS", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert fast_jl_available() is False  # imports, but has no kernel
    assert "sparse" in type(make_projector(64, 8, device="cpu")).__name__.lower()


# ------------------------------------------------------------------------------------------
# Impossible projection options
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"proj_dim": 0}, r"proj_dim=0 is not a projection size"),
    ({"proj_dim": -4}, r"proj_dim=-4 is not a projection size"),
    ({"proj_dim": 2.5}, r"proj_dim=2.5 is not a projection size"),
    ({"proj_dim": "512"}, r"proj_dim='512' is not a projection size"),
    ({"proj_dim": True}, r"proj_dim=True is not a projection size"),
    ({"proj_dim": 4, "proj_type": "gaussian"}, r"proj_type must be one of"),
    ({"proj_type": "sparse"}, r"proj_type='sparse' needs proj_dim"),
    ({"proj_dim": 4, "proj_seed": 0.5}, r"proj_seed=0.5 must be an int"),
    ({"proj_dim": 4, "projdim": 3}, r"unknown projector option\(s\) \['projdim'\]"),
    ({"proj_dim": 4, "proj_type": "normal", "nnz": 2}, r"\['nnz'\] for proj_type='normal'"),
])
def test_impossible_projection_options_are_refused(problem, kwargs, match):
    task = problem[0]
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):  # at construction, not at the first score
        TracInAttributor(task=task, projector_kwargs=kwargs)
    dim = kwargs.pop("proj_dim", None)
    kwargs.pop("proj_seed", None)
    if "proj_dim" in match or "proj_type" in match:
        with pytest.raises(ValueError, match=match):
            make_projector(8, dim, **kwargs)


def test_possible_projection_options_still_work(problem):
    task, model, train_set, test = problem
    train = DataLoader(train_set, batch_size=4)
    reference = _grad_dot(model, train_set, range(N_TRAIN), test)
    for kwargs in (None, {}, {"proj_dim": None}, {"proj_type": "identity"},
                   {"proj_dim": 100, "proj_max_batch_size": 16, "nnz": 2}):
        attributor = GradDotAttributor(task=task, projector_kwargs=kwargs)
        torch.testing.assert_close(attributor.attribute(train, test), reference,
                                   rtol=1e-5, atol=1e-6)


def test_loader_indices_are_the_yielded_examples(problem):
    """IFAttributorLiSSA draws its Hessian mini-batches from these indices."""
    _, _, train_set, _ = problem
    assert loader_indices(DataLoader(train_set, batch_size=4, drop_last=True)) == list(range(8))
    assert loader_indices(DataLoader(train_set, batch_sampler=[[5, 6], [1]])) == [5, 6, 1]
    assert loader_indices(DataLoader(train_set, batch_size=None,
                                     sampler=SubsetSampler([3, 2]))) == [3, 2]


def test_fast_jl_projection_without_a_working_kernel_is_refused(monkeypatch):
    monkeypatch.setattr(projection, "_FAST_JL_WORKS", False)
    with pytest.raises(ValueError, match="proj_type='fast_jl' needs the fast_jl CUDA kernel"):
        make_projector(1024, 512, proj_type="fast_jl")


def test_tracin_without_learning_rates_warns_in_the_plain_api(problem):
    """TracInCP with no weight_list uses step size 1; say so (Grad-Dot/Cos do not warn)."""
    import warnings

    from hf_attrib.algorithm import GradDotAttributor

    task = problem[0]
    with pytest.warns(UserWarning, match="every step size is 1.*weight_list"):
        TracInAttributor(task=task)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TracInAttributor(task=task, weight_list=[0.1])
        GradDotAttributor(task=task)


def test_sharded_checkpoint_index_may_not_name_files_outside_its_folder(tmp_path):
    """A ``model.safetensors.index.json`` naming ``../x`` is refused, never read."""
    import json

    from safetensors.torch import save_file

    from hf_attrib.task import load_state_dict_file

    outside = tmp_path / "outside.safetensors"
    save_file({"weight": torch.ones(2)}, outside)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"bias": torch.zeros(2)}, folder / "part-1.safetensors")
    for bad in ["../outside.safetensors", str(outside)]:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"weight": bad, "bias": "part-1.safetensors"}}))
        with pytest.raises(ValueError, match="outside"):
            load_state_dict_file(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"bias": "part-1.safetensors"}}))
    assert torch.equal(load_state_dict_file(folder)["bias"], torch.zeros(2))
