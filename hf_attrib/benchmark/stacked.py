"""A setting's trained models as stacked tensors: train one, load built ones, evaluate them.

A model set is ``Stacked``: ``(params, buffers)``, each tensor with a leading model dimension
``[M, ...]`` (what :mod:`hf_attrib.model_utils.retraining` trains and writes). These helpers
are the runner's and the Hub export's common ground.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hf_attrib.benchmark.builders import load_state
from hf_attrib.model_utils.retraining import evaluate_stacked, load_stacked, train_stacked

__all__ = ["Stacked", "evaluate_models", "load_models", "persistent", "select_models",
           "train_model", "unstack"]

Stacked = tuple[dict[str, Tensor], dict[str, Tensor]]  # (params, buffers), each [M, ...]


def unstack(models: Stacked, i: int) -> dict[str, Tensor]:
    """The state dict (parameters and buffers) of stacked model ``i``."""
    params, buffers = models
    return {k: v[i].clone() for k, v in {**params, **buffers}.items()}


def select_models(models: Stacked, ids: Sequence[int]) -> Stacked:
    """The stacked models at rows ``ids``."""
    params, buffers = models
    return ({k: v[ids] for k, v in params.items()}, {k: v[ids] for k, v in buffers.items()})


def persistent(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]
               ) -> Stacked:
    """Drop non-persistent buffers (e.g. attention masks): they are not part of a state."""
    keys = model.state_dict().keys()
    return params, {k: v for k, v in buffers.items() if k in keys}


def load_models(model: nn.Module, gt_dir: str | Path, kind: str) -> Stacked:
    """The ``kind`` models (``"lds"``, ``"loo"``, ``"loo-full"``) of a ground-truth build."""
    params, buffers, _ = load_stacked(gt_dir, kind, with_buffers=True)
    return persistent(model, params, buffers)


def train_model(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor, seed: int,
                recipe: dict[str, Any], start: dict[str, Tensor] | None = None,
                **kwargs: Any) -> Stacked:
    """One model on all of ``x``, from ``start`` (default: the model's current weights).

    ``loss`` calls ``model`` itself, so ``model`` is trained in place of a copy and its
    weights are restored afterwards. Batch-norm models train sequentially, keeping buffers.

    Args:
        model: the setting's model.
        loss: ``loss(params, x, y)``, the setting's ``train_loss``.
        x, y: the training data.
        seed: seed of the batch order.
        recipe: the training recipe (``epochs``, ``lr``, ...; see
            :func:`hf_attrib.model_utils.retraining.train_stacked`).
        start: initial state (default: the model's current weights).
        **kwargs: override recipe entries (e.g. ``epochs``).

    Returns:
        The trained model as a stack of one.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if start is not None:
        load_state(model, start)
    mask = torch.ones(1, x.shape[0], dtype=torch.bool)
    try:
        params, buffers = train_stacked(model, loss, x, y, mask, seed=seed, return_buffers=True,
                                        init="model", **{**recipe, **kwargs})
        return persistent(model, params, buffers)
    finally:
        model.load_state_dict(saved)


def evaluate_models(model: nn.Module, models: Stacked, x: Tensor, y: Tensor,
                    target: Callable[..., Tensor]) -> Tensor:
    """``[M, n]``: ``target(params, x, y)`` of every stacked model on every example."""
    params, buffers = models
    return evaluate_stacked(model, params, x, y, target, chunk=64, buffers=buffers or None)
