"""Imports flow launcher -> engine -> {model, data}; tools may use any of them; nothing imports launcher or tools."""
from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO_ROOT

FORBIDDEN = {
    "model": {"launcher", "engine", "tools", "data"},
    "data": {"launcher", "engine", "tools", "model"},
    "engine": {"launcher", "tools"},
    "launcher": {"tools"},
}


def imported_packages(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = sorted(set(imported_packages(path)) & FORBIDDEN[package])
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}: {package}/ must not depend on them"


PACKAGES = ("launcher", "engine", "model", "data", "tools")


def module_name(path):
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path, modules):
    """Every project module `path` imports, at any depth of the file (late imports inside functions included):
    `from a.b import c` names a.b.c when that is a module, else a.b."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        yield from (name for name in names if name in modules)


def test_no_import_cycles():
    """No two project modules import each other, directly or through others (a cycle is a layering fault even
    when a late import hides it from Python)."""
    paths = {module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
    graph = {name: set(project_imports(path, paths)) - {name} for name, path in paths.items()}
    # A package's __init__ that re-exports from its own modules is not a cycle with them.
    graph = {name: {dep for dep in deps if not (name.startswith(dep + ".") and paths[dep].name == "__init__.py")}
             for name, deps in graph.items()}
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("package", PACKAGES)
def test_rooms_stay_small(package):
    """No room (folder of Python modules) holds more than 13 files: more means a concept wants its own folder."""
    for folder in [REPO_ROOT / package, *(p for p in (REPO_ROOT / package).rglob("*") if p.is_dir())]:
        files = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(files) <= 13, f"{folder.relative_to(REPO_ROOT)} holds {len(files)} modules: split it by concern"
