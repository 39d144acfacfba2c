r"""Representer point selection with L2 regularisation (RPS-L2; Yeh et al., 2018).

With :math:`\Phi(x) = \Theta_1 h(x) + b` the pre-activation output of the final linear layer
and :math:`h` its input features, a stationary point of
:math:`\frac1n\sum_j L(x_j) + \lambda\|\Theta_1\|^2` satisfies
:math:`\Theta_1 = \sum_j \alpha_j h_j^\top` with
:math:`\alpha_j = -\frac{1}{2\lambda n}\,\partial L(x_j)/\partial\Phi(x_j)`, so the output
for class :math:`c` on :math:`x` decomposes as
:math:`\Theta_{1,c} h = \sum_j \alpha_{jc}\,h_j^\top h`.
The score of training example :math:`j` for test example :math:`x` of class :math:`c` is that
term, :math:`\alpha_{jc}\,h_j^\top h`: how much :math:`x_j` raises the class-:math:`c` output.

The theorem needs a stationary point, which a trained network's last layer is not. So by
default (``fit_last_layer=True``, as dattri and the authors' code) the last layer's weight is
first refit, on the training features, to the model's own predictions with the L2 term:
:math:`L(x_j)` is the cross-entropy between :math:`\mathrm{softmax}(\Theta_1 h_j + b)` and the
model's predicted probabilities :math:`\mathrm{softmax}(\Phi(x_j))` (sigmoid and binary
cross-entropy for a single output), minimised by full-batch L-BFGS in float64 from the model's
weight until the gradient's largest entry is below ``fit_tol``. The bias :math:`b` is kept. Then
:math:`\alpha_j = -(\mathrm{softmax}(\Theta_1 h_j + b) - \mathrm{softmax}(\Phi(x_j)))/(2\lambda n)`
and the decomposition above holds to the fit's tolerance. With ``fit_last_layer=False`` the
model's own weights are taken as the stationary point and :math:`\partial L/\partial\Phi` is
the gradient of the task's ``loss_func`` (use it for a model trained with that L2 term).

``fit_targets="labels"`` fits to the one-hot training labels instead (the training objective
itself, also a stationary point for the theorem). The default explains the model's
*predictions*, which attributes better; the labels make the self-influence a mislabel
detector. On the digits-lr benchmark: predictions LDS 0.629 / noisy-label AUC 0.017 (a
mislabelled example's self-influence is the most negative), labels LDS 0.443 / AUC 0.995.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from hf_attrib.algorithm.base import BaseAttributor
from hf_attrib.algorithm.cache_store import CacheIntegrityError, CacheReader
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
        normalize_preactivate: use unit-norm features :math:`h/\\|h\\|` in the kernel (the
            fit and :math:`\\alpha` use the layer's real inputs).
        label_func: ``batch -> [B]`` class index of each test example (default: labels of the
            batch).
        fit_last_layer: refit the last layer's weight with the L2 term to a stationary point
            first (see the module docstring); ``False`` uses the model's weight as it is.
        fit_tol: the fit stops when every entry of the objective's gradient is below this.
        fit_max_iter: L-BFGS iterations at most (a warning says when they did not reach
            ``fit_tol``).
        fit_targets: what the refit matches: ``"predictions"`` (the model's predicted
            probabilities, as dattri; best for attribution) or ``"labels"`` (the training
            labels, one-hot; best for mislabel detection by self-influence).
        device, progress, distributed: see ``BaseAttributor`` (``device=None``: the model's
            device; ``grad_chunk_size`` is accepted and unused).

    Why not ``FeatureAttributor``'s shared loop: that loop scores inner products of
    per-example gradients of ``loss_func``/``target_func``, computed independently per example
    and per checkpoint. RPS's train side is not that: every :math:`\\alpha_j` comes from one
    fit over the whole training set (the refit weight), its features are the last layer's
    inputs (normalised in the kernel only), the test side picks the column of :math:`\\alpha`
    of each test example's class (``label_func``), and there is one checkpoint. What it does
    instead: ``cache`` makes one pass over the training loader (the same loader checks) and
    keeps :math:`\\alpha` ``[n, C]`` and :math:`h` ``[n, H]`` (a forward pass per example and
    a small convex fit); ``attribute`` scores one test batch at a time. With ``distributed``
    every process computes all of it (no work is shared; every process gets the same scores).

    Attributes:
        fitted_weight: the refit weight :math:`\\Theta_1` ``[classes, features]`` (float64),
            set by ``cache`` when ``fit_last_layer``.
    """

    def __init__(self, task: AttributionTask, *, final_linear_layer_name: str,
                 l2_strength: float = 0.003, normalize_preactivate: bool = False,
                 label_func: Callable[[Any], Tensor] = default_label_func,
                 device: torch.device | str | None = None, fit_last_layer: bool = True,
                 fit_tol: float = 1e-9, fit_max_iter: int = 1000,
                 fit_targets: str = "predictions", **kwargs: Any) -> None:
        super().__init__(task, layer_name=final_linear_layer_name, device=device, **kwargs)
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
        if fit_targets not in ("predictions", "labels"):
            raise ValueError(f"fit_targets must be 'predictions' (the model's predicted "
                             f"probabilities, as dattri) or 'labels' (the training labels), "
                             f"got {fit_targets!r}.")
        self.fit_last_layer = fit_last_layer
        self.fit_targets = fit_targets
        self.fit_tol = fit_tol
        self.fit_max_iter = fit_max_iter
        self.fitted_weight: Tensor | None = None
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

    def _layer_io(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(h [B, H], output [B, C])`` of the final linear layer (raw, not normalised)."""
        state: dict[str, Tensor] = {}

        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            state["h"], state["out"] = inputs[0].detach(), out.detach()

        handle = self._layer().register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.task.loss_func({n: p.detach() for n, p in self.task.model.named_parameters()},
                                    batch)
        finally:
            handle.remove()
        h = state["h"]
        if h.dim() != 2:
            raise ValueError(f"RPS needs [batch, features] inputs at {self.layer_name_final!r}; "
                             f"got {tuple(h.shape)}. Use RPS on a classification head.")
        return h, state["out"]

    def _features(self, batch: Any) -> Tensor:
        return self._normalize(self._layer_io(batch)[0])

    # -- API ---------------------------------------------------------------------------------
    def cache(self, train_loader: DataLoader) -> None:
        """Fit the last layer (``fit_last_layer``), then compute :math:`\\alpha_j` and
        :math:`h_j` for the training set."""
        self._loaded_n = None  # a cache restored by load_cache is replaced
        self.task.load_checkpoint(0)
        if self.fit_last_layer:
            alpha, feats = self._fitted_representers(train_loader)
        else:
            alphas, feats_list = [], []
            for offset, batch in self._batches(train_loader, "train", "RPS representers"):
                g, h = self._representers(batch, offset)
                alphas.append(g)
                feats_list.append(h)
            alpha = torch.cat(alphas)
            alpha = alpha / (-2.0 * self.l2_strength * alpha.shape[0])
            feats = torch.cat(feats_list)
        self._train = (alpha, feats)
        self._cache_loader = train_loader

    def _fitted_representers(self, train_loader: DataLoader) -> tuple[Tensor, Tensor]:
        """Refit the weight to a stationary point; ``(alpha [n, C], features [n, H])``."""
        hs, outs, labels = [], [], []
        for _, batch in self._batches(train_loader, "train", "RPS features"):
            h, out = self._layer_io(batch)
            hs.append(h)
            outs.append(out)
            if self.fit_targets == "labels":
                labels.append(self.label_func(batch).long().reshape(-1))
        h, out = torch.cat(hs), torch.cat(outs)
        bad = ~(torch.isfinite(h).all(dim=1) & torch.isfinite(out).all(dim=1))
        if bool(bad.any()):
            raise FloatingPointError(
                f"non-finite (NaN/inf) features or outputs at {self.layer_name_final!r} for "
                f"train example {int(bad.nonzero()[0, 0])} (its position in the train loader); "
                "check that example's inputs and the checkpoint's weights.")
        layer = self._layer()
        bias = (layer.bias.detach().double() if layer.bias is not None
                else torch.zeros(layer.out_features, dtype=torch.float64, device=h.device))
        h64 = h.double()
        targets = (_probabilities(out.double()) if self.fit_targets == "predictions"
                   else _label_targets(torch.cat(labels), out.shape[1]))
        weight = _fit_weight(h64, bias, targets, layer.weight.detach().double(),
                             self.l2_strength, self.fit_tol, self.fit_max_iter)
        if not bool(torch.isfinite(weight).all()):
            raise FloatingPointError("RPS: the last-layer fit diverged (non-finite weight); "
                                     "raise l2_strength.")
        self.fitted_weight = weight
        residual = _probabilities(h64 @ weight.T + bias) - targets
        alpha = residual / (-2.0 * self.l2_strength * h.shape[0])
        return alpha.to(h.dtype), self._normalize(h)

    def _train_side(self, train_loader: DataLoader) -> tuple[Tensor, Tensor]:
        if self._cache_loader is None and self._loaded_n is not None:
            self._check_loaded_count(train_loader)  # restored by load_cache: bind this loader
            self._cache_loader, self._loaded_n = train_loader, None
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


    # -- save_cache / load_cache: alpha, the features and the refit weight ----------------------
    def _cache_options(self) -> dict[str, Any]:
        return {"final_linear_layer_name": self.layer_name_final,
                "l2_strength": self.l2_strength,
                "normalize_preactivate": self.normalize_preactivate,
                "fit_last_layer": self.fit_last_layer, "fit_targets": self.fit_targets,
                "fit_tol": self.fit_tol, "fit_max_iter": self.fit_max_iter}

    def _cache_contents(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self._train is None:
            raise ValueError("RPSAttributor has nothing cached to save: call "
                             "cache(train_loader) (or attribute) first.")
        alpha, feats = self._train
        tensors = {"alpha": alpha, "features": feats}
        if self.fitted_weight is not None:
            tensors["fitted_weight"] = self.fitted_weight
        return tensors, {"num_train": alpha.shape[0]}

    def _restore_cache(self, reader: CacheReader) -> None:
        alpha = reader.tensor("alpha", self.device)
        feats = reader.tensor("features", self.device)
        n = reader.manifest["num_train"]
        if alpha.shape[0] != n or feats.shape[0] != n:
            raise CacheIntegrityError(f"the RPS cache in {reader.path} holds {alpha.shape[0]} "
                                      f"representer values for {n} training examples; "
                                      "rebuild it.")
        self.fitted_weight = (reader.tensor("fitted_weight", self.device)
                              if "fitted_weight" in reader else None)
        self._train = (alpha, feats)
        self._cache_loader = None


def _label_targets(labels: Tensor, classes: int) -> Tensor:
    """Training labels as probability targets: one-hot (the label itself for one output)."""
    if classes == 1:
        return labels.double()[:, None]
    if bool(((labels < 0) | (labels >= classes)).any()):
        raise ValueError(f"RPS fit_targets='labels': labels must be class indices in "
                         f"0..{classes - 1}; got {labels.min().item()}..{labels.max().item()}.")
    return F.one_hot(labels, classes).double()


def _probabilities(logits: Tensor) -> Tensor:
    """Softmax over classes (sigmoid for a single output)."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy against probability targets (binary for a single output)."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()


def _fit_weight(h: Tensor, bias: Tensor, targets: Tensor, init: Tensor, l2: float, tol: float,
                max_iter: int) -> Tensor:
    """Minimise ``mean CE(h W^T + b, targets) + l2 ||W||^2`` over ``W`` (full batch, L-BFGS).

    The objective is strongly convex, so L-BFGS from the model's weight reaches the unique
    stationary point; a deterministic full-batch solver gives the same weight on every run.
    """
    weight = init.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tol, tolerance_change=1e-20,
                                  line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        return _soft_cross_entropy(h @ weight.T + bias, targets) + l2 * weight.pow(2).sum()

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value

    optimizer.step(closure)
    (grad,) = torch.autograd.grad(objective(), weight)
    largest = float(grad.abs().max())
    if not largest <= tol * 10:
        warnings.warn(f"RPS: the last-layer fit stopped after {max_iter} L-BFGS iterations with "
                      f"gradient {largest:.1e} (fit_tol={tol:g}); the representer values are "
                      "approximate. Raise fit_max_iter, or l2_strength (a better-conditioned "
                      "fit).", RuntimeWarning, stacklevel=3)
    return weight.detach()
