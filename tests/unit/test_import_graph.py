"""No import cycles in dsi_operator, dsi_worker or dsi_localcluster.

The graph is read from the source with ``ast``, so it needs none of the packages' dependencies.
Every import counts: module level, inside functions (an import moved into a function to dodge
a cycle is still the cycle) and under ``if TYPE_CHECKING:`` (a type-only dependency is still a
dependency between the two modules). Run this file as a script to print the cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "dsi_operator": REPO / "operator" / "dsi_operator",
    "dsi_worker": REPO / "worker" / "dsi_worker",
    "dsi_localcluster": REPO / "localcluster" / "dsi_localcluster",
}

Graph = dict[str, set[str]]


def module_files(packages: Mapping[str, Path] = PACKAGES) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name)."""
    modules: dict[str, Path] = {}
    for top, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name a (possibly relative) ``from`` import names."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _targets(importer: str, path: Path, tree: ast.Module) -> Iterable[str]:
    """Dotted names each import in the tree brings in (modules or names in modules)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, _is_package(path), node.level, node.module)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: Mapping[str, Path] | None = None) -> Graph:
    """Edges from each module to the package modules it imports.

    ``import a.b.c`` also imports the packages ``a`` and ``a.b``: those count, except the
    importer's own ancestors (Python has imported them before the importer runs).
    """
    modules = module_files() if modules is None else modules
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own = {*_ancestors(name), name}
        for target in _targets(name, path, tree):
            for candidate in [*_ancestors(target), target]:
                if candidate in modules and candidate not in own:
                    graph[name].add(candidate)
    return graph


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (a module never imports itself here)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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
    return sorted(found)


def a_cycle(graph: Mapping[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, as a path that ends where it starts."""
    start = component[0]
    members = set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"{component} is not strongly connected")


def cycles(graph: Mapping[str, set[str]] | None = None) -> list[list[str]]:
    """One named cycle per strongly connected group of modules."""
    graph = import_graph() if graph is None else graph
    return [a_cycle(graph, component) for component in strongly_connected(graph)]


def test_graph_sees_relative_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import X\n"
    )
    (pkg / "c.py").write_text("from pkg import a\nimport pkg.sub\n")
    graph = import_graph(module_files({"pkg": pkg}))
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a", "pkg.sub"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert set(PACKAGES) <= set(graph), "the packages were not found"
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found
    )


if __name__ == "__main__":
    for components in strongly_connected(import_graph()):
        print(len(components), "modules:", " -> ".join(a_cycle(import_graph(), components)))
