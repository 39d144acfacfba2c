"""Training and test features through the per-layer engine and the factored projection.

``projector_kwargs={"proj_type": "factored", "factor_dim": k}`` makes a feature attributor
(TRAK, TracInCP, Grad-Dot, Grad-Cos) take its features from one batched forward/backward with
layer hooks (``hf_attrib.func.layer_grads``) projected side by side
(``hf_attrib.func.factored_projection``), instead of projecting explicit per-example gradients.

Trust: the engine's per-example factors are exact only when the loss (or target) of a batch is
the mean of independent per-example values and every use of a selected parameter goes through
a hooked module. Both are checked, not assumed: on the first batch of each checkpoint and
gradient kind the features of the first and last examples are compared with the projection of
their explicit ``torch.func`` gradients, and on batches 1, 2, 4, 8, ... the batch's value with
the mean of its examples' values (forward passes only); a mismatch raises. Not detectable this
way: a layer whose leading dimension equals the batch size by coincidence on every checked
batch (MoE experts on routed tokens): such models need a dense projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hf_attrib.func.factored_projection import FactoredProjector
from hf_attrib.func.layer_grads import Block, LayerGradients, Side
from hf_attrib.func.utils import batch_size_of, slice_batch
from hf_attrib.task import AttributionTask, CheckpointFunctions

__all__ = ["FACTORED", "FactoredFeatures", "factored_options"]

FACTORED = "factored"
_OPTIONS = {"proj_type", "factor_dim", "proj_dim", "proj_seed", "kind"}
_DEFAULT_FACTOR_DIM = 32


def factored_options(projector_kwargs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The factored projection's options from ``projector_kwargs`` (``None``: another kind).

    The size is ``factor_dim`` (``k``: each weight block gets ``k x k`` features, each vector
    block ``k``; sides smaller than ``k`` kept whole) or ``proj_dim``, a budget for the total
    width: the largest ``k`` whose width fits it (to compare with a dense projection of the
    same size). Neither: ``factor_dim=32``.

    Raises:
        ValueError: unknown options, or both sizes.
    """
    if not projector_kwargs or projector_kwargs.get("proj_type") != FACTORED:
        return None
    unknown = sorted(set(projector_kwargs) - _OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for proj_type='factored'; it takes "
                         f"{sorted(_OPTIONS - {'proj_type'})}.")
    factor_dim = projector_kwargs.get("factor_dim")
    proj_dim = projector_kwargs.get("proj_dim")
    if factor_dim is not None and proj_dim is not None:
        raise ValueError("proj_type='factored' takes factor_dim (per-side size) or proj_dim "
                         "(total width budget), not both.")
    for name, value in (("factor_dim", factor_dim), ("proj_dim", proj_dim)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if factor_dim is None and proj_dim is None:
        factor_dim = _DEFAULT_FACTOR_DIM
    return {"factor_dim": factor_dim, "proj_dim": proj_dim,
            "seed": projector_kwargs.get("proj_seed", 0),
            "kind": projector_kwargs.get("kind", "normal")}


def checked_engine(model: torch.nn.Module, names: list[str], *, who: str, verb: str,
                   instead: str) -> LayerGradients:
    """The per-layer engine over the parameters ``names`` of ``model``, for a method that
    needs it to cover them all and the model in eval mode.

    Args:
        model: the task's model (its modules get the hooks).
        names: the selected parameter names.
        who: the method, as the errors name it (``"IFAttributorKFAC"``).
        verb: what the method does with the layers' gradients (``"factors"``).
        instead: the way out the errors offer (``"use IFAttributorCG"``).

    Raises:
        ValueError: a selected parameter belongs to no supported layer, or dropout (any
            training-mode module) is active: a batched forward then draws other masks than
            one example at a time.
    """
    engine = LayerGradients(model, names)
    if engine.uncovered:
        raise ValueError(
            f"{who} {verb} the gradients of nn.Linear, transformers Conv1D, nn.Conv2d "
            f"(groups=1), nn.Embedding and nn.LayerNorm layers; the selected parameters "
            f"{engine.uncovered[:5]} belong to other modules. Select only such layers "
            f"(layer_name=...) or {instead}.")
    if any(m.training for m in model.modules()):
        raise ValueError(
            f"{who} needs the model in eval mode (active dropout draws other masks in a "
            f"batched forward than per example): call model.eval(), or {instead}.")
    return engine


class FactoredFeatures:
    """Factored features of one task's selected layers (every checkpoint: same layers).

    Args:
        task: the task (its model's modules carry the hooks).
        fns: any checkpoint's functions (for the selected parameter names).
        options: ``factored_options(...)`` (unused when ``projector`` is given).
        device: where features are computed.
        projector: a ready projector of the engine's blocks (K-FAC's eigenbasis rotation)
            instead of one built from ``options``.

    Raises:
        ValueError: a selected parameter belongs to no supported layer, or dropout is active.
    """

    def __init__(self, task: AttributionTask, fns: CheckpointFunctions,
                 options: dict[str, Any] | None, device: torch.device,
                 projector: FactoredProjector | None = None) -> None:
        self.engine = checked_engine(
            task.model, list(fns.layout), who="proj_type='factored'", verb="projects",
            instead="use a dense projection (proj_type='normal' or 'sparse'; it also serves "
                    "dropout ensembles)")
        blocks = list(self.engine.blocks.values())
        if projector is None:
            assert options is not None, "options or a projector"
            factor_dim = options["factor_dim"] or FactoredProjector.factor_dim_for(
                blocks, options["proj_dim"])
            projector = FactoredProjector(blocks, factor_dim, options["seed"],
                                          options["kind"], device)
        self.projector = projector
        self.device = device
        self.model = task.model
        self._calls: dict[tuple[int, str], int] = {}

    @property
    def width(self) -> int:
        return self.projector.proj_dim

    def __call__(self, fns: CheckpointFunctions, batch: Any, kind: str,
                 normalize: bool = False) -> Tensor:
        """Projected per-example gradients ``[B, width]`` of the loss (``kind="loss"``) or
        target, divided by the exact gradient norms with ``normalize``."""
        if any(m.training for m in self.model.modules()):
            raise ValueError("the model was put in training mode (dropout active) after the "
                             "attributor was built; call model.eval() first.")
        func = fns.loss if kind == "loss" else fns.target
        size = batch_size_of(batch)
        out = torch.zeros(size, self.width, device=self.device)
        norms = torch.zeros(size, device=self.device)
        uses: dict[str, int] = {}

        def visit(block: Block, rows: Side, cols: Side | None) -> None:
            self.projector.accumulate(out, block, rows, cols, fns.index)
            uses[block.name] = uses.get(block.name, 0) + 1
            if normalize:
                norms.add_(self.projector.squared_norm(rows, cols))

        value = self.engine.run(lambda: func(fns.theta, batch), size, visit)
        call = self._calls.get((fns.index, kind), 0)
        self._calls[(fns.index, kind)] = call + 1
        if call == 0:
            self._check(fns, func, batch, out)
        elif call & (call - 1) == 0:  # batches 1, 2, 4, 8, ...: a forward-only spot check
            self._check_mean(fns, func, batch, value)
        if normalize:
            shared = sorted(n for n, k in uses.items() if k > 1)
            if shared:
                raise ValueError(
                    f"normalised gradients (Grad-Cos) with proj_type='factored' need each "
                    f"parameter used once per forward; {shared[:3]} are used several times "
                    "(tied or reused weights). Leave them out (layer_name=...) or use a dense "
                    "projection.")
            out.div_(norms.sqrt().clamp_min(1e-12)[:, None])
        return out

    def _check(self, fns: CheckpointFunctions, func: Any, batch: Any, out: Tensor) -> None:
        """Compare the features of the batch's first and last examples (most likely to differ
        in length) with the projection of their explicit gradients, one example at a time (one
        ``d``-sized gradient in memory)."""
        size = out.shape[0]
        tol = 5e-2 if fns.theta.dtype in (torch.float16, torch.bfloat16) else 1e-3
        for i in sorted({0, size - 1}):
            # torch.func.grad on a batch of one, not vmap: models with data-dependent checks
            # (transformers' padding warnings) run here too.
            explicit = torch.func.grad(func)(fns.theta, slice_batch(batch, i, i + 1))
            grads, start = {}, 0
            for name, param in fns.layout.items():
                grads[name] = explicit[start:start + param.numel()].reshape(1, *param.shape)
                start += param.numel()
            del explicit
            ref = self.projector.project_explicit(grads, fns.index)[0]
            err, scale = float((out[i] - ref).norm()), float(ref.norm())
            if err > tol * scale + 1e-6:
                raise _mismatch(f"relative error {err / max(scale, 1e-12):.2g} on example {i} "
                                f"of the first batch, checkpoint {fns.index}")

    def _check_mean(self, fns: CheckpointFunctions, func: Any, batch: Any, value: Tensor
                    ) -> None:
        """The batch's value must be the mean of its examples' values (what makes the engine's
        per-example factors exact); checked with forward passes only."""
        with torch.no_grad():
            each = torch.stack([func(fns.theta, slice_batch(batch, i, i + 1)).float()
                                for i in range(batch_size_of(batch))])
        mean, got = float(each.mean()), float(value)
        tol = 5e-2 if fns.theta.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if abs(got - mean) > tol * max(abs(mean), float(each.abs().mean()), 1e-6):
            raise _mismatch(f"a batch's value {got:.6g} is not the mean {mean:.6g} of its "
                            f"examples' values (checkpoint {fns.index})")


def _mismatch(detail: str) -> ValueError:
    return ValueError(
        f"the per-layer engine's gradients differ from the explicit per-example gradients "
        f"({detail}): the loss of a batch must be the mean of independent per-example losses "
        "(no sum over the batch, no token mean across the batch such as transformers' own "
        "outputs.loss, no batch norm in training mode, no cross-example terms), and every use "
        "of a selected parameter must go through its module (no weight read directly, e.g. "
        "hidden @ embedding.weight.T). Fix the loss, or use a dense projection "
        "(proj_type='normal' or 'sparse').")

