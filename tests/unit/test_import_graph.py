"""No import circle anywhere in liveupdate/.

The graph is built from the source (ast), not by importing: every
``import`` and ``from ... import`` of a liveupdate module counts, at module
level, inside functions and under ``if TYPE_CHECKING:`` alike, since a
circle a type checker or a lazy import walks is still a circle a reader has
to untangle. ``from . import name`` counts as an edge to the submodule
``name`` when there is one, else to the package.

Run as a script, it prints the circles it finds (for notes and reviews):
    python tests/unit/test_import_graph.py
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "liveupdate"


def modules(root: str = ROOT) -> Dict[str, str]:
    """Dotted module name -> file, for every .py file of the package."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    if level == 0:
        return target
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def edges(known: Dict[str, str]) -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (anywhere in its file)."""
    graph: Dict[str, Set[str]] = {}
    for module, path in known.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        out: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    out.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module or "")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    out.add(sub if sub in known else base)
        # An import of a.b.c also runs a and a.b; only the named module is
        # the edge, its parents are imported by Python, not by this file.
        graph[module] = {m for m in out if m in known and m != module}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component of more than one module (Tarjan),
    each as a sorted list, the list sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_the_package():
    graph = edges(modules())
    # A sanity check that the walk finds imports at all (relative, absolute,
    # under TYPE_CHECKING): the device imports the session module.
    assert "liveupdate.session" in graph["liveupdate.device"]
    assert "liveupdate._port" in graph["liveupdate.emulator.port"]


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    found = cycles(edges(modules()))
    assert found == [], "import circles in liveupdate/: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_handles_know_no_backend():
    # The backend choice lives in _backends.py alone: the handles, the port
    # seam and the errors import no backend, even lazily.
    graph = edges(modules())
    for module in ("liveupdate.device", "liveupdate.session", "liveupdate._handle", "liveupdate._port",
                   "liveupdate.errors", "liveupdate._abi"):
        backends = sorted(m for m in graph[module] if m.startswith(("liveupdate.emulator", "liveupdate.service")))
        assert backends == [], f"{module} imports {backends}"


if __name__ == "__main__":
    for component in cycles(edges(modules())):
        print(" <-> ".join(component))
