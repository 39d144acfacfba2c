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

**Scale of** :math:`\lambda` **(dattri's).** :math:`\lambda` is added to the kernel of
dattri's features :math:`\tilde\phi = \tilde P^\top g/\sqrt{D}`: :math:`g` the gradient of the
selected parameters, :math:`\tilde P` a :math:`d\times p` map with *unscaled* N(0, 1) or
:math:`\pm1` entries (dattri's and the TRAK package's projectors) and :math:`D` the number of
trainable parameters of the whole model (dattri's ``norm_scaler``). hf_attrib's projectors are
normalised instead (:math:`P = \tilde P/\sqrt p`, so :math:`\phi^\top\phi' \approx g^\top g'`),
so :math:`\tilde\phi = \sqrt{p/D}\,\phi` and the scores are computed as

.. math::
    \phi_i^\top\big(\Phi^\top\Phi + \lambda\,\tfrac{D}{p}\,I\big)^{-1}\phi(x)
    = \tilde\phi_i^\top\big(\tilde\Phi^\top\tilde\Phi + \lambda I\big)^{-1}\tilde\phi(x):

a ``regularization`` carried over from dattri with the same ``proj_dim`` is the same kernel.
:math:`p` is the requested ``proj_dim`` (also when the selected parameters are fewer and no
projection is applied, where dattri's kernel has the same expectation); with
``proj_type="identity"`` and no ``proj_dim``, :math:`p` is the number of selected parameters.
The TRAK package's ``lambda_reg`` omits the :math:`1/\sqrt D`: ``regularization = lambda_reg / D``.
``relative_regularization=r`` sets the damping relative to the kernel instead: ``r`` times
its mean eigenvalue, :math:`\lambda\,\tfrac{D}{p} = r\,\mathrm{tr}(\Phi^\top\Phi)/w` with
:math:`w` the kernel's size (:math:`p` when projecting), which means the same on every scale
(:math:`\lambda = r\,\mathrm{tr}(\tilde\Phi^\top\tilde\Phi)/w` on dattri's).
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

__all__ = ["DEFAULT_PROJ_DIM", "TRAKAttributor"]

#: The projection size when ``projector_kwargs`` is not given.
DEFAULT_PROJ_DIM = 2048
_DEFAULT_PROJ_DIM = DEFAULT_PROJ_DIM  # its former (private) name; tests still read it


class TRAKAttributor(FeatureAttributor):
    """TRAK over the task's checkpoints (an ensemble of independently trained models).

    Args:
        task: the attribution task; ``target_func`` should be the model output function
            (e.g. the margin :math:`\\log\\frac{p}{1-p}` of the true class).
        correct_probability_func: ``p(params, batch) -> scalar``, the probability of the
            correct label for a batch of one example (as ``loss_func``); gives ``Q = 1 - p``.
        projector_kwargs: gradient projection; default ``{"proj_dim": 2048}`` (the identity
            when the selected parameters have at most that many entries).
        regularization: :math:`\\lambda` added to the kernel, on dattri's scale (see the
            module docstring): the same number as in dattri's ``TRAKAttributor`` with the same
            ``proj_dim`` gives the same scores. Internally the kernel of hf_attrib's normalised
            features gets :math:`\\lambda D/p` (:attr:`effective_regularization`). Default 0:
            :math:`(\\Phi^\\top\\Phi)^{-1}`, a pseudo-inverse when singular.
        relative_regularization: alternatively, the damping as a multiple ``r`` of the kernel's
            mean eigenvalue, :math:`r\\,\\mathrm{tr}(\\Phi^\\top\\Phi)/w` (:math:`w` the kernel's
            size), per checkpoint; independent of any scaling of the features. ``1e-3`` is a
            mild damping. Not together with a non-zero ``regularization``.
        layer_name, device, grad_chunk_size, max_cache_bytes, progress: see
            ``FeatureAttributor`` (``device=None``: the model's device).
    """

    train_kind = "target"
    test_kind = "target"

    def __init__(self, task: AttributionTask, *,
                 correct_probability_func: Callable[[dict[str, Tensor], Any], Tensor] | None = None,
                 projector_kwargs: dict[str, Any] | None = None,
                 layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str | None = None, regularization: float = 0.0,
                 relative_regularization: float | None = None,
                 **kwargs: Any) -> None:
        if projector_kwargs is None:
            projector_kwargs = {"proj_dim": DEFAULT_PROJ_DIM}
        _check_regularization(regularization, relative_regularization)
        super().__init__(task, layer_name=layer_name, device=device,
                         projector_kwargs=projector_kwargs, **kwargs)
        self.correct_probability_func = correct_probability_func
        self.regularization = regularization
        self.relative_regularization = relative_regularization
        # D of dattri's norm_scaler: every trainable parameter of the model, whatever
        # layer_name selects (dattri divides the selected gradients by the same sqrt(D)).
        self.num_trainable_parameters = sum(
            p.numel() for p in task.model.parameters() if p.requires_grad) or 1
        self.effective_regularization: dict[int, float] = {}

    supports_factored = True

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

    def kernel_scale(self, fns: CheckpointFunctions) -> float:
        """:math:`p/D`: dattri's kernel is this times the kernel of hf_attrib's features."""
        proj_dim = (self.projector_kwargs or {}).get("proj_dim") or self._width(fns)
        return proj_dim / self.num_trainable_parameters

    def _prepare(self, fns: CheckpointFunctions, loader: DataLoader,
                 features: Tensor | None) -> Tensor:
        """``(Phi^T Phi + lambda D/p I)^{-1}`` in float64, accumulated block by block."""
        if features is not None:
            kernel = features.double().T @ features.double()
        else:  # streamed: each process sums its own batches' share, then all are added
            width = self._width(fns)
            kernel = torch.zeros(width, width, dtype=torch.float64, device=self.device)
            for _, feats, _, _ in self._train_blocks(fns, loader, shard=True):
                kernel += feats.double().T @ feats.double()
            # distributed=False: this process read every batch, so there is nothing to add
            kernel = all_reduce_sum(kernel, self._world()[1])
        return self._state_from_kernel(fns, kernel)

    needs_kernel = True

    def _state_from_kernel(self, fns: CheckpointFunctions, kernel: Tensor | None) -> Tensor:
        """``(kernel + lambda D/p I)^{-1}`` of ``kernel = Phi^T Phi`` (float64)."""
        assert kernel is not None
        # a copy: the damping is added in place, and the caller's kernel stays as it was
        kernel = kernel.to(device=self.device, dtype=torch.float64, copy=True)
        if self.relative_regularization is not None:
            # r * mean eigenvalue: the same on dattri's scale and on ours
            lam = self.relative_regularization * float(kernel.diagonal().mean())
        else:
            lam = self.regularization / self.kernel_scale(fns)
        self.effective_regularization[fns.index] = lam
        if lam > 0:
            kernel.diagonal().add_(lam)
            return torch.linalg.inv(kernel)
        return torch.linalg.pinv(kernel, hermitian=True)

    def _transform_test(self, fns: CheckpointFunctions, state: Tensor, feats: Tensor) -> Tensor:
        return (feats.double() @ state).to(feats.dtype)

    # -- save_cache / load_cache: the kernel inverse is the state; the damping is baked in.
    def _cache_options(self) -> dict[str, Any]:
        return {**super()._cache_options(), "regularization": self.regularization,
                "relative_regularization": self.relative_regularization,
                "num_trainable_parameters": self.num_trainable_parameters}

    def _state_tensors(self, index: int, state: Tensor) -> dict[str, Tensor]:
        lam = torch.tensor(self.effective_regularization[index], dtype=torch.float64)
        return {"kernel_inverse": state, "effective_regularization": lam}

    def _state_from_tensors(self, index: int, tensors: dict[str, Tensor]) -> Tensor:
        self.effective_regularization[index] = float(tensors["effective_regularization"])
        return tensors["kernel_inverse"]


def _check_regularization(regularization: float, relative: float | None) -> None:
    if regularization < 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}.")
    if relative is None:
        return
    if relative < 0:
        raise ValueError(f"relative_regularization must be >= 0, got {relative}.")
    if regularization:
        raise ValueError("pass either regularization (absolute, dattri's scale) or "
                         "relative_regularization (a multiple of the kernel's mean "
                         "eigenvalue), not both.")
