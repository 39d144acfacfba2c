r"""Kronecker-factored curvature (K-FAC, EK-FAC) of per-layer gradients.

For a weight block (``hf_attrib.func.layer_grads``) with per-example gradient
``G_i = sum_t r_t c_t^T`` (rows side ``r_t``, cols side ``c_t``), the Fisher
``F = (1/n) sum_i vec(G_i) vec(G_i)^T`` (``vec`` row-major, so ``vec(r c^T) = r kron c``) is
approximated as in K-FAC "expand" (Eschenhagen et al., 2023; kronfluence's normalisation):
cross-position terms are dropped and the two sides taken as independent,

.. math::  F \approx \frac{1}{n\,N} R \otimes C, \qquad
           R = \sum_{i,t} r_t r_t^\top, \quad C = \sum_{i,t} c_t c_t^\top,

with ``n`` the examples and ``N`` the positions counted (one per example for an MLP:
``F = (R/n) kron (C/n)``). A position whose outer product is zero — padding, whose output
gradient is zero, or an all-zero input — is left out of ``R``, ``C`` and ``N`` (it adds nothing
to any gradient). A one-hot side (an embedding's tokens) has a diagonal ``R`` (token counts):
it is kept diagonal, and its eigenbasis is the identity. A vector block (bias, LayerNorm
weight) has the exact covariance of its per-example gradient ``b_i = sum_t r_t``:
``V = (1/n) sum_i b_i b_i^T``.

With ``R = Q_R diag(l_R) Q_R^T`` and ``C = Q_C diag(l_C) Q_C^T`` (float64 ``eigh``, tiny negative
eigenvalues from round-off clamped to zero), a gradient's coordinates in the Kronecker
eigenbasis are ``Q_R^T G Q_C`` (``Q^T b`` for a vector block): what
:class:`EigenbasisProjector` computes from the sides, never forming ``G``. K-FAC's eigenvalues
are ``l_R[a] l_C[b] / (n N)``; EK-FAC's (George et al., 2018) are the exact second moments
of the training gradients in that basis, ``(1/n) sum_i (Q_R^T G_i Q_C)[a, b]^2``, which its
caller takes from the rotated training gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_attrib.distributed import all_reduce_sum
from hf_attrib.func.factored_projection import FactoredProjector
from hf_attrib.func.layer_grads import Block, Side

__all__ = [
    "MAX_DENSE_DIM",
    "BlockEigen",
    "EigenbasisProjector",
    "KroneckerFactors",
    "SideEigen",
    "block_damping",
    "kfac_eigenvalues",
    "transposed_bases",
]

#: Largest side kept as a dense ``[dim, dim]`` covariance (float64: 2 GiB at this size).
MAX_DENSE_DIM = 2**14


@dataclass
class SideEigen:
    """Eigendecomposition of one side's covariance: ``values [dim]`` (>= 0) and ``basis``
    ``[dim, dim]`` (eigenvectors as columns; ``None``: the identity, a diagonal covariance)."""

    values: Tensor
    basis: Tensor | None


@dataclass
class BlockEigen:
    """The factors of one block, eigendecomposed.

    Attributes:
        rows: the rows side (a vector block's only side).
        cols: the cols side (``None`` for a vector block).
        positions: ``N``, the positions counted in the factors (weight blocks).
    """

    rows: SideEigen
    cols: SideEigen | None
    positions: float


class _SideCovariance:
    """``sum r r^T`` of one side: dense ``[dim, dim]``, or only its diagonal for a side fed
    only one-hot (token) vectors. float64 accumulators."""

    def __init__(self, dim: int, dense: bool, device: torch.device) -> None:
        self.dim = dim
        self.matrix = torch.zeros((dim, dim) if dense else (dim,), dtype=torch.float64,
                                  device=device)

    @property
    def dense(self) -> bool:
        return self.matrix.dim() == 2

    def add(self, side: Side, live: Tensor) -> None:
        values = side.values[live]  # [N, dim] floats or [N] ids
        if side.is_index:
            counts = torch.bincount(values, minlength=self.dim).to(torch.float64)
            diagonal = self.matrix.diagonal() if self.dense else self.matrix
            diagonal.add_(counts)
            return
        if not self.dense:  # only the engine's embedding rows are one-hot (see side_kinds)
            raise ValueError("a dense side reached a covariance kept diagonal.")
        self.matrix.add_((values.t() @ values).to(torch.float64))

    def eigen(self) -> SideEigen:
        if not self.dense:
            return SideEigen(self.matrix.clone(), None)
        sym = (self.matrix + self.matrix.t()) / 2
        values, basis = torch.linalg.eigh(sym)
        # A covariance is positive semi-definite: negative eigenvalues are round-off.
        return SideEigen(values.clamp_min(0.0), basis)


def _nonzero(side: Side) -> Tensor:
    """``[B, T]``: positions whose vector is not zero (a one-hot never is)."""
    if side.is_index:
        return torch.ones(side.values.shape, dtype=torch.bool, device=side.values.device)
    return side.values.ne(0).any(-1)


class KroneckerFactors:
    """Accumulates every block's factors from the per-layer engine's sides.

    Usage: for each batch, ``start_batch(size)``, ``engine.run(value, size, factors.visit)``,
    ``end_batch()``; then ``all_reduce()`` (several processes) and ``eigen()``.

    Args:
        blocks: the blocks (``LayerGradients.blocks.values()``).
        one_hot_rows: names of the weight blocks whose rows side is always one-hot (only used
            by embeddings): their ``R`` is kept diagonal.
        device: where the accumulators live.

    Raises:
        ValueError: a dense side is larger than ``MAX_DENSE_DIM``.
    """

    def __init__(self, blocks: Iterable[Block], one_hot_rows: Iterable[str],
                 device: torch.device | str) -> None:
        device = torch.device(device)
        self.blocks = list(blocks)
        one_hot = set(one_hot_rows)
        self.sides: dict[tuple[str, int], _SideCovariance] = {}
        for block in self.blocks:
            axes = [(0, block.rows, block.name not in one_hot)]
            if block.is_matrix:
                axes.append((1, block.cols, True))
            for axis, dim, dense in axes:
                if dense and dim > MAX_DENSE_DIM:
                    side = "rows" if axis == 0 else "columns"
                    raise ValueError(
                        f"K-FAC needs a dense {dim} x {dim} covariance for the {side} of "
                        f"{block.name} (shape {list(block.shape)}), more than the "
                        f"{MAX_DENSE_DIM} supported (e.g. a language model's output layer "
                        "over its vocabulary). Leave that parameter out (layer_name=...).")
                self.sides[(block.name, axis)] = _SideCovariance(dim, dense, device)
        # [examples, positions of each weight block], summed over processes by all_reduce
        self.counts = torch.zeros(1 + len(self.blocks), dtype=torch.float64, device=device)
        self._column = {b.name: 1 + i for i, b in enumerate(self.blocks)}
        self._vectors: dict[str, Tensor] = {}

    def start_batch(self, batch_size: int) -> None:
        """Begin a batch of ``batch_size`` examples."""
        self.counts[0] += batch_size
        self._vectors = {}

    def visit(self, block: Block, rows: Side, cols: Side | None) -> None:
        """The engine's visitor: add one use of ``block`` (see ``LayerGradients.run``)."""
        if cols is None:  # a vector block: its per-example gradient, summed over uses
            summed = rows.project(None).sum(1)
            if block.name in self._vectors:
                self._vectors[block.name] = self._vectors[block.name] + summed
            else:
                self._vectors[block.name] = summed
            return
        live = _nonzero(rows) & _nonzero(cols)
        self.sides[(block.name, 0)].add(rows, live)
        self.sides[(block.name, 1)].add(cols, live)
        self.counts[self._column[block.name]] += int(live.sum())

    def end_batch(self) -> None:
        """Finish the batch (vector blocks' outer products)."""
        for name, summed in self._vectors.items():
            summed = summed.to(torch.float64)
            self.sides[(name, 0)].matrix.add_(summed.t() @ summed)
        self._vectors = {}

    @property
    def examples(self) -> float:
        return float(self.counts[0])

    def all_reduce(self, world: int | None = None) -> None:
        """Sum the factors over the processes (every process calls it, in the same order);
        ``world=1``: this process saw every batch (``all_reduce_sum``)."""
        for side in self.sides.values():
            side.matrix.copy_(all_reduce_sum(side.matrix, world))
        self.counts.copy_(all_reduce_sum(self.counts, world))

    def eigen(self) -> dict[str, BlockEigen]:
        """``{block name: BlockEigen}`` of the factors accumulated so far."""
        out = {}
        for block in self.blocks:
            rows = self.sides[(block.name, 0)].eigen()
            cols = self.sides[(block.name, 1)].eigen() if block.is_matrix else None
            positions = float(self.counts[self._column[block.name]]) if block.is_matrix else 0.0
            out[block.name] = BlockEigen(rows, cols, positions)
        return out


def kfac_eigenvalues(blocks: Sequence[Block], eigen: Mapping[str, BlockEigen], examples: float
                     ) -> Tensor:
    """K-FAC's eigenvalues of every block, flattened in feature order (float64):
    ``l_R[a] l_C[b] / (n N)`` for a weight block, ``l / n`` for a vector block."""
    parts = []
    for block in blocks:
        e = eigen[block.name]
        if e.cols is None:
            parts.append(e.rows.values / examples)
        elif e.positions == 0:  # never used with a non-zero gradient: no curvature
            parts.append(torch.zeros(block.rows * block.cols, dtype=torch.float64,
                                     device=e.rows.values.device))
        else:
            outer = e.rows.values[:, None] * e.cols.values[None, :]
            parts.append(outer.reshape(-1) / (examples * e.positions))
    return torch.cat(parts)


def block_damping(eigenvalues: Tensor, slices: Mapping[str, slice], scale: float) -> Tensor:
    """``scale * mean(eigenvalues of the block)`` at each block's entries (``[width]``): the
    per-layer damping heuristic (kronfluence's, with ``scale = 0.1``, per module)."""
    out = torch.empty_like(eigenvalues)
    for where in slices.values():
        out[where] = scale * eigenvalues[where].mean()
    return out


class EigenbasisProjector(FactoredProjector):
    """The rotation of every block's gradient into its Kronecker eigenbasis, ``Q_R^T G Q_C``
    (``Q^T b``), as a ``FactoredProjector`` whose side matrices are the transposed
    eigenvector matrices (full rank: the width is the number of parameters).

    Each checkpoint (``ensemble_id``) has its own basis, set by ``set_basis``.

    Args:
        blocks: the blocks, in feature order.
        device: where the bases live.
    """

    def __init__(self, blocks: Sequence[Block], device: torch.device | str | None = None
                 ) -> None:
        widest = max((max(b.rows, b.cols) for b in blocks), default=1)
        super().__init__(blocks, factor_dim=widest, seed=0, kind="normal", device=device)
        self._bases: dict[int, dict[tuple[str, int], Tensor | None]] = {}

    def set_basis(self, ensemble_id: int, bases: Mapping[tuple[str, int], Tensor | None]
                  ) -> None:
        """Use ``bases[(name, axis)]``, the transposed eigenvector matrix of each side
        (``[dim, dim]``, ``None``: identity), for checkpoint ``ensemble_id``."""
        self._bases[ensemble_id] = {k: None if v is None else v.to(self.device, torch.float32)
                                    for k, v in bases.items()}

    def bases(self, ensemble_id: int) -> dict[tuple[str, int], Tensor | None]:
        """The transposed eigenvector matrices of checkpoint ``ensemble_id``."""
        self._require(ensemble_id)
        return dict(self._bases[ensemble_id])

    def _require(self, ensemble_id: int) -> None:
        if ensemble_id not in self._bases:
            raise ValueError(f"no K-FAC eigenbasis for checkpoint {ensemble_id} yet: call "
                             "cache(train_loader) (or load_cache) first.")

    def matrix(self, block: Block, axis: int, ensemble_id: int = 0) -> Tensor | None:
        self._require(ensemble_id)
        return self._bases[ensemble_id][(block.name, axis)]


def transposed_bases(eigen: Mapping[str, BlockEigen]) -> dict[tuple[str, int], Tensor | None]:
    """``{(name, axis): Q^T or None}`` of eigendecomposed factors, for ``set_basis``."""
    out: dict[tuple[str, int], Tensor | None] = {}
    for name, e in eigen.items():
        sides = [e.rows] if e.cols is None else [e.rows, e.cols]
        for axis, side in enumerate(sides):
            out[(name, axis)] = None if side.basis is None else side.basis.t().contiguous()
    return out

