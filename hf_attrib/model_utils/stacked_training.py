"""The stacked training engine: many copies of a small model trained (and evaluated) at once.

* :func:`train_stacked` trains ``M`` copies of a small ``nn.Module``: parameters are stacked to
  ``[M, ...]`` and one step is ``torch.func.vmap`` over ``torch.func.grad`` of the loss,
  followed by SGD (momentum, weight decay) or Adam on the stacked tensors, with PyTorch's
  optimizer semantics (the stacked optimizers below). Each model has its own subset,
  initialization and batch order, all drawn from generators seeded by ``(seed, stream id)``
  (:mod:`hf_attrib.model_utils.subsets`), so model ``k`` of a stack equals model ``k`` trained
  alone.
* Models whose buffers change in training mode (BatchNorm running statistics) cannot be carried
  by stacked functional training: for them (found by one probing forward pass,
  :func:`resolve_strategy`) :func:`train_stacked` takes a *sequential* path, a plain PyTorch
  loop model by model with the same initialization, batch order and optimizer semantics.
* :func:`evaluate_stacked` computes a target (e.g. the margin) of every stacked model on every
  test example.

Models are trained in training mode (dropout active, with ``randomness="different"`` under
vmap: every model and step gets its own masks).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from hf_attrib.model_utils.subsets import (
    as_ids,
    check_masks,
    derive_seed,
    epoch_orders,
    shared_windows,
    subset_size,
)

__all__ = [
    "STRATEGIES",
    "ExampleLossFn",
    "LossFn",
    "check_example_loss",
    "check_strategy",
    "evaluate_stacked",
    "resolve_strategy",
    "train_stacked",
]

LossFn = Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor]
# ``example_loss_fn(params, xb, yb) -> [b]``: one loss per example, whose mean is ``loss_fn``.
ExampleLossFn = Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor]
STRATEGIES = ("auto", "stacked", "sequential")


@contextmanager
def _rng_scope(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNG (CPU and ``device``) for the block and restore it afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _initial_params(
    model: nn.Module, init: str, seed: int, streams: Sequence[int]
) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if init == "model":
        return {
            name: p.detach().unsqueeze(0).expand(len(streams), *p.shape).clone()
            for name, p in named.items()
        }
    if init != "seeded":
        raise ValueError(f"init must be 'model' or 'seeded', got {init!r}.")
    device = next(iter(named.values())).device
    fresh = copy.deepcopy(model)
    resets = [m for m in fresh.modules() if callable(getattr(m, "reset_parameters", None))]
    per_stream: dict[int, dict[str, Tensor]] = {}
    for stream in dict.fromkeys(streams):
        with _rng_scope(device, derive_seed("init", seed, stream)), torch.no_grad():
            for module in resets:
                module.reset_parameters()
        per_stream[stream] = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    return {
        name: torch.stack([per_stream[s][name] for s in streams]) for name in named
    }


def _changing_buffers(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> list[str]:
    """Names of the buffers a training-mode forward pass changes (e.g. BatchNorm statistics).

    Runs ``loss_fn`` once on (at most) 4 examples, without gradients and under a fixed seed,
    then restores the buffers and the model's mode.
    """
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    if not before:
        return []
    was_training = model.training
    device = next(model.parameters()).device
    model.train()
    try:
        with torch.no_grad(), _rng_scope(device, 0):
            loss_fn(dict(model.named_parameters()), x[:4].to(device), y[:4].to(device))
    finally:
        model.train(was_training)
        changed = _restore_buffers(model, before)
    return changed


def _restore_buffers(model: nn.Module, before: Mapping[str, Tensor]) -> list[str]:
    """Copy ``before`` back into the model's buffers; return the names that had changed."""
    changed = []
    with torch.no_grad():
        for name, buf in model.named_buffers():
            old = before.get(name)
            if old is None or old.shape != buf.shape or not torch.equal(old, buf):
                changed.append(name)
                if old is not None and old.shape == buf.shape:
                    buf.copy_(old)
    return changed


def check_strategy(strategy: str) -> None:
    """Raise a ``ValueError`` unless ``strategy`` is one of :data:`STRATEGIES`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")


def resolve_strategy(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, strategy: str
) -> str:
    """``"stacked"`` or ``"sequential"``: what ``strategy`` means for this model.

    ``"auto"`` runs ``loss_fn`` once in training mode on (at most) 4 examples (buffers and mode
    restored afterwards): the stacked path if no buffer changes, the sequential one otherwise.

    Args:
        model: the architecture.
        loss_fn: ``loss_fn(params, xb, yb) -> scalar``.
        x: training inputs.
        y: training targets.
        strategy: ``"auto"``, ``"stacked"`` or ``"sequential"``.

    Raises:
        ValueError: ``strategy="stacked"`` for a model whose buffers change in training mode
            (naming them and the alternatives).
    """
    check_strategy(strategy)
    if strategy == "sequential":
        return strategy
    changed = _changing_buffers(model, loss_fn, x, y)
    if not changed:
        return "stacked"
    if strategy == "stacked":
        raise ValueError(
            f"buffers {changed} change when the model runs in training mode (e.g. BatchNorm "
            "running statistics). Stacked training carries parameters only, so it does not "
            "support them: use strategy='sequential' (or 'auto'), or GroupNorm/LayerNorm or "
            "BatchNorm(track_running_stats=False)."
        )
    return "sequential"


class _StackedSGD:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) on stacked tensors."""

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.bufs: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], grads: Mapping[str, Tensor]) -> None:
        for name, g in grads.items():
            p = params[name]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.bufs.get(name)
                if buf is None:
                    buf = self.bufs[name] = g.clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


class _StackedAdam:
    """``torch.optim.Adam`` (L2 weight decay added to the gradient, no AMSGrad) on stacks."""

    def __init__(
        self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], grads: Mapping[str, Tensor]) -> None:
        beta1, beta2 = self.betas
        self.t += 1
        step_size = self.lr / (1 - beta1**self.t)
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.t)
        for name, g in grads.items():
            p = params[name]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if name not in self.exp_avg:
                self.exp_avg[name] = torch.zeros_like(p)
                self.exp_avg_sq[name] = torch.zeros_like(p)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


def _torch_optimizer(
    params: list[nn.Parameter], optimizer: str, lr: float, momentum: float,
    weight_decay: float, betas: tuple[float, float], eps: float,
) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _train_vmap(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, masks: Tensor, ids: list[int],
    streams: list[int], size: int, *, epochs: int, batch_size: int, lr: float, momentum: float,
    weight_decay: float, optimizer: str, betas: tuple[float, float], eps: float, seed: int,
    init: str, example_loss_fn: ExampleLossFn | None = None,
) -> dict[str, Tensor]:
    """The stacked path of :func:`train_stacked`: one ``vmap(grad)`` step for all models.

    Models that share one stream and whose mini-batches fit short shared windows (leave-one-out
    stacks) train on the windows (:func:`_window_steps`) when ``example_loss_fn`` is given.
    """
    params_named = dict(model.named_parameters())
    device = x.device
    params = _initial_params(model, init, seed, streams)
    trainable = [n for n, p in params_named.items() if p.requires_grad]
    frozen = {n: params[n] for n in params if n not in trainable}

    def split_loss(train_p: dict[str, Tensor], frozen_p: dict[str, Tensor], xb: Tensor,
                   yb: Tensor) -> Tensor:
        return loss_fn({**train_p, **frozen_p}, xb, yb)

    grad_fn = torch.func.vmap(torch.func.grad(split_loss), randomness="different")
    opt: _StackedSGD | _StackedAdam
    if optimizer == "sgd":
        opt = _StackedSGD(lr, momentum, weight_decay)
    else:
        opt = _StackedAdam(lr, betas, eps, weight_decay)

    train_p = {n: params[n] for n in trainable}
    windows = None
    if example_loss_fn is not None and len(set(streams)) == 1:
        windows = shared_windows(masks, epochs=epochs, batch_size=batch_size, seed=seed,
                                 stream=streams[0])
    was_training = model.training
    model.train()
    try:
        with _rng_scope(device, derive_seed("dropout", seed, *ids)):
            if windows is not None:
                _window_steps(model, example_loss_fn, train_p, frozen, x, y, windows, opt)
                return {n: params[n].detach() for n in params_named}
            for order in epoch_orders(masks, epochs, seed, streams):
                order = order.to(device)
                for start in range(0, size, batch_size):
                    idx = order[:, start:start + batch_size]  # [M, b]
                    flat = idx.reshape(-1)
                    xb = x.index_select(0, flat).reshape(*idx.shape, *x.shape[1:])
                    yb = y.index_select(0, flat).reshape(*idx.shape, *y.shape[1:])
                    grads = grad_fn(train_p, frozen, xb, yb)
                    with torch.no_grad():
                        opt.step(train_p, grads)
    finally:
        model.train(was_training)
    return {n: params[n].detach() for n in params_named}


def _window_steps(
    model: nn.Module, example_loss_fn: ExampleLossFn, train_p: dict[str, Tensor],
    frozen: dict[str, Tensor], x: Tensor, y: Tensor,
    windows: list[list[tuple[Tensor, Tensor]]], opt: _StackedSGD | _StackedAdam,
) -> None:
    """Train on shared windows (:func:`.shared_windows`): every model sees the same inputs.

    Model ``m``'s loss on a window is ``sum_t member[m, t] * l_t / sum_t member[m, t]``: the
    mean loss over exactly its own mini-batch, as on the per-model path. The inputs carry no
    model dimension, so when the model's first layer is an ``nn.Linear`` on the raw input
    (found and verified by :func:`_input_layer`) it runs for all models as one matrix product
    outside ``vmap`` (:class:`_InputLayerGrad`); otherwise the whole model runs under ``vmap``.
    """
    grad_fn = _window_grad(example_loss_fn)
    fast = None
    first = windows[0][0] if windows and windows[0] else None
    if first is not None:
        layer = _input_layer(model, example_loss_fn, train_p, frozen, x, y, first)
        if layer is not None:
            fast = _InputLayerGrad(model, example_loss_fn, layer)
    for batches in windows:
        for window, member in batches:
            window = window.to(x.device)
            xw, yw = x.index_select(0, window), y.index_select(0, window)
            member = member.to(x.device, x.dtype)
            grads = (fast(train_p, frozen, xw, yw, member) if fast is not None
                     else grad_fn(train_p, frozen, xw, yw, member))
            with torch.no_grad():
                opt.step(train_p, grads)


def _masked_mean(losses: Tensor, member: Tensor) -> Tensor:
    """One model's loss on a shared window: the mean over its own examples (``member``)."""
    return (losses * member).sum() / member.sum()


def _window_grad(example_loss_fn: ExampleLossFn) -> Callable[..., dict[str, Tensor]]:
    """``(train [M, ...], fixed [M, ...], xw, yw, member [M, t]) -> grads [M, ...]``: every
    model's gradient of its masked-mean window loss, the whole network under ``vmap``."""

    def window_loss(train: dict[str, Tensor], fixed: dict[str, Tensor], xw: Tensor,
                    yw: Tensor, member: Tensor) -> Tensor:
        return _masked_mean(example_loss_fn({**train, **fixed}, xw, yw), member)

    return torch.func.vmap(torch.func.grad(window_loss), in_dims=(0, 0, None, None, 0),
                           randomness="different")


class _InputLayerGrad:
    """Gradients of the window losses with the input layer as one matrix product.

    With shared inputs ``X [t, d]`` and the models' input-layer weights ``W [M, o, d]``,
    ``Z_m = X W_m^T + b_m`` for all models is one GEMM ``X [W_1; ...; W_M]^T``. The rest of the
    network runs under ``vmap`` from ``Z_m`` (the layer's forward is replaced by ``Z_m`` for
    the call), giving ``dL_m/dZ_m``; then ``dL_m/dW_m = (dL_m/dZ_m)^T X`` is again one GEMM for
    all models and ``dL_m/db_m`` a sum over the window. Same gradients as the plain window
    path (verified on the first window by :func:`_input_layer`), without ``M`` small matrix
    products against the same inputs.
    """

    def __init__(self, model: nn.Module, example_loss_fn: ExampleLossFn,
                 layer: tuple[str, nn.Linear]) -> None:
        self.name, self.module = layer
        prefix = f"{self.name}." if self.name else ""  # "" when the model is the layer
        self.weight, self.bias = f"{prefix}weight", f"{prefix}bias"
        self.model, self.example_loss_fn = model, example_loss_fn

        def rest_loss(train: dict[str, Tensor], fixed: dict[str, Tensor], z: Tensor,
                      xw: Tensor, yw: Tensor, member: Tensor) -> Tensor:
            self.module.forward = lambda _inp: z  # the input layer's output, given
            try:
                losses = example_loss_fn({**train, **fixed}, xw, yw)
            finally:
                del self.module.forward
            return _masked_mean(losses, member)

        self.grad_fn = torch.func.vmap(torch.func.grad(rest_loss, argnums=(0, 2)),
                                       in_dims=(0, 0, 0, None, None, 0),
                                       randomness="different")

    def __call__(self, train_p: dict[str, Tensor], frozen: dict[str, Tensor], xw: Tensor,
                 yw: Tensor, member: Tensor) -> dict[str, Tensor]:
        weight = train_p[self.weight]                           # [M, o, d]
        bias = train_p.get(self.bias, frozen.get(self.bias))     # [M, o] or None
        num, out_dim, in_dim = weight.shape
        flat = xw.reshape(xw.shape[0], -1)                       # [t, d]
        with torch.no_grad():
            z = (flat @ weight.reshape(num * out_dim, in_dim).T).reshape(-1, num, out_dim)
            z = z.transpose(0, 1)                                # [M, t, o]
            if bias is not None:
                z = z + bias.unsqueeze(1)
        rest = {n: v for n, v in train_p.items() if n not in (self.weight, self.bias)}
        fixed = {n: v for n, v in frozen.items() if n not in (self.weight, self.bias)}
        grads, dz = self.grad_fn(rest, fixed, z, xw, yw, member)  # dz: [M, t, o]
        grads = dict(grads)
        grads[self.weight] = (dz.transpose(1, 2).reshape(num * out_dim, -1) @ flat
                              ).reshape(num, out_dim, in_dim)
        if self.bias in train_p:
            grads[self.bias] = dz.sum(1)
        return grads


def _input_layer(
    model: nn.Module, example_loss_fn: ExampleLossFn, train_p: dict[str, Tensor],
    frozen: dict[str, Tensor], x: Tensor, y: Tensor, first: tuple[Tensor, Tensor],
) -> tuple[str, nn.Linear] | None:
    """The ``nn.Linear`` that the model applies first, to its raw (flattened) input, if any.

    Found by one forward pass of model 0 with hooks; accepted only if its weight is trained
    and :class:`_InputLayerGrad` reproduces the plain window gradients on the first window
    (in eval mode, so dropout cannot blur the comparison).
    """
    window, member = first
    xw, yw = x.index_select(0, window.to(x.device)), y.index_select(0, window.to(x.device))
    names = {m: n for n, m in model.named_modules()}
    seen: list[tuple[nn.Module, Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append((mod, inp[0])))
             for m in model.modules()]
    one = {n: v[0] for n, v in {**train_p, **frozen}.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            example_loss_fn(one, xw, yw)
    finally:
        for h in hooks:
            h.remove()
    # Leaves in call order; reshaping ones may come first, anything else (e.g. dropout on
    # the input, identity in eval mode only) rules the shortcut out.
    leaves = [(mod, inp) for mod, inp in seen if not list(mod.children())
              and not isinstance(mod, (nn.Flatten, nn.Identity))]
    if not leaves or not isinstance(leaves[0][0], nn.Linear):
        model.train(was_training)
        return None
    module, inp = leaves[0]
    name = names[module]
    if ((f"{name}.weight" if name else "weight") not in train_p or inp.shape[0] != xw.shape[0]
            or not torch.equal(inp.reshape(xw.shape[0], -1), xw.reshape(xw.shape[0], -1))):
        model.train(was_training)
        return None
    try:
        fast = _InputLayerGrad(model, example_loss_fn, (name, module))
        member = member.to(x.device, x.dtype)
        plain = _window_grad(example_loss_fn)(train_p, frozen, xw, yw, member)
        got = fast(train_p, frozen, xw, yw, member)
    finally:
        model.train(was_training)
    same = plain.keys() == got.keys() and all(
        torch.allclose(got[n], plain[n], rtol=1e-4, atol=1e-6) for n in plain)
    return (name, module) if same else None


def check_example_loss(
    model: nn.Module, loss_fn: LossFn, example_loss_fn: ExampleLossFn, x: Tensor, y: Tensor
) -> None:
    """Raise unless ``example_loss_fn`` gives the per-example losses whose mean is ``loss_fn``.

    Compared on (at most) 4 examples at the model's weights, in eval mode (dropout off; mode
    restored), without gradients.

    Raises:
        ValueError: the shape is not ``[b]`` or the mean differs from ``loss_fn``.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    xb, yb = x[:4], y[:4]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = loss_fn(params, xb, yb)
            each = example_loss_fn(params, xb, yb)
    finally:
        model.train(was_training)
    if each.shape != (xb.shape[0],):
        raise ValueError(f"example_loss_fn must return one loss per example ([{xb.shape[0]}]), "
                         f"got shape {tuple(each.shape)}.")
    if not torch.allclose(each.mean(), batch, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"example_loss_fn's mean ({float(each.mean()):.6g}) differs from loss_fn "
            f"({float(batch):.6g}) on the same batch: example_loss_fn must return the "
            "per-example losses that loss_fn averages (or pass example_loss_fn=None)."
        )


def _train_sequential(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, masks: Tensor, ids: list[int],
    streams: list[int], size: int, *, epochs: int, batch_size: int, lr: float, momentum: float,
    weight_decay: float, optimizer: str, betas: tuple[float, float], eps: float, seed: int,
    init: str,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The sequential path of :func:`train_stacked`: a plain PyTorch loop, model by model.

    One deep copy ``net`` of the model is reused: for every model it is reset to the model's
    weights and buffers (then re-initialized per stream with ``init="seeded"``, exactly as the
    stacked path does), and trained with a fresh ``torch.optim`` optimizer. ``loss_fn`` gets
    ``net``'s parameters *and* buffers, so ``functional_call(model, ...)`` in training mode
    updates ``net``'s running statistics in place, never the model's own.
    """
    device = x.device
    net = copy.deepcopy(model)
    net.train()
    resets = [m for m in net.modules() if callable(getattr(m, "reset_parameters", None))]
    start_p = {n: p.detach() for n, p in model.named_parameters()}
    start_b = {n: b.detach() for n, b in model.named_buffers()}
    guard = {n: b.clone() for n, b in start_b.items()}
    net_p, net_b = dict(net.named_parameters()), dict(net.named_buffers())
    state = {**net_p, **net_b}
    trainable = [p for p in net_p.values() if p.requires_grad]
    out_p: dict[str, list[Tensor]] = {n: [] for n in net_p}
    out_b: dict[str, list[Tensor]] = {n: [] for n in net_b}
    checked = False
    was_training = model.training
    model.train()
    try:
        for row, (mid, stream) in enumerate(zip(ids, streams, strict=True)):
            with torch.no_grad():
                for n, p in net_p.items():
                    p.copy_(start_p[n])
                for n, b in net_b.items():
                    b.copy_(start_b[n])
            if init == "seeded":
                with _rng_scope(device, derive_seed("init", seed, stream)), torch.no_grad():
                    for module in resets:
                        module.reset_parameters()
            opt = (_torch_optimizer(trainable, optimizer, lr, momentum, weight_decay, betas, eps)
                   if trainable else None)
            with _rng_scope(device, derive_seed("dropout", seed, mid)):
                for order in epoch_orders(masks[row:row + 1], epochs, seed, [stream]):
                    order = order[0].to(device)
                    for start in range(0, size, batch_size):
                        idx = order[start:start + batch_size]
                        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
                        if opt is None:
                            with torch.no_grad():
                                loss_fn(state, xb, yb)
                        else:
                            opt.zero_grad()
                            loss_fn(state, xb, yb).backward()
                            opt.step()
                        if not checked:
                            _check_routed(model, guard)
                            checked = True
            for n, p in net_p.items():
                out_p[n].append(p.detach().clone())
            for n, b in net_b.items():
                out_b[n].append(b.detach().clone())
    finally:
        model.train(was_training)
    return ({n: torch.stack(v) for n, v in out_p.items()},
            {n: torch.stack(v) for n, v in out_b.items()})


def _check_routed(model: nn.Module, guard: Mapping[str, Tensor]) -> None:
    """Raise if ``loss_fn`` updated the model's own buffers instead of the ones it was given."""
    changed = _restore_buffers(model, guard)
    if changed:
        raise ValueError(
            f"loss_fn changed the model's own buffers {changed}: for sequential training it "
            "must pass the whole mapping it receives (parameters and buffers) to "
            "torch.func.functional_call, e.g. functional_call(model, params, xb)."
        )


def train_stacked(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    masks: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    seed: int = 0,
    model_ids: Sequence[int] | Tensor | None = None,
    init: str = "model",
    stream_ids: Sequence[int] | Tensor | None = None,
    strategy: str = "auto",
    return_buffers: bool = False,
    example_loss_fn: ExampleLossFn | None = None,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Train ``M`` copies of a small model at once, each on its own subset.

    Parameters are stacked to ``[M, ...]`` and each step evaluates
    ``vmap(grad(loss_fn), randomness="different")`` on one mini-batch per model, then applies
    the optimizer to the stacked tensors with PyTorch's semantics (``torch.optim.SGD`` with
    momentum and L2 weight decay; ``torch.optim.Adam``). Model ``r`` draws its initialization
    (``init="seeded"``) and its batch order (see :func:`.batch_orders`) from generators seeded
    by ``(seed, stream_ids[r])``, so it does not depend on the other models of the stack:
    stacked model ``r`` equals the same model trained alone. Dropout masks are the exception:
    they come from the global RNG, seeded per stack from ``(seed, model_ids)``, so with
    dropout a model is reproducible for a fixed stack composition only.

    The model runs in training mode (its mode is restored afterwards); parameters with
    ``requires_grad=False`` are stacked and returned but not trained.

    **When the sequential path is used.** Stacked (vmap) training carries parameters only, so
    buffers that change in training mode (BatchNorm running statistics, ``num_batches_tracked``)
    cannot be updated. With ``strategy="auto"`` (the default) one probing forward pass in
    training mode (on 4 examples, buffers restored afterwards) decides: if no buffer changes,
    the stacked path runs; if some do (e.g. ResNet-9), the models are trained **one after
    another** with a plain PyTorch loop instead: a deep copy of the model, a fresh
    ``torch.optim.SGD``/``Adam`` per model with the same hyperparameters and semantics, the same
    initialization and batch order as above, and dropout masks from the global RNG seeded per
    model from ``(seed, model_ids[r])``, so every model (dropout included) is independent of
    the stack composition. ``loss_fn`` then receives the copy's parameters *and* buffers and
    must pass the whole mapping to ``functional_call`` (the usual form below does), so BatchNorm
    updates each model's own statistics. ``strategy="sequential"`` forces this path (slower,
    but it works for any model); ``strategy="stacked"`` forces the vmap path and raises a
    ``ValueError`` naming the changing buffers. The two paths agree to float rounding on
    models without changing buffers and dropout.

    Args:
        model: the architecture (and, with ``init="model"``, the initial weights and buffers);
            not changed.
        loss_fn: ``loss_fn(params, xb, yb) -> scalar`` on one model's mini-batch, typically
            ``cross_entropy(torch.func.functional_call(model, params, xb), yb)``.
        x: all training inputs ``[n_train, ...]``.
        y: all training targets ``[n_train, ...]``.
        masks: ``[M, n_train]`` boolean subset masks, all of the same subset size.
        epochs: passes over each subset.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty added to the gradient (PyTorch's ``weight_decay``).
        optimizer: ``"sgd"`` or ``"adam"``.
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
        seed: training seed.
        model_ids: ids of the ``M`` models (default ``0..M-1``); they seed the dropout RNG
            (of the stack, or of each model on the sequential path) and are the default
            stream ids.
        init: ``"model"``: every model starts from ``model``'s current weights (and buffers);
            ``"seeded"``: model ``r`` re-initializes a copy of ``model`` by calling every
            module's ``reset_parameters()`` (in ``model.modules()`` order) under
            ``torch.manual_seed`` derived from ``(seed, stream_ids[r])`` (for BatchNorm this
            also resets the running statistics). Parameters of modules without
            ``reset_parameters`` keep the model's values.
        stream_ids: the random stream of each model (default: ``model_ids``). Models sharing
            a stream share their initialization and batch order (up to their subsets), e.g.
            leave-one-out models that should differ only by the removed example.
        strategy: ``"auto"``, ``"stacked"`` or ``"sequential"`` (see above).
        return_buffers: also return the buffers of every model.
        example_loss_fn: ``example_loss_fn(params, xb, yb) -> [b]``, the per-example losses
            whose mean is ``loss_fn`` (checked once on 4 examples). With it, a stack whose
            models all share one stream (leave-one-out models) trains on *shared windows*
            (:func:`.shared_windows`): every model is evaluated on the same short run of
            examples and weights its own mini-batch, so the inputs carry no model dimension
            and the first layer of all ``M`` models is one matrix product. Same batches, same
            optimizer, same result up to float rounding as without it; 1.7x faster on a
            250-model MNIST-LR block (with dropout, the masks drawn differ: they cover the
            window).

    Returns:
        The trained parameters ``{name: [M, *shape]}``, detached, on the model's device. With
        ``return_buffers=True``, ``(params, buffers)`` where ``buffers`` is
        ``{name: [M, *shape]}`` for every buffer of the model: the trained ones on the
        sequential path, the model's own (constant) buffers on the stacked path. Without it,
        buffers that training changed are dropped with a warning.
    """
    params_named = dict(model.named_parameters())
    if not params_named:
        raise ValueError("the model has no parameters to train.")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
    if init not in ("model", "seeded"):
        raise ValueError(f"init must be 'model' or 'seeded', got {init!r}.")
    check_strategy(strategy)
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}.")
    masks = check_masks(masks, x.shape[0])
    num = masks.shape[0]
    ids = as_ids(model_ids, num, "model_ids")
    streams = as_ids(stream_ids, num, "stream_ids") if stream_ids is not None else ids
    size = subset_size(masks, ids)
    model_buffers = {n: b.detach() for n, b in model.named_buffers()}
    if num == 0:
        params = {n: p.detach().new_empty(0, *p.shape) for n, p in params_named.items()}
        empty = {n: b.new_empty(0, *b.shape) for n, b in model_buffers.items()}
        return (params, empty) if return_buffers else params
    device = next(iter(params_named.values())).device
    x, y = x.to(device), y.to(device)
    recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                  weight_decay=weight_decay, optimizer=optimizer, betas=betas, eps=eps,
                  seed=seed, init=init)
    if resolve_strategy(model, loss_fn, x, y, strategy) == "sequential":
        params, buffers = _train_sequential(model, loss_fn, x, y, masks, ids, streams, size,
                                            **recipe)
        if not return_buffers:
            dropped = [n for n, b in buffers.items()
                       if not bool((b == model_buffers[n].unsqueeze(0)).all())]
            if dropped:
                warnings.warn(
                    f"train_stacked trained buffers {dropped} (e.g. BatchNorm running "
                    "statistics) but return_buffers=False drops them; pass return_buffers=True "
                    "to keep them.", stacklevel=2,
                )
            return params
        return params, buffers
    if example_loss_fn is not None:
        check_example_loss(model, loss_fn, example_loss_fn, x, y)
    params = _train_vmap(model, loss_fn, x, y, masks, ids, streams, size, **recipe,
                         example_loss_fn=example_loss_fn)
    if not return_buffers:
        return params
    buffers = {n: b.unsqueeze(0).expand(num, *b.shape).clone() for n, b in model_buffers.items()}
    return params, buffers



def evaluate_stacked(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    target_fn: Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor],
    chunk: int = 1024,
    model_chunk: int | None = None,
    *,
    buffers: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The target value of every stacked model on every test example.

    Runs ``vmap`` over the models (``model`` in eval mode, restored afterwards) and loops over
    test examples in chunks, without gradients.

    Args:
        model: the architecture that ``target_fn`` calls through ``functional_call``.
        params: stacked parameters ``{name: [M, ...]}`` (e.g. from :func:`.load_stacked`).
        x: test inputs ``[n_test, ...]``.
        y: test targets ``[n_test, ...]``.
        target_fn: ``target_fn(params, xb, yb) -> [b]``, one value per example, e.g. the margin
            ``logit_y - logsumexp(other logits)`` of the true class.
        chunk: test examples per forward pass.
        model_chunk: models per vectorized call (``vmap``'s ``chunk_size``); ``None`` for all.
        buffers: stacked buffers ``{name: [M, ...]}`` of the same models (e.g. from
            ``load_stacked(..., with_buffers=True)``). They are merged into the mapping that
            ``target_fn`` receives, so ``functional_call(model, params, xb)`` in eval mode uses
            each model's own BatchNorm running statistics. Without them, ``functional_call``
            falls back to ``model``'s own buffers for every model.

    Returns:
        A ``[M, n_test]`` tensor of target values.
    """
    if not params:
        raise ValueError("params is empty.")
    num = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    state = dict(params)
    if buffers:
        clash = sorted(set(buffers) & set(params))
        if clash:
            raise ValueError(f"names {clash} are in both params and buffers.")
        wrong = {n: tuple(b.shape[:1]) for n, b in buffers.items() if b.shape[:1] != (num,)}
        if wrong:
            raise ValueError(f"buffers must be stacked over the {num} models of params, got "
                             f"leading shapes {wrong}.")
        state.update({n: b.to(device) for n, b in buffers.items()})
    x, y = x.to(device), y.to(device)
    fn = torch.func.vmap(target_fn, in_dims=(0, None, None), chunk_size=model_chunk)
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                xb, yb = x[start:start + chunk], y[start:start + chunk]
                out = fn(state, xb, yb)
                if out.shape != (num, xb.shape[0]):
                    raise ValueError(
                        f"target_fn must return one value per example ([{xb.shape[0]}] per "
                        f"model), got {tuple(out.shape[1:])}."
                    )
                outs.append(out)
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty(num, 0, device=device)
    return torch.cat(outs, dim=1)
