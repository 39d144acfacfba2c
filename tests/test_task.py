"""AttributionTask: checkpoints in every supported form, the paper's Demo 1, and bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_attrib.algorithm import GradDotAttributor, IFAttributorCG, TRAKAttributor
from hf_attrib.task import AttributionTask


def _setup(n=12, d=4, classes=3):
    torch.manual_seed(0)
    x, y = torch.randn(n, d), torch.randint(0, classes, (n,))
    model = nn.Linear(d, classes)

    def f(params, data):
        xb, yb = data
        return nn.CrossEntropyLoss()(torch.func.functional_call(model, params, xb), yb)

    return model, f, DataLoader(TensorDataset(x, y), batch_size=5)


def test_paper_demo_1_runs_as_printed():
    """Demo 1 of the paper with dattri replaced by hf_attrib (CPU instead of CUDA)."""
    from hf_attrib.algorithm import IFAttributorCG
    from hf_attrib.task import AttributionTask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    train_loader = DataLoader(TensorDataset(torch.randn(20, 6), torch.randint(0, 3, (20,))),
                              batch_size=8)
    test_loader = DataLoader(TensorDataset(torch.randn(5, 6), torch.randint(0, 3, (5,))),
                             batch_size=5)
    attributor_hyperparams = {"regularization": 1e-2, "max_iter": 10}

    def f(params, data):  # an example of loss function using CE loss
        x, y = data
        loss = nn.CrossEntropyLoss()
        yhat = torch.func.functional_call(model, params, x)
        return loss(yhat, y)

    attr_task = AttributionTask(
        loss_func=f,
        model=model,
        checkpoints=model.state_dict(),
        target_func=f,  # the target function to be attributed could differ from the loss
    )
    attributor = IFAttributorCG(
        task=attr_task,
        device=torch.device("cpu"),
        **attributor_hyperparams,  # e.g., regularization, ...
    )  # similar for other attributors
    attributor.cache(train_loader)  # optional pre-processing to accelerate the attribution
    score = attributor.attribute(train_loader, test_loader)
    assert score.shape == (20, 5)
    assert torch.isfinite(score).all()


def test_checkpoint_forms_give_identical_scores(tmp_path):
    model, f, loader = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "ckpt.safetensors")
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    results = []
    for ckpt in (state, tmp_path / "ckpt.safetensors", str(folder)):
        nn.init.zeros_(model.weight)  # loading must restore the checkpoint's weights
        task = AttributionTask(loss_func=f, model=model, checkpoints=ckpt)
        results.append(GradDotAttributor(task=task).attribute(loader, loader))
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def test_pickle_checkpoints_are_refused(tmp_path):
    model, f, _ = _setup()
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"not read")
    task = AttributionTask(loss_func=f, model=model, checkpoints=path)
    with pytest.raises(ValueError, match="never unpickles"):
        task.load_checkpoint(0)


def test_checkpoint_mismatch_names_keys_and_shapes():
    model, f, _ = _setup()
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        AttributionTask(loss_func=f, model=model, checkpoints={"weight": model.weight.detach()})
    bad = {"weight": torch.zeros(2, 2), "bias": model.bias.detach(), "extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\].*weight: checkpoint "
                                         r"\(2, 2\) vs model \(3, 4\)"):
        AttributionTask(loss_func=f, model=model, checkpoints=bad)


def test_missing_checkpoint_file():
    model, f, _ = _setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AttributionTask(loss_func=f, model=model, checkpoints="/nonexistent/ckpt.safetensors")


def test_shuffled_loader_is_refused():
    model, f, loader = _setup()
    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    shuffled = DataLoader(loader.dataset, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffles"):
        GradDotAttributor(task=task).attribute(shuffled, loader)
    with pytest.raises(ValueError, match="shuffles"):
        GradDotAttributor(task=task).attribute(loader, shuffled)


def test_empty_loader_is_refused():
    model, f, _loader = _setup()
    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        IFAttributorCG(task=task).cache(empty)


def test_non_scalar_loss_is_refused():
    model, _, loader = _setup()

    def per_example(params, data):
        xb, yb = data
        out = torch.func.functional_call(model, params, xb)
        return nn.functional.cross_entropy(out, yb, reduction="none")

    task = AttributionTask(loss_func=per_example, model=model, checkpoints=model.state_dict())
    with pytest.raises(ValueError, match="must return a scalar"):
        GradDotAttributor(task=task).attribute(loader, loader)


def test_nan_gradient_names_the_example():
    model, f, _ = _setup()
    x = torch.randn(12, 4)
    x[7, 2] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.zeros(12, dtype=torch.long)), batch_size=5)
    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    with pytest.raises(FloatingPointError, match="train example 7 "):
        TRAKAttributor(task=task).cache(loader)


def test_unknown_layer_name_lists_modules():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    task = AttributionTask(loss_func=lambda p, b: torch.tensor(0.0), model=model,
                           checkpoints=model.state_dict())
    with pytest.raises(ValueError, match=r"unknown layer name 'head'.*Modules include \['0'"):
        GradDotAttributor(task=task, layer_name="head")
    assert task.select_parameters(["2"]) == ["2.weight", "2.bias"]
    assert task.select_parameters("0.bias") == ["0.bias"]


def test_tracin_weight_list_length_checked():
    model, f, _ = _setup()
    from hf_attrib.algorithm import TracInAttributor

    task = AttributionTask(loss_func=f, model=model, checkpoints=[model.state_dict()] * 2)
    with pytest.raises(ValueError, match="one per checkpoint"):
        TracInAttributor(task=task, weight_list=[1.0])


def test_live_state_dict_checkpoint_survives_loading_another():
    """``model.state_dict()`` shares memory with the model; the task keeps its own copy."""
    model = nn.Linear(3, 2)
    live = model.state_dict()
    first = {k: v.clone() for k, v in live.items()}
    other = {k: torch.randn_like(v) for k, v in live.items()}

    def loss(params, batch):
        return torch.func.functional_call(model, params, (batch,)).sum()

    task = AttributionTask(loss, model, [live, other])
    task.load_checkpoint(1)
    task.load_checkpoint(0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, first[k])


def test_tasks_sharing_a_model_each_get_their_own_weights():
    """Two tasks on one model (the benchmark's main and noisy-label tasks): after one loads its
    checkpoint, the other's next call loads its own again, instead of trusting that its
    last-loaded checkpoint is still in place (it was not: scores came from the other model)."""
    model, f, loader = _setup()
    ours = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    theirs = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    a, b = AttributionTask(f, model, ours), AttributionTask(f, model, theirs)

    def flat(state):
        return torch.cat([state[n].flatten() for n, _ in model.named_parameters()])

    torch.testing.assert_close(a.functions(0).theta, flat(ours), rtol=0, atol=0)
    torch.testing.assert_close(b.functions(0).theta, flat(theirs), rtol=0, atol=0)
    torch.testing.assert_close(a.functions(0).theta, flat(ours), rtol=0, atol=0)
    # and so are the scores: an attributor of `a` run after `b` scores with a's weights
    fresh = GradDotAttributor(AttributionTask(f, model, ours))
    fresh.cache(loader)
    ref = fresh.attribute(loader, loader)
    b.functions(0)
    att = GradDotAttributor(a)
    att.cache(loader)
    torch.testing.assert_close(att.attribute(loader, loader), ref, rtol=0, atol=0)


def test_weights_changed_in_place_are_reloaded():
    """An optimizer step (or any in-place write) after a load: the checkpoint is loaded again."""
    model, f, _ = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task = AttributionTask(f, model, state)
    task.functions(0)
    with torch.no_grad():
        model.weight.add_(1.0)
    torch.testing.assert_close(task.functions(0).theta[: model.weight.numel()],
                               state["weight"].flatten(), rtol=0, atol=0)
    model.weight = nn.Parameter(torch.zeros_like(model.weight))  # replaced, not written
    torch.testing.assert_close(model.weight, torch.zeros_like(model.weight))
    task.functions(0)
    torch.testing.assert_close(model.weight.detach(), state["weight"], rtol=0, atol=0)
