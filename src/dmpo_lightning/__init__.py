"""dmpo-lightning: inference-efficient tuning of pre-trained vision transformers (DMPO, ICCV 2025).

The top-level names are imported lazily, so the pure-torch parts (``dmpo_lightning.models``: the multi-exit
model, the exit policy and the early-exit engine) import with only ``torch`` and ``timm`` installed, without
Lightning, jsonargparse or torchmetrics.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dmpo_lightning.version import __version__

_EXPORTS = {
    "BenchmarkDataModule": "dmpo_lightning.data",
    "DMPOModule": "dmpo_lightning.module",
    "MultiExitViT": "dmpo_lightning.models",
    "TwoPhaseSchedule": "dmpo_lightning.schedules",
}

if TYPE_CHECKING:
    from dmpo_lightning.data import BenchmarkDataModule
    from dmpo_lightning.models import MultiExitViT
    from dmpo_lightning.module import DMPOModule
    from dmpo_lightning.schedules import TwoPhaseSchedule


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["BenchmarkDataModule", "DMPOModule", "MultiExitViT", "TwoPhaseSchedule", "__version__"]
