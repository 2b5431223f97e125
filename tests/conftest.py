"""Shared fixtures: offline environment, seeding, tiny models, temporary output dirs and crafted pickles."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch
from support.builders import make_tiny_vit
from support.fakes import isolate_torchvision_checksums
from support.runs import make_artefact

from dmpo_lightning.data import registry as data_registry
from dmpo_lightning.models.adapters import PEFT_REGISTRY
from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY
from dmpo_lightning.models.heads import PREDICTOR_REGISTRY


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--accelerator",
        default="cpu",
        help="Lightning accelerator for end-to-end tests (cpu by default; 'gpu' on an accelerator box)",
    )


@pytest.fixture
def accelerator(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--accelerator")


@pytest.fixture(autouse=True)
def _isolate(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed everything, run in a temporary folder, send every cache dir there, isolate fake checksums.

    Tests use absolute paths for the project's files; anything a Trainer or data module writes relative to the
    working directory (runs/, calibration_indices.json) lands in tmp_path, never in the checkout.
    """
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    isolate_torchvision_checksums(monkeypatch)  # fake Flowers-102 files enter their MD5 sums per test


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_tiny_vit().eval()


@pytest.fixture
def unsafe_torch_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch's own ``weights_only`` default turned back to ``False`` (as on torch < 2.6).

    A loader that relies on torch's default instead of passing ``weights_only=True`` itself then unpickles
    whatever a crafted file holds, so a test of that loader catches it.
    """
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.fixture
def pickle_marker(tmp_path: Path, unsafe_torch_default: None) -> Path:
    """The file a crafted pickle of ``support.pickles`` creates when it is unpickled (it must never exist)."""
    return tmp_path / "PWNED"


@pytest.fixture
def artefact(tmp_path: Path) -> dict:
    """An exported tiny run (``support.runs.make_artefact``), fresh for each test: tests may damage it."""
    return make_artefact(tmp_path)


@pytest.fixture(scope="module")
def shared_artefact(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An exported tiny run whose thresholds spread samples over the exits; one per module, read only."""
    return make_artefact(tmp_path_factory.mktemp("artefact"), quantiles=(0.4, 0.7))


@pytest.fixture
def scratch_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names a test registers (exit rules, predictors, PEFT methods, datasets) are dropped after it."""
    for registry in (EXIT_RULE_REGISTRY, PREDICTOR_REGISTRY, PEFT_REGISTRY):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(data_registry, "DATASETS", dict(data_registry.DATASETS))
