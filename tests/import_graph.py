"""The project's import graph, read from the source (AST), and the rules the architecture keeps.

Every ``import`` and ``from ... import`` counts, wherever it is written (module level, inside a
function, under ``TYPE_CHECKING``): a lazy import is still a dependency of the deployable.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGES = ("shared", "functions", "job", "tools", "bench")
# What each top-level part may import (besides itself and third-party packages).
ALLOWED: dict[str, set[str]] = {
    "function_app": {"functions", "shared"},
    "functions": {"shared"},
    "shared": set(),
    "job": {"shared"},
    "tools": {"shared", "functions", "job"},
    "bench": {"shared", "functions", "job", "tools"},
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every module of ``packages`` and ``function_app.py``."""
    mods = {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    if (root / "function_app.py").is_file():
        mods["function_app"] = root / "function_app.py"
    return mods


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    mods = project_modules(root, packages)

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mods:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(resolve(f"{node.module}.{alias.name}") or resolve(node.module) for alias in node.names)
        graph[name] = {m for m in found if m is not None and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (import loops), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs that break :data:`ALLOWED`."""
    bad = []
    for importer, imported in sorted(graph.items()):
        top = importer.split(".")[0]
        for target in sorted(imported):
            other = target.split(".")[0]
            if other != top and other not in ALLOWED.get(top, set()):
                bad.append((importer, target))
    return bad
