"""Every file format the package reads, behind one interface, so a rule is tested on all of them at once.

A :class:`FileFormat` makes a valid file of its kind (``make(folder)``), reads it with the package's one
reader of that kind (``read(path)``) and, when the format carries a version, rewrites it with another version
(``set_version``). ``tests/test_file_formats.py`` damages each file (truncated, corrupt, empty, a folder in
its place, another format's file, a newer version) and asserts that the reader refuses it in one sentence
naming the file. A new file format is one more entry in :data:`FILE_FORMATS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from dmpo_lightning.constants import REPORT_FORMAT, REPORT_FORMAT_VERSION
from dmpo_lightning.data.splits import indices_payload, load_indices, save_indices
from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.format import read_manifest
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.evaluation.report import read_report
from dmpo_lightning.evaluation.thresholds import read_thresholds
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.predictions import PredictionRow, read_predictions, write_predictions
from support.builders import TINY_MODULE
from support.runs import make_run


@dataclass(frozen=True)
class FileFormat:
    """One kind of file the package reads.

    Attributes:
        make: Writes a valid file of this kind under the folder it is given; returns what the reader takes.
        read: The package's reader of this kind (raises on a file it refuses).
        file: The file inside what ``make`` returned that holds the content (an artefact's manifest.json).
        set_version: Rewrites the file with another format version (``None``: the format has no version).
    """

    make: Callable[[Path], Path]
    read: Callable[[Path], Any]
    file: Callable[[Path], Path] = lambda path: path
    set_version: Callable[[Path, int], None] | None = None


def _json_version(key: str = "format_version") -> Callable[[Path, int], None]:
    def rewrite(path: Path, version: int) -> None:
        data = json.loads(path.read_text())
        data[key] = version
        path.write_text(json.dumps(data))

    return rewrite


def _json_version_of(path: Path) -> int:
    return int(json.loads(path.read_text())["format_version"])


def _thresholds(folder: Path) -> Path:
    return Path(make_run(folder, "thresholds_run")["thresholds"])


def _checkpoint(folder: Path) -> Path:
    return Path(make_run(folder, "checkpoint_run")["ckpt"])


def _report(folder: Path) -> Path:
    """A report.json as far as its reader checks it (the format); the full content: test_report.py."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.json"
    path.write_text(json.dumps({"format": REPORT_FORMAT, "format_version": REPORT_FORMAT_VERSION}))
    return path


def _artefact(folder: Path) -> Path:
    run = make_run(folder, "artefact_run")
    return Path(
        export_artefact(str(folder / "art"), ckpt_path=str(run["ckpt"]), thresholds=str(run["thresholds"]))
    )


def _trainable(folder: Path) -> Path:
    module = DMPOModule(**TINY_MODULE)
    module.train_steps.fill_(4)
    return Path(module.export_trainable(str(folder / "model.safetensors")))


def _trainable_version(path: Path, version: int) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, "format_version": str(version)})


def _predictions(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions.csv"
    rows = [
        PredictionRow(1, "dog", 2, 0.75, 0.75, 0.125, path="/images/a.png"),
        PredictionRow.failed("the image is truncated", path="/images/b.png"),
    ]
    write_predictions(str(path), rows, num_exits=4)
    return path


def _indices(folder: Path) -> Path:
    return save_indices(folder / "calibration_indices.json", indices_payload("synthetic", 0, 48, [3, 5, 7]))


FILE_FORMATS: dict[str, FileFormat] = {
    "thresholds.json": FileFormat(
        _thresholds, lambda p: read_thresholds(str(p)), set_version=_json_version()
    ),
    "report.json": FileFormat(_report, lambda p: read_report(str(p)), set_version=_json_version()),
    "manifest.json": FileFormat(
        _artefact,
        lambda p: read_manifest(str(p)),
        file=lambda p: p / "manifest.json",
        set_version=_json_version(),
    ),
    "artefact weights.safetensors": FileFormat(
        _artefact, lambda p: EarlyExitPredictor.load(p, budget=0.5), file=lambda p: p / "weights.safetensors"
    ),
    "trainable export .safetensors": FileFormat(
        _trainable, lambda p: DMPOModule.from_trainable(str(p)), set_version=_trainable_version
    ),
    "checkpoint .ckpt": FileFormat(_checkpoint, lambda p: DMPOModule.load_from_checkpoint(str(p))),
    "predictions CSV": FileFormat(_predictions, lambda p: read_predictions(str(p))),
    "calibration_indices.json": FileFormat(
        _indices, lambda p: load_indices(p, "synthetic"), set_version=_json_version()
    ),
}
"""Every file format the package reads, by the name a user knows it by."""
