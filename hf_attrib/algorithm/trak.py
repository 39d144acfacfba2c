r"""TRAK (Park et al., 2023): attribution through the randomly projected after-kernel.

For each model :math:`\Theta^{(c)}` of the ensemble (the task's checkpoints), with
:math:`\phi = P_c^\top \nabla_\Theta f(x)` the projected gradient of the target (the margin in
classification) and :math:`\Phi_c` those of the training set stacked,

.. math::
    \tau(x) = \Big(\frac1I\sum_c Q_c\Big) \odot
              \frac1I\sum_c \Phi_c\,(\Phi_c^\top\Phi_c + \lambda I)^{-1}\phi_c(x),

where :math:`Q_c` is the diagonal of "one minus the probability of the correct class" of each
training example under model :math:`c` (omitted when no ``correct_probability_func`` is given).
Scores are positive when a training example raises the target, as everywhere in hf_attrib.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hf_attrib.algorithm.base import FeatureAttributor
from hf_attrib.distributed import all_reduce_sum
from hf_attrib.func.utils import add_batch_dim
from hf_attrib.task import AttributionTask, CheckpointFunctions

__all__ = ["TRAKAttributor"]

_DEFAULT_PROJ_DIM = 2048


class TRAKAttributor(FeatureAttributor):
    """TRAK over the task's checkpoints (an ensemble of independently trained models).

    Args:
        task: the attribution task; ``target_func`` should be the model output function
            (e.g. the margin :math:`\\log\\frac{p}{1-p}` of the true class).
        correct_probability_func: ``p(params, batch) -> scalar``, the probability of the
            correct label for a batch of one example (as ``loss_func``); gives ``Q = 1 - p``.
        projector_kwargs: gradient projection; default ``{"proj_dim": 2048}`` (the identity
            when the selected parameters have at most that many entries).
        regularization: :math:`\\lambda` added to :math:`\\Phi^\\top\\Phi`.
        layer_name, device, grad_chunk_size, max_cache_bytes, progress: see
            ``FeatureAttributor``.
    """

    train_kind = "target"
    test_kind = "target"

    def __init__(self, task: AttributionTask,
                 correct_probability_func: Callable[[dict[str, Tensor], Any], Tensor] | None = None,
                 projector_kwargs: dict[str, Any] | None = None,
                 layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str = "cpu", regularization: float = 0.0,
                 **kwargs: Any) -> None:
        if projector_kwargs is None:
            projector_kwargs = {"proj_dim": _DEFAULT_PROJ_DIM}
        super().__init__(task, layer_name, device, projector_kwargs, **kwargs)
        self.correct_probability_func = correct_probability_func
        self.regularization = regularization

    @property
    def _uses_row_factor(self) -> bool:
        return self.correct_probability_func is not None

    def _row_factor(self, fns: CheckpointFunctions, batch: Any) -> Tensor | None:
        if self.correct_probability_func is None:
            return None
        prob = self.correct_probability_func
        params = {n: p.detach() for n, p in self.task.model.named_parameters()}

        def one(example: Any) -> Tensor:
            return prob(params, add_batch_dim(example))

        with torch.no_grad():
            p = torch.func.vmap(one, randomness="same")(batch)
        return 1.0 - p.reshape(-1)

    def _prepare(self, fns: CheckpointFunctions, loader: DataLoader,
                 features: Tensor | None) -> Tensor:
        """``(Phi^T Phi + lambda I)^{-1}`` in float64, accumulated block by block."""
        if features is not None:
            kernel = features.double().T @ features.double()
        else:  # streamed: each process sums its own batches' share, then all are added
            width = self._width(fns)
            kernel = torch.zeros(width, width, dtype=torch.float64, device=self.device)
            for _, feats, _, _ in self._train_blocks(fns, loader, shard=True):
                kernel += feats.double().T @ feats.double()
            kernel = all_reduce_sum(kernel)
        if self.regularization > 0:
            kernel += self.regularization * torch.eye(kernel.shape[0], dtype=kernel.dtype,
                                                      device=kernel.device)
            return torch.linalg.inv(kernel)
        return torch.linalg.pinv(kernel, hermitian=True)

    def _transform_test(self, fns: CheckpointFunctions, state: Tensor, feats: Tensor) -> Tensor:
        return (feats.double() @ state).to(feats.dtype)
