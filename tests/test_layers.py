"""The package's layers, checked from the source: imports point only down, no module imports itself back
through a cycle, and no qlab module pulls in streamlit.

Run alone with ``python -m pytest tests/test_layers.py``. Lazy imports inside functions count too: a cycle that
only closes at call time is still a knot for whoever moves the code next.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlab"

# Top to bottom: a module may import its own layer or any layer below it, never one above.
LAYERS = ("cli", "store", "backends", "analyses", "models", "core")
# Figure builders and URL-view parsing sit beside the layers for the front-ends; they import the core only.
SIDE_MODULES = {"qlab.charts": "core", "qlab.views": "core"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """Every qlab module this source imports, at any depth. ``from qlab.models import hardware`` imports the
    module ``hardware`` (an edge to it, not to the package); ``from qlab.store import Store`` imports the package."""
    found = set()
    base = importer if is_package else importer.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "qlab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qlab":
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(target)
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        imported = imported_modules(path.read_text(), name, path.name == "__init__.py", set(modules))
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def layer_of(module: str) -> str | None:
    """The layer a module belongs to; None for the root package and ``__main__`` (entry points, no rank)."""
    if module in SIDE_MODULES:
        return SIDE_MODULES[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for importer, targets in graph.items():
        if importer in SIDE_MODULES:
            allowed = LAYERS[LAYERS.index(SIDE_MODULES[importer]):]
            problems += [f"{importer} -> {t}" for t in targets
                         if t != "qlab" and (layer_of(t) not in allowed or t in SIDE_MODULES)]
            continue
        own = layer_of(importer)
        if own is None:
            continue
        for target in targets:
            theirs = layer_of(target)
            if theirs is not None and LAYERS.index(theirs) < LAYERS.index(own):
                problems.append(f"{importer} -> {target}")
    return sorted(problems)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(all_modules())


def test_imports_point_only_down(graph):
    assert upward_imports(graph) == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_every_package_declares_its_public_names():
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent == PACKAGE:
            continue
        tree = ast.parse(init.read_text())
        names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)]
        assert "__all__" in names, f"{init.relative_to(PACKAGE.parent)} has no __all__"


def test_the_check_catches_an_upward_import_and_a_cycle():
    """The guard itself: a core module importing the store, and two modules importing each other."""
    known = {"qlab.core.quant", "qlab.store", "qlab.core.algorithms", "qlab.core.algorithms.gptq"}
    upward = {"qlab.core.quant": imported_modules("from qlab.store import Store\n", "qlab.core.quant", False, known)}
    assert upward_imports(upward) == ["qlab.core.quant -> qlab.store"]
    side = {"qlab.charts": {"qlab.models.loading"}}
    assert upward_imports(side) == ["qlab.charts -> qlab.models.loading"]
    relative = imported_modules("from .gptq import gptq_quantize\n", "qlab.core.algorithms", True, known)
    assert "qlab.core.algorithms.gptq" in relative
    assert cycles({"qlab.a": {"qlab.b"}, "qlab.b": {"qlab.a"}, "qlab.c": {"qlab.a"}}) == [["qlab.a", "qlab.b"]]


def test_no_qlab_module_imports_streamlit():
    names = sorted(name for name in all_modules() if not name.endswith("__main__"))
    # Triton comes with CUDA builds of torch only: qlab.core.triton_kernels is imported where it is installed.
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except ModuleNotFoundError as missing:\n"
              "        if missing.name != 'triton':\n"
              "            raise\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'streamlit'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
