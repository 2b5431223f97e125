"""benchmarks/bad_input_cases.py: every regression test its table names exists where the table says.

The table (docs/bad_input_cases.md) points readers to ``tests/<file>.py::<test>``; a test renamed or moved to
another file would leave a reference that leads nowhere, so each one is resolved here: the file exists, it
defines the test function, and a ``test_cli_bad_input::...[case]`` names a case of that file's ``CASES``.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE_TEST = "test_bad_input_fails_clearly_and_writes_nothing"  # what `test_cli_bad_input::...[x]` stands for


def _cases() -> list:
    path = ROOT / "benchmarks" / "bad_input_cases.py"
    spec = importlib.util.spec_from_file_location("bad_input_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bad_input_cases"] = module  # dataclasses look their module up while the script loads
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["bad_input_cases"]
    return module.CASES


@cache
def _tests_of(file: str) -> tuple[set[str], set[str]]:
    """The test functions a test file defines, and the keys of its ``CASES`` dict (if it has one)."""
    tree = ast.parse((ROOT / "tests" / f"{file}.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    cases: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CASES" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                cases = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return functions, cases


def references(text: str) -> list[tuple[str, str, str | None]]:
    """``(file, test, case)`` for each reference in a case's ``tests`` text: ``; `` separates files,
    ``, ::`` another test of the same file, ``...[case]`` a case of the file's bad-input table."""
    out = []
    for group in text.split(";"):
        file = None
        for part in group.split(","):
            left, _, right = part.strip().partition("::")
            file = left or file
            match = re.fullmatch(r"(\.\.\.|test_\w+)(?:\[(.+)\])?", right)
            assert file and match, f"not a test reference: {part!r} in {text!r}"
            out.append((file, match[1], match[2] if match[1] == "..." else None))
    return out


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_test_the_table_names_exists(case):
    if not case.tests.startswith("test_"):  # a file, not a test (the dependency-bounds job)
        assert (ROOT / case.tests.split()[0]).is_file(), case.tests
        return
    for file, test, case_id in references(case.tests):
        assert (ROOT / "tests" / f"{file}.py").is_file(), f"{case.name}: tests/{file}.py does not exist"
        functions, table = _tests_of(file)
        if test == "...":
            assert TABLE_TEST in functions and case_id in table, f"{case.name}: no case {case_id!r} in {file}"
        else:
            assert test in functions, f"{case.name}: tests/{file}.py defines no {test}"


def test_the_reference_parser_reads_every_form():
    assert references("test_a::test_x, ::test_y[10]; test_b::...[name]") == [
        ("test_a", "test_x", None),
        ("test_a", "test_y", None),
        ("test_b", "...", "name"),
    ]
    with pytest.raises(AssertionError, match="not a test reference"):
        references("test_a::")
