"""The method registry (``hf_attrib.algorithm.registry``): names, defaults, the Appendix C.1
grids, and the callers that take their methods from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_attrib.algorithm.registry as registry
from hf_attrib.algorithm import (
    Attributor,
    GradDotAttributor,
    IFAttributorCG,
    MethodSpec,
    TRAKAttributor,
    get_method,
    make_attributor,
    method_names,
    register_method,
)
from hf_attrib.task import AttributionTask

BUILTIN = ("trak", "tracin", "grad-dot", "grad-cos", "if-explicit", "if-cg", "if-lissa",
           "if-arnoldi", "if-ekfac", "if-kfac", "rps")
REGS = [1e-1, 1e-2, 5e-3, 1e-3, 1e-4, 1e-5]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.body(x)))


@pytest.fixture()
def task():
    torch.manual_seed(0)
    model = _Net()

    def loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    return AttributionTask(loss, model, model.state_dict())


@pytest.fixture()
def scratch_registry(monkeypatch):
    """A copy of the registry that the test may change."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_the_nine_methods_are_registered_in_order():
    assert method_names() == BUILTIN
    assert all(get_method(name).name == name for name in BUILTIN)
    assert [n for n in BUILTIN if get_method(n).needs_classification_head] == ["rps"]
    assert all(get_method(n).summary for n in BUILTIN)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'if-magic'; choose one of trak, "
                                         r"tracin, .*, rps\."):
        get_method("if-magic")
    with pytest.raises(ValueError, match="unknown method"):
        make_attributor("if-magic", None)


def test_search_grids_are_the_papers_appendix_c1():
    def grid(name):
        return [registry._thawed(p) for p in get_method(name).search]

    assert grid("if-explicit") == [{"regularization": r} for r in REGS]
    assert grid("if-cg") == [{"regularization": r, "max_iter": 10} for r in REGS]
    assert grid("if-arnoldi") == [{"regularization": r, "max_iter": 50} for r in REGS]
    assert grid("if-lissa") == [{"recursion_depth": 500, "batch_size": 10},
                                {"recursion_depth": 500, "batch_size": 50}]
    assert grid("rps") == [{"l2_strength": s, "normalize_preactivate": n}
                           for s in (10, 1, 1e-1, 1e-2, 1e-3, 1e-4) for n in (True, False)]
    assert grid("trak") == [{"projector_kwargs": {"proj_dim": 512}},
                            {"projector_kwargs": {"proj_dim": 2048}}]
    for name in ("tracin", "grad-dot", "grad-cos"):
        assert grid(name) == [{}]


def test_defaults_are_those_of_task_attributor_and_the_cli():
    from hf_attrib.integrations.transformers import METHOD_DEFAULTS, method_defaults

    assert set(METHOD_DEFAULTS) == set(BUILTIN)
    for name in BUILTIN:
        assert METHOD_DEFAULTS[name] == method_defaults(name) == get_method(name).defaults
    assert method_defaults("if-cg") == {"regularization": 1e-2, "max_iter": 10}
    assert method_defaults("trak") == {"projector_kwargs": {"proj_dim": 2048},
                                       "regularization": 0.0}


def test_make_attributor_puts_kwargs_over_the_defaults(task):
    cg = make_attributor("if-cg", task)
    assert type(cg) is IFAttributorCG and isinstance(cg, Attributor)
    assert (cg.regularization, cg.max_iter) == (1e-2, 10)
    cg = make_attributor("if-cg", task, max_iter=3, layer_name="classifier")
    assert (cg.regularization, cg.max_iter, cg.layer_name) == (1e-2, 3, "classifier")
    trak = make_attributor("trak", task, regularization=0.5)
    assert type(trak) is TRAKAttributor and trak.projector_kwargs == {"proj_dim": 2048}
    assert trak.regularization == 0.5


def test_every_grid_entry_builds_its_attributor(task):
    for name in BUILTIN:
        extra = {"final_linear_layer_name": "classifier"} if name == "rps" else {}
        for params in get_method(name).search:
            attributor = make_attributor(name, task, **params, **extra)
            assert isinstance(attributor, get_method(name).attributor_class)
            for key, value in registry._thawed(params).items():
                if key == "max_iter" and name == "if-arnoldi":
                    # Arnoldi runs at least proj_dim (default 100) iterations
                    value = max(value, attributor.proj_dim)
                if key != "projector_kwargs":
                    assert getattr(attributor, key) == value, (name, key)


def test_defaults_and_grids_are_read_only():
    spec = get_method("trak")
    with pytest.raises(TypeError):
        spec.defaults["regularization"] = 1.0
    with pytest.raises(TypeError):
        spec.defaults["projector_kwargs"]["proj_dim"] = 8
    with pytest.raises(TypeError):
        spec.search[0]["projector_kwargs"] = {}
    with pytest.raises(AttributeError):
        spec.name = "other"
    # what callers receive is theirs to change
    kwargs = spec.constructor_kwargs()
    kwargs["projector_kwargs"]["proj_dim"] = 8
    assert get_method("trak").defaults["projector_kwargs"]["proj_dim"] == 2048
    assert spec.constructor_kwargs(regularization=1.0)["regularization"] == 1.0


def test_register_method(scratch_registry, task):
    spec = MethodSpec("dot-probe", GradDotAttributor, defaults={"layer_name": "classifier"},
                      search=({},), summary="Grad-Dot on the head")
    assert register_method(spec) is spec
    assert method_names()[-1] == "dot-probe"
    attributor = make_attributor("dot-probe", task)
    assert type(attributor) is GradDotAttributor and attributor.layer_name == "classifier"
    with pytest.raises(ValueError, match=r"already registered.*overwrite=True"):
        register_method(spec)
    replaced = MethodSpec("dot-probe", GradDotAttributor, defaults={}, search=({},))
    register_method(replaced, overwrite=True)
    assert get_method("dot-probe") is replaced
    with pytest.raises(TypeError, match=r"subclass of hf_attrib\.algorithm\.BaseAttributor"):
        MethodSpec("bad", dict, defaults={}, search=())


def test_public_factories_are_typed():
    import typing

    from hf_attrib.benchmark import runner
    from hf_attrib.integrations.transformers import HFAttributionTask

    for factory in (make_attributor, HFAttributionTask.attributor, runner.make_attributor):
        assert typing.get_type_hints(factory)["return"] is Attributor, factory


def test_benchmark_takes_classes_names_and_grids_from_the_registry():
    from hf_attrib.benchmark import runner

    families = {runner._family(m) for m in runner.METHODS}
    # K-FAC/EK-FAC are benchmarked by recipes/speed/bench_ekfac_fidelity.py, not (yet) the runner
    benchmarked = set(BUILTIN) - {"if-ekfac", "if-kfac"}
    assert families == benchmarked == set(runner.DEFAULTS) == set(runner.SEARCH)
    for family in families - {"trak"}:
        assert runner.SEARCH[family] == [registry._thawed(p)
                                         for p in get_method(family).search]
    proj_dims = [p["projector_kwargs"]["proj_dim"] for p in get_method("trak").search]
    assert runner.SEARCH["trak"] == [{"proj_dim": p, "per_example_regularization": r}
                                     for p in proj_dims for r in (0.0, 1e-2, 1e-1, 1.0)]
