"""Shared fixtures: offline environment, seeding, tiny models and temporary output dirs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import timm
import torch


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
    """Seed everything, run in a temporary folder and send every cache dir there.

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


TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)


def make_tiny_vit(**overrides: object) -> torch.nn.Module:
    """A depth-4, dim-32 timm ViT at 32x32 with random weights and no classifier."""
    kwargs = {**TINY_VIT_KWARGS, **overrides}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_tiny_vit().eval()
