"""files.py: the one file layer every writer and reader of the package goes through.

Every file format the package writes refuses another format or version in one sentence; reports, plots and
exports are written atomically (a failed write leaves the old file, and no temporary file, behind) and never
overwrite a file unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support.runs import make_run

from dmpo_lightning import __version__, files, serialization
from dmpo_lightning.constants import (
    REPORT_FORMAT,
    REPORT_FORMAT_VERSION,
    THRESHOLDS_FORMAT,
    THRESHOLDS_FORMAT_VERSION,
)
from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ArtefactError,
    read_manifest,
)
from dmpo_lightning.evaluation import report
from dmpo_lightning.evaluation.report import read_report
from dmpo_lightning.evaluation.thresholds import load_thresholds, read_thresholds
from dmpo_lightning.files import check_format, write_json


def _thresholds(folder: Path, content: dict) -> str:
    path = folder / "thresholds.json"
    path.write_text(json.dumps(content))
    return str(path)


def _report(folder: Path, content: dict) -> str:
    path = folder / "report.json"
    path.write_text(json.dumps(content))
    return str(path)


def _artefact(folder: Path, content: dict) -> str:
    (folder / "art").mkdir()
    (folder / "art" / MANIFEST_FILE).write_text(json.dumps(content))
    return str(folder / "art")


def _predict_thresholds(path: str) -> None:
    load_thresholds(path, 0.5, {}, num_exits=2)


# reader, writer, format tag, current version, remedy, the content of a file of the previous format
FORMATS = {
    "thresholds": (
        read_thresholds,
        _thresholds,
        THRESHOLDS_FORMAT,
        THRESHOLDS_FORMAT_VERSION,
        "re-run `dmpo test` on the checkpoint to write a new thresholds.json",
        {"format": "dmpo-thresholds-v1", "fingerprint": {"exit_blocks": [1, 2]}, "budgets": []},
    ),
    "thresholds_in_predict": (
        _predict_thresholds,
        _thresholds,
        THRESHOLDS_FORMAT,
        THRESHOLDS_FORMAT_VERSION,
        "re-run `dmpo test` on the checkpoint to write a new thresholds.json",
        {"format": "dmpo-thresholds-v1", "fingerprint": {"exit_blocks": [1, 2]}, "budgets": []},
    ),
    "report": (
        read_report,
        _report,
        REPORT_FORMAT,
        REPORT_FORMAT_VERSION,
        "re-run `dmpo test` on the checkpoint to write a new report.json",
        {"unit": "GFLOPs", "exits": [], "budgets": [], "config": {"exit_blocks": [1, 2]}},
    ),
    "artefact": (
        read_manifest,
        _artefact,
        FORMAT_NAME,
        FORMAT_VERSION,
        "export the artefact again with `dmpo export`",
        {"format": FORMAT_NAME, "format_version": 1, "model": {"peft": "lora", "exit_blocks": [1, 2]}},
    ),
}


def _refused(read, path: str, *expected: str) -> str:
    with pytest.raises(ValueError) as err:
        read(path)
    message = str(err.value)
    assert "\n" not in message and message.count(". ") == 0, message  # one sentence
    for part in expected:
        assert part in message, (part, message)
    return message


@pytest.mark.parametrize("kind", list(FORMATS))
def test_a_file_of_the_previous_format_is_refused_saying_how_to_make_a_new_one(tmp_path, kind):
    read, write, _, version, remedy, previous = FORMATS[kind]
    path = write(tmp_path, previous)
    message = _refused(read, path, remedy, path)
    if "format" in previous:
        assert f"of format version {version - 1}, written by an older dmpo-lightning" in message
        assert f"reads format version {version} only" in message
    else:  # report.json of version 1 had no format field
        assert (
            f"it has no format field: a dmpo test report written before format version {version}" in message
        )


@pytest.mark.parametrize("kind", list(FORMATS))
def test_a_file_of_a_newer_format_is_refused_saying_to_upgrade(tmp_path, kind):
    read, write, name, version, remedy, _ = FORMATS[kind]
    path = write(tmp_path, {"format": name, "format_version": version + 1})
    _refused(read, path, f"of format version {version + 1}, newer than this dmpo-lightning {__version__}")
    _refused(read, path, "upgrade dmpo-lightning, or " + remedy)


@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("version", [None, "two", True, 2.0])
def test_a_file_without_a_valid_version_is_refused_as_corrupt(tmp_path, kind, version):
    read, write, name, _, remedy, _ = FORMATS[kind]
    path = write(tmp_path, {"format": name, "format_version": version})
    _refused(read, path, f"without a valid format_version ({version!r}), so it is corrupt; {remedy}")


@pytest.mark.parametrize("kind", list(FORMATS))
def test_another_kind_of_file_is_refused_naming_both_formats(tmp_path, kind):
    read, write, name, version, remedy, _ = FORMATS[kind]
    path = write(tmp_path, {"format": "something-else", "format_version": version})
    _refused(read, path, "its format is 'something-else', a ", f"has format {name!r}); {remedy}")


def test_the_artefact_reader_raises_its_own_error_type(tmp_path):
    path = _artefact(tmp_path, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ArtefactError):
        read_manifest(path)


def test_a_file_of_the_current_format_is_returned_as_it_is():
    data = {"format": "x", "format_version": 3, "a": 1}
    assert check_format(data, "x.json", name="x", version=3, what="x file", remedy="-") is data
    safetensors_metadata = {"format": "x", "format_version": "3"}  # metadata values are strings
    assert check_format(safetensors_metadata, "x", name="x", version=3, what="x file", remedy="-")


def test_dmpo_export_refuses_thresholds_of_the_previous_format_before_writing(tmp_path):
    run = make_run(tmp_path)
    old = json.loads(run["thresholds"].read_text())
    old["format"] = "dmpo-thresholds-v1"
    del old["format_version"]
    run["thresholds"].write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"of format version 1, written by an older dmpo-lightning.*re-run"):
        export_artefact(str(tmp_path / "art"), run=str(run["run"]))
    assert not any(p.name.startswith((".art", "art")) for p in tmp_path.iterdir())


def _write_report(path):
    files.write_json(path, {"a": 2})


def _write_plot(path):
    report.plot_curve(path, report.build_report(costs=[1.0, 2.0], full_cost=2.0, anytime_top1=[0.5, 0.6]))


def _write_export(path):
    serialization.write_trainable(str(path), {"w": torch.ones(2)}, {"a": 1}, overwrite=True)


@pytest.mark.parametrize("write", [_write_report, _write_plot, _write_export], ids=lambda f: f.__name__)
def test_reports_plots_and_exports_are_written_atomically(tmp_path, monkeypatch, write):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write(path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    monkeypatch.undo()
    write(path)
    assert path.read_bytes() != b"old" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_atomic_write_without_overwrite_refuses_and_leaves_nothing(tmp_path):
    target = tmp_path / "x.bin"
    files.atomic_write_bytes(target, b"1", overwrite=False)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        files.atomic_write_bytes(target, b"2", overwrite=False)
    assert target.read_bytes() == b"1"
    files.atomic_write_bytes(target, b"3")
    assert target.read_bytes() == b"3" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json(path, {"a": 1})

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(files.os, "fsync", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert (path.stat().st_mode & 0o777) == 0o644
