"""No import cycles in the package: every import (module level, inside a function, and under
``if TYPE_CHECKING:`` too -- a type-only cycle is still two modules that need each other)
follows a layering.

``from pkg import submodule`` is an edge to the submodule, not to the package; a cycle is a
strongly connected group of two or more modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ubpf_py"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_pkg: bool, mods: dict[str, Path]) -> None:
        self.module, self.mods, self.edges = module, mods, set()
        self.pkg = module if is_pkg else module.rsplit(".", 1)[0]

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name in self.mods:
                self.edges.add(a.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.pkg.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        subs = [a.name for a in node.names if f"{base}.{a.name}" in self.mods]
        self.edges.update(f"{base}.{s}" for s in subs)
        if base in self.mods and len(subs) < len(node.names):
            self.edges.add(base)


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        v = _Imports(name, path.name == "__init__.py", mods)
        v.visit(ast.parse(path.read_text()))
        graph[name] = v.edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (break them by moving the shared part down a layer): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
