"""The artefact's on-disk format: file names, format version and manifest reading.

An artefact is a directory::

    <name>/
      manifest.json          # everything that is not a tensor (see docs/deploy.md)
      weights.safetensors    # the tensors needed to run the model (no pickle)
      onnx/stage_<k>.onnx    # optional: one graph per exit stage (``dmpo export --onnx``)

:func:`read_manifest` checks the whole manifest once, at load, against itself (class names against the
number of classes, input size against the preprocessing and the counted costs, one threshold per exit,
a registered exit rule, files that stay inside the artefact folder, ...) and names the field that is wrong.
The checksums and the format check are those of every file of the package (:mod:`dmpo_lightning.files`:
``file_sha256``, ``tensors_sha256``, ``check_format``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from dmpo_lightning.files import check_format
from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY

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
    "validate_manifest",
]

FORMAT_NAME = "dmpo-early-exit-artefact"
FORMAT_VERSION = 2
"""Bumped on any change an older reader cannot understand; readers refuse every other version (version 1
stored the model options under other names)."""

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
            was written by a newer format version, required entries are missing, or an entry contradicts
            another (:func:`validate_manifest`).
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
    manifest = check_format(
        manifest,
        manifest_path,
        name=FORMAT_NAME,
        version=FORMAT_VERSION,
        what="dmpo artefact manifest",
        remedy="export the artefact again with `dmpo export`",
        error=ArtefactError,
    )
    required = ("model", "weights", "preprocessing", "class_names", "exit_rule", "operating_points", "costs")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ArtefactError(f"{manifest_path} lacks {missing}; it is corrupt or incomplete")
    validate_manifest(manifest, path)
    return manifest


class _Invalid(Exception):
    """One wrong field: ``(field, what is wrong)``."""


def _fail(field: str, problem: str) -> _Invalid:
    return _Invalid(field, problem)


def _int(value: Any, field: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(field, f"is {value!r}, not an integer >= {low}")
    return value


def _number(value: Any, field: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field, f"is {value!r}, not a finite number")
    if positive and value <= 0:
        raise _fail(field, f"is {value!r}, not > 0")
    return float(value)


def _list(value: Any, field: str, length: int | None = None, what: str = "") -> list[Any]:
    if not isinstance(value, list):
        raise _fail(field, f"is {type(value).__name__}, not a list")
    if length is not None and len(value) != length:
        raise _fail(field, f"holds {len(value)} entries but {what}")
    return value


def _inside(artefact: str, relative: Any, field: str) -> None:
    """A file the manifest names must be a relative path that stays inside the artefact folder."""
    if not isinstance(relative, str) or not relative:
        raise _fail(field, f"is {relative!r}, not a file name")
    normal = os.path.normpath(relative)
    root = os.path.realpath(artefact)
    target = os.path.realpath(os.path.join(artefact, relative))
    if os.path.isabs(relative) or normal.startswith(os.pardir) or os.path.commonpath([root, target]) != root:
        raise _fail(
            field, f"is {relative!r}, a path that leaves the artefact folder (only files inside it are read)"
        )


def _check_preprocessing(pre: Any, model: Mapping[str, Any]) -> list[int]:
    if not isinstance(pre, Mapping):
        raise _fail("preprocessing", f"is {type(pre).__name__}, not a mapping")
    size = _list(pre.get("input_size"), "preprocessing.input_size", 3, "it must be [channels, height, width]")
    channels, height, width = (_int(v, f"preprocessing.input_size[{i}]", 1) for i, v in enumerate(size))
    if channels not in (1, 3) or height != width:
        raise _fail("preprocessing.input_size", f"is {size}, not [1 or 3, S, S]")
    for key in ("mean", "std"):
        values = _list(pre.get(key), f"preprocessing.{key}", channels, f"the input has {channels} channels")
        for i, v in enumerate(values):
            _number(v, f"preprocessing.{key}[{i}]", positive=key == "std")
    crop = pre.get("crop_mode")
    if crop not in ("center", "none", "squash"):
        raise _fail("preprocessing.crop_mode", f"is {crop!r}, not 'center', 'squash' or 'none'")
    if crop != "none" and pre.get("interpolation") not in ("nearest", "bilinear", "bicubic"):
        raise _fail(
            "preprocessing.interpolation", f"is {pre.get('interpolation')!r}, not nearest/bilinear/bicubic"
        )
    if crop == "center":
        _int(pre.get("resize"), "preprocessing.resize", height)
    for key, value in (("in_chans", channels), ("img_size", height)):
        if model.get(key) is not None and model.get(key) != value:
            raise _fail("preprocessing.input_size", f"is {size} but model.{key} is {model.get(key)!r}")
    return [channels, height, width]


def _check_thresholds(points: Any, num_exits: int) -> None:
    points = _list(points, "operating_points")
    if not points:
        raise _fail("operating_points", "is empty (no calibrated budget)")
    seen = set()
    for i, point in enumerate(points):
        where = f"operating_points[{i}]"
        if not isinstance(point, Mapping):
            raise _fail(where, f"is {type(point).__name__}, not a mapping")
        budget = _number(point.get("budget"), f"{where}.budget", positive=True)
        if budget in seen:
            raise _fail(f"{where}.budget", f"{budget} appears twice")
        seen.add(budget)
        raw = _list(
            point.get("thresholds"), f"{where}.thresholds", num_exits, f"the model has {num_exits} exits"
        )
        for k, t in enumerate(raw):
            ok = (isinstance(t, (int, float)) and not isinstance(t, bool)) or t in ("inf", "-inf")
            if not ok or math.isnan(float(t)):
                raise _fail(f"{where}.thresholds[{k}]", f"is {t!r}, not a number or 'inf'/'-inf'")


def _check_fields(manifest: Mapping[str, Any], artefact: str) -> None:
    model = manifest["model"]
    if not isinstance(model, Mapping):
        raise _fail("model", f"is {type(model).__name__}, not a mapping")
    num_classes = _int(model.get("num_classes"), "model.num_classes", 2)
    names = _list(manifest["class_names"], "class_names", num_classes, f"model.num_classes is {num_classes}")
    if not all(isinstance(n, str) for n in names):
        raise _fail("class_names", "holds entries that are not strings")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _fail("class_names", f"names {duplicates} more than once")
    blocks = _list(manifest.get("exit_blocks"), "exit_blocks")
    if not blocks or any(_int(b, "exit_blocks", 1) <= a for a, b in pairwise([0, *blocks])):
        raise _fail("exit_blocks", f"is {blocks}, not increasing block numbers >= 1")
    num_exits = len(blocks)
    if manifest.get("num_exits", num_exits) != num_exits:
        raise _fail("num_exits", f"is {manifest.get('num_exits')!r} but exit_blocks lists {num_exits} exits")
    rule = manifest["exit_rule"]
    if rule not in EXIT_RULE_REGISTRY:
        raise _fail(
            "exit_rule",
            f"is {rule!r}, not a registered exit rule ({', '.join(EXIT_RULE_REGISTRY.names())}; a rule "
            "registered by another package must be imported before loading)",
        )
    input_size = _check_preprocessing(manifest["preprocessing"], model)
    costs = manifest["costs"]
    if not isinstance(costs, Mapping):
        raise _fail("costs", f"is {type(costs).__name__}, not a mapping")
    gflops = _list(
        costs.get("exit_gflops"), "costs.exit_gflops", num_exits, f"exit_blocks lists {num_exits} exits"
    )
    values = [_number(g, f"costs.exit_gflops[{k}]", positive=True) for k, g in enumerate(gflops)]
    if any(b < a for a, b in pairwise(values)):
        raise _fail(
            "costs.exit_gflops", f"is {gflops}, not non-decreasing (each exit costs at least the one before)"
        )
    _number(costs.get("full_gflops"), "costs.full_gflops", positive=True)
    if costs.get("input_shape") is not None and list(costs["input_shape"]) != input_size:
        raise _fail(
            "costs.input_shape", f"is {costs['input_shape']} but preprocessing.input_size is {input_size}"
        )
    _check_thresholds(manifest["operating_points"], num_exits)
    if manifest.get("budget_unit", "fraction") not in ("fraction", "gflops"):
        raise _fail("budget_unit", f"is {manifest.get('budget_unit')!r}, not 'fraction' or 'gflops'")
    temps = manifest.get("temperatures")
    if temps is not None:
        for k, t in enumerate(_list(temps, "temperatures", num_exits, f"the model has {num_exits} exits")):
            _number(t, f"temperatures[{k}]", positive=True)
    weights = manifest["weights"]
    if not isinstance(weights, Mapping):
        raise _fail("weights", f"is {type(weights).__name__}, not a mapping")
    _inside(artefact, weights.get("file", WEIGHTS_FILE), "weights.file")
    onnx = manifest.get("onnx")
    if onnx:
        stages = _list(onnx.get("stages"), "onnx.stages", num_exits, f"the model has {num_exits} exits")
        for k, stage in enumerate(stages):
            _inside(artefact, os.path.join(ONNX_DIR, str(stage.get("file"))), f"onnx.stages[{k}].file")


def validate_manifest(manifest: Mapping[str, Any], artefact: str) -> None:
    """Check the whole manifest against itself, once, and name the first field that is wrong.

    Args:
        manifest: A manifest with the required top-level entries.
        artefact: The artefact folder (files the manifest names must lie inside it).

    Raises:
        ArtefactError: ``<artefact>: manifest field <name> ...; ...`` for the first inconsistency.
    """
    try:
        _check_fields(manifest, artefact)
    except _Invalid as err:
        field, problem = err.args
        raise ArtefactError(
            f"artefact {artefact}: manifest field {field} {problem}; the artefact contradicts itself (edited "
            "or corrupt), so it is not used: export it again"
        ) from None
