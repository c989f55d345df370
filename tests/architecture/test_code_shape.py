"""The shape rules of docs/architecture.md that a reader relies on: short functions, dependencies visible at the top.

Mutations each test was checked against (put back by hand, the test failed):
- a 61-line function in any module (e.g. `evaluation.linear`'s two probe trainers as they were: 72 and 65 lines);
- `from moco_ray.data.manifest import read_manifest` moved into a function without a ``# lazy:`` reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "moco_ray"
MODULES = sorted(PKG.rglob("*.py"))
MAX_FUNCTION_LINES = 60


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_function_is_longer_than_60_lines(path: Path):
    """A function a newcomer must scroll through does more than one thing; split it (decorators not counted)."""
    tree = ast.parse(path.read_text())
    long = [
        f"{f.name} ({f.end_lineno - f.lineno + 1} lines, line {f.lineno})"
        for f in _functions(tree)
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.relative_to(PKG)}: over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_inside_functions_say_why(path: Path):
    """Imports belong at the top of a module, where its dependencies can be read; one inside a function is kept
    only for a reason (an optional or heavy dependency, a fast path before Ray or torch is imported), written on
    its first line as ``# lazy: <reason>``."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    unexplained = sorted(
        {
            f"line {n.lineno}: {ast.unparse(n)}"
            for f in _functions(tree)
            for n in ast.walk(f)
            if isinstance(n, ast.Import | ast.ImportFrom) and "# lazy:" not in lines[n.lineno - 1]
        }
    )
    assert not unexplained, f"{path.relative_to(PKG)}: imports inside functions without a '# lazy:' reason: " + (
        "; ".join(unexplained)
    )
