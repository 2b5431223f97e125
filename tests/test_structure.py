"""Package layout rules: layers and no cycles, no private library members, imports at the top, and no
call that lets ``torch.load`` unpickle arbitrary objects (``weights_only`` is always the literal True)."""

import ast
import logging
from pathlib import Path

import pytest

import dmpo_lightning

ROOT = Path(__file__).resolve().parents[1]
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


# ------------------------------------------------------------------------------------- the whole package
SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))
THIRD_PARTY_PRIVATE = {
    # (file, name): why the package reads a private member of a library other than lightning, jsonargparse
    # or torch (those three: none at all)
    ("data/formats.py", "_image_files"): "torchvision's Food101/Flowers102 keep their file list only there",
    ("data/formats.py", "_file_dict"): "torchvision's Flowers102 keeps the official MD5 sums only there",
    ("models/toy_backbone.py", "timm.models._registry._registry"): "timm registers pretrained cfgs so",
    ("models/toy_backbone.py", "timm.models._registry.generate_default_cfgs"): "(the same import)",
    (
        "models/toy_backbone.py",
        "timm.models.vision_transformer._create_vision_transformer",
    ): "timm's ViT builder",
    ("data/formats.py", "_labels"): "torchvision's Food101/Flowers102 keep their labels only there",
    ("data/formats.py", "_samples"): "torchvision's StanfordCars keeps its (path, label) list only there",
    ("models/backbone.py", "_pos_embed"): "timm's own token embedding step (the one file touching timm)",
}


def _private_uses(path: Path) -> list[tuple[str, int]]:
    """``obj._name`` (not dunders, not on ``self``/``cls``), private imports, ``getattr(x, "_n")``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if ast.unparse(node.value) not in ("self", "cls"):
                found.append((node.attr, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
            for part in [*node.module.split("."), *(a.name for a in node.names)]:
                if part.startswith("_") and not part.startswith("__"):
                    found.append((f"{node.module}.{part}", node.lineno))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "setattr", "hasattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and str(name.value).startswith("_"):
                if not str(name.value).startswith("__"):
                    found.append((str(name.value), node.lineno))
    return found


def test_no_private_member_of_lightning_jsonargparse_or_torch_is_used():
    bad = []
    for path in SOURCES:
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        for name, line in _private_uses(path):
            if (rel, name) in THIRD_PARTY_PRIVATE:
                continue
            if rel == "serve/litserve_app.py" and name == "_shutdown_event":
                continue  # LitServe (not Lightning) has no public shutdown event in 0.2; pinned <0.3
            bad.append(f"{rel}:{line}: {name}")
    assert not bad, "private members used:\n" + "\n".join(bad)


def test_the_private_member_check_sees_attributes_imports_and_getattr(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from jsonargparse._common import x\n"
        "def f(trainer, loop):\n"
        "    trainer.test_loop._print_results = 1\n"
        "    getattr(loop, '_version')\n"
        "    self._mine = 1\n"
    )
    names = {name for name, _ in _private_uses(probe)}
    assert names == {"jsonargparse._common._common", "_print_results", "_version"}


def _indented_imports(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    out.append((sub.lineno, lines[sub.lineno - 1]))
    return out


def test_imports_sit_at_the_top_except_lazy_optional_ones_that_say_why():
    """A function-level import is allowed only with a comment saying why (an optional extra, a slow
    import needed by one file format); everything else is imported at the top of its file."""
    bad = []
    for path in SOURCES:
        for line, text in _indented_imports(path):
            if "#" not in text or not any(w in text.lower() for w in ("optional extra", "lazily")):
                bad.append(f"{path.relative_to(PACKAGE_DIR)}:{line}: {text.strip()}")
    assert not bad, "imports inside functions without a reason:\n" + "\n".join(bad)


def test_the_import_contract_holds():
    """The layers of docs/ARCHITECTURE.md and no cycles ([tool.importlinter] in pyproject.toml)."""
    pytest.importorskip("importlinter", reason="import-linter is in the [lint] extra, which CI installs")
    from importlinter.cli import lint_imports

    root = PACKAGE_DIR.parents[1]
    # lint_imports configures logging with dictConfig, which disables every logger that exists (Lightning's,
    # timm's): later tests would see no log records. Their state is put back.
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    disabled = [logger.disabled for logger in loggers]
    try:
        assert lint_imports(config_filename=str(root / "pyproject.toml")) == 0
    finally:
        for logger, was in zip(loggers, disabled, strict=True):
            logger.disabled = was


def test_the_cli_is_a_thin_lightning_cli():
    """cli.py holds the LightningCLI subclass only (the program, parse messages and callbacks live apart)."""
    assert len((PACKAGE_DIR / "cli.py").read_text().splitlines()) <= 410


def _weights_only_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, innermost enclosing function) of every call passing weights_only other than the literal True."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call) and any(
                k.arg == "weights_only" and not (isinstance(k.value, ast.Constant) and k.value.value is True)
                for k in child.keywords
            ):
                found.append((child.lineno, function))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_no_unrestricted_torch_load_in_the_package_or_the_benchmarks():
    """No call in src or benchmarks passes a ``weights_only`` other than the literal True."""
    found = [
        f"{path.relative_to(ROOT)}:{line} in {function}"
        for folder in ("src", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, function in _weights_only_calls(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert found == []
