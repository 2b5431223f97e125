"""Issue 28, "validated whole at load": every file format the package reads refuses a damaged file.

Each format of ``support.file_formats.FILE_FORMATS`` (thresholds.json, report.json, an artefact's
manifest.json and weights, the trainable export, checkpoints, the predictions CSV, calibration_indices.json)
is made valid, then damaged as files get damaged or mixed up: cut short, overwritten in the middle, emptied,
replaced by a folder or by another of the package's files, or written by a newer format version. The
package's reader of that format must refuse each in one sentence (a ``ValueError`` or ``OSError`` whose
message is one line, not a bare ``[Errno ...]``) that names the file, and must never return. Before the
checkpoint check, flipped bytes in a checkpoint's tensor data loaded as wrong weights without a word.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.file_formats import FILE_FORMATS, FileFormat

OTHER = {
    "thresholds.json": "report.json",
    "report.json": "thresholds.json",
    "manifest.json": "thresholds.json",
    "artefact weights.safetensors": "trainable export .safetensors",
    "trainable export .safetensors": "checkpoint .ckpt",
    "checkpoint .ckpt": "trainable export .safetensors",
    "predictions CSV": "thresholds.json",
    "calibration_indices.json": "thresholds.json",
}
"""For each format, another of the package's files a user could give in its place."""

DEFECTS = ("truncated", "corrupt", "empty", "folder", "other_format", "newer_version")


def _damage(name: str, fmt: FileFormat, defect: str, tmp_path: Path) -> tuple[Path, Path]:
    given = fmt.make(tmp_path / "valid")
    fmt.read(given)  # the valid file is read (so a refusal below is the defect's)
    target = fmt.file(given)
    data = target.read_bytes()
    if defect == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif defect == "corrupt":
        middle = bytearray(data)
        start = len(middle) // 3
        middle[start : start + 64] = bytes(b ^ 0xFF for b in middle[start : start + 64])
        target.write_bytes(bytes(middle))
    elif defect == "empty":
        target.write_bytes(b"")
    elif defect == "folder":
        target.unlink()
        target.mkdir()
    elif defect == "other_format":
        other = FILE_FORMATS[OTHER[name]]
        target.write_bytes(other.file(other.make(tmp_path / "other")).read_bytes())
    elif defect == "newer_version":
        assert fmt.set_version is not None
        fmt.set_version(target, 99)
    return given, target


CASES = [
    (name, defect)
    for name, fmt in FILE_FORMATS.items()
    for defect in DEFECTS
    if defect != "newer_version" or fmt.set_version is not None  # CSV, checkpoints, weights: no version field
]


@pytest.mark.parametrize(("name", "defect"), CASES)
def test_every_file_format_refuses_a_damaged_file_in_one_sentence_naming_it(name, defect, tmp_path):
    fmt = FILE_FORMATS[name]
    given, target = _damage(name, fmt, defect, tmp_path)
    with pytest.raises((ValueError, OSError)) as info:
        fmt.read(given)
    message = str(info.value).strip()
    assert message and "\n" not in message, message
    assert not message.startswith("[Errno"), message  # a sentence, not the bare error of open()
    assert str(given) in message or str(target) in message, message
    if defect == "newer_version":
        assert "newer" in message or "upgrade" in message, message
    if defect == "folder":  # not "does not exist": the path exists, it is the wrong kind
        assert "folder" in message or "directory" in message, message


def test_a_copy_of_a_valid_file_is_read_by_every_reader(tmp_path):
    """The readers accept what the package writes (the other half of the rule: no refusal of good files)."""
    for i, (name, fmt) in enumerate(FILE_FORMATS.items()):
        given = fmt.make(tmp_path / f"f{i}")
        copy = tmp_path / f"copy{i}" / given.name
        copy.parent.mkdir()
        (shutil.copytree if given.is_dir() else shutil.copy2)(given, copy)
        assert fmt.read(copy) is not None, name
