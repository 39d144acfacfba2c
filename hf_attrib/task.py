"""``AttributionTask``: what is attributed (model, checkpoints) and through which functions.

A task holds the model, one or more trained checkpoints, the training loss ``loss_func`` and
the ``target_func`` whose value on a test example is being explained (the loss by default).
Both are written as in the paper's Demo 1::

    def f(params, batch):                       # params: {name: tensor}
        x, y = batch
        yhat = torch.func.functional_call(model, params, x)
        return nn.functional.cross_entropy(yhat, y)

and always receive a *batch* (with per-example gradients, a batch of one), so code written
for training works unchanged.

Attributors work on a flat vector ``theta`` of the selected parameters (all of them, or the
ones named by ``layer_name``); the task turns ``f(params, batch)`` into ``f(theta, batch)``
with the other parameters and buffers fixed at the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hf_attrib.func.utils import flatten_params, per_sample_grad, unflatten_params

__all__ = ["AttributionTask", "CheckpointFunctions", "check_state_dict", "load_state_dict_file",
           "use_eager_attention"]

Checkpoint = Mapping[str, Tensor] | str | os.PathLike
LossFunc = Callable[[dict[str, Tensor], Any], Tensor]


# --------------------------------------------------------------------------------------------
# Checkpoint files (safetensors only: nothing is unpickled)
# --------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a state dict from a ``.safetensors`` file or a ``save_pretrained`` folder.

    Folders may hold ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
    Pickle-based files (``.bin``, ``.pt``) are refused: convert them with
    ``safetensors.torch.save_file(model.state_dict(), "model.safetensors")``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        single = path / "model.safetensors"
        index = path / "model.safetensors.index.json"
        if single.exists():
            return load_file(single)
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(load_file(_inside(path, shard, index.name)))
            return state
        raise FileNotFoundError(
            f"checkpoint folder {path} has no model.safetensors or model.safetensors.index.json;"
            " save it with model.save_pretrained(folder) (safe_serialization is the default)."
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {path} does not exist.")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"checkpoint {path} is not a .safetensors file; hf_attrib never unpickles files. "
            "Convert it with safetensors.torch.save_file(state_dict, 'model.safetensors')."
        )
    return load_file(path)


def _inside(folder: Path, name: str, index_name: str) -> Path:
    """``folder / name``, refused unless it is a file name inside ``folder`` (an index that
    names ``../x`` or an absolute path must not make us read outside the checkpoint)."""
    target = (folder / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(folder.resolve()):
        raise ValueError(f"{folder / index_name} names the shard {name!r}, which is outside "
                         f"{folder}; a checkpoint index may only name files inside its folder.")
    return target


def _weights_stamp(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Where each parameter and buffer lives and how often it was written in place (the
    version counter autograd keeps): it changes whenever anything loads, steps or replaces
    the weights, so a loaded checkpoint is known to be still in place without reading it."""
    return tuple((t.data_ptr(), t._version)
                 for t in (*model.parameters(), *model.buffers()))


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], label: str) -> None:
    """Check that ``state`` fits ``model``; tied weights may be stored once.

    Args:
        model: the model the state is for.
        state: a state dict.
        label: how the message names the state (``"checkpoint 3"``).

    Raises:
        ValueError: naming every missing/unexpected key and shape mismatch.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    # Tied weights (e.g. a language-model head sharing the embedding) are stored once.
    by_storage: dict[int, set[str]] = {}
    for k, v in expected.items():
        by_storage.setdefault(v.untyped_storage().data_ptr(), set()).add(k)
    missing = [
        k for k in missing
        if not any(other in state for other in by_storage[expected[k].untyped_storage().data_ptr()])
    ]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:10]))
        raise ValueError(
            f"{label} does not match the model ({type(model).__name__}): " + ", ".join(parts)
            + ". Pass checkpoints saved from this architecture, or a checkpoints_load_func "
            "that maps them onto it."
        )


def use_eager_attention(model: nn.Module) -> None:
    """Switch a ``transformers`` model to the eager attention implementation.

    The fused SDPA/flash kernels have no ``vmap`` batching rule and no double backward on CPU,
    so per-example gradients through them run a slow fallback and HVPs fail; eager attention
    computes the same function with plain matmuls that ``torch.func`` transforms natively.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        return
    model.set_attn_implementation("eager")


def _unshare(model: nn.Module, state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Copy the tensors of ``state`` that share memory with the model's own.

    ``model.state_dict()`` returns the live parameters: kept as a checkpoint, it would be
    overwritten the first time another checkpoint is loaded into the model.
    """
    live = {t.untyped_storage().data_ptr() for t in model.state_dict().values()
            if isinstance(t, Tensor)}
    if not any(isinstance(t, Tensor) and t.untyped_storage().data_ptr() in live
               for t in state.values()):
        return state
    return {k: t.detach().clone() if isinstance(t, Tensor)
            and t.untyped_storage().data_ptr() in live else t for k, t in state.items()}


def _meta_tensor_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` on the ``meta`` device (no data)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in named if t.is_meta]


# --------------------------------------------------------------------------------------------
# The functions of one checkpoint
# --------------------------------------------------------------------------------------------
def _scalar(func: LossFunc, name: str) -> LossFunc:
    def checked(params: dict[str, Tensor], batch: Any) -> Tensor:
        out = func(params, batch)
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{name} must return a scalar tensor for a batch; got {shape}. "
                "Reduce it over the batch (e.g. .mean() or .sum())."
            )
        return out

    return checked


@dataclass
class CheckpointFunctions:
    """The flat-parameter view of one checkpoint.

    Attributes:
        index: checkpoint index.
        theta: selected parameters as one flat vector ``[d]`` (detached).
        layout: ``{name: tensor}`` of the selected parameters (defines ``theta``'s order).
        loss: ``loss(theta, batch) -> scalar``.
        target: ``target(theta, batch) -> scalar``.
        target_is_loss: the task uses the loss as its target.
    """

    index: int
    theta: Tensor
    layout: dict[str, Tensor]
    loss: Callable[[Tensor, Any], Tensor]
    target: Callable[[Tensor, Any], Tensor]
    target_is_loss: bool

    @property
    def dim(self) -> int:
        return self.theta.numel()

    def loss_grads(self, batch: Any, chunk_size: int | None = None) -> Tensor:
        """Per-example gradients of the loss, ``[B, d]``."""
        return per_sample_grad(self.loss, self.theta, batch, chunk_size)

    def target_grads(self, batch: Any, chunk_size: int | None = None) -> Tensor:
        """Per-example gradients of the target, ``[B, d]``."""
        return per_sample_grad(self.target, self.theta, batch, chunk_size)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------
class AttributionTask:
    """The model, its checkpoints, and the loss and target functions to attribute.

    Args:
        loss_func: ``f(params, batch) -> scalar``, the loss the model was trained on (mean over
            the batch). ``params`` is a ``{name: tensor}`` dict for ``functional_call``.
        model: the ``nn.Module`` (or ``PreTrainedModel``) the checkpoints belong to.
        checkpoints: one checkpoint or a list: state dicts, ``.safetensors`` files or
            ``save_pretrained`` folders. Several checkpoints are ensembled by the attributors
            (TracInCP: training trajectory; TRAK: independently trained models).
        target_func: ``f(params, batch) -> scalar`` whose value on a test example is explained
            (defaults to ``loss_func``); e.g. the margin or a log-likelihood.
        checkpoints_load_func: ``(model, checkpoint) -> model``, for checkpoints that need
            custom loading. By default ``model.load_state_dict`` is used after a key/shape check.

    Sign convention (all attributors): ``score[i, j]`` estimates how much training example
    ``i`` *raises* ``target_func`` on test example ``j``. With a loss as the target, helpful
    examples score negative; with the margin or a log-likelihood, positive.
    """

    def __init__(
        self,
        loss_func: LossFunc,
        model: nn.Module,
        checkpoints: Checkpoint | Sequence[Checkpoint],
        target_func: LossFunc | None = None,
        checkpoints_load_func: Callable[[nn.Module, Any], nn.Module] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_func):
            raise TypeError("loss_func must be a callable f(params, batch) -> scalar.")
        # Attribution explains the trained model as it predicts: dropout off, batch norm on its
        # running statistics. A model prepared with activate_dropout() is already in eval mode
        # with chosen dropout layers re-enabled, and is left as it is.
        if model.training:
            model.eval()
        use_eager_attention(model)
        self.model = model
        self.loss_func = _scalar(loss_func, "loss_func")
        self.target_is_loss = target_func is None or target_func is loss_func
        self.target_func = self.loss_func if self.target_is_loss else _scalar(
            target_func, "target_func"
        )
        self.checkpoints_load_func = checkpoints_load_func
        if isinstance(checkpoints, (Mapping, str, os.PathLike)):
            checkpoints = [checkpoints]
        self.checkpoints = [_unshare(model, c) if isinstance(c, Mapping) else c
                            for c in checkpoints]
        if not self.checkpoints:
            raise ValueError("checkpoints is empty; pass at least one state dict or file.")
        for i, ckpt in enumerate(self.checkpoints):
            if isinstance(ckpt, (str, os.PathLike)) and not Path(ckpt).exists():
                raise FileNotFoundError(f"checkpoint {i} ({ckpt}) does not exist.")
            if isinstance(ckpt, Mapping) and checkpoints_load_func is None:
                check_state_dict(model, ckpt, f"checkpoint {i}")
        self._loaded: int | None = None
        self._loaded_stamp: tuple[tuple[int, int], ...] = ()

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoints)

    def load_checkpoint(self, index: int) -> nn.Module:
        """Load checkpoint ``index`` into ``self.model`` (parameters and buffers)."""
        if not 0 <= index < self.num_checkpoints:
            raise IndexError(f"checkpoint index {index} out of range "
                             f"(the task has {self.num_checkpoints}).")
        # The memo holds only while nothing else wrote to the weights: another task sharing
        # this model (the benchmark's noisy-label task does) or the user's own updates would
        # otherwise leave another checkpoint's weights in place, silently.
        if self._loaded == index and self._loaded_stamp == _weights_stamp(self.model):
            return self.model
        ckpt = self.checkpoints[index]
        if self.checkpoints_load_func is not None:
            model = self.checkpoints_load_func(self.model, ckpt)
            if model is not None:
                self.model = model
        else:
            state = ckpt if isinstance(ckpt, Mapping) else load_state_dict_file(ckpt)
            check_state_dict(self.model, state, f"checkpoint {index}")
            self.model.load_state_dict(state, strict=False)
        self._loaded = index
        self._loaded_stamp = _weights_stamp(self.model)
        return self.model

    def to(self, device: torch.device | str) -> AttributionTask:
        """Move the model (and future checkpoint loads) to ``device``.

        Raises:
            ValueError: the model is on the ``meta`` device (see ``model_device``).
        """
        self._require_weights()
        self.model.to(device)
        return self

    def model_device(self) -> torch.device:
        """The device of the model's parameters: where attributors compute by default.

        A model with tensors on the ``meta`` device is first given checkpoint 0 through
        ``checkpoints_load_func`` (which may materialise or replace it).

        Raises:
            ValueError: the model is on the ``meta`` device, or its parameters are spread
                over several devices (pass ``device=`` to the attributor to gather them).
        """
        self._require_weights()
        devices = sorted({str(p.device) for p in self.model.parameters()})
        if len(devices) > 1:
            raise ValueError(
                f"the model's parameters are on several devices ({', '.join(devices)}; e.g. "
                "from_pretrained(..., device_map='auto')); attributors compute on one. Pass "
                "device='cuda:0' (or another) to the attributor to move the whole model there."
            )
        return torch.device(devices[0]) if devices else torch.device("cpu")

    def _require_weights(self) -> None:
        """Raise a clear error when the model has no real weights (``meta`` tensors)."""
        if not _meta_tensor_names(self.model):
            return
        if self.checkpoints_load_func is not None:
            self.load_checkpoint(0)  # a custom loader may materialise or replace the model
            if not _meta_tensor_names(self.model):
                return
            self._loaded = None  # nothing real was loaded: load again once weights exist
        names = _meta_tensor_names(self.model)
        raise ValueError(
            f"the model is on the 'meta' device (no weights: {names[:3]}"
            f"{' ...' if len(names) > 3 else ''}), e.g. built under init_empty_weights() or "
            "offloaded by from_pretrained(..., device_map='auto'). Load real weights first: "
            "from_pretrained(..., device_map=None), or model.to_empty(device='cpu') followed by "
            "model.load_state_dict(...), or a checkpoints_load_func that materialises it."
        )

    # -- parameter selection -------------------------------------------------------------
    def select_parameters(self, layer_name: str | Sequence[str] | None = None) -> list[str]:
        """Names of the parameters selected by ``layer_name``.

        Each entry of ``layer_name`` is a parameter name or a module name (all of that
        module's parameters). ``None`` selects every parameter that requires grad.
        """
        named = dict(self.model.named_parameters())
        if layer_name is None:
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ValueError("the model has no parameters that require grad; pass "
                                 "layer_name to choose the parameters to attribute through.")
            return names
        if isinstance(layer_name, str):
            layer_name = [layer_name]
        selected: list[str] = []
        for entry in layer_name:
            hits = [n for n in named if n == entry or n.startswith(entry + ".")]
            if not hits:
                modules = [m for m, _ in self.model.named_modules() if m][:25]
                raise ValueError(
                    f"unknown layer name {entry!r}: no parameter or module of "
                    f"{type(self.model).__name__} has that name. Modules include {modules}; "
                    "parameters: see model.named_parameters()."
                )
            selected += [n for n in hits if n not in selected]
        return selected

    # -- functions -----------------------------------------------------------------------
    def functions(
        self, index: int = 0, layer_name: str | Sequence[str] | None = None
    ) -> CheckpointFunctions:
        """Flat-parameter loss/target functions of checkpoint ``index``."""
        model = self.load_checkpoint(index)
        names = self.select_parameters(layer_name)
        params = {n: p.detach() for n, p in model.named_parameters()}
        layout = {n: params[n] for n in names}
        fixed = {n: p for n, p in params.items() if n not in layout}

        def bind(func: LossFunc) -> Callable[[Tensor, Any], Tensor]:
            def flat(theta: Tensor, batch: Any) -> Tensor:
                return func({**fixed, **unflatten_params(theta, layout)}, batch)

            return flat

        loss = bind(self.loss_func)
        target = loss if self.target_is_loss else bind(self.target_func)
        return CheckpointFunctions(index, flatten_params(layout), layout, loss, target,
                                   self.target_is_loss)
