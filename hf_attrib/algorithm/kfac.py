r"""Influence functions with K-FAC and EK-FAC curvature (Grosse et al., 2023; kronfluence).

The score is the influence function's (``hf_attrib.algorithm.influence_function``, same sign
and scale),

.. math::  \tau(x)_i = -\frac{1}{n}\, \nabla f(x)^\top (F + \Lambda)^{-1} \nabla L(x_i),

with the Hessian replaced by a layer-wise Kronecker-factored Fisher ``F`` (see
``hf_attrib.func.kfac``): block-diagonal over the selected parameters, each weight block
``Q diag(e) Q^T`` with ``Q = Q_R kron Q_C`` the eigenvectors of its two factors. Each gradient
is rotated into that basis by the per-layer engine (``hf_attrib.func.layer_grads``: one batched
forward/backward, no per-example gradient formed), and the inverse is a division there:
training features ``u_i = Q^T g_i``, test features ``Q^T g(x) / (e + damping)``.

* ``IFAttributorKFAC``: ``e = l_R kron l_C / (n N)``, the factors' eigenvalues.
* ``IFAttributorEKFAC``: ``e`` are the second moments of the training gradients in the
  eigenbasis, ``mean_i (Q^T g_i)^2`` (George et al., 2018): the best diagonal in that basis.
  With the empirical Fisher these come from the cached training features (no extra pass).

Options:

* ``fisher``: ``"true"`` (the default, kronfluence's): the Fisher of labels sampled from the
  model's predictive distribution, which needs ``sampled_loss_func(params, batch, generator)``,
  the training loss with each example's label drawn from the model (``torch.multinomial(...,
  generator=generator)``), a mean over the batch like ``loss_func``; batches are sampled with
  seeds fixed by ``(fisher_seed, checkpoint, batch offset)``, so results do not depend on the
  number of processes. Checked on each process's first batch of every checkpoint: the same
  seed must give the same value (labels drawn with ``generator``, not the global RNG). Not
  checkable, because the labels are drawn inside the function: that the batch's value is the
  mean of independent per-example losses (the engine's per-example factors assume it, as for
  ``loss_func``, which the features' check covers); a sum over the batch, or a token mean
  across it, scales or mixes the Fisher silently. ``"empirical"``: the training loss with the
  true labels (``loss_func``, nothing else needed).
* ``damping``: ``None`` (default): per block, ``damping_scale`` (0.1) times the mean of the
  block's eigenvalues (kronfluence's heuristic ``damping_factor=None``, applied per parameter
  block rather than per module, i.e. a bias is damped on its own scale); a float: that value
  for every block (kronfluence's default is ``1e-8``). Applied when scoring: it may be changed
  between ``attribute`` calls without a new ``cache``.

Factors are fitted in ``cache`` (one pass over the training loader with the engine, summed over
processes under ``torchrun``/``accelerate``), then the training features are computed in the
eigenbasis (a second pass; EK-FAC with the true Fisher needs a third, for the eigenvalues).
``save_cache`` keeps the eigenbases and eigenvalues as safetensors (fit once, attribute many
times); ``load_cache`` checks them against the model, layers and options.

Supported layers: those of the per-layer engine (``nn.Linear``, transformers ``Conv1D``,
``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``), with the model in eval mode and a loss that
is a mean of independent per-example losses (checked on the first batch against explicit
per-example gradients). A dense factor side is at most ``MAX_DENSE_DIM`` wide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hf_attrib.algorithm.base import FeatureAttributor
from hf_attrib.algorithm.cache_store import CacheIntegrityError
from hf_attrib.algorithm.factored import FactoredFeatures, checked_engine
from hf_attrib.distributed import all_reduce_sum
from hf_attrib.func.factored_projection import stable_seed
from hf_attrib.func.kfac import (
    BlockEigen,
    EigenbasisProjector,
    KroneckerFactors,
    block_damping,
    kfac_eigenvalues,
    transposed_bases,
)
from hf_attrib.func.layer_grads import Block, Side
from hf_attrib.func.utils import batch_size_of, unflatten_params
from hf_attrib.task import AttributionTask, CheckpointFunctions

__all__ = ["IFAttributorEKFAC", "IFAttributorKFAC"]

_FISHERS = ("true", "empirical")
# kronfluence's heuristic damping: 0.1 x the mean eigenvalue.
_DAMPING_SCALE = 0.1

SampledLossFunc = Callable[[dict[str, Tensor], Any, torch.Generator], Tensor]


class _KFACBase(FeatureAttributor):
    """K-FAC / EK-FAC influence (see module). Subclasses set ``strategy``.

    Args:
        task: the attribution task.
        layer_name: parameters or modules to attribute through (``None``: all; every one
            must belong to a supported layer).
        device: where to compute (``None``: the model's device).
        fisher: ``"true"`` (sampled labels; needs ``sampled_loss_func``) or ``"empirical"``.
        sampled_loss_func: ``f(params, batch, generator) -> scalar``, the batch-mean training
            loss with labels sampled from the model using ``generator`` (every draw from it:
            the same seed must give the same value), the mean of independent per-example
            losses as ``loss_func`` is. ``None``: the task's ``sampled_loss_func`` attribute,
            if it has one.
        fisher_seed: seed of the sampled labels.
        damping: one damping for every block, or ``None`` for the per-block heuristic.
        damping_scale: the heuristic's factor on each block's mean eigenvalue.
        grad_chunk_size: unused (the engine takes whole batches); accepted for uniformity.
        max_cache_bytes: keep the training features in memory while they fit (bytes).
        progress: show progress bars.
        distributed: share the passes between processes (see ``BaseAttributor``).

    Raises:
        ValueError: a bad option, ``fisher="true"`` without a sampled loss, a selected
            parameter outside the supported layers, or active dropout.
    """

    strategy = "ekfac"
    train_kind = "loss"
    test_kind = "target"

    def __init__(self, task: AttributionTask, *, layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str | None = None, fisher: str = "true",
                 sampled_loss_func: SampledLossFunc | None = None, fisher_seed: int = 0,
                 damping: float | None = None, damping_scale: float = _DAMPING_SCALE,
                 grad_chunk_size: int | None = None, max_cache_bytes: int = 4 * 2**30,
                 progress: bool = False, distributed: bool | None = None) -> None:
        super().__init__(task, layer_name=layer_name, device=device,
                         grad_chunk_size=grad_chunk_size, max_cache_bytes=max_cache_bytes,
                         progress=progress, distributed=distributed)
        if fisher not in _FISHERS:
            raise ValueError(f"fisher must be 'true' (labels sampled from the model) or "
                             f"'empirical' (the training labels), got {fisher!r}.")
        if sampled_loss_func is None:
            sampled_loss_func = getattr(task, "sampled_loss_func", None)
        elif fisher == "empirical":
            raise ValueError("sampled_loss_func is used only with fisher='true'; drop it or "
                             "pass fisher='true'.")
        if fisher == "true" and sampled_loss_func is None:
            raise ValueError(
                f"{type(self).__name__}(fisher='true') (the default, as kronfluence's) needs "
                "the training loss with labels sampled from the model: pass "
                "sampled_loss_func=f(params, batch, generator) -> batch-mean loss, with each "
                "label drawn by torch.multinomial(softmax(logits), 1, generator=generator); or "
                "pass fisher='empirical' to use the training labels (loss_func).")
        if damping is not None and not damping > 0:
            raise ValueError(f"damping must be > 0 (or None for the per-block heuristic), got "
                             f"{damping!r}.")
        if not damping_scale > 0:
            raise ValueError(f"damping_scale must be > 0, got {damping_scale!r}.")
        self.fisher = fisher
        self.sampled_loss_func = sampled_loss_func if fisher == "true" else None
        self.fisher_seed = fisher_seed
        self.damping = damping
        self.damping_scale = damping_scale
        self._layers = checked_engine(
            self.task.model, self.task.select_parameters(self.layer_name),
            who=type(self).__name__, verb="factors",
            instead="use IFAttributorCG / IFAttributorArnoldi")
        self._rotation = EigenbasisProjector(list(self._layers.blocks.values()), self.device)
        self._rotated: FactoredFeatures | None = None
        self._fits: dict[int, dict[str, BlockEigen]] = {}

    # -- the engine's features, rotated into the eigenbasis ----------------------------------
    def _factored_features(self, fns: CheckpointFunctions) -> FactoredFeatures:
        if self._rotated is None:
            self._rotated = FactoredFeatures(self.task, fns, None, self.device,
                                             projector=self._rotation)
        return self._rotated

    def _projector_descriptions(self) -> list[Any] | None:
        return None  # the eigenbases are saved; the options say how they were fitted

    def _cache_options(self) -> dict[str, Any]:
        options = {"strategy": self.strategy, "fisher": self.fisher}
        if self.fisher == "true":
            options["fisher_seed"] = self.fisher_seed
        return {**super()._cache_options(), **options}

    # -- the fit ------------------------------------------------------------------------------
    def _fisher_loss(self, fns: CheckpointFunctions, batch: Any, offset: int
                     ) -> Callable[[], Tensor]:
        """The batch-mean loss whose gradients define the Fisher (``value`` for the engine)."""
        if self.sampled_loss_func is None:
            return lambda: fns.loss(fns.theta, batch)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(stable_seed(self.fisher_seed, fns.index, offset))
        # The merge task.functions binds into fns.loss: the fixed parameters of checkpoint
        # fns.index (not whatever checkpoint the model holds now), the selected ones from theta.
        model = self.task.load_checkpoint(fns.index)
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in fns.layout}
        params = {**fixed, **unflatten_params(fns.theta, fns.layout)}
        func = self.sampled_loss_func
        return lambda: func(params, batch, generator)

    def _check_sampled_loss(self, fns: CheckpointFunctions, batch: Any, offset: int) -> None:
        """The sampled loss must draw its labels from the generator it is passed: two calls
        with the same seed give the same value (else the Fisher would depend on the global
        RNG and on the number of processes)."""
        with torch.no_grad():
            first = self._fisher_loss(fns, batch, offset)().float()
            second = self._fisher_loss(fns, batch, offset)().float()
        # a tolerance for non-deterministic GPU reductions; other labels differ far more
        if first.shape != second.shape or not torch.allclose(first, second, rtol=1e-4,
                                                             atol=1e-7):
            raise ValueError(
                f"sampled_loss_func gave {first.flatten()[:1].tolist()} and "
                f"{second.flatten()[:1].tolist()} on the same batch with generators of the same "
                f"seed (checkpoint {fns.index}): it must draw every label with the generator "
                "it is passed (torch.multinomial(probs, 1, generator=generator)), not the "
                "global RNG, and return the batch mean of independent per-example losses, as "
                "loss_func does. Fix it, or pass fisher='empirical'.")

    def _run(self, fns: CheckpointFunctions, batch: Any, offset: int,
             visit: Callable[[Block, Side, Side | None], None]) -> None:
        size = batch_size_of(batch)
        try:
            self._layers.run(self._fisher_loss(fns, batch, offset), size, visit)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, IndexError, KeyError, RuntimeError) as err:
            func = "loss_func" if self.sampled_loss_func is None else "sampled_loss_func"
            raise self._batch_error("train", offset, batch, func, err) from err

    def _fit(self, fns: CheckpointFunctions, loader: DataLoader) -> dict[str, BlockEigen]:
        """Checkpoint ``fns.index``'s factors, summed over the processes, eigendecomposed."""
        factors = KroneckerFactors(self._layers.blocks.values(), self._one_hot_rows(),
                                   self.device)
        desc = f"K-FAC factors (ckpt {fns.index})"
        for i, (offset, batch) in enumerate(self._batches(loader, "train", desc, shard=True)):
            if i == 0 and self.sampled_loss_func is not None:
                self._check_sampled_loss(fns, batch, offset)
            factors.start_batch(batch_size_of(batch))
            self._run(fns, batch, offset, factors.visit)
            factors.end_batch()
        factors.all_reduce(self._world()[1])
        return factors.eigen()

    def _one_hot_rows(self) -> set[str]:
        """Weight blocks whose rows side is only ever an embedding's one-hot tokens: their
        covariance is kept diagonal and their eigenbasis is the identity (no matrix)."""
        one_hot = {site.weight.name for site in self._layers.sites
                   if site.kind == "embedding" and site.weight is not None}
        return one_hot - {site.weight.name for site in self._layers.sites
                          if site.kind != "embedding" and site.weight is not None}

    def _cache_features(self, fns: CheckpointFunctions, loader: DataLoader) -> Tensor | None:
        # The eigenbasis first: the training features are the gradients rotated into it.
        fit = self._fit(fns, loader)
        self._rotation.set_basis(fns.index, transposed_bases(fit))
        self._fits[fns.index] = fit
        return super()._cache_features(fns, loader)

    def _prepare(self, fns: CheckpointFunctions, loader: DataLoader,
                 features: Tensor | None) -> Tensor:
        """The eigenvalues ``[width]`` (float64) of checkpoint ``fns.index``."""
        fit = self._fits.pop(fns.index)
        if self.strategy == "kfac":
            return kfac_eigenvalues(self._rotation.blocks, fit, self._n_cache)
        return self._corrected_eigenvalues(fns, loader, features)

    def _corrected_eigenvalues(self, fns: CheckpointFunctions, loader: DataLoader,
                               features: Tensor | None) -> Tensor:
        """EK-FAC: ``mean_i (Q^T g_i)^2`` over the training set, ``g_i`` the Fisher's gradients
        (the cached features themselves for the empirical Fisher)."""
        if self.fisher == "empirical" and features is not None:
            return features.double().pow(2).sum(0) / self._n_cache
        total = torch.zeros(self._rotation.proj_dim, dtype=torch.float64, device=self.device)
        if self.fisher == "empirical":  # features not kept: one more pass
            for _, feats, _, _ in self._train_blocks(fns, loader, shard=True):
                total += feats.double().pow(2).sum(0)
        else:
            desc = f"EK-FAC eigenvalues (ckpt {fns.index})"
            for offset, batch in self._batches(loader, "train", desc, shard=True):
                out = torch.zeros(batch_size_of(batch), self._rotation.proj_dim,
                                  device=self.device)

                def visit(block: Block, rows: Side, cols: Side | None, out: Tensor = out
                          ) -> None:
                    self._rotation.accumulate(out, block, rows, cols, fns.index)

                self._run(fns, batch, offset, visit)
                total += out.double().pow(2).sum(0)
        return all_reduce_sum(total, self._world()[1]) / self._n_cache

    # -- scoring ------------------------------------------------------------------------------
    def _damping(self, eigenvalues: Tensor) -> Tensor:
        if self.damping is not None:
            return torch.full_like(eigenvalues, self.damping)
        return block_damping(eigenvalues, self._rotation.slices, self.damping_scale)

    def _transform_test(self, fns: CheckpointFunctions, state: Tensor, feats: Tensor) -> Tensor:
        denominator = state + self._damping(state)
        # A zero denominator (a block with no curvature at all under the heuristic) is a
        # direction in which every training gradient is zero: its score terms are zero.
        inverse = torch.where(denominator > 0, 1.0 / denominator.clamp_min(1e-300),
                              torch.zeros_like(denominator))
        return (feats.double() * inverse).to(feats.dtype)

    def _weight(self, fns: CheckpointFunctions) -> float:
        return -1.0 / (self._n_cache * self.task.num_checkpoints)

    def attribute(self, train_loader: DataLoader, test_loader: DataLoader) -> Tensor:
        return _finite(super().attribute(train_loader, test_loader), self, "attribute")

    def self_attribute(self, train_loader: DataLoader) -> Tensor:
        return _finite(super().self_attribute(train_loader), self, "self_attribute")

    # -- save_cache / load_cache --------------------------------------------------------------
    def _state_tensors(self, index: int, state: Tensor) -> dict[str, Tensor]:
        tensors = {"eigenvalues": state}
        for (name, axis), basis in self._rotation.bases(index).items():
            if basis is not None:
                tensors[f"basis/{name}/{axis}"] = basis
        return tensors

    def _state_from_tensors(self, index: int, tensors: dict[str, Tensor]) -> Tensor:
        eigenvalues = tensors.pop("eigenvalues", None)
        if eigenvalues is None or eigenvalues.shape != (self._rotation.proj_dim,):
            raise CacheIntegrityError(
                f"checkpoint {index}'s K-FAC eigenvalues are missing or of the wrong size; "
                "rebuild the cache with cache(train_loader) and save_cache.")
        bases: dict[tuple[str, int], Tensor | None] = {}
        one_hot = self._one_hot_rows()
        for block in self._rotation.blocks:
            sides = [(0, block.rows)] + ([(1, block.cols)] if block.is_matrix else [])
            for axis, dim in sides:
                if axis == 0 and block.name in one_hot:
                    # the identity: nothing saved (a tensor here is refused below)
                    bases[(block.name, axis)] = None
                    continue
                basis = tensors.pop(f"basis/{block.name}/{axis}", None)
                if basis is None or basis.shape != (dim, dim):
                    # a missing basis is not the identity: the features were rotated by one
                    found = "missing" if basis is None else f"of shape {list(basis.shape)}"
                    raise CacheIntegrityError(
                        f"checkpoint {index}'s K-FAC eigenbasis of {block.name} "
                        f"({'rows' if axis == 0 else 'columns'} side) is {found}, not a "
                        f"{dim} x {dim} matrix; rebuild the cache with cache(train_loader) and "
                        "save_cache.")
                bases[(block.name, axis)] = basis
        if tensors:
            raise CacheIntegrityError(f"checkpoint {index}'s K-FAC state holds unknown tensors "
                                      f"{sorted(tensors)[:3]}; rebuild the cache.")
        self._rotation.set_basis(index, bases)
        return eigenvalues.to(self.device, torch.float64)


def _finite(scores: Tensor, attributor: _KFACBase, call: str) -> Tensor:
    """``scores``, or a ``FloatingPointError`` naming the fix when one is NaN/inf."""
    if bool(torch.isfinite(scores.sum())) or bool(torch.isfinite(scores).all()):
        return scores
    bad = int((~torch.isfinite(scores)).sum())
    raise FloatingPointError(
        f"{type(attributor).__name__}.{call} produced {bad} NaN/inf score(s) from finite "
        "gradients: the damped inverse overflowed. Pass a larger damping (or damping_scale).")


class IFAttributorEKFAC(_KFACBase):
    """Influence function with EK-FAC curvature (kronfluence's default strategy): see the
    module for the method and ``_KFACBase`` for the options (all keyword-only)."""

    strategy = "ekfac"


class IFAttributorKFAC(_KFACBase):
    """Influence function with K-FAC curvature: see the module for the method and
    ``_KFACBase`` for the options (all keyword-only)."""

    strategy = "kfac"
