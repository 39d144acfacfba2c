r"""Factored (LoGra-style) random projection of per-layer gradients.

A weight block's per-example gradient is ``G_i = \sum_t r_t c_t^\top`` (rows side ``r_t``, cols
side ``c_t``, see ``hf_attrib.func.layer_grads``). Projecting each side with its own seeded
Gaussian (or Rademacher) matrix, ``P_r [k_r, rows]`` and ``P_c [k_c, cols]``, gives

.. math::  P_r G_i P_c^\top = \sum_t (P_r r_t)(P_c c_t)^\top ,

the projection of ``vec(G_i)`` by the Kronecker product ``P_r \otimes P_c`` — a JL map on the
block (``E[(P_r \otimes P_c)^\top (P_r \otimes P_c)] = I`` with entries of variance ``1/k``) —
computed from ``k``-sized vectors per position, never from ``G_i``. A bias block is projected
by ``P_r`` alone. A side no larger than ``factor_dim`` is kept as it is (exact). Features of
all blocks are concatenated in the order of the flat parameter vector.

The matrices are functions of ``(seed, ensemble_id, parameter name, side)``: train and test
features of one ensemble member always share them, in every process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hf_attrib.func.layer_grads import Block, Side

__all__ = ["FactoredProjector"]

_KINDS = ("normal", "rademacher")


class FactoredProjector:
    """Per-block Kronecker-factored projection (see module).

    Args:
        blocks: the blocks to project, in the order of the features.
        factor_dim: ``k``, the most dimensions kept per side of a block.
        seed: seed of the matrices.
        kind: ``"normal"`` (Gaussian) or ``"rademacher"`` (±1) entries, scaled by ``1/sqrt(k)``.
        device: where the matrices live (the features' device).

    Attributes:
        proj_dim: the feature width, summed over blocks.
    """

    def __init__(self, blocks: Sequence[Block], factor_dim: int, seed: int = 0,
                 kind: str = "normal", device: torch.device | str | None = None) -> None:
        if not isinstance(factor_dim, int) or isinstance(factor_dim, bool) or factor_dim < 1:
            raise ValueError(f"factor_dim must be a positive int, got {factor_dim!r}.")
        if kind not in _KINDS:
            raise ValueError(f"factored projection kind must be one of {_KINDS}, got {kind!r}.")
        self.blocks = list(blocks)
        self.factor_dim = factor_dim
        self.seed = seed
        self.kind = kind
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.slices: dict[str, slice] = {}
        start = 0
        for block in self.blocks:
            width = self._kept(block.rows) * (self._kept(block.cols) if block.is_matrix else 1)
            self.slices[block.name] = slice(start, start + width)
            start += width
        self.proj_dim = start
        self._matrices: dict[tuple[str, int], Tensor | None] = {}
        self._ensemble: int | None = None

    def _kept(self, dim: int) -> int:
        return min(dim, self.factor_dim)

    @staticmethod
    def width_for(blocks: Sequence[Block], factor_dim: int) -> int:
        """The feature width ``FactoredProjector(blocks, factor_dim)`` would have."""
        return sum(min(b.rows, factor_dim) * (min(b.cols, factor_dim) if b.is_matrix else 1)
                   for b in blocks)

    @classmethod
    def factor_dim_for(cls, blocks: Sequence[Block], proj_dim: int) -> int:
        """The largest ``factor_dim`` whose width is at most ``proj_dim`` (at least 1), so
        that a factored projection can be compared with a dense one of the same size."""
        smallest = cls.width_for(blocks, 1)
        if proj_dim < smallest:
            raise ValueError(
                f"proj_dim={proj_dim} is below the smallest factored width of these layers, "
                f"{smallest} (one feature per selected parameter); give proj_dim >= {smallest} "
                "or select fewer layers.")
        low, high = 1, max(max(b.rows, b.cols) for b in blocks)
        while low < high:  # the width grows with factor_dim
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cls.width_for(blocks, mid) <= proj_dim else (low, mid - 1)
        return low

    def matrix(self, block: Block, axis: int, ensemble_id: int = 0) -> Tensor | None:
        """``P`` of ``block``'s rows (``axis=0``) or cols (``axis=1``) side, ``[k, dim]``, or
        ``None`` when the side is kept whole."""
        if self._ensemble != ensemble_id:  # one ensemble member's matrices at a time
            self._matrices.clear()
            self._ensemble = ensemble_id
        key = (block.name, axis)
        if key not in self._matrices:
            dim = block.rows if axis == 0 else block.cols
            self._matrices[key] = (None if dim <= self.factor_dim
                                   else self._draw(block.name, axis, ensemble_id, dim))
        return self._matrices[key]

    def _draw(self, name: str, axis: int, ensemble_id: int, dim: int) -> Tensor:
        gen = torch.Generator().manual_seed(stable_seed(self.seed, ensemble_id, name, axis))
        k = self.factor_dim
        if self.kind == "normal":
            mat = torch.randn(k, dim, generator=gen)
        else:
            mat = torch.randint(0, 2, (k, dim), generator=gen).to(torch.float32).mul_(2).sub_(1)
        return mat.div_(math.sqrt(k)).to(self.device)

    # -- features from the engine's sides ------------------------------------------------------
    def accumulate(self, out: Tensor, block: Block, rows: Side, cols: Side | None,
                   ensemble_id: int = 0) -> None:
        """Add one module use's projected gradient of ``block`` to ``out [B, proj_dim]``."""
        p_r = self.matrix(block, 0, ensemble_id)
        target = out[:, self.slices[block.name]]
        if rows.values.shape[0] != out.shape[0]:
            raise ValueError(f"{block.name}: factors of {rows.values.shape[0]} examples for "
                             f"features of {out.shape[0]}.")
        if cols is None:
            target += rows.project(p_r).sum(1)
            return
        c = cols.project(self.matrix(block, 1, ensemble_id))
        if rows.is_index and p_r is None:
            # Token rows kept whole: scatter each position's c_t into its token's row instead
            # of multiplying by a [B, T, vocab] one-hot.
            batch, vocab = out.shape[0], rows.dim
            flat = (rows.values + vocab * torch.arange(batch, device=c.device)[:, None])
            summed = c.new_zeros(batch * vocab, c.shape[-1])
            summed.index_add_(0, flat.reshape(-1), c.reshape(-1, c.shape[-1]))
            target += summed.view(batch, -1)
            return
        target += torch.bmm(rows.project(p_r).transpose(1, 2), c).reshape(out.shape[0], -1)

    @staticmethod
    def squared_norm(rows: Side, cols: Side | None) -> Tensor:
        r"""``||G_i||^2`` per example, exactly, from the sides: ``sum_{t,s} (r_t.r_s)(c_t.c_s)``
        (``||sum_t r_t||^2`` for a bias). Only one use of a block: several uses of one tied
        parameter add cross terms this does not see."""
        if cols is None:
            summed = rows.project(None).sum(1)
            return (summed * summed).sum(-1)
        positions = rows.values.shape[1]
        if positions * positions > rows.dim * cols.dim:  # many positions: the [B, T, T] Grams
            grad = torch.bmm(rows.project(None).transpose(1, 2), cols.project(None))  # are larger
            return grad.pow(2).sum((1, 2))
        return (rows.gram() * cols.gram()).sum((1, 2))

    # -- the same map on explicit gradients (tests, checks) ------------------------------------
    def project_explicit(self, grads: Mapping[str, Tensor], ensemble_id: int = 0) -> Tensor:
        """Project explicit per-example gradients ``{name: [B, *shape]}``: ``P_r G_i P_c^T``
        per block, flattened and concatenated -> ``[B, proj_dim]``."""
        parts = []
        for block in self.blocks:
            g = grads[block.name].to(torch.float32)
            batch = g.shape[0]
            mat = g.reshape(batch, block.rows, block.cols)
            p_r = self.matrix(block, 0, ensemble_id)
            if p_r is not None:
                mat = p_r @ mat
            if block.is_matrix:
                p_c = self.matrix(block, 1, ensemble_id)
                if p_c is not None:
                    mat = mat @ p_c.t()
            parts.append(mat.reshape(batch, -1))
        return torch.cat(parts, dim=1)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, the same in every Python process (``hash()`` is salted
    per process; a digest of ``"/".join(parts)`` is not)."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
