"""The two libraries the method benchmark times, behind one interface.

``make_adapter(lib)`` builds a row's attributor and calls ``cache`` / ``attribute`` /
``self_attribute`` the way that library expects:

* ``hf_attrib``: ``make_attributor`` of the method registry, with the row's options
  (``method_table.hf_attrib_kwargs``); its calls need no adapting.
* ``dattri`` (0.3.0, only importable in the benchmark's own venv, never a dependency): a small
  table from registry names to dattri's classes, and its call conventions: TracIn's ``cache()``
  takes no loader, TRAK's ``attribute(test)`` runs on the cached training set, RPS has no
  ``self_attribute``, and the IF ``self_attribute`` sums each batch into the whole output
  (so it needs one-batch loaders; see ``README.md``, "How dattri is called").
"""

from __future__ import annotations

from typing import Any

from method_table import constructor_options, hf_attrib_kwargs, tracin_weights

# Rows per dattri LiSSA self_attribute call (its vmapped recursion over 50 rows peaks near
# 11.6 GB on the digits MLP, as its attribute() does for 50 test rows).
DATTRI_LISSA_SELF_ROWS = 50

# registry name -> dattri 0.3.0 class (Grad-Dot and Grad-Cos are its TracIn with one
# checkpoint of weight 1, the latter with normalised gradients).
DATTRI_CLASSES = {
    "if-explicit": "IFAttributorExplicit", "if-cg": "IFAttributorCG",
    "if-lissa": "IFAttributorLiSSA", "if-arnoldi": "IFAttributorArnoldi",
    "tracin": "TracInAttributor", "grad-dot": "TracInAttributor",
    "grad-cos": "TracInAttributor", "rps": "RPSAttributor", "trak": "TRAKAttributor",
}
_DATTRI_TRACIN = ("tracin", "grad-dot", "grad-cos")


def _layer_params(model: Any, layer: str | None) -> list[str] | None:
    """dattri's ``layer_name`` takes parameter names; hf_attrib's takes modules or parameters."""
    if layer is None:
        return None
    return [n for n, _ in model.named_parameters() if n == layer or n.startswith(layer + ".")]


class HfAttribAdapter:
    """hf_attrib: attributors from the method registry, called as documented."""

    name = "hf_attrib"

    def __init__(self, proj_type: str = "auto") -> None:
        self.proj_type = proj_type

    def version(self) -> str:
        import hf_attrib

        return getattr(hf_attrib, "__version__", "?")

    def build(self, params: dict[str, Any], case: Any, ckpts: list[Any]) -> Any:
        """The row's attributor on ``case`` (a ``cases.LoadedCase``) with ``ckpts``."""
        from hf_attrib.algorithm.registry import make_attributor
        from hf_attrib.task import AttributionTask

        # TRAK's gradients are those of its target (the margin); the others', of the loss.
        loss = case.fns["margin" if params["method"] == "trak" else "loss"]
        task = AttributionTask(loss_func=loss, model=case.model, checkpoints=ckpts)
        return make_attributor(params["method"], task,
                               **hf_attrib_kwargs(params, case.fns, case.info, self.proj_type))

    def cache(self, attributor: Any, params: dict[str, Any], train_loader: Any) -> None:
        attributor.cache(train_loader)

    def attribute(self, attributor: Any, params: dict[str, Any], train_loader: Any,
                  test_loader: Any) -> Any:
        return attributor.attribute(train_loader, test_loader)

    def self_influence(self, params: dict[str, Any], case: Any, ckpts: list[Any]) -> Any:
        """The training set's self-influence from a fresh attributor (``cache`` included)."""
        attributor = self.build(params, case, ckpts)
        attributor.cache(case.train_loader)
        return attributor.self_attribute(case.train_loader)

    def missing_self_attribute(self, params: dict[str, Any]) -> str | None:
        """Why the row has no ``self_attribute`` in this library (``None``: it has one)."""
        return None


class DattriAdapter:
    """dattri 0.3.0, written the way its own API expects (same data, checkpoints, options)."""

    name = "dattri"

    def version(self) -> str:
        import dattri

        return getattr(dattri, "__version__", "0.3.0")

    def build(self, params: dict[str, Any], case: Any, ckpts: list[Any]) -> Any:
        """The row's dattri attributor on ``case`` (a ``cases.LoadedCase``) with ``ckpts``."""
        import dattri.algorithm
        from dattri.task import AttributionTask

        params = {**params, **params.get("dattri", {})}  # its own settings where it has them
        method = params["method"]
        cls = getattr(dattri.algorithm, DATTRI_CLASSES[method])
        options = constructor_options(params)
        options.pop("block", None)  # dattri has no block CG: the row's dattri options say so
        layer_name = _layer_params(case.model, params.get("layer"))
        projector = ({"proj_dim": params["projection"], "proj_seed": 0}
                     if "projection" in params else None)
        task_kwargs: dict[str, Any] = {"loss_func": case.fns["loss"]}
        if method == "trak":
            task_kwargs["loss_func"] = case.fns["margin"]
            options.update(correct_probability_func=case.fns["prob"],
                           projector_kwargs=projector, layer_name=layer_name)
        elif method == "rps":  # dattri's RPS target is f(pre_activation, soft labels)
            task_kwargs["target_func"] = case.fns["rps_target"]
            options.update(final_linear_layer_name=params["layer"],
                           normalize_preactivate=False)
        elif method in _DATTRI_TRACIN:
            weights = tracin_weights(case.info, params) if method == "tracin" else [1.0]
            options.update(weight_list=weights, normalized_grad=method == "grad-cos",
                           projector_kwargs=projector, layer_name=layer_name)
        else:
            options["layer_name"] = layer_name
        task = AttributionTask(model=case.model, checkpoints=ckpts, **task_kwargs)
        return cls(task, device="cpu", **options)

    def cache(self, attributor: Any, params: dict[str, Any], train_loader: Any) -> None:
        if params["method"] in _DATTRI_TRACIN:
            attributor.cache()  # dattri's TracIn cache takes no loader (a no-op)
        else:
            attributor.cache(train_loader)

    def attribute(self, attributor: Any, params: dict[str, Any], train_loader: Any,
                  test_loader: Any) -> Any:
        if params["method"] == "trak":
            return attributor.attribute(test_loader)  # dattri: (test, train=None), cached
        return attributor.attribute(train_loader, test_loader)

    def self_influence(self, params: dict[str, Any], case: Any, ckpts: list[Any]) -> Any:
        """The training set's self-influence from a fresh attributor (``cache`` included).

        dattri's TRAK refuses ``self_attribute(loader)`` once cached and ``self_attribute()``
        without one, so only from-scratch numbers compare across the two libraries.
        """
        import torch
        from torch.utils.data import DataLoader, Subset

        attributor = self.build(params, case, ckpts)
        method = params["method"]
        if method == "trak":
            return attributor.self_attribute(case.train_loader)  # computes its own features
        if method in _DATTRI_TRACIN:
            attributor.cache()
            return attributor.self_attribute(case.train_loader)
        # dattri 0.3.0's inner-product self_attribute adds each batch's values to the whole
        # output vector (`tda_output += values`), which fails unless the loader is one batch:
        # give it the same training set as a single batch (the Hessian still comes from the
        # cached train_loader).
        attributor.cache(case.train_loader)
        # dattri's LiSSA vmaps its whole recursion over the rows of a call: 500 rows need far
        # more than 12 GB, so it gets the rows in one-batch calls of DATTRI_LISSA_SELF_ROWS
        # (the same total work, as a user would have to).
        train_set = case.train_set
        rows = DATTRI_LISSA_SELF_ROWS if method == "if-lissa" else len(train_set)
        return torch.cat([
            attributor.self_attribute(DataLoader(
                Subset(train_set, range(start, min(start + rows, len(train_set)))),
                batch_size=rows, shuffle=False))
            for start in range(0, len(train_set), rows)])

    def missing_self_attribute(self, params: dict[str, Any]) -> str | None:
        """Why the row has no ``self_attribute`` in this library (``None``: it has one)."""
        if params["method"] == "rps":
            return "dattri 0.3.0 RPSAttributor has no self_attribute"
        return None


def make_adapter(lib: str, hf_proj_type: str = "auto") -> HfAttribAdapter | DattriAdapter:
    """The adapter of ``lib``; ``hf_proj_type`` is hf_attrib's projector kind (``auto``: its
    own default, sparse JL on CPU). dattri keeps its default, a dense normal map."""
    return HfAttribAdapter(hf_proj_type) if lib == "hf_attrib" else DattriAdapter()


def dattri_available() -> tuple[bool, str]:
    """Whether ``import dattri`` can work here, and why not."""
    from importlib.util import find_spec

    if find_spec("dattri") is None:
        return False, ("dattri is not importable in this environment (it is only installed in "
                       "the benchmark's own venv; see recipes/speed/README.md)")
    return True, ""

