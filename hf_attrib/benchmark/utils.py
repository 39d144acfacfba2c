"""Small data utilities shared by the benchmark settings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["SubsetSampler"]


class SubsetSampler(Sampler[int]):
    """Yield the given dataset indices in the given order (never shuffled).

    The attribution counterpart of ``SubsetRandomSampler``: scores line up with ``indices``.

    Args:
        indices: dataset indices, e.g. ``range(1000)``.
    """

    def __init__(self, indices: Sequence[int] | torch.Tensor) -> None:
        self.indices = [int(i) for i in indices]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
