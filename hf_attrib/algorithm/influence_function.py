r"""Influence functions (Koh & Liang, 2017) with four IHVP solvers.

For training example :math:`x_i` and test example :math:`x`,

.. math::
    \tau(x)_i = -\frac{1}{n}\, \nabla_\theta f(x)^\top (H + \lambda I)^{-1} \nabla_\theta L(x_i),
    \qquad H = \frac{1}{n}\sum_{j=1}^n \nabla^2_\theta L(x_j),

the first-order estimate of how much including :math:`x_i` raises the target :math:`f` on
:math:`x` (removing it moves the parameters by :math:`\tfrac1n H^{-1}\nabla L(x_i)`). The
paper's Appendix A writes :math:`g(x_i)^\top H^{-1} g(x)`; the factor :math:`-1/n` makes the
scores additive predictions of the target on the library-wide sign convention. The training
set of the Hessian is the loader passed to ``cache``. With several checkpoints, scores are
averaged.

Solvers: ``IFAttributorExplicit`` (the ``d x d`` Hessian, inverted once), ``IFAttributorCG``
(conjugate gradients on all test gradients at once), ``IFAttributorLiSSA`` (stochastic Neumann
series over random training mini-batches) and ``IFAttributorArnoldi`` (top eigenpairs of
:math:`H`, then a projection of every gradient onto them).

No NaN or inf leaves them: gradients, solver outputs (a diverging LiSSA recursion stops with
an estimate of the eigenvalue ``scaling`` must exceed; zero Arnoldi eigenvalues at
``regularization=0`` are refused) and scores are checked, and a violation raises an error that
names the option to change. Models with float16/bfloat16 weights are attributed on float32
copies (see ``float32_functions``): gradients, HVPs and solves run in float32 and the scores
are float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hf_attrib.algorithm.base import FeatureAttributor, to_device
from hf_attrib.algorithm.cache_store import CacheReader
from hf_attrib.distributed import gather_rows, shard_range
from hf_attrib.func.hvp_engine import (
    HessianSum,
    chunked,
    hessian_columns,
    hvp_operator,
    linearization_bytes,
    vmap_chunk,
)
from hf_attrib.func.projection import Projector
from hf_attrib.func.solvers import (
    CG_FIX,
    arnoldi_eigen,
    batched_cg,
    block_cg,
    check_eigenvalues,
    check_finite_solution,
    lissa_recursion,
)
from hf_attrib.func.solvers.explicit import eigh_, symmetrize_
from hf_attrib.func.utils import batch_size_of, unflatten_params
from hf_attrib.loaders import loader_indices
from hf_attrib.task import AttributionTask, CheckpointFunctions

__all__ = [
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
]

# Largest Hessian IFAttributorExplicit builds by default (float64 bytes, ~11k parameters):
# beyond it, the d^3 inversion takes minutes on a CPU and another solver is the better tool.
_MAX_EXPLICIT_BYTES = 2**30
# Memory for the per-batch HVP linearisations kept between products (see HessianSum).
_HESSIAN_CACHE_BYTES = 2**30
# Parameter dtypes whose curvature is computed on float32 copies: in them an HVP overflows
# (float16: a NaN column from IF-CG on a small MLP) or loses the solve (bfloat16: IF-CG scores
# correlated 0.04 with float32's).
_HALF = (torch.float16, torch.bfloat16)


def _upcast(batch: Any) -> Any:
    """``batch`` with every half-precision tensor cast to float32 (labels, ids untouched)."""
    if isinstance(batch, Tensor):
        return batch.float() if batch.dtype in _HALF else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _upcast(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_upcast(v) for v in batch)
    return batch


@contextmanager
def _buffers_as(model: nn.Module, buffers: Mapping[str, Tensor]) -> Iterator[None]:
    """Swap the named buffers of ``model`` for ``buffers`` during the block.

    The loss function receives parameters only (a loss adding weight decay over
    ``params.values()`` must not see buffers), so half-precision buffers such as BatchNorm
    statistics are replaced on the modules themselves, and put back afterwards.
    """
    saved = []
    try:
        for name, value in buffers.items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            saved.append((module, leaf, module._buffers[leaf]))
            module._buffers[leaf] = value
        yield
    finally:
        for module, leaf, value in reversed(saved):
            module._buffers[leaf] = value


def float32_functions(task: AttributionTask, fns: CheckpointFunctions) -> CheckpointFunctions:
    """``fns`` computed in float32 when the model holds half-precision weights, else ``fns``.

    The selected parameters (``theta``), the other parameters and the floating buffers are
    copied to float32 and half-precision tensors of every batch are cast to float32 inside the
    call, so per-example gradients, HVPs and solves all run in float32 and the scores come
    out in float32. Costs one float32 copy of the model's weights while attributing.

    Must be called while checkpoint ``fns.index`` is the one loaded in ``task.model`` (right
    after ``task.functions``): the other parameters are read from the model.
    """
    model = task.model
    half = fns.theta.dtype in _HALF or any(p.dtype in _HALF for p in model.parameters())
    if not half:
        return fns
    layout = {n: t.detach().float() for n, t in fns.layout.items()}
    fixed = {n: p.detach().float() if p.is_floating_point() else p.detach()
             for n, p in model.named_parameters() if n not in layout}
    buffers = {n: b.float() for n, b in model.named_buffers() if b.dtype in _HALF}

    def bind(func: Callable[[dict[str, Tensor], Any], Tensor]) -> Callable[[Tensor, Any], Tensor]:
        def flat(theta: Tensor, batch: Any) -> Tensor:
            with _buffers_as(model, buffers):
                out = func({**fixed, **unflatten_params(theta, layout)}, _upcast(batch))
            return out.float()

        return flat

    loss = bind(task.loss_func)
    target = loss if fns.target_is_loss else bind(task.target_func)
    theta = torch.cat([t.reshape(-1) for t in layout.values()])
    return CheckpointFunctions(fns.index, theta, layout, loss, target, fns.target_is_loss)


class _IFBase(FeatureAttributor):
    """Shared pieces: train side = loss gradients, test side = target gradients, weight -1/n.

    Options every IF attributor takes (besides ``FeatureAttributor``'s):

    Args:
        regularization: :math:`\\lambda` added to the Hessian.
        mode: HVP mode, ``"rev-rev"`` (linearisations can be kept between products) or
            ``"rev-fwd"`` (less memory, nothing kept).
        rhs_chunk_size: most right-hand sides in one vectorised HVP call (calls are sized
            below it from the model's activation memory, see ``func.hessian.HessianSum``).
        hessian_cache_bytes: memory for the per-batch HVP linearisations kept between
            products (all checkpoints together); batches beyond it are re-linearised for
            every product.
    """

    train_kind = "loss"
    test_kind = "target"

    def __init__(self, task: AttributionTask, *, layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str | None = None, regularization: float = 0.0,
                 mode: str = "rev-rev", rhs_chunk_size: int = 256,
                 hessian_cache_bytes: int = _HESSIAN_CACHE_BYTES, **kwargs: Any) -> None:
        super().__init__(task, layer_name=layer_name, device=device, **kwargs)
        if regularization < 0:
            raise ValueError("regularization must be >= 0.")
        self.regularization = regularization
        self.mode = mode
        self.rhs_chunk_size = rhs_chunk_size
        self.hessian_cache_bytes = hessian_cache_bytes
        self._float32: dict[int, CheckpointFunctions] = {}

    # -- float32 curvature and finite results ------------------------------------------------
    def _f32(self, fns: CheckpointFunctions) -> CheckpointFunctions:
        """The float32 view of ``fns`` (``fns`` itself for a float32/float64 model; a half
        model's float32 copy is built once per checkpoint per ``cache``)."""
        if fns.index in self._float32:
            return self._float32[fns.index]
        converted = float32_functions(self.task, fns)
        if converted is not fns:  # holds copies, not views of the loaded checkpoint: keep it
            self._float32[fns.index] = converted
        return converted

    def cache(self, train_loader: DataLoader) -> None:
        self._float32.clear()
        super().cache(train_loader)

    def _restore_cache(self, reader: CacheReader) -> None:
        self._float32.clear()
        super()._restore_cache(reader)

    def _features(self, fns: CheckpointFunctions, batch: Any, kind: str, offset: int,
                  role: str) -> Tensor:
        return super()._features(self._f32(fns), batch, kind, offset, role)

    def attribute(self, train_loader: DataLoader, test_loader: DataLoader) -> Tensor:
        return self._check_scores(super().attribute(train_loader, test_loader), "attribute")

    def self_attribute(self, train_loader: DataLoader) -> Tensor:
        return self._check_scores(super().self_attribute(train_loader), "self_attribute")

    def _check_scores(self, scores: Tensor, call: str) -> Tensor:
        """Raise instead of returning NaN/inf scores. Gradients and solves are checked on the
        way; this catches the rest, such as an inner product that overflows."""
        if bool(torch.isfinite(scores.sum())) or bool(torch.isfinite(scores).all()):
            return scores
        bad = ~torch.isfinite(scores)
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise FloatingPointError(
            f"{type(self).__name__}.{call} produced {int(bad.sum())} NaN/inf score(s) (first at "
            f"index {first[0] if len(first) == 1 else first}) from finite gradients: the "
            "inverse-HVPs or their inner products overflowed. Raise regularization (damping "
            "for LiSSA) so that H + regularization * I is well conditioned."
        )

    def _weight(self, fns: CheckpointFunctions) -> float:
        return -1.0 / (self._n_cache * self.task.num_checkpoints)

    def _hessian_batches(self) -> list[tuple[Any, float]]:
        """The Hessian's training batches on the device, with weights ``B_b / n``."""
        loader = self._hessian_loader
        assert loader is not None, "cache() sets the Hessian's training set"
        return [(batch, batch_size_of(batch) / self._n_cache)
                for _, batch in self._batches(loader, "train", "Hessian data")]

    def _hessian_matvec(self, fns: CheckpointFunctions) -> HessianSum:
        """``V [k, d] -> H V`` for the training-set Hessian, linearisations kept in budget."""
        budget = self.hessian_cache_bytes // self.task.num_checkpoints  # shared by checkpoints
        fns = self._f32(fns)
        return HessianSum(fns.loss, fns.theta, self._hessian_batches(), self.mode, budget,
                          self.rhs_chunk_size, merge_batches=True)


_HESSIAN_FIX = ("Check the loss and the weights of that checkpoint (a loss with log(0) or an "
                "overflow gives NaN curvature).")


class IFAttributorExplicit(_IFBase):
    """Influence function with the explicit Hessian, decomposed once per checkpoint (exact).

    Memory grows as ``d^2`` and time as ``d^3``: restrict ``layer_name`` for anything beyond
    ~10k parameters. ``cache`` keeps the eigendecomposition of each checkpoint's Hessian, so
    ``regularization`` may be changed between ``attribute`` calls without a new ``cache``
    (a search over the damping costs one Hessian).

    Args:
        task: the attribution task.
        layer_name: parameters to attribute through.
        device: where to compute (``None``: the model's device).
        regularization: :math:`\\lambda` added to the Hessian's diagonal.
        max_hessian_bytes: refuse Hessians larger than this (float64 bytes). It is also the
            memory budget of the eigendecomposition: on CPU (with SciPy) a Hessian up to half
            of it is decomposed with the fast LAPACK driver (a second matrix of workspace), a
            bigger one in place (one matrix in all, about 4x slower).
    """

    def __init__(self, task: AttributionTask, *, layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str | None = None, regularization: float = 0.0,
                 max_hessian_bytes: int = _MAX_EXPLICIT_BYTES, **kwargs: Any) -> None:
        super().__init__(task, layer_name=layer_name, device=device,
                         regularization=regularization, **kwargs)
        self.max_hessian_bytes = max_hessian_bytes

    def _prepare(self, fns: CheckpointFunctions, loader: DataLoader,
                 features: Tensor | None) -> tuple[Tensor, Tensor]:
        fns = self._f32(fns)
        d = fns.dim
        if d * d * 8 > self.max_hessian_bytes:
            raise MemoryError(
                f"IFAttributorExplicit would build a {d} x {d} Hessian "
                f"({d * d * 8 / 2**30:.1f} GiB). Select fewer parameters with layer_name, or "
                "use IFAttributorCG, IFAttributorLiSSA or IFAttributorArnoldi."
            )
        hessian = self._build_hessian(fns, d)
        check_finite_solution(hessian, "IFAttributorExplicit's Hessian", _HESSIAN_FIX)
        symmetrize_(hessian)  # symmetric up to round-off; in place, tile by tile
        # The eigendecomposition, not an inverse: (H + lambda I)^-1 = V diag(1/(e + lambda)) V^T
        # for any lambda, so changing ``regularization`` after ``cache`` (a grid search)
        # costs two products instead of a new Hessian. In place (one matrix in memory) when
        # the fast LAPACK driver's second matrix would not fit in max_hessian_bytes.
        return eigh_(hessian, self.max_hessian_bytes)

    def _build_hessian(self, fns: CheckpointFunctions, d: int) -> Tensor:
        """The float64 ``d x d`` Hessian, its rows written into one preallocated matrix."""
        # With several processes each builds its own share of the columns.
        rank, world = self._world()
        own = shard_range(d, rank, world)
        matvec = self._hessian_matvec(fns)
        if world == 1:
            hessian = torch.empty(d, d, dtype=torch.float64, device=self.device)
            return hessian_columns(matvec, d, own, self.rhs_chunk_size, fns.theta.dtype,
                                   self.device, out=hessian)
        own_columns = hessian_columns(matvec, d, own, self.rhs_chunk_size, fns.theta.dtype,
                                      self.device)
        return gather_rows(own_columns, torch.arange(own.start, own.stop), d)

    def _inverse_eigenvalues(self, eigenvalues: Tensor) -> Tensor:
        """``1 / (e + lambda)``; for ``lambda = 0`` the pseudo-inverse's (zero on the null space:
        softmax cross-entropy is invariant to a shift shared by all classes, and the gradients
        live in the range)."""
        lam = self.regularization
        top = float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
        if lam == 0:
            tol = top * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
            safe = torch.where(eigenvalues.abs() > tol, eigenvalues, torch.ones_like(eigenvalues))
            return torch.where(eigenvalues.abs() > tol, 1.0 / safe, torch.zeros_like(eigenvalues))
        shifted = eigenvalues + lam
        if bool((shifted.abs() <= max(top, lam) * 1e-12).any()):
            raise ValueError(
                f"H + regularization * I is singular at regularization={lam:g} (a negative "
                "Hessian eigenvalue cancels it): pass another regularization."
            )
        return check_finite_solution(1.0 / shifted, "IFAttributorExplicit's inverse",
                                     "Pass a larger regularization.")

    def _transform_test(self, fns: CheckpointFunctions, state: tuple[Tensor, Tensor],
                        feats: Tensor) -> Tensor:
        eigenvalues, eigenvectors = state
        coords = (feats.double() @ eigenvectors) * self._inverse_eigenvalues(eigenvalues)
        return (coords @ eigenvectors.T).to(feats.dtype)

    # save_cache keeps the eigendecomposition (regularization is applied when scoring, so a
    # loaded cache serves any regularization, as after cache()).
    def _state_tensors(self, index: int, state: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        eigenvalues, eigenvectors = state
        return {"eigenvalues": eigenvalues, "eigenvectors": eigenvectors}

    def _state_from_tensors(self, index: int, tensors: dict[str, Tensor]
                            ) -> tuple[Tensor, Tensor]:
        return tensors["eigenvalues"], tensors["eigenvectors"]


class IFAttributorCG(_IFBase):
    """Influence function with conjugate-gradient IHVPs (all test gradients solved together).

    CG needs :math:`H + \\lambda I` positive definite. Network Hessians are usually
    indefinite: with :math:`\\lambda` below the magnitude of the most negative eigenvalue the
    truncated iteration is a heuristic (it warns), not the inverse-HVP.

    Args:
        max_iter: CG iterations (each is one pass of HVPs over the training set).
        tol: residual-norm tolerance per right-hand side.
        regularization: :math:`\\lambda` (damping) added to the Hessian.
        mode: HVP mode, ``"rev-rev"`` or ``"rev-fwd"``.
        block: solve the gradients of a call (the test loader's, or a self-influence group's)
            in one shared Krylov space (``func.hessian.block_cg``) instead of one CG recursion
            each. On a positive-definite system 2 block iterations reached the accuracy of 10
            plain ones on the digits MLP (``recipes/speed/bench_cg_accuracy.py``); the price
            is that each row depends on the others in its solve until converged (with several
            processes, each solves its own share of rows). On an indefinite system it warns
            and falls back to plain CG.
    """

    def __init__(self, task: AttributionTask, *, layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str | None = None, max_iter: int = 10,
                 tol: float = 1e-7,
                 regularization: float = 0.0, mode: str = "rev-rev", block: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(task, layer_name=layer_name, device=device,
                         regularization=regularization, mode=mode, **kwargs)
        self.max_iter = max_iter
        self.tol = tol
        self.block = block

    shard_solves = True

    def _prepare(self, fns, loader, features):
        matvec = self._hessian_matvec(fns)
        return lambda v: matvec(v) + self.regularization * v

    def _transform_test(self, fns: CheckpointFunctions, state: Any, feats: Tensor) -> Tensor:
        solver = block_cg if self.block else batched_cg
        out = solver(state, feats, max_iter=self.max_iter, tol=self.tol)
        return check_finite_solution(out, "IFAttributorCG's CG solve", CG_FIX)


class IFAttributorLiSSA(_IFBase):
    """Influence function with LiSSA IHVPs (Agarwal et al., 2017).

    Each recursion step uses the Hessian of ``batch_size`` training examples drawn at random
    (seeded) from the ``cache`` loader's dataset. The result approximates
    ``(H + damping * scaling * I)^{-1} v``: ``scaling`` must exceed the top Hessian eigenvalue.

    Args:
        batch_size: examples per recursion step.
        num_repeat: independent recursions averaged.
        recursion_depth: steps per recursion.
        damping: see above.
        scaling: see above.
        seed: seed of the mini-batch sampler.
    """

    def __init__(self, task: AttributionTask, *, layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str | None = None, batch_size: int = 50,
                 num_repeat: int = 1,
                 recursion_depth: int = 500, damping: float = 0.0, scaling: float = 50.0,
                 mode: str = "rev-rev", seed: int = 0, **kwargs: Any) -> None:
        # LiSSA damps through damping/scaling, not the shared regularization (passing
        # regularization= is a TypeError, as it always was).
        super().__init__(task, layer_name=layer_name, device=device, regularization=0.0,
                         mode=mode, **kwargs)
        self.batch_size = batch_size
        self.num_repeat = num_repeat
        self.recursion_depth = recursion_depth
        self.damping = damping
        self.scaling = scaling
        self.seed = seed

    shard_solves = True

    def _prepare(self, fns, loader, features):
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__"):
            raise TypeError("IFAttributorLiSSA samples training mini-batches by index: the "
                            "cache loader needs a map-style dataset (loader.dataset[i]).")
        indices = loader_indices(loader)  # the examples the loader yields, in order
        return dataset, indices, loader.collate_fn

    def _transform_test(self, fns: CheckpointFunctions, state: Any, feats: Tensor) -> Tensor:
        fns = self._f32(fns)
        dataset, indices, collate = state
        gen = torch.Generator().manual_seed(self.seed)
        size = min(self.batch_size, len(indices))
        chunk = 0  # vmap chunk, sized once from the first mini-batch
        # lissa_recursion consumes each product before the next: one output buffer serves all
        product = torch.empty_like(feats)

        def sample_matvec(_: int) -> Callable[[Tensor], Tensor]:
            nonlocal chunk
            picks = torch.randperm(len(indices), generator=gen)[:size].tolist()
            batch = to_device(collate([dataset[indices[i]] for i in picks]), self.device)

            def objective(t: Tensor) -> Tensor:
                return fns.loss(t, batch)

            if not chunk:
                chunk = vmap_chunk(linearization_bytes(objective, fns.theta), self.rhs_chunk_size)
            return chunked(hvp_operator(objective, fns.theta, self.mode), chunk, product)

        return lissa_recursion(sample_matvec, feats, self.recursion_depth, self.num_repeat,
                               self.damping, self.scaling)


class _EigenProjector(Projector):
    def __init__(self, eigenvectors: Tensor) -> None:
        super().__init__(eigenvectors.shape[1], eigenvectors.shape[0])
        self.eigenvectors = eigenvectors

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        return features @ self.eigenvectors.T


class IFAttributorArnoldi(_IFBase):
    """Influence function on the top-``proj_dim`` Hessian eigenspace (Schioppa et al., 2022).

    An Arnoldi run of ``max_iter`` HVPs over the training set finds the eigenpairs
    :math:`(\\lambda_k, v_k)`; gradients are projected onto the :math:`v_k` (so train features
    are ``proj_dim``-sized and cheap to keep) and scored as
    :math:`-\\frac1n\\sum_k (v_k^\\top g_f)(v_k^\\top g_L)/(\\lambda_k + \\text{reg})`.

    Args:
        proj_dim: eigenpairs kept.
        max_iter: Arnoldi iterations (Krylov dimension, at least ``proj_dim``).
        norm_constant: divides the Hessian during the run, for very large spectra.
        regularization: added to every kept eigenvalue.
        seed: seed of the Arnoldi start vector.
    """

    def __init__(self, task: AttributionTask, *, layer_name: str | Sequence[str] | None = None,
                 device: torch.device | str | None = None, proj_dim: int = 100,
                 max_iter: int = 200,
                 norm_constant: float = 1.0, tol: float = 1e-7, regularization: float = 0.0,
                 mode: str = "rev-rev", seed: int = 0, **kwargs: Any) -> None:
        super().__init__(task, layer_name=layer_name, device=device,
                         regularization=regularization, mode=mode, **kwargs)
        self.proj_dim = proj_dim
        self.max_iter = max(max_iter, proj_dim)
        self.norm_constant = norm_constant
        self.tol = tol
        self.seed = seed
        self._eigen: dict[int, tuple[Tensor, Tensor]] = {}

    def cache(self, train_loader: DataLoader) -> None:
        self._eigen.clear()
        self._projectors.clear()
        super().cache(train_loader)

    # -- save_cache / load_cache: the eigenpairs are the state (the projection and the kernel);
    # regularization is added when scoring, so it may differ from the saved run's.
    def _cache_options(self) -> dict[str, Any]:
        return {**super()._cache_options(), "proj_dim": self.proj_dim,
                "max_iter": self.max_iter, "norm_constant": self.norm_constant,
                "tol": self.tol, "seed": self.seed}

    def _projector_descriptions(self) -> None:
        return None  # the Arnoldi eigenvectors are the projection: covered by the options

    def _restore_cache(self, reader: CacheReader) -> None:
        self._eigen.clear()
        self._projectors.clear()
        super()._restore_cache(reader)

    def _state_tensors(self, index: int, state: Tensor) -> dict[str, Tensor]:
        evals, evecs = self._eigen[index]
        return {"eigenvalues": evals, "eigenvectors": evecs}

    def _state_from_tensors(self, index: int, tensors: dict[str, Tensor]) -> Tensor:
        evals, evecs = tensors["eigenvalues"], tensors["eigenvectors"]
        check_eigenvalues(evals, self.regularization, "proj_dim")
        self._eigen[index] = (evals, evecs)
        self._projectors[index] = _EigenProjector(evecs)
        return evals

    def _projector(self, fns: CheckpointFunctions) -> Projector:
        if fns.index not in self._projectors:
            fns = self._f32(fns)
            matvec = self._hessian_matvec(fns)
            evals, evecs = arnoldi_eigen(
                lambda v: matvec(v) / self.norm_constant, fns.dim, max_iter=self.max_iter,
                top_k=self.proj_dim, tol=self.tol, seed=self.seed, dtype=fns.theta.dtype,
                device=self.device,
            )
            evals = evals * self.norm_constant
            check_eigenvalues(evals, self.regularization, "proj_dim")
            self._eigen[fns.index] = (evals, evecs)
            self._projectors[fns.index] = _EigenProjector(evecs)
        return self._projectors[fns.index]

    def _prepare(self, fns, loader, features):
        evals, _ = self._eigen[fns.index]
        return evals

    def _transform_test(self, fns: CheckpointFunctions, state: Tensor, feats: Tensor) -> Tensor:
        # the damping is added here, not stored: a regularization set after cache() applies,
        # as it does for the explicit and CG attributors (and is checked against the spectrum)
        check_eigenvalues(state, self.regularization, "proj_dim")
        return feats / (state + self.regularization)
