"""The import contract: floors import one way, lb <- control <- netns <- bench.

Every import in every module of the four packages -- at module level or inside a
function, ``import x`` or ``from x import y`` or ``importlib.import_module("x")`` -- is
read with ast; an import of a floor above the module's own fails, named file:line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("lb", "control", "netns", "bench")  # bottom to top: each may import the ones before it


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file at ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value.split(".")[0]


def upward_imports(floor: str) -> list[str]:
    """``file:line: imports X`` for every import in package ``floor`` of a floor above it."""
    below, above = FLOORS[:FLOORS.index(floor) + 1], FLOORS[FLOORS.index(floor) + 1:]
    return [f"{path.relative_to(ROOT)}:{line}: imports {pkg} ({floor} may import only {', '.join(below)})"
            for path in sorted((ROOT / floor).rglob("*.py"))
            for line, pkg in imports(path) if pkg in above]


def test_every_package_is_a_floor() -> None:
    """A new top-level package must take its place in FLOORS, or the contract misses it."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(FLOORS)


@pytest.mark.parametrize("floor", FLOORS)
def test_imports_only_go_down(floor: str) -> None:
    violations = upward_imports(floor)
    assert not violations, "imports of a higher floor:\n" + "\n".join(violations)


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from control.cli import register\n    import netns.ns\n"
                 "    importlib.import_module('bench.common')\n    from . import sibling\n")
    assert sorted(imports(f)) == [(1, "os"), (4, "control"), (5, "netns"), (6, "bench")]
