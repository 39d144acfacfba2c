r"""The Hessian-vector product engine: ``V [k, d] -> H V`` on ``torch.func``, within bounded memory.

* ``flat_objective`` flattens the differentiated argument of ``f(*x)`` into ``theta [d]``;
  ``as_batch`` views a right-hand side (one vector or a batch) as rows ``[k, d]``.
* ``hvp_operator`` builds the batched product at ``theta`` (``rev-rev`` or ``rev-fwd``),
  ``regularized`` adds ``lambda I``, ``chunked`` applies it a few rows at a time.
* The memory gauge: ``linearization_bytes`` measures what one product keeps per right-hand
  side, ``vmap_chunk`` turns that into rows per vectorised call.
* ``HessianSum`` sums the Hessians of many data batches (small ones merged, linearisations
  kept within a budget); ``hessian_columns`` materialises columns of any such operator.

The solvers in ``hf_attrib.func.solvers`` take these operators; ``hf_attrib.func.hessian``
wraps both into dattri's ``hvp`` / ``ihvp_*`` function API.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "MODES",
    "HessianSum",
    "MatVec",
    "as_batch",
    "check_mode",
    "chunked",
    "flat_objective",
    "hessian_columns",
    "hvp_operator",
    "linearization_bytes",
    "regularized",
    "vmap_chunk",
]

# The two ways to differentiate the gradient once more (see hvp_operator).
MODES = ("rev-rev", "rev-fwd")
# Right-hand sides per vmapped HVP call: their tangents (chunk x linearisation size) stay near
# _VMAP_BYTES, but at least _MIN_VMAP vectors go together while that fits _VMAP_FLOOR_BYTES.
# Measured on 2 idle cores: the digits MLP (500 examples) costs 2.9 us per (vector, example)
# at 11-33 vectors a call, 4.1 us at 176; a layer-restricted GPT-2 HVP 27 ms per vector alone,
# 17 ms in calls of 8 and 16 ms in calls of 16.
_VMAP_BYTES = 96 * 2**20
_MIN_VMAP = 8
_VMAP_FLOOR_BYTES = 2**30
# Largest linearisation that small Hessian batches are merged into (see _merge_small_batches).
_MERGED_BYTES = 16 * 2**20
# An operator applied to right-hand sides as rows: ``[k, d] -> [k, d]``.
MatVec = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Plumbing: flatten the differentiated argument and batch v
# --------------------------------------------------------------------------------------------
def check_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def flat_objective(func: Callable[..., Tensor], x: Sequence[Any],
                   argnums: int) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``theta -> func(*x)`` with ``x[argnums]`` replaced by ``theta.reshape(shape)``.

    Args:
        func: a scalar function of ``*x``.
        x: the tuple (or list) of ``func``'s arguments.
        argnums: the index of the argument differentiated.

    Returns:
        ``(objective, theta)``: the function of the flat argument ``theta [d]`` (it raises
        ``ValueError`` when ``func`` is not scalar), and ``x[argnums]`` flattened.
    """
    if not isinstance(x, (tuple, list)):
        raise TypeError("x must be a tuple of the function's arguments, e.g. (x, param).")
    shape = x[argnums].shape
    args = list(x)

    def objective(theta: Tensor) -> Tensor:
        call = list(args)
        call[argnums] = theta.reshape(shape)
        out = func(*call)
        if out.dim() != 0:
            raise ValueError(
                f"the function must return a scalar to have a Hessian; got shape "
                f"{tuple(out.shape)}. Reduce it (e.g. .sum() or .mean())."
            )
        return out

    return objective, x[argnums].reshape(-1)


def as_batch(v: Tensor, shape: torch.Size) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``v`` as ``[k, d]`` and return a function that restores its original layout.

    Args:
        v: one right-hand side shaped ``shape``, a batch ``[k, *shape]``, or rows ``[k, d]``.
        shape: the shape of the differentiated argument (``d`` entries).

    Raises:
        ValueError: ``v`` has none of those shapes.
    """
    d = shape.numel()
    if v.shape == shape:
        return v.reshape(1, d), lambda out: out.reshape(shape)
    if v.dim() >= 1 and v.shape[1:] == shape:
        k = v.shape[0]
        return v.reshape(k, d), lambda out: out.reshape(k, *shape)
    if v.dim() == 2 and v.shape[1] == d:
        return v, lambda out: out
    raise ValueError(
        f"v must have shape {tuple(shape)} or [k, {', '.join(map(str, shape))}]; "
        f"got {tuple(v.shape)}."
    )


def hvp_operator(objective: Callable[[Tensor], Tensor], theta: Tensor, mode: str) -> MatVec:
    """A batched Hessian-vector product ``V [k, d] -> H V`` at ``theta``.

    ``rev-rev`` builds the reverse-mode linearisation of the gradient once (``vjp``) and reuses
    it; ``rev-fwd`` pushes tangents forward through the gradient (``jvp``), which needs less
    memory for large ``k``. A single vector skips ``vmap`` (its batching costs more than the
    product itself on small models, and Arnoldi/Lanczos runs are all single vectors).

    Args:
        objective: ``theta [d] -> scalar`` (e.g. from :func:`flat_objective`).
        theta: the point ``[d]`` the Hessian is taken at.
        mode: one of :data:`MODES`.
    """
    check_mode(mode)
    grad_fn = torch.func.grad(objective)
    if mode == "rev-rev":
        _, vjp_fn = torch.func.vjp(grad_fn, theta)

        def one(v: Tensor) -> Tensor:
            return vjp_fn(v)[0]
    else:
        def one(v: Tensor) -> Tensor:
            return torch.func.jvp(grad_fn, (theta,), (v,))[1]

    batched = torch.func.vmap(one)

    def matvec(v: Tensor) -> Tensor:
        return one(v[0])[None] if v.shape[0] == 1 else batched(v)

    return matvec


def chunked(matvec: MatVec, chunk: int, out: Tensor | None = None) -> MatVec:
    """``matvec`` applied ``chunk`` rows at a time (vmap over too many tangents at once spills
    out of cache and runs slower per vector, see ``_VMAP_BYTES``), written into ``out`` when it
    has the right shape (a caller that consumes each product at once can reuse one buffer).

    Args:
        matvec: ``[k, d] -> [k, d]``.
        chunk: most rows per call (e.g. from :func:`vmap_chunk`).
        out: an optional output buffer, used for inputs of its shape.
    """

    def in_chunks(v: Tensor) -> Tensor:
        if v.shape[0] <= chunk:
            return matvec(v)
        result = out if out is not None and out.shape == v.shape else torch.empty_like(v)
        for start in range(0, v.shape[0], chunk):
            result[start:start + chunk] = matvec(v[start:start + chunk])
        return result

    return in_chunks


class _ParamDependentBytes(TorchDispatchMode):
    """Sums the bytes of every intermediate result that depends on ``theta``.

    Only those carry tangents in an HVP (and are saved by its linearisation): with a few
    layers selected, everything computed before them is a constant of the product.
    """

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.total = 0
        # id -> weak reference: the id alone could be reused by a later, unrelated tensor
        # (and tensors cannot live in a WeakSet: their == is elementwise).
        self._dependent: dict[int, weakref.ref] = {id(theta): weakref.ref(theta)}

    def _depends(self, t: Any) -> bool:
        ref = self._dependent.get(id(t)) if isinstance(t, Tensor) else None
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(self._depends(t) for t in tree_flatten((args, kwargs or {}))[0]):
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    self.total += t.numel() * t.element_size()
                    self._dependent[id(t)] = weakref.ref(t)
        return out


def linearization_bytes(objective: Callable[[Tensor], Tensor], theta: Tensor) -> int:
    """Estimate the memory of an HVP of ``objective`` at ``theta``, per right-hand side.

    ``torch.func`` transforms do not support saved-tensor hooks, so the tensors an HVP keeps
    cannot be counted directly. Instead one forward pass runs under a dispatch mode that sums
    the intermediate results depending on ``theta``; the HVP (forward, backward and their
    tangents) is taken as three times that. It sizes both the ``rev-rev`` linearisation kept
    between products and the tangents of one more vector in a vmapped product.
    """
    gauge = _ParamDependentBytes(theta)
    with torch.no_grad(), gauge:
        objective(theta)
    return 3 * gauge.total


def vmap_chunk(linearization: int, cap: int) -> int:
    """Vectors per vmapped HVP call for a linearisation of ``linearization`` bytes.

    Args:
        linearization: bytes per right-hand side (from :func:`linearization_bytes`).
        cap: most vectors per call.
    """
    chunk = _VMAP_BYTES // max(linearization, 1)
    if _MIN_VMAP * linearization <= _VMAP_FLOOR_BYTES:
        chunk = max(chunk, _MIN_VMAP)
    return max(1, min(cap, chunk))


def _concat_batches(batches: Sequence[Any]) -> Any | None:
    """Concatenate batches along the first dimension, or ``None`` when their structures or
    trailing shapes differ (e.g. text padded per batch) or a leaf is not a tensor."""
    leaves, specs = zip(*(tree_flatten(b) for b in batches), strict=True)
    if any(spec != specs[0] for spec in specs):
        return None
    merged = []
    for column in zip(*leaves, strict=True):
        if not all(isinstance(t, Tensor) and t.dim() > 0 for t in column):
            return None
        if any(t.shape[1:] != column[0].shape[1:] for t in column):
            return None
        merged.append(torch.cat(column))
    return tree_unflatten(merged, specs[0])


def _merge_small_batches(objective: Callable[[Tensor, Any], Tensor], theta: Tensor,
                         batches: list[tuple[Any, float]]
                         ) -> tuple[list[tuple[Any, float]], list[int]]:
    """Merge consecutive small batches into ones of up to ``_MERGED_BYTES`` of linearisation.

    On small models an HVP costs mostly per-call overhead, so one product over five batches of
    100 takes about five times as long as one over a batch of 500; a Lanczos run (one vector
    at a time) gains the most. Weights add up: the loss of a batch is its examples' mean and
    each weight is the batch's share of the training set.

    Returns:
        The new ``(batch, weight)`` list and each entry's linearisation size (a merged batch's
        is the sum of its parts', an upper bound), so that nothing is measured twice.
    """
    sizes = [linearization_bytes(lambda t, b=b: objective(t, b), theta) for b, _ in batches]
    out: list[tuple[Any, float]] = []
    out_sizes: list[int] = []
    group: list[int] = []

    def flush() -> None:
        merged = _concat_batches([batches[i][0] for i in group]) if len(group) > 1 else None
        if merged is None:
            out.extend(batches[i] for i in group)
            out_sizes.extend(sizes[i] for i in group)
        else:
            out.append((merged, sum(batches[i][1] for i in group)))
            out_sizes.append(sum(sizes[i] for i in group))

    for i, size in enumerate(sizes):
        if group and sum(sizes[j] for j in group) + size > _MERGED_BYTES:
            flush()
            group = []
        group.append(i)
    flush()
    return out, out_sizes


class HessianSum:
    r"""``V [k, d] -> \sum_b w_b H_b V``: a Hessian summed over data batches, linearised once.

    Each term is the Hessian of ``objective(theta, batch_b)``. In ``rev-rev`` mode the
    per-batch linearisations are built on first use and kept while their estimated memory
    (:func:`linearization_bytes`) fits ``cache_bytes``, so iterative solvers (CG, Arnoldi,
    the explicit Hessian's column sweeps) pay for each forward/backward pass once rather than
    once per iteration; batches beyond the budget are re-linearised on every product.

    Right-hand sides go through ``vmap`` in chunks sized by :func:`vmap_chunk`: wide enough
    to amortise per-call overhead, narrow enough that the tangents stay in the CPU caches.

    Args:
        objective: ``(theta [d], batch) -> scalar``.
        theta: the flat parameters ``[d]``.
        batches: ``(batch, weight)`` pairs.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` (``rev-fwd`` keeps nothing between products).
        cache_bytes: memory budget for kept linearisations.
        rhs_chunk_size: most right-hand sides pushed through one vectorised product.
        merge_batches: concatenate consecutive small batches (same structure and trailing
            shapes) into one term with the summed weight. Valid when ``objective`` is the mean
            over a batch's examples and each weight is proportional to its batch size, as for
            a training-set Hessian with weights ``B_b / n``.
    """

    def __init__(self, objective: Callable[[Tensor, Any], Tensor], theta: Tensor,
                 batches: Sequence[tuple[Any, float]], mode: str = "rev-rev",
                 cache_bytes: int = 2**30, rhs_chunk_size: int = 256,
                 merge_batches: bool = False) -> None:
        check_mode(mode)
        self.objective = objective
        self.theta = theta
        self.batches = list(batches)
        # Linearisation sizes, measured on first use (or while deciding what to merge).
        self._sizes: list[int | None] = [None] * len(self.batches)
        if merge_batches and len(self.batches) > 1:
            self.batches, self._sizes = _merge_small_batches(objective, theta, self.batches)
        self.mode = mode
        self.rhs_chunk_size = rhs_chunk_size
        self._ops: dict[int, MatVec] = {}
        self._chunks: dict[int, int] = {}
        self._budget = cache_bytes if mode == "rev-rev" else 0

    def _operator(self, b: int) -> tuple[MatVec, int]:
        if b in self._ops:
            return self._ops[b], self._chunks[b]
        batch = self.batches[b][0]

        def objective(t: Tensor) -> Tensor:
            return self.objective(t, batch)

        op = hvp_operator(objective, self.theta, self.mode)
        if b not in self._chunks:
            size = self._sizes[b]
            if size is None:
                size = linearization_bytes(objective, self.theta)
            self._chunks[b] = vmap_chunk(size, self.rhs_chunk_size)
            if size <= self._budget:
                self._budget -= size
                self._ops[b] = op
        return op, self._chunks[b]

    def __call__(self, v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        for b, (_, weight) in enumerate(self.batches):
            op, chunk = self._operator(b)
            for start in range(0, v.shape[0], chunk):
                rows = slice(start, start + chunk)
                out[rows] += weight * op(v[rows])
        return out


def hessian_columns(matvec: MatVec, dim: int, columns: range, chunk: int,
                    dtype: torch.dtype, device: torch.device | str,
                    out: Tensor | None = None) -> Tensor:
    """Columns ``columns`` of the ``dim x dim`` matrix behind ``matvec``, as float64 rows
    ``[len(columns), dim]``: products with basis vectors, ``chunk`` at a time, so memory stays
    bounded (``torch.func.hessian`` would push all ``dim`` tangents through at once).

    ``out``: a preallocated ``[len(columns), dim]`` tensor the rows are written into (no
    second copy of the matrix); returned."""
    if out is None:
        out = torch.empty(len(columns), dim, dtype=torch.float64, device=device)
    for start in range(columns.start, columns.stop, chunk):
        stop = min(start + chunk, columns.stop)
        basis = torch.zeros(stop - start, dim, dtype=dtype, device=device)
        basis[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=device)
        out[start - columns.start:stop - columns.start].copy_(matvec(basis))
    return out


def regularized(matvec: MatVec, regularization: float) -> MatVec:
    """``V -> matvec(V) + regularization * V`` (``matvec`` itself when it is zero)."""
    if regularization == 0.0:
        return matvec
    return lambda v: matvec(v) + regularization * v
