r"""Representer point selection with L2 regularisation (RPS-L2; Yeh et al., 2018).

With :math:`\Phi(x) = \Theta_1 h(x)` the pre-activation output of the final linear layer and
:math:`h` its input features, a stationary point of
:math:`\frac1n\sum_j L(x_j) + \lambda\|\Theta_1\|^2` satisfies
:math:`\Theta_1 = \sum_j \alpha_j h_j^\top` with
:math:`\alpha_j = -\frac{1}{2\lambda n}\,\partial L(x_j)/\partial\Phi(x_j)`, so the output
for class :math:`c` on :math:`x` decomposes as :math:`\Phi_c(x) = \sum_j \alpha_{jc}\,h_j^\top h`.
The score of training example :math:`j` for test example :math:`x` of class :math:`c` is that
term, :math:`\alpha_{jc}\,h_j^\top h`: how much :math:`x_j` raises the class-:math:`c` output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hf_attrib.algorithm.base import BaseAttributor
from hf_attrib.func.utils import add_batch_dim
from hf_attrib.task import AttributionTask

__all__ = ["RPSAttributor", "default_label_func"]


def default_label_func(batch: Any) -> Tensor:
    """The class labels of a batch: ``batch[1]`` of an ``(x, y)`` pair or ``batch["labels"]``."""
    if isinstance(batch, Mapping) and "labels" in batch:
        return batch["labels"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[1]
    raise ValueError("RPSAttributor needs each test example's class: use (x, y) batches, dict "
                     "batches with 'labels', or pass label_func=lambda batch: ...")


class RPSAttributor(BaseAttributor):
    """RPS-L2 over the final linear layer of a classifier.

    Args:
        task: the attribution task (``loss_func`` is the classification loss; only the first
            checkpoint is used, as the representer theorem holds for one model).
        final_linear_layer_name: module name of the ``nn.Linear`` producing the logits.
        l2_strength: :math:`\\lambda`.
        normalize_preactivate: use unit-norm features :math:`h/\\|h\\|` in the kernel.
        label_func: ``batch -> [B]`` class index of each test example (default: labels of the
            batch).
        device, grad_chunk_size, progress: see ``BaseAttributor``.
    """

    def __init__(self, task: AttributionTask, final_linear_layer_name: str,
                 l2_strength: float = 0.003, normalize_preactivate: bool = False,
                 label_func: Callable[[Any], Tensor] = default_label_func,
                 device: torch.device | str = "cpu", **kwargs: Any) -> None:
        super().__init__(task, final_linear_layer_name, device, **kwargs)
        modules = dict(task.model.named_modules())
        layer = modules.get(final_linear_layer_name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"final_linear_layer_name {final_linear_layer_name!r} must name an "
                             f"nn.Linear module of the model (got {type(layer).__name__}).")
        if l2_strength <= 0:
            raise ValueError("l2_strength must be positive.")
        self.layer_name_final = final_linear_layer_name
        self.l2_strength = l2_strength
        self.normalize_preactivate = normalize_preactivate
        self.label_func = label_func
        self._cache_loader: DataLoader | None = None
        self._train: tuple[Tensor, Tensor] | None = None

    # -- features ----------------------------------------------------------------------------
    def _layer(self) -> nn.Linear:
        return dict(self.task.model.named_modules())[self.layer_name_final]

    def _representers(self, batch: Any, offset: int) -> tuple[Tensor, Tensor]:
        """``(dL/dPhi [B, C], h [B, H])`` for every example of a batch."""
        model = self.task.model
        params = {n: p.detach() for n, p in model.named_parameters()}
        state: dict[str, Tensor] = {}

        def hook(_: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
            state["h"] = inputs[0]
            return out + state["delta"]

        def loss_of_delta(delta: Tensor, example: Any) -> tuple[Tensor, Tensor]:
            state["delta"] = delta
            loss = self.task.loss_func(params, add_batch_dim(example))
            return loss, state["h"]

        layer = self._layer()
        handle = layer.register_forward_hook(hook)
        try:
            delta = torch.zeros(layer.out_features, device=self.device)
            grads, h = torch.func.vmap(torch.func.grad(loss_of_delta, has_aux=True),
                                       in_dims=(None, 0), randomness="same")(delta, batch)
        finally:
            handle.remove()
        if h.dim() != 3 or h.shape[1] != 1:
            raise ValueError(f"RPS needs one feature vector per example at "
                             f"{self.layer_name_final!r}; its input has per-example shape "
                             f"{tuple(h.shape[1:])}. Use RPS on a classification head.")
        bad = ~torch.isfinite(grads).all(dim=1)
        if bool(bad.any()):
            raise FloatingPointError(f"non-finite loss gradient for train example "
                                     f"{offset + int(bad.nonzero()[0, 0])}.")
        return grads, self._normalize(h[:, 0].detach())

    def _normalize(self, h: Tensor) -> Tensor:
        if not self.normalize_preactivate:
            return h
        return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _features(self, batch: Any) -> Tensor:
        state: dict[str, Tensor] = {}
        handle = self._layer().register_forward_hook(
            lambda _m, inputs, _o: state.__setitem__("h", inputs[0].detach()))
        try:
            with torch.no_grad():
                self.task.loss_func({n: p.detach() for n, p in self.task.model.named_parameters()},
                                    batch)
        finally:
            handle.remove()
        h = state["h"]
        if h.dim() != 2:
            raise ValueError(f"RPS needs [batch, features] inputs at {self.layer_name_final!r}; "
                             f"got {tuple(h.shape)}.")
        return self._normalize(h)

    # -- API ---------------------------------------------------------------------------------
    def cache(self, train_loader: DataLoader) -> None:
        """Compute :math:`\\alpha_j` and :math:`h_j` for the training set."""
        self.task.load_checkpoint(0)
        alphas, feats = [], []
        for offset, batch in self._batches(train_loader, "train", "RPS representers"):
            g, h = self._representers(batch, offset)
            alphas.append(g)
            feats.append(h)
        alpha = torch.cat(alphas)
        alpha = alpha / (-2.0 * self.l2_strength * alpha.shape[0])
        self._train = (alpha, torch.cat(feats))
        self._cache_loader = train_loader

    def _train_side(self, train_loader: DataLoader) -> tuple[Tensor, Tensor]:
        if self._cache_loader is None:
            self.cache(train_loader)
        if train_loader is not self._cache_loader:
            raise ValueError("RPS scores the training set it was cached on; call "
                             "cache(train_loader) with this loader first.")
        assert self._train is not None
        return self._train

    def attribute(self, train_loader: DataLoader, test_loader: DataLoader) -> Tensor:
        alpha, h_train = self._train_side(train_loader)
        self.task.load_checkpoint(0)
        columns = []
        for _, batch in self._batches(test_loader, "test"):
            h = self._features(batch)
            labels = self.label_func(batch).long().reshape(-1)
            columns.append(alpha[:, labels] * (h_train @ h.T))
        return torch.cat(columns, dim=1)

    def self_attribute(self, train_loader: DataLoader) -> Tensor:
        alpha, h_train = self._train_side(train_loader)
        values = []
        offset = 0
        for _, batch in self._batches(train_loader, "train"):
            labels = self.label_func(batch).long().reshape(-1)
            rows = slice(offset, offset + labels.shape[0])
            values.append(alpha[rows].gather(1, labels[:, None])[:, 0]
                          * (h_train[rows] ** 2).sum(dim=1))
            offset += labels.shape[0]
        return torch.cat(values)
