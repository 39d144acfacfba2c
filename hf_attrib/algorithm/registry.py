"""The method registry: each attribution method by name, with its class, defaults and grid.

One table answers "which methods exist, how is each built by default, and what does the paper
search over" for every caller: ``task.attributor(name)`` and ``hf-attrib attribute`` (which
use ``defaults``), the benchmark runner and the speed recipes (classes, names and the
``search`` grid). Methods are chosen by name, their options are data::

    from hf_attrib.algorithm import get_method, make_attributor, method_names

    method_names()                                  # ("trak", "tracin", ..., "rps")
    attributor = make_attributor("if-cg", task)     # IFAttributorCG(task, regularization=1e-2,
                                                    #                max_iter=10)
    for params in get_method("if-cg").search:       # the Appendix C.1 grid
        scores = make_attributor("if-cg", task, **params).attribute(train, test)

A new method is one ``register_method(MethodSpec(...))`` call. ``defaults`` and ``search``
are stored read-only (nested mappings too); ``MethodSpec.constructor_kwargs`` and
``make_attributor`` build fresh dicts from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from hf_attrib.algorithm.base import Attributor, BaseAttributor
from hf_attrib.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from hf_attrib.algorithm.kfac import IFAttributorEKFAC, IFAttributorKFAC
from hf_attrib.algorithm.rps import RPSAttributor
from hf_attrib.algorithm.tracin import GradCosAttributor, GradDotAttributor, TracInAttributor
from hf_attrib.algorithm.trak import DEFAULT_PROJ_DIM, TRAKAttributor
from hf_attrib.task import AttributionTask

__all__ = ["MethodSpec", "get_method", "make_attributor", "method_names", "register_method"]


def _frozen(value: Any) -> Any:
    """``value`` with every mapping in it made a read-only ``MappingProxyType`` (a copy)."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return value


def _thawed(value: Any) -> Any:
    """``value`` with every read-only mapping the registry made turned into a fresh ``dict``
    (what constructors receive; the caller's own objects are passed through)."""
    if isinstance(value, MappingProxyType):
        return {k: _thawed(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class MethodSpec:
    """One attribution method: its name, class, default options and hyperparameter grid.

    Attributes:
        name: the name users choose it by (``"if-cg"``).
        attributor_class: the ``BaseAttributor`` subclass that implements it.
        defaults: constructor keyword arguments used when the caller gives none (by
            ``task.attributor(name)``, ``hf-attrib attribute`` and ``make_attributor``).
        search: the hyperparameter grid of the paper's Appendix C.1, one mapping of
            constructor keyword arguments per setting (``({},)``: nothing to search).
        needs_classification_head: the method works on a classifier's final linear layer
            (RPS), so it does not apply to language models.
        summary: one line for help texts.
    """

    name: str
    attributor_class: type[BaseAttributor]
    defaults: Mapping[str, Any]
    search: tuple[Mapping[str, Any], ...]
    needs_classification_head: bool = False
    summary: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.attributor_class, type) or not issubclass(
                self.attributor_class, BaseAttributor):
            raise TypeError(f"method {self.name!r}: attributor_class must be a subclass of "
                            f"hf_attrib.algorithm.BaseAttributor, got {self.attributor_class!r}.")
        # Stored read-only, so that a caller editing what it read cannot change the registry.
        object.__setattr__(self, "defaults", _frozen(self.defaults))
        object.__setattr__(self, "search", tuple(_frozen(p) for p in self.search))

    def constructor_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``defaults`` updated by ``overrides``, as fresh dicts the caller may change (an
        entry of ``search`` may be passed as ``overrides``)."""
        return {k: _thawed(v) for k, v in {**self.defaults, **overrides}.items()}


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, overwrite: bool = False) -> MethodSpec:
    """Add ``spec`` to the registry under ``spec.name``.

    Args:
        spec: the method.
        overwrite: replace a method already registered under that name.

    Returns:
        ``spec``.

    Raises:
        ValueError: the name is taken and ``overwrite`` is false.
    """
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"a method named {spec.name!r} is already registered; pass "
                         "overwrite=True to replace it.")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``.

    Raises:
        ValueError: no method has that name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of "
                         f"{', '.join(method_names())}.") from None


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def make_attributor(name: str, task: AttributionTask, **kwargs: Any) -> Attributor:
    """The attributor of method ``name`` for ``task``: its class built with the method's
    ``defaults`` updated by ``kwargs``.

    Args:
        name: a registered method name.
        task: the attribution task.
        **kwargs: constructor options; they replace the defaults of the same name.

    Raises:
        ValueError: ``name`` is not registered.
    """
    spec = get_method(name)
    return spec.attributor_class(task, **spec.constructor_kwargs(**kwargs))


# --------------------------------------------------------------------------------------------
# The built-in methods
# --------------------------------------------------------------------------------------------
# Defaults: the classes' own, except the influence functions' Hessian damping. A transformer's
# loss Hessian is indefinite away from a minimum, so the classes' regularization=0 (dattri's)
# would make CG/explicit solves meaningless; 1e-2 is the damping of dattri's and Koh & Liang's
# examples. Grids: the paper's Appendix C.1.
_REGULARIZATIONS = (1e-1, 1e-2, 5e-3, 1e-3, 1e-4, 1e-5)
_NO_SEARCH: tuple[Mapping[str, Any], ...] = ({},)
# K-FAC/EK-FAC: the classes' default is kronfluence's true Fisher, which needs a
# sampled_loss_func a plain task does not have; by name they use the empirical Fisher (the
# training labels) so that every task works. Damping: the per-block heuristic at a few scales
# (the default 0.1 is kronfluence's), and one global value over the IF grid.
_KFAC_DEFAULTS = {"fisher": "empirical"}
_KFAC_SEARCH = (tuple({"fisher": "empirical", "damping_scale": s} for s in (1.0, 0.1, 0.01))
                + tuple({"fisher": "empirical", "damping": r} for r in _REGULARIZATIONS))

for _spec in (
    MethodSpec(
        "trak", TRAKAttributor,
        defaults={"projector_kwargs": {"proj_dim": DEFAULT_PROJ_DIM}, "regularization": 0.0},
        search=tuple({"projector_kwargs": {"proj_dim": p}} for p in (512, 2048)),
        summary="TRAK: projected gradients through the after-kernel, ensembled over "
                "checkpoints"),
    MethodSpec(
        "tracin", TracInAttributor, defaults={}, search=_NO_SEARCH,
        summary="TracInCP: gradient dot products summed over training checkpoints"),
    MethodSpec(
        "grad-dot", GradDotAttributor, defaults={}, search=_NO_SEARCH,
        summary="Grad-Dot: loss-gradient dot target-gradient at one checkpoint"),
    MethodSpec(
        "grad-cos", GradCosAttributor, defaults={}, search=_NO_SEARCH,
        summary="Grad-Cos: cosine of the two gradients at one checkpoint"),
    MethodSpec(
        "if-explicit", IFAttributorExplicit, defaults={"regularization": 1e-2},
        search=tuple({"regularization": r} for r in _REGULARIZATIONS),
        summary="influence function with the explicit Hessian inverse (small models)"),
    MethodSpec(
        "if-cg", IFAttributorCG, defaults={"regularization": 1e-2, "max_iter": 10},
        search=tuple({"regularization": r, "max_iter": 10} for r in _REGULARIZATIONS),
        summary="influence function with conjugate-gradient inverse-HVPs"),
    MethodSpec(
        "if-lissa", IFAttributorLiSSA, defaults={},
        search=tuple({"recursion_depth": 500, "batch_size": b} for b in (10, 50)),
        summary="influence function with LiSSA (stochastic Neumann series) inverse-HVPs"),
    MethodSpec(
        "if-arnoldi", IFAttributorArnoldi, defaults={"regularization": 1e-2},
        search=tuple({"regularization": r, "max_iter": 50} for r in _REGULARIZATIONS),
        summary="influence function on the top Hessian eigenspace (Arnoldi)"),
    MethodSpec(
        "if-ekfac", IFAttributorEKFAC, defaults=_KFAC_DEFAULTS, search=_KFAC_SEARCH,
        summary="influence function with EK-FAC curvature (per-layer Kronecker eigenbasis, "
                "corrected eigenvalues)"),
    MethodSpec(
        "if-kfac", IFAttributorKFAC, defaults=_KFAC_DEFAULTS, search=_KFAC_SEARCH,
        summary="influence function with K-FAC curvature (per-layer Kronecker factors)"),
    MethodSpec(
        "rps", RPSAttributor, defaults={"l2_strength": 0.003, "fit_last_layer": True},
        search=tuple({"l2_strength": s, "normalize_preactivate": n}
                     for s in (10, 1, 1e-1, 1e-2, 1e-3, 1e-4) for n in (True, False)),
        needs_classification_head=True,
        summary="representer points (RPS-L2) of a classifier's final linear layer"),
):
    register_method(_spec)
del _spec
