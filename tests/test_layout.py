"""The package layout: every module imports in a fresh interpreter, vqakit's import graph has no cycle, and
inference / serving never reach training code (STYLE.md: data flows one way; inference never imports training)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vqakit

PACKAGE = Path(vqakit.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the vqakit modules it imports anywhere in its file (top level, in functions, under TYPE_CHECKING)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vqakit"):
                for alias in node.names:  # `from vqakit.data import prepare` imports the module vqakit.data.prepare
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: relative import; vqakit uses absolute imports")
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("vqakit"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", ["vqakit.inference", "vqakit.serve", "vqakit.models", "vqakit.towers"])
def test_inference_never_reaches_training(package):
    graph = import_graph()
    for name in (m for m in graph if m == package or m.startswith(package + ".")):
        bad = sorted(m for m in _reachable(graph, name) if m.startswith(("vqakit.train", "vqakit.experiments")))
        assert not bad, f"{name} reaches training/experiment code: {bad}"


def test_top_level_is_packages():
    """The top level shows the architecture: packages, plus the CLI (and the package's __init__)."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "cli.py"], loose


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
