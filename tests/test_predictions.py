"""The one predictions schema (``dmpo_lightning.predictions``): its CSV file, its rows, and the surfaces.

Every surface that predicts image files must give the same rows for the same images: ``dmpo predict``
(the Lightning CLI, in-process), :class:`EarlyExitPredictor` and ``python -m dmpo_lightning.deploy``.
A new surface (the HTTP server) is added to ``support.surfaces.PREDICT_SURFACES``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.runs import make_run
from support.surfaces import PREDICT_SURFACES, predict_with

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.predictions import (
    IMAGE_COLUMNS,
    PREDICTION_COLUMNS,
    SAMPLE_COLUMNS,
    PredictionRow,
    format_prediction_summary,
    read_predictions,
    rows_from_outputs,
    write_predictions,
)


def _row(i: int, **kw) -> PredictionRow:
    values = dict(class_index=i % 2, class_name="ab"[i % 2], exit=1 + i % 2, confidence=1 / 3 + i)
    values.update(score=math.pi / (i + 1), gflops=0.1 + i, path=f"/x/{i}.png")
    return PredictionRow(**{**values, **kw})


# ------------------------------------------------------------------------------------------- the file
def test_csv_round_trip_keeps_every_float_bit_and_the_columns_are_the_json_keys(tmp_path):
    rows = [_row(0), PredictionRow.failed("the file is not a readable image (x)", path="/x/b.png"), _row(3)]
    summary = write_predictions(str(tmp_path / "p.csv"), rows, num_exits=2)
    assert summary is not None and summary.rows == 3 and summary.predicted == 2
    assert summary.exit_counts == [1, 1] and summary.failed == [("/x/b.png", rows[1].error)]
    assert summary.mean_gflops == pytest.approx((0.1 + 3.1) / 2)
    text = (tmp_path / "p.csv").read_text()
    assert text.splitlines()[0] == ",".join(IMAGE_COLUMNS)
    assert read_predictions(str(tmp_path / "p.csv")) == rows  # exact floats: full precision
    for r in rows:
        assert tuple(r.to_dict()) == IMAGE_COLUMNS
        assert PredictionRow.from_dict(r.to_dict()) == r


def test_dataset_rows_carry_index_and_label(tmp_path):
    rows = [_row(i, path=None, index=i, label=1) for i in range(3)]
    write_predictions(str(tmp_path / "p.csv"), rows, num_exits=2)
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == ",".join(SAMPLE_COLUMNS)
    assert read_predictions(str(tmp_path / "p.csv")) == rows
    assert tuple(rows[0].to_dict()) == SAMPLE_COLUMNS


def test_the_writer_never_overwrites_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "p.csv"
    path.write_text("user data\n")
    with pytest.raises(FileExistsError, match="exists"):
        write_predictions(str(path), [_row(0)], num_exits=2)
    assert path.read_text() == "user data\n"

    def boom(fd):
        raise OSError("disk full")

    new = tmp_path / "new.csv"
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_predictions(str(new), [_row(0)], num_exits=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]

    def interrupted():
        yield _row(0)
        raise KeyboardInterrupt

    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        write_predictions(str(new), interrupted(), num_exits=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]
    assert write_predictions(str(new), [], num_exits=2) is None and not new.exists()


def test_rows_of_two_kinds_are_not_mixed_in_one_file(tmp_path):
    with pytest.raises(ValueError, match="two kinds"):
        write_predictions(str(tmp_path / "p.csv"), [_row(0), _row(1, path=None, index=1)], num_exits=2)
    assert not (tmp_path / "p.csv").exists()


def test_a_file_that_is_not_a_predictions_file_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("path,prediction,class_name\n/a.png,1,b\n")
    with pytest.raises(ValueError, match="is not a dmpo predictions file"):
        read_predictions(str(tmp_path / "x.csv"))


def test_rows_from_predict_step_outputs():
    outputs = [
        {
            "prediction": torch.tensor([1, -1, 0]),
            "exit_index": torch.tensor([0, -1, 1]),
            "score": torch.tensor([0.5, math.nan, 0.25]),
            "confidence": torch.tensor([0.75, math.nan, 0.5]),
            "index": torch.tensor([0, 1, 2]),
            "path": ["/a.png", "/b.png", "/c.png"],
            "error": ["", "the file is not a readable image (x)", ""],
            "source_mode": ["", "", "RGBA"],
        }
    ]
    rows = list(rows_from_outputs(outputs, class_names=["a", "b"], exit_gflops=[1.0, 2.0]))
    assert rows == [
        PredictionRow(1, "b", 1, 0.75, 0.5, 1.0, path="/a.png"),
        PredictionRow.failed("the file is not a readable image (x)", path="/b.png"),
        PredictionRow(0, "a", 2, 0.5, 0.25, 2.0, path="/c.png"),
    ]
    assert rows[2].source_mode == "RGBA"


def test_the_summary_counts_exits_failures_and_conversions(tmp_path):
    rows = [_row(0), _row(1, source_mode="RGBA"), PredictionRow.failed("too large", path="/x/big.png")]
    summary = write_predictions(str(tmp_path / "p.csv"), rows, num_exits=2)
    assert summary is not None
    text = format_prediction_summary(summary, full_gflops=4.0, in_chans=3, budget=0.5)
    first = f"early-exit predictions at budget 0.5 for 3 images written to {tmp_path}/p.csv"
    assert text.splitlines()[0] == first
    assert "2 predicted; exit 1: 1, exit 2: 1" in text
    assert "mean cost 0.6 GFLOPs per image (15.0% of the full model's 4)" in text
    assert "1 not predicted (the reason is in the error column): /x/big.png: too large" in text
    assert "1 image converted to RGB from another channel layout (RGBA: 1)" in text


# ------------------------------------------------------------------------------------------ surfaces
def _write_images(folder: Path) -> list[Path]:
    """Images of the synthetic 32 px model: ordinary, grey, RGBA, 16-bit, one of another size, one broken."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = folder / f"rgb_{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / "wide.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("schema")
    r = make_run(base)
    art = export_artefact(str(base / "art"), run=str(r["run"]))
    _write_images(base / "images")
    return {"base": base, "art": art, **r}


@pytest.fixture(scope="module")
def surface_rows(exported) -> dict[str, tuple[str, list[PredictionRow]]]:
    out: dict[str, tuple[str, list[PredictionRow]]] = {}
    for i, name in enumerate(PREDICT_SURFACES):
        csv_path = exported["base"] / f"surface_{i}.csv"
        out[name] = predict_with(name, exported, exported["base"] / "images", csv_path)
        assert csv_path.read_text().splitlines()[0] == ",".join(IMAGE_COLUMNS), name
    return out


@pytest.mark.parametrize("surface", list(PREDICT_SURFACES)[1:])
def test_every_surface_writes_the_rows_dmpo_predict_writes(surface_rows, surface):
    reference = surface_rows["dmpo predict"][1]
    rows = surface_rows[surface][1]
    assert [r.path for r in rows] == [r.path for r in reference]
    assert all(os.path.isabs(r.path) for r in rows)
    predicted = 0
    for got, want in zip(rows, reference, strict=True):
        for column in PREDICTION_COLUMNS:
            a, b = getattr(got, column), getattr(want, column)
            if column in ("confidence", "score") and a is not None and b is not None:
                assert a == pytest.approx(b, abs=1e-5), (got.path, column)
            else:
                assert a == b, (got.path, column)
        predicted += got.error is None
    assert predicted == 9  # 6 RGB + grey + RGBA + 16-bit; wide.png and broken.png have their reason
    errors = {Path(r.path).name: r.error for r in rows if r.error}
    assert set(errors) == {"broken.png", "wide.png"}
    assert errors["wide.png"].startswith("image is 40x32 px")
    assert all("Error" not in e for e in errors.values())  # a sentence, not an exception type name


@pytest.mark.parametrize("surface", ["dmpo predict", "python -m dmpo_lightning.deploy"])
def test_every_command_prints_the_same_summary(surface_rows, surface):
    printed = surface_rows[surface][0]
    assert "early-exit predictions at budget 0.5 for 11 images written to" in printed
    assert "9 predicted; exit 1:" in printed
    assert "2 not predicted (the reason is in the error column)" in printed
    assert "3 images converted to RGB from another channel layout (I;16: 1, L: 1, RGBA: 1)" in printed
