"""No import cycles among the project's own modules (agent, cli, userspace_l7, bench).

Every import counts, also one inside a function (a lazy import hides a cycle from the interpreter,
not from the reader); imports under ``if TYPE_CHECKING:`` do not run and are left out. A package's
``__init__`` is a module of its own: ``from pkg import name`` depends on it, ``from pkg import sub``
on the submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.paths import REPO

ROOT = REPO
PACKAGES = ("agent", "cli", "userspace_l7", "bench")

# Known cycles, each as a pair of modules that import each other (directly or through others).
KNOWN: set[frozenset[str]] = set()  # cycles left on purpose (none), each with the reason


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                out.append(child)
            visit(child)

    visit(tree)
    return out


def graph() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
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

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_every_kind_of_import():
    edges = graph()
    assert "userspace_l7.snapshot" in edges["userspace_l7.routing"]  # from .snapshot import ...
    assert "userspace_l7.origdst" in edges["userspace_l7.server"]  # from . import origdst
    assert "agent.resources" in edges["cli.main"]  # a function-level import
    assert "agent.endpoint" not in edges["agent.l7_snapshot"]  # only under TYPE_CHECKING


def test_no_import_cycles():
    found = [c for c in cycles(graph()) if frozenset(c) not in KNOWN]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_known_cycles_still_exist():
    """Delete an entry of KNOWN once its cycle is gone."""
    present = {frozenset(c) for c in cycles(graph())}
    assert KNOWN <= present, f"no longer cycles: {[sorted(k) for k in KNOWN - present]}"


def test_cycle_finder():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
