"""dmpo-lightning: inference-efficient tuning of pre-trained vision transformers (DMPO, ICCV 2025)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that `dmpo_lightning.deploy.predictor` (inference) loads without Lightning,
# jsonargparse or torchmetrics; `from dmpo_lightning import DMPOModule` works as before.
_LAZY = {
    "BenchmarkDataModule": "dmpo_lightning.data",
    "MultiExitViT": "dmpo_lightning.models",
    "DMPOModule": "dmpo_lightning.module",
    "TwoPhaseSchedule": "dmpo_lightning.schedules",
}

__all__ = ["BenchmarkDataModule", "DMPOModule", "MultiExitViT", "TwoPhaseSchedule", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dmpo_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
