r"""Per-layer gradient factors from one batched backward: per-example gradients never formed.

For a layer applied at positions ``t`` of example ``i`` (tokens, pixels), ``y_t = W a_t + b``,
the gradient of example ``i``'s loss is a sum of outer products

.. math::  \nabla_W L_i = \sum_t g_t a_t^\top, \qquad \nabla_b L_i = \sum_t g_t,
           \qquad g_t = \partial L_i / \partial y_t .

Hooks on the layers capture ``a_t`` in the forward pass and ``g_t`` in the backward pass of
``B * mean_i L_i``: when the loss is a mean over independent examples (the contract of
``AttributionTask.loss_func``, model in eval mode), ``g_t`` of that sum is example ``i``'s own
output gradient. One batched backward gives every example's factors; the weights need no
gradient, so the backward does no weight-gradient matmul at all. Consumers (the factored
projection of ``hf_attrib.func.factored_projection``, K-FAC covariances) take the two sides of
each outer product and reduce them as they come, so nothing ``d``-sized per example is kept.

Padding needs no special case: a padded position's output reaches no loss term (masked in the
loss and in attention), so its ``g_t`` is exactly zero; an embedding's ``padding_idx`` row, which
PyTorch never updates, is masked explicitly.

Each selected parameter is a *block* seen as a matrix ``[shape[0], prod(shape[1:])]`` (weights)
or a vector (biases), so a tied parameter (GPT-2's ``wte`` and ``lm_head``) receives the terms
of both modules in one orientation:

=================  =====================  ================================
module             weight (rows x cols)   rows side / cols side
=================  =====================  ================================
``nn.Linear``      ``[out, in]``          ``g_t`` / ``a_t``
``Conv1D`` (HF)    ``[in, out]``          ``a_t`` / ``g_t``
``nn.Conv2d``      ``[out, in*kh*kw]``    ``g_t`` / unfolded patch ``a_t``
``nn.Embedding``   ``[vocab, dim]``       one-hot of the token / ``g_t``
``nn.LayerNorm``   vector ``[dim]``       ``g_t * x_hat_t`` (elementwise)
=================  =====================  ================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Block", "LayerGradients", "Side", "supported_kind"]


@dataclass(frozen=True)
class Side:
    """One side of a block's outer products, per example and position.

    Attributes:
        values: ``[B, T, dim]`` floats, or ``[B, T]`` token ids (one-hot of size ``dim``).
        dim: the side's dimension (the block's rows or cols).
    """

    values: Tensor
    dim: int

    @property
    def is_index(self) -> bool:
        return not self.values.is_floating_point()

    def project(self, matrix: Tensor | None) -> Tensor:
        """``[B, T, p]``: each position's vector times ``matrix.T`` (``[p, dim]``), or the
        vector itself (one-hot for ids) when ``matrix`` is ``None``."""
        if matrix is None:
            if self.is_index:
                return F.one_hot(self.values, self.dim).to(torch.float32)
            return self.values
        if self.is_index:
            return matrix.t()[self.values]
        return self.values @ matrix.t()

    def gram(self) -> Tensor:
        """``[B, T, T]`` inner products between the positions of each example."""
        if self.is_index:
            return (self.values[:, :, None] == self.values[:, None, :]).to(torch.float32)
        return self.values @ self.values.transpose(1, 2)


@dataclass(frozen=True)
class Block:
    """A selected parameter as the engine sees it.

    Attributes:
        name: the parameter's name (``model.named_parameters()``).
        shape: the parameter's shape.
        is_matrix: weights (``rows x cols`` outer products) or biases (sums of ``g_t``).
    """

    name: str
    shape: tuple[int, ...]
    is_matrix: bool

    @property
    def rows(self) -> int:
        return self.shape[0] if self.is_matrix else math.prod(self.shape)

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:]) if self.is_matrix else 1


# visit(block, rows, cols): cols is None for a bias block.
Visitor = Callable[[Block, Side, "Side | None"], None]


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so that func/ needs no transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def supported_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``, ``"layernorm"``, or ``None``
    when the engine cannot take the module's gradient apart (other types, grouped or non-zero-padded
    convolutions, renormalised or frequency-scaled embeddings). ``"layernorm"`` too: its
    weight and bias are vectors, ``sum_t g_t * x_hat_t`` and ``sum_t g_t``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_hf_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        plain = (module.groups == 1 and module.padding_mode == "zeros"
                 and not isinstance(module.padding, str))
        return "conv2d" if plain else None
    if isinstance(module, nn.Embedding):
        plain = module.max_norm is None and not module.scale_grad_by_freq
        return "embedding" if plain else None
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    return None


@dataclass
class _Site:
    """One supported module whose weight or bias is selected."""

    kind: str
    module: nn.Module
    weight: Block | None
    bias: Block | None


class LayerGradients:
    """Hooks that hand each selected block's per-example gradient factors to a visitor.

    Args:
        model: the model whose modules compute the loss (``functional_call`` on it is fine:
            the hooks fire on its modules whatever tensors are swapped in).
        names: the selected parameter names, in the order of the flat parameter vector.

    Attributes:
        blocks: ``{name: Block}`` in the order of ``names``.
        uncovered: selected names no supported module owns (the engine cannot serve those;
            callers fall back to explicit per-example gradients).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        params = dict(model.named_parameters())
        name_of = {id(p): n for n, p in params.items()}  # tied: the canonical (first) name
        selected = set(names)
        self.sites: list[_Site] = []
        found: dict[str, Block] = {}
        for module in model.modules():
            kind = supported_kind(module)
            if kind is None:
                continue
            weight = _block(module, "weight", name_of, selected, is_matrix=kind != "layernorm")
            bias = _block(module, "bias", name_of, selected, is_matrix=False)
            if weight is None and bias is None:
                continue
            self.sites.append(_Site(kind, module, weight, bias))
            for block in (weight, bias):
                if block is not None and found.setdefault(block.name, block) != block:
                    raise ValueError(
                        f"{block.name} is used as a matrix by one module and as a vector by "
                        "another; the per-layer engine cannot combine them. Leave it out "
                        "(layer_name=...) or use a dense projection.")
        self.blocks = {n: found[n] for n in names if n in found}
        self.uncovered = [n for n in names if n not in found]

    def run(self, value: Callable[[], Tensor], batch_size: int, visit: Visitor) -> Tensor:
        """Evaluate ``value()`` (the batch-mean loss, parameters not requiring grad) under the
        hooks, backpropagate ``batch_size * value`` and call ``visit`` for every use of every
        block. Returns the value (detached)."""
        leaves: list[Tensor] = []
        handles = [site.module.register_forward_hook(
            self._forward_hook(site, leaves, visit, batch_size)) for site in self.sites]
        try:
            with torch.enable_grad():
                out = value()
                if leaves and out.requires_grad:
                    torch.autograd.grad(out * batch_size, leaves, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        return out.detach()

    def _forward_hook(self, site: _Site, leaves: list[Tensor], visit: Visitor, batch_size: int
                      ) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor | None:
            if not isinstance(output, Tensor) or not torch.is_grad_enabled():
                return None
            if not args or not isinstance(args[0], Tensor):
                raise ValueError(f"{type(module).__name__} was called without a positional "
                                 "input tensor; the per-layer engine reads its input there.")
            inputs = args[0].detach()
            if not output.requires_grad:
                # The parameters do not require grad, so a layer fed by data alone starts the
                # graph: its output becomes a leaf the backward runs to. An output shared by
                # the batch (position embeddings of ids [1, T]) is given one copy per example,
                # or its gradient would arrive summed over the examples.
                if output.dim() > 0 and output.shape[0] == 1 and batch_size > 1:
                    output = output.expand(batch_size, *output.shape[1:])
                    inputs = inputs.expand(batch_size, *inputs.shape[1:])
                output = output.detach().contiguous().requires_grad_(True)
                leaves.append(output)
            if output.dim() == 0 or output.shape[0] != batch_size or (
                    inputs.dim() > 0 and inputs.shape[0] != batch_size):
                # A layer on [tokens, d] (MoE experts), [T, B, d] (sequence first) or an
                # unbatched [T, d] would have its positions credited to the wrong examples.
                raise ValueError(
                    f"{type(module).__name__} was called on an input of leading size "
                    f"{inputs.shape[0] if inputs.dim() else 0} / output of leading size "
                    f"{output.shape[0] if output.dim() else 0} for a batch of {batch_size}: the "
                    "per-layer engine needs the batch as each selected layer's first dimension "
                    "(no routed tokens, no sequence-first layout). Leave that layer out "
                    "(layer_name=...) or use a dense projection.")
            output.register_hook(lambda grad: self._visit(site, inputs, grad, visit))
            return output

        return hook

    @staticmethod
    def _visit(site: _Site, inputs: Tensor, grad: Tensor, visit: Visitor) -> None:
        rows, cols, out = _sides(site, inputs, grad)
        if site.weight is not None:
            visit(site.weight, rows, cols)
        if site.bias is not None:
            visit(site.bias, out, None)


def _block(module: nn.Module, attr: str, name_of: dict[int, str], selected: set[str],
           is_matrix: bool) -> Block | None:
    param = getattr(module, attr, None)
    if not isinstance(param, nn.Parameter):
        return None
    name = name_of.get(id(param))
    if name is None or name not in selected:
        return None
    return Block(name, tuple(param.shape), is_matrix)


def _sides(site: _Site, inputs: Tensor, grad: Tensor) -> tuple[Side, Side | None, Side]:
    """``(rows side, cols side, output-gradient side)`` of one use of ``site``'s module (no
    cols side for a LayerNorm, whose weight is a vector)."""
    batch = grad.shape[0]
    module = site.module
    if site.kind == "layernorm":  # y = w * x_hat + b elementwise: grad_w = sum_t g_t * x_hat_t
        shape = module.normalized_shape
        x_hat = F.layer_norm(inputs.to(torch.float32), shape, eps=module.eps)
        dim = math.prod(shape)
        g = grad.reshape(batch, -1, dim).to(torch.float32)
        g_side = Side(g, dim)
        return Side(g * x_hat.reshape(batch, -1, dim), dim), None, g_side
    if site.kind == "embedding":
        ids = inputs.reshape(batch, -1)
        g = grad.reshape(batch, ids.shape[1], -1).to(torch.float32)
        if module.padding_idx is not None:  # PyTorch never updates the padding row
            g = g * (ids != module.padding_idx)[..., None]
        return Side(ids, module.num_embeddings), Side(g, g.shape[-1]), Side(g, g.shape[-1])
    if site.kind == "conv2d":
        patches = F.unfold(inputs, module.kernel_size, module.dilation, module.padding,
                           module.stride).transpose(1, 2).to(torch.float32)
        g = grad.reshape(batch, grad.shape[1], -1).transpose(1, 2).to(torch.float32)
        g_side = Side(g, g.shape[-1])
        return g_side, Side(patches, patches.shape[-1]), g_side
    a = inputs.reshape(batch, -1, inputs.shape[-1]).to(torch.float32)
    g = grad.reshape(batch, -1, grad.shape[-1]).to(torch.float32)
    a_side, g_side = Side(a, a.shape[-1]), Side(g, g.shape[-1])
    if site.kind == "conv1d":  # transformers' Conv1D stores W as [in, out]
        return a_side, g_side, g_side
    return g_side, a_side, g_side
