"""Tests of hf_attrib.model_utils.activate_dropout."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from hf_attrib.model_utils import activate_dropout, dropout_modules


class MyDropout(nn.Module):
    """A custom dropout recognised by its class name."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.p, training=self.training)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            lin1=nn.Linear(8, 16),
            bn=nn.BatchNorm1d(16),
            drop1=nn.Dropout(0.5),
            lin2=nn.Linear(16, 16),
            drop2=nn.Dropout1d(0.5),
            custom=MyDropout(0.5),
            alpha=nn.AlphaDropout(0.5),
            lin3=nn.Linear(16, 4),
        )
    )


def _drop_names() -> list[str]:
    return ["drop1", "drop2", "custom", "alpha"]


def test_dropout_modules_found():
    assert list(dropout_modules(_model())) == _drop_names()


@pytest.mark.parametrize("name", _drop_names())
def test_only_named_layer_is_active(name):
    model = _model()
    model.train()
    assert activate_dropout(model, [name]) is model
    assert not model.training and not model.bn.training
    for other, module in dropout_modules(model).items():
        assert module.training == (other == name)
    x = torch.randn(32, 8)
    running_mean = model.bn.running_mean.clone()
    assert not torch.equal(model(x), model(x))  # a fresh mask each pass
    assert torch.equal(model.bn.running_mean, running_mean)  # BatchNorm stays eval


def test_none_activates_all_and_empty_activates_none():
    model = activate_dropout(_model())
    assert all(m.training for m in dropout_modules(model).values())
    assert not model.bn.training and not model.lin1.training

    model = activate_dropout(_model().train(), [])
    assert not any(m.training for m in model.modules())
    x = torch.randn(32, 8)
    assert torch.equal(model(x), model(x))


def test_single_name_and_dropout_prob():
    model = activate_dropout(_model(), "custom", dropout_prob=0.0)
    assert model.custom.p == 0.0 and model.drop1.p == 0.5 and model.custom.training
    x = torch.randn(32, 8)
    assert torch.equal(model(x), model(x))  # p=0: active but a no-op

    model = activate_dropout(_model(), dropout_prob=0.2)
    assert all(m.p == 0.2 for m in dropout_modules(model).values())


def test_errors():
    with pytest.raises(ValueError, match=r"drop1.*drop2.*custom.*alpha"):
        activate_dropout(_model(), ["drop3"])
    with pytest.raises(ValueError, match="not dropout modules"):
        activate_dropout(_model(), ["lin1"])
    with pytest.raises(ValueError, match="between 0 and 1"):
        activate_dropout(_model(), dropout_prob=1.5)
