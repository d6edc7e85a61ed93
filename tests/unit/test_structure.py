"""The house's shape, read from the sources with `ast`: no module imports another that imports it
back (directly or round a cycle), host/ and image/ never import each other, nvidia/ (the layer
below both) imports neither, model/ imports nothing of envcheck, and a module over 400 lines
says why in its docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("envcheck", "model")
LINES_MAX = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES
            for path in sorted((REPO / package).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules `path` imports, at any depth of the file (function-level imports
    too): `from a.b import c` is a.b.c where that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                     else node.module for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
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
                result.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return result


def test_no_module_imports_round_a_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("importer, imported", [
    ("envcheck.host", "envcheck.image"),
    ("envcheck.image", "envcheck.host"),
    ("envcheck.nvidia", "envcheck.host"),
    ("envcheck.nvidia", "envcheck.image"),
    ("envcheck.nvidia", "envcheck.gpu_smoke"),
    ("model", "envcheck"),
])
def test_no_import_across_a_wall(importer, imported):
    crossing = sorted(f"{name} imports {target}" for name, targets in graph().items()
                      for target in targets if (name + ".").startswith(importer + ".")
                      and (target + ".").startswith(imported + "."))
    assert crossing == []


def test_a_long_module_says_why():
    long = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > LINES_MAX and f"Over {LINES_MAX} lines:" not in docstring:
            long.append(f"{name} ({lines} lines)")
    assert long == []


def test_the_command_module_holds_commands_only():
    """cli.py: click commands and their registration; no helpers of its own."""
    tree = ast.parse((REPO / "envcheck/cli.py").read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    helpers = [f.name for f in functions if not f.decorator_list and f.name != "main"]
    assert helpers == [] and len(functions) >= 7


def test_every_real_capture_says_where_it_came_from():
    """tests/fixtures/real holds verbatim outputs of real tools: SOURCES.md names each one."""
    folder = REPO / "tests/fixtures/real"
    sources = (folder / "SOURCES.md").read_text()
    unnamed = sorted(p.name for p in folder.iterdir()
                     if p.name != "SOURCES.md" and f"`{p.name}`" not in sources)
    assert unnamed == []
