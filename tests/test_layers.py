"""The package's import graph: no cycles, and the storage layer never reaches up.

Module-level imports count, those under `if TYPE_CHECKING:` too (a type is a dependency);
imports inside functions (deferred on purpose) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import stockhold

PACKAGE = Path(stockhold.__file__).resolve().parent
# Modules of the storage layer must not import these (docs/architecture.md, "Layout").
ABOVE_STORE = ("stockhold.servicer", "stockhold.server", "stockhold.cli", "stockhold.engine")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """stockhold modules imported at module level (TYPE_CHECKING blocks included)."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in known:
                        found.add(sub)
                    elif node.module in known:
                        found.add(node.module)

    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "v1" not in p.parts}
    known = set(files)
    return {
        name: _runtime_imports(ast.parse(path.read_text(encoding="utf-8")), known) - {name}
        for name, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from where it closed)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    assert "stockhold.engine" in graph and "stockhold.policies" in graph
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_policies_stand_on_the_script_call_layer_not_on_the_engine() -> None:
    graph = _graph()
    assert "stockhold.engine" not in graph["stockhold.policies"]
    assert "stockhold.store.calls" in graph["stockhold.policies"]
    assert "stockhold.policies" in graph["stockhold.engine"]


def test_the_storage_layer_never_imports_the_layers_above_it() -> None:
    graph = _graph()
    store = [name for name in graph if name.startswith("stockhold.store")]
    assert store
    for name in store:
        assert not {m for m in graph[name] if m.startswith(ABOVE_STORE)}, name
    for path in (PACKAGE / "store").rglob("*.py"):
        assert "import grpc" not in path.read_text(encoding="utf-8"), path
