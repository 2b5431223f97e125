"""Deployment: export a tuned run to one artefact and run it with true early exits, without Lightning.

- :func:`~dmpo_lightning.deploy.export.export_artefact` (``dmpo export``) writes the artefact: weights in
  safetensors plus a JSON manifest (model options, preprocessing, class names, exit rule, every calibrated
  operating point, counted costs, checksums), optionally with one ONNX graph per stage.
- :class:`~dmpo_lightning.deploy.predictor.EarlyExitPredictor` loads it and predicts on tensors or image
  files (imports only torch, timm, torchvision, PIL and safetensors; ``onnxruntime`` for ``backend="onnx"``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ArtefactError", "EarlyExitPredictor", "export_artefact", "merge_peft"]

_LAZY = {
    "ArtefactError": "dmpo_lightning.deploy.format",
    "EarlyExitPredictor": "dmpo_lightning.deploy.predictor",
    "export_artefact": "dmpo_lightning.deploy.export",
    "merge_peft": "dmpo_lightning.deploy.merge",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmpo_lightning.deploy' has no attribute {name!r}")
