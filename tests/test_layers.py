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
