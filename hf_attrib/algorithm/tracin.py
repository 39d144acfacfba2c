r"""TracInCP (Pruthi et al., 2020) and its one-checkpoint variants Grad-Dot and Grad-Cos.

.. math::
    \tau_{\text{TracInCP}}(x)_i = -\sum_{c=1}^{I} \eta_c\, \nabla f_{\Theta^{(c)}}(x)^\top
    \nabla L_{\Theta^{(c)}}(x_i)

An SGD step of size :math:`\eta_c` on :math:`x_i` moves the parameters by
:math:`-\eta_c \nabla L(x_i)`, changing the target by the expression above: the minus sign puts
TracIn on the library-wide convention (score = how much including :math:`x_i` raises the
target; the paper's Appendix A states the loss-reduction form without it). Grad-Dot is the
final checkpoint alone with :math:`\eta = 1`; Grad-Cos normalises both gradients, giving
:math:`-\cos(\nabla f(x), \nabla L(x_i))`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hf_attrib.algorithm.base import FeatureAttributor
from hf_attrib.task import AttributionTask, CheckpointFunctions

__all__ = ["GradCosAttributor", "GradDotAttributor", "TracInAttributor"]


class TracInAttributor(FeatureAttributor):
    """TracInCP over the task's checkpoints.

    Args:
        task: the attribution task; its checkpoints are the saved training trajectory.
        weight_list: step size :math:`\\eta_c` per checkpoint (the learning rate between
            checkpoint ``c-1`` and ``c``); defaults to 1 for each.
        normalized_grad: normalise every gradient to unit norm (Grad-Cos).
        projector_kwargs: optional random projection of the gradients, e.g.
            ``{"proj_dim": 2048}``.
        layer_name, device, grad_chunk_size, max_cache_bytes, progress: see
            ``FeatureAttributor``.
    """

    train_kind = "loss"
    test_kind = "target"

    def __init__(self, task: AttributionTask, *,
                 weight_list: Sequence[float] | Tensor | None = None,
                 normalized_grad: bool = False, projector_kwargs: dict[str, Any] | None = None,
                 layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str | None = None, **kwargs: Any) -> None:
        super().__init__(task, layer_name=layer_name, device=device,
                         projector_kwargs=projector_kwargs, **kwargs)
        if weight_list is None:
            warnings.warn(
                f"TracInCP without learning rates: {task.num_checkpoints} checkpoint(s) and no "
                "weight_list, so every step size is 1 and the scores are gradient dot products "
                "summed over checkpoints, not estimates of a training step's effect. Pass "
                "weight_list=[lr, ...] (with task_from_pretrained, checkpoints=<Trainer "
                "output_dir> reads them).", UserWarning, stacklevel=2)
            weight_list = [1.0] * task.num_checkpoints
        weights = [float(w) for w in weight_list]
        if len(weights) != task.num_checkpoints:
            raise ValueError(f"weight_list has {len(weights)} step sizes for "
                             f"{task.num_checkpoints} checkpoints; give one per checkpoint.")
        self.weight_list = weights
        self.normalized_grad = normalized_grad

    supports_factored = True

    @property
    def normalizes_gradients(self) -> bool:  # type: ignore[override]
        return self.normalized_grad

    def _weight(self, fns: CheckpointFunctions) -> float:
        return -self.weight_list[fns.index]

    def _cache_options(self) -> dict[str, Any]:
        # weight_list is applied when scoring; a saved cache serves any step sizes
        return {**super()._cache_options(), "normalized_grad": self.normalized_grad}

    def _gradient_transform(self, grads: Tensor) -> Tensor:
        if not self.normalized_grad:
            return grads
        return grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-12)


class GradDotAttributor(TracInAttributor):
    """Grad-Dot (Charpiat et al., 2019): ``-<grad f(x), grad L(x_i)>`` at one checkpoint."""

    def __init__(self, task: AttributionTask, **kwargs: Any) -> None:
        _single_checkpoint(task, "GradDotAttributor")
        super().__init__(task, weight_list=[1.0], normalized_grad=False, **kwargs)


class GradCosAttributor(TracInAttributor):
    """Grad-Cos (Charpiat et al., 2019): ``-cos(grad f(x), grad L(x_i))`` at one checkpoint."""

    def __init__(self, task: AttributionTask, **kwargs: Any) -> None:
        _single_checkpoint(task, "GradCosAttributor")
        super().__init__(task, weight_list=[1.0], normalized_grad=True, **kwargs)


def _single_checkpoint(task: AttributionTask, name: str) -> None:
    if task.num_checkpoints != 1:
        raise ValueError(f"{name} uses one checkpoint but the task has {task.num_checkpoints}; "
                         "use TracInAttributor to combine several.")
