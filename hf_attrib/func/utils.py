"""Parameter flattening and per-sample gradients on top of ``torch.func``.

Every attributor works on a flat parameter vector ``theta`` of the selected parameters (``d``
entries), so that gradients are rows of a ``[n, d]`` matrix and HVPs are ``d -> d`` maps.
These helpers move between the ``{name: tensor}`` dictionaries that
``torch.func.functional_call`` wants and that flat vector.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "add_batch_dim",
    "batch_size_of",
    "describe_batch",
    "flatten_func",
    "flatten_params",
    "partial_param",
    "per_sample_grad",
    "slice_batch",
    "unflatten_params",
]


def flatten_params(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a ``{name: tensor}`` dictionary into one flat vector, in key order.

    Args:
        params: named tensors, e.g. ``dict(model.named_parameters())``.

    Returns:
        A 1-D tensor of ``sum(p.numel())`` entries.
    """
    if not params:
        raise ValueError("flatten_params got no parameters; select at least one tensor.")
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten_params(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector back into tensors shaped like ``like`` (inverse of ``flatten_params``).

    Works under ``vmap`` (only views and ``split`` are used).
    """
    sizes = [p.numel() for p in like.values()]
    total = sum(sizes)
    if flat.shape[-1] != total:
        raise ValueError(f"flat parameter vector has {flat.shape[-1]} entries, expected {total}.")
    chunks = torch.split(flat, sizes, dim=-1)
    lead = flat.shape[:-1]
    return {
        name: chunk.reshape(*lead, *p.shape)
        for (name, p), chunk in zip(like.items(), chunks, strict=True)
    }


def flatten_func(
    model_or_params: torch.nn.Module | Mapping[str, Tensor], param_num: int = 0
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: turn ``f(params_dict, ...)`` into ``f(flat_params, ...)``.

    Args:
        model_or_params: the model (its named parameters define the layout) or a parameter dict.
        param_num: position of the parameter argument in ``f``.

    Example:
        >>> @flatten_func(model)
        ... def loss(params, batch): ...
        >>> loss(flatten_params(dict(model.named_parameters())), batch)
    """
    if isinstance(model_or_params, torch.nn.Module):
        layout = {k: v.detach() for k, v in model_or_params.named_parameters()}
    else:
        layout = dict(model_or_params)

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args = list(args)
            args[param_num] = unflatten_params(args[param_num], layout)
            return func(*args, **kwargs)

        return wrapper

    return decorator


def partial_param(
    full_param: Mapping[str, Tensor], layer_name: Sequence[str], param_num: int = 0
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make ``f(full_params, ...)`` a function of the parameters in ``layer_name`` only.

    The other entries of ``full_param`` are held fixed (detached), so gradients and Hessians of
    the decorated function are taken with respect to the selected tensors alone.

    Args:
        full_param: every parameter the wrapped function needs.
        layer_name: the keys that stay free.
        param_num: position of the parameter argument in ``f``.
    """
    missing = [n for n in layer_name if n not in full_param]
    if missing:
        raise KeyError(f"partial_param: unknown parameter names {missing}.")
    fixed = {k: v.detach() for k, v in full_param.items() if k not in set(layer_name)}

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args = list(args)
            args[param_num] = {**fixed, **args[param_num]}
            return func(*args, **kwargs)

        return wrapper

    return decorator


def add_batch_dim(batch: Any) -> Any:
    """Give every tensor in a (nested) batch a leading dimension of size 1."""
    if isinstance(batch, Tensor):
        return batch.unsqueeze(0)
    if isinstance(batch, Mapping):
        return type(batch)({k: add_batch_dim(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(add_batch_dim(v) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("a batch tensor must have a leading batch dimension; got a scalar.")
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (list, tuple)) or isinstance(batch, Mapping):
        for v in values:
            try:
                return batch_size_of(v)
            except TypeError:
                continue
    raise TypeError(f"cannot find a tensor in the batch (got {type(batch).__name__}).")


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a (nested) batch: every tensor sliced on its first dimension."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


def describe_batch(batch: Any, depth: int = 0) -> str:
    """A short description of a batch's structure, for error messages.

    Example: ``tuple of 3: (tensor[8, 6] float32, tensor[8] int64, tensor[8] int64)``.
    """
    if isinstance(batch, Tensor):
        return f"tensor{list(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if depth >= 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        items = [f"{k!r}: {describe_batch(v, depth + 1)}" for k, v in list(batch.items())[:8]]
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__} with {len(batch)} keys {{{', '.join(items)}{more}}}"
    if isinstance(batch, (list, tuple)):
        items = [describe_batch(v, depth + 1) for v in batch[:8]]
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__} of {len(batch)}: ({', '.join(items)}{more})"
    return type(batch).__name__


def per_sample_grad(
    func: Callable[[Tensor, Any], Tensor],
    theta: Tensor,
    batch: Any,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example gradients ``[B, d]`` of a scalar function ``func(theta, batch)``.

    ``func`` is called with a batch of one example (every tensor keeps a leading dimension of
    size 1), so functions written for mini-batches work unchanged. ``vmap`` processes
    ``chunk_size`` examples at a time to bound memory (``None``: all at once).

    Args:
        func: ``f(theta, batch) -> scalar`` with ``theta`` a flat parameter vector.
        theta: the flat parameters ``[d]``.
        batch: a tensor, tuple/list or dict of tensors whose leading dimension is ``B``.
        chunk_size: examples per vectorised call.
    """

    def one(t: Tensor, example: Any) -> Tensor:
        return func(t, add_batch_dim(example))

    grad_fn = torch.func.grad(one)
    # randomness="same": an active dropout layer draws one mask for the whole chunk, which is
    # what a dropout ensemble member means (the caller seeds the generator per member).
    return torch.func.vmap(grad_fn, in_dims=(None, 0), chunk_size=chunk_size, randomness="same")(
        theta, batch
    )
