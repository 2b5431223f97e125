"""Package layout rules: the model parts do not depend on the evaluation package."""

import ast
from pathlib import Path

import pytest

import dmpo_lightning

PACKAGE_DIR = Path(dmpo_lightning.__file__).parent
MODELS_DIR = PACKAGE_DIR / "models"


def imported_modules(source: str, package: str) -> list[str]:
    """Absolute names of every module a file of ``package`` imports (relative and lazy imports included)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_import_parser_sees_absolute_relative_and_lazy_imports():
    source = (
        "import dmpo_lightning.evaluation.protocol\n"
        "from ..evaluation import flops\n"
        "from . import heads\n"
        "def f():\n    from dmpo_lightning.evaluation.report import write_json\n"
    )
    names = imported_modules(source, "dmpo_lightning.models")
    assert "dmpo_lightning.evaluation.protocol" in names
    assert "dmpo_lightning.evaluation.flops" in names
    assert "dmpo_lightning.models.heads" in names
    assert "dmpo_lightning.evaluation.report" in names
    assert not [
        n
        for n in imported_modules("import torch\nfrom . import heads\n", "dmpo_lightning.models")
        if n.startswith("dmpo_lightning.evaluation")
    ]


@pytest.mark.parametrize("path", sorted(MODELS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_models_do_not_import_evaluation(path):
    bad = [
        name
        for name in imported_modules(path.read_text(), "dmpo_lightning.models")
        if name.startswith("dmpo_lightning.evaluation")
    ]
    assert not bad, f"{path.name} imports {bad}; models/ must not depend on evaluation/"


def test_models_package_has_the_expected_files():
    # guards the parametrised test above against an empty glob (e.g. a moved package)
    names = {p.name for p in MODELS_DIR.glob("*.py")}
    assert {"exit_rules.py", "exit_policy.py", "multi_exit.py", "heads.py", "adapters.py"} <= names


TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_test_modules_import_shared_helpers_from_support_only(path):
    """Helpers live in tests/support; a test module importing another one would run its tests' imports."""
    tree = ast.parse(path.read_text())
    bad = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
        if ((node.module or "") if isinstance(node, ast.ImportFrom) else alias.name)
        .split(".")[0]
        .startswith("test")
        or ((node.module or "") if isinstance(node, ast.ImportFrom) else alias.name) == "conftest"
    ]
    assert not bad, f"{path.name} imports {bad}; move the helpers to tests/support"
