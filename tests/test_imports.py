"""How the package is put together: no import circle, safe concurrent imports, modules of a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: import package -> source folder (pyproject's package-dir)
FOLDERS = {"hetkd": ROOT / "src" / "hetkd", "hetkd.clients": ROOT / "clients",
           "hetkd.strategies": ROOT / "strategies", "hetkd.simulations": ROOT / "simulations"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Every hetkd module by import name."""
    out: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name.split(".")[1:2] and name.split(".")[1] in ("clients", "strategies", "simulations") \
                    and package == "hetkd":
                continue  # not part of the src/hetkd tree
            out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The hetkd modules ``path`` imports anywhere (module level and inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hetkd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hetkd"):
            for alias in node.names:  # `from hetkd.x import y` imports the module hetkd.x.y when there is one
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def test_the_import_graph_has_no_cycle_even_counting_imports_inside_functions():
    """A function-local import cannot hide a cycle: every import counts, wherever it is written."""
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_core_never_imports_the_flower_parts():
    """design.md's layers: core <- clients, strategies <- simulations; a strategy never imports a client."""
    modules = _modules()
    for name, path in modules.items():
        imported = _imports(path, modules)
        if not name.startswith(("hetkd.clients", "hetkd.strategies", "hetkd.simulations")):
            assert not {m for m in imported if m.startswith(("hetkd.clients", "hetkd.strategies",
                                                             "hetkd.simulations"))}, name
        if name.startswith("hetkd.strategies"):
            assert not {m for m in imported if m.startswith(("hetkd.clients", "hetkd.simulations"))}, name
        if name.startswith("hetkd.clients"):
            assert not {m for m in imported if m.startswith(("hetkd.strategies", "hetkd.simulations"))}, name


def test_packages_import_none_of_their_modules():
    """Package ``__init__`` files export lazily, so entering a package never runs its modules."""
    for name, path in _modules().items():
        if path.name == "__init__.py":
            assert _imports(path, _modules()) <= {"hetkd._exports"}, name


def test_every_exported_name_resolves():
    import importlib

    for name, path in _modules().items():
        if path.name == "__init__.py":
            package = importlib.import_module(name)
            for exported in getattr(package, "__all__", []):
                assert getattr(package, exported) is not None, f"{name}.{exported}"


RACE = """
import importlib, sys, threading
barrier, errors = threading.Barrier(2), []
def load(name):
    barrier.wait()
    try:
        importlib.import_module(name)
    except BaseException as err:
        errors.append(f"{name}: {type(err).__name__}: {err}")
threads = [threading.Thread(target=load, args=(n,)) for n in sys.argv[1:]]
[t.start() for t in threads]
[t.join(120) for t in threads]
print(errors)
sys.exit(1 if errors else 0)
"""


@pytest.mark.parametrize(
    "pair",
    [("hetkd.distill.similarity", "hetkd.distill.losses"),
     ("hetkd.simulations.server_app", "hetkd.clients.app")],
)
def test_two_threads_import_the_server_and_the_devices_at_once(pair):
    """Flower's simulation imports the ServerApp and the ClientApp in two threads of one process."""
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", RACE, *pair], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in long.items() if n > MAX_LINES} == {}
