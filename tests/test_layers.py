"""The package's import structure: layers import downward only, no cycles, no private names
across modules, and a light, flat ``import hf_attrib``.

Layers (lowest first); a module may import from its own layer or a lower one:
``func``, ``metrics``, ``model_utils``, ``distributed``, ``loaders``, ``files`` < ``task`` <
``algorithm`` < ``benchmark``, ``integrations`` < ``hub`` < ``index`` < ``cli``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hf_attrib

PACKAGE = Path(hf_attrib.__file__).parent

LAYERS = {
    "func": 0, "metrics": 0, "model_utils": 0, "distributed": 0, "loaders": 0, "files": 0,
    "task": 1,
    "algorithm": 2,
    "benchmark": 3, "integrations": 3,
    "hub": 4,
    "index": 5,
    "cli": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` of every absolute ``hf_attrib`` import in a file,
    including those inside functions (a lazy import is still a dependency)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "hf_attrib":
                found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hf_attrib":
                    found.append((alias.name, [], node.lineno))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "templates" not in p.parts)


def test_every_subpackage_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _files()}
    assert tops - {"__init__"} <= set(LAYERS), tops - set(LAYERS) - {"__init__"}


def test_layers_import_downward_only():
    upward = []
    for path in _files():
        here = _module_name(path)
        mine = _layer(here)
        if mine is None:  # the package root re-exports lazily
            continue
        for target, _, line in _imports(path):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{here}:{line} imports {target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_private_names_across_modules():
    crossings = []
    for path in _files():
        here = _module_name(path)
        for target, names, line in _imports(path):
            if target == here:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            # A private module is its package's business: its siblings and the package's
            # __init__ may import it, nobody else.
            parts = target.split(".")
            first_private = next((i for i, p in enumerate(parts)
                                  if p.startswith("_") and not p.startswith("__")), None)
            private_module = False
            if first_private is not None:
                owner = ".".join(parts[:first_private])
                private_module = not (here == owner or here.startswith(owner + "."))
            if private or private_module:
                crossings.append(f"{here}:{line} imports {private or target} from {target}")
    assert not crossings, "private names imported across modules:\n" + "\n".join(crossings)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in _files()}

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    for path in _files():
        here = _module_name(path)
        deps = graph.setdefault(here, set())
        for target, names, _ in _imports(path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                dep = resolve(candidate)
                if dep and dep != here and dep != "hf_attrib":
                    deps.add(dep)
                    break

    # Packages' __init__ re-export their children; a child importing its own package's
    # __init__ is not a cycle of concern, so edges from a package to its children are dropped.
    def is_child(parent: str, child: str) -> bool:
        return child.startswith(parent + ".")

    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if is_child(node, dep) or is_child(dep, node):
                continue
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_flat_api_is_lazy_and_complete():
    code = (
        "import sys, hf_attrib\n"
        "assert 'torch' not in sys.modules, 'import hf_attrib imported torch'\n"
        "from hf_attrib import (AttributionTask, IFAttributorCG, TRAKAttributor, lds, loo_corr,"
        " task_from_pretrained)\n"
        "import hf_attrib.task, hf_attrib.algorithm, hf_attrib.metrics\n"
        "assert AttributionTask is hf_attrib.task.AttributionTask\n"
        "assert IFAttributorCG is hf_attrib.algorithm.IFAttributorCG\n"
        "assert lds is hf_attrib.metrics.lds\n"
        "for name in hf_attrib.__all__:\n"
        "    getattr(hf_attrib, name)\n"
        "assert set(hf_attrib.__all__) <= set(dir(hf_attrib))\n"
        "assert set(hf_attrib.__all__) == set(hf_attrib._NAME_TO_MODULE) | {'__version__'}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_attrib.nope
