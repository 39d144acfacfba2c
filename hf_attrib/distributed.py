"""Work sharing across processes (``accelerate launch``, ``torchrun``) for the attributors.

Attributors split their expensive loops — per-example gradients of the training and test
sets, inverse-HVP solves, self-influence — over the processes of an initialised
``torch.distributed`` process group, and gather the pieces back so that every process ends
with the same full result. Each piece travels with the global row indices it covers, so the
gathered tensor is identical to a one-process run whatever the split.

Launch with accelerate (which initialises the group) or torchrun::

    accelerate launch --multi_gpu --num_processes 4 attribute.py      # 4 GPUs
    accelerate launch --multi_gpu --num_processes 2 attribute.py      # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 attribute.py                           # same, with torchrun

(``accelerate launch --cpu`` starts a single process.) Without a process group every helper
here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "close_process_group", "gather_rows", "is_main_process",
           "parse_shard", "rank_and_world", "shard_range"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def close_process_group() -> None:
    """Leave the process group together (barrier, then destroy); nothing without one. A
    process that exits while the others still hold a gloo group open can abort (SIGABRT) at
    interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that writes files."""
    return rank_and_world()[0] == 0


def shard_range(total: int, rank: int, world: int) -> range:
    """The contiguous share ``[total * rank / world, total * (rank + 1) / world)``."""
    return range(total * rank // world, total * (rank + 1) // world)


def parse_shard(text: str | None, allow_auto: bool = False) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` (``None`` stays ``None``); with ``allow_auto``, ``"auto"`` takes
    ``(RANK, WORLD_SIZE)`` from the launcher's environment.

    Raises:
        ValueError: naming the expected form.
    """
    if text is None:
        return None
    if allow_auto and text == "auto":
        if "WORLD_SIZE" not in os.environ:
            raise ValueError("--shard auto needs RANK/WORLD_SIZE (run under `accelerate "
                             "launch` or torchrun), or pass --shard i/n.")
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        form = "i/n (e.g. 0/4) or auto" if allow_auto else "i/n (e.g. 0/4)"
        raise ValueError(f"--shard must look like {form}, got {text!r}.") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= i < n.")
    return index, count


def _comm_device(tensor: Tensor) -> torch.device:
    # gloo moves CPU tensors only; NCCL only CUDA ones.
    return tensor.device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(rows: Tensor, index: Tensor, total: int, world: int | None = None) -> Tensor:
    """Assemble a ``[total, ...]`` tensor from every process's ``rows`` at rows ``index``.

    Args:
        rows: this process's rows ``[m, ...]`` (``m`` may differ between processes, even 0).
        index: their global positions ``[m]``.
        total: rows of the result.
        world: the processes sharing the work (default: the process group's size; ``1``
            for a caller that keeps to itself inside a group, e.g. ``distributed=False``).

    Returns:
        The full tensor, on ``rows``' device, on every process.

    Raises:
        RuntimeError: when the processes' indices do not cover ``0..total-1`` exactly once
            (the processes disagree about the data: e.g. different loaders).
    """
    index = index.to(device=rows.device, dtype=torch.long)
    world = rank_and_world()[1] if world is None else world
    if world == 1:
        pieces = [(rows, index)]
    else:
        device = _comm_device(rows)
        local = torch.tensor([rows.shape[0]], device=device)
        counts = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(counts, local)
        sizes = [int(c.item()) for c in counts]
        width = max(sizes)
        padded = rows.new_zeros((width, *rows.shape[1:])).to(device)
        padded[: rows.shape[0]] = rows.to(device)
        padded_index = torch.full((width,), -1, dtype=torch.long, device=device)
        padded_index[: rows.shape[0]] = index.to(device)
        all_rows = [torch.empty_like(padded) for _ in range(world)]
        all_index = [torch.empty_like(padded_index) for _ in range(world)]
        dist.all_gather(all_rows, padded)
        dist.all_gather(all_index, padded_index)
        pieces = [(r[:s].to(rows.device), i[:s].to(rows.device))
                  for r, i, s in zip(all_rows, all_index, sizes, strict=True)]
    out = rows.new_zeros((total, *rows.shape[1:]))
    seen = torch.zeros(total, dtype=torch.long, device=rows.device)
    for piece, idx in pieces:
        out[idx] = piece
        seen.index_add_(0, idx, torch.ones_like(idx))
    if not bool((seen == 1).all()):
        raise RuntimeError(
            f"gathered rows cover {int((seen > 0).sum())} of {total} positions "
            f"({int((seen > 1).sum())} twice): every process must iterate the same loaders "
            "in the same order (no shuffling, no DistributedSampler: the attributor shards "
            "the batches itself)."
        )
    return out


def all_reduce_sum(tensor: Tensor, world: int | None = None) -> Tensor:
    """Sum of ``tensor`` over the processes (a new tensor; ``tensor`` itself without a group,
    or with ``world=1``: a caller that keeps to itself inside a group, as ``gather_rows``)."""
    world = rank_and_world()[1] if world is None else world
    if world == 1:
        return tensor
    device = _comm_device(tensor)
    out = tensor.to(device, copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)
