"""The artefact's on-disk format: file names, format version and manifest reading.

An artefact is a directory::

    <name>/
      manifest.json          # everything that is not a tensor (see docs/deploy.md)
      weights.safetensors    # the tensors needed to run the model (no pickle)
      onnx/stage_<k>.onnx    # optional: one graph per exit stage (``dmpo export --onnx``)

Only the standard library is imported here; the checksums are :func:`dmpo_lightning.files.file_sha256` and
:func:`dmpo_lightning.files.tensors_sha256`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "ONNX_DIR",
    "WEIGHTS_FILE",
    "ArtefactError",
    "decode_float",
    "encode_float",
    "read_manifest",
]

FORMAT_NAME = "dmpo-early-exit-artefact"
FORMAT_VERSION = 1
"""Bumped on any change a version-1 reader cannot understand; readers refuse newer versions."""

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
ONNX_DIR = "onnx"


class ArtefactError(ValueError):
    """An artefact that cannot be used: missing, corrupt, truncated, of a newer format, or inconsistent."""


def encode_float(value: float) -> float | str:
    """JSON has no infinity: ``inf``/``-inf``/``nan`` are written as strings."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def decode_float(value: float | str) -> float:
    """Inverse of :func:`encode_float`."""
    if isinstance(value, str) and value not in ("inf", "-inf", "nan"):
        raise ArtefactError(f"expected a number or 'inf'/'-inf', got {value!r}")
    return float(value)


def read_manifest(path: str) -> dict[str, Any]:
    """Read and check an artefact's manifest.

    Args:
        path: The artefact directory (or its ``manifest.json``).

    Returns:
        The manifest dict.

    Raises:
        FileNotFoundError: If the path does not exist.
        ArtefactError: If it is not an artefact, its manifest is not valid JSON (corrupt or truncated), it
            was written by a newer format version, or required entries are missing.
    """
    if os.path.basename(path) == MANIFEST_FILE and os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if not os.path.exists(path):
        raise FileNotFoundError(f"artefact {path} does not exist; `dmpo export` writes one (a directory)")
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isdir(path) or not os.path.isfile(manifest_path):
        raise ArtefactError(
            f"{path} is not a dmpo artefact: it has no {MANIFEST_FILE} (an artefact is the directory "
            "`dmpo export --output` writes)"
        )
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtefactError(
            f"{manifest_path} is corrupt or truncated (not valid JSON: {err}); export the artefact again"
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtefactError(f"{manifest_path} is not a dmpo artefact manifest (format {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtefactError(f"{manifest_path} has no integer format_version; it is corrupt")
    if version > FORMAT_VERSION:
        raise ArtefactError(
            f"{path} has artefact format version {version}, newer than this dmpo-lightning reads "
            f"(up to {FORMAT_VERSION}); upgrade dmpo-lightning (the artefact was written by version "
            f"{manifest.get('package_version', 'unknown')})"
        )
    required = ("model", "weights", "preprocessing", "class_names", "exit_rule", "operating_points", "costs")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ArtefactError(f"{manifest_path} lacks {missing}; it is corrupt or incomplete")
    return manifest
