"""The code stays readable at a glance: short functions, short parameter lists (settings travel as
dataclasses). Lint (ruff) and the import layers (import-linter) run in `make test` beside this."""

import ast

import pytest

from tests.conftest import PROJECT

MAX_LINES, MAX_PARAMS = 60, 8


def functions():
    for path in sorted([*PROJECT.glob("p2ch_app/**/*.py"), *PROJECT.glob("scripts/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PROJECT), node


def parameters(node: ast.FunctionDef) -> int:
    args = node.args
    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
    return len(names) - (names[:1] in (["self"], ["cls"])) + bool(args.vararg)


@pytest.mark.parametrize("limit", ["lines", "parameters"])
def test_functions_are_short_and_take_few_parameters(limit):
    found = list(functions())
    assert len(found) > 100
    if limit == "lines":
        over = [f"{path}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for path, n in found
                if n.end_lineno - n.lineno + 1 > MAX_LINES]
    else:
        over = [f"{path}:{n.lineno} {n.name} ({parameters(n)} parameters)" for path, n in found
                if parameters(n) > MAX_PARAMS]
    assert not over, "split these or pass a settings dataclass: " + "; ".join(over)


def test_the_readme_stays_a_short_manual():
    lines = (PROJECT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
