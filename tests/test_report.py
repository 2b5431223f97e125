"""evaluation/report.py: table content, JSON round trip, CSV layout and PNG validity."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from dmpo_lightning.evaluation.protocol import budgeted_curve, operating_points, search_qs
from dmpo_lightning.evaluation.report import (
    GFLOPS_UNIT,
    build_report,
    format_report_table,
    plot_curve,
    write_curve_csv,
)
from dmpo_lightning.files import decode_float, to_jsonable, write_json

COSTS = [1.25, 2.5, 3.75, 5.1]
FULL = 5.0


@pytest.fixture(scope="module")
def run():
    g = torch.Generator().manual_seed(0)

    def split(n):
        scores = torch.rand(n, 4, generator=g)
        correct = torch.rand(n, 4, generator=g) < (torch.linspace(0.4, 0.9, 4) + 0.3 * (scores - 0.5))
        return scores, correct

    (cs, cc), (ts, tc) = split(300), split(200)
    curve = budgeted_curve(cs, cc, ts, tc, COSTS, FULL)
    points = operating_points(cs, cc, ts, tc, COSTS, FULL, [0.25, 0.5, 1.0], qs=search_qs(100))
    rep = build_report(
        costs=COSTS,
        full_cost=FULL,
        anytime_top1=tc.double().mean(0),
        anytime_top5=[0.9, 0.95, 0.97, 0.99],
        exit_blocks=[3, 6, 9, 12],
        curve=curve,
        operating_points=points,
        full_accuracy=0.8765,
        extra={"checkpoint_sha256": "abc123", "config": {"lr": 1e-3}},
    )
    return rep, curve, points


def test_report_content(run):
    rep, _, points = run
    assert rep["unit"] == GFLOPS_UNIT
    assert [e["exit"] for e in rep["exits"]] == [1, 2, 3, 4]
    assert rep["exits"][0]["cost_fraction"] == pytest.approx(0.25)
    assert rep["curve"]["thresholds"][0][-1] == "-inf"
    assert len(rep["curve"]["qs"]) == 39
    assert rep["budgets"][1]["test_accuracy"] == points[1].test_accuracy
    assert 0 < rep["auc"]["value"] < 1
    assert rep["checkpoint_sha256"] == "abc123"
    with pytest.raises(ValueError, match="clash"):
        build_report(costs=COSTS, full_cost=FULL, anytime_top1=[0.1] * 4, extra={"exits": 1})
    with pytest.raises(ValueError, match="anytime_top1 has 3 entries"):
        build_report(costs=COSTS, full_cost=FULL, anytime_top1=[0.1] * 3)


def test_table_contains_the_numbers(run):
    rep, _, points = run
    table = format_report_table(rep)
    assert GFLOPS_UNIT in table
    assert "1.2500" in table and "25.0" in table  # exit 1 GFLOPs and cost %
    assert f"{100 * rep['exits'][2]['top1']:.2f}" in table
    assert "99.00" in table  # top-5 of exit 4
    for p in points:
        assert f"{100 * p.test_accuracy:.2f}" in table
        assert f"{p.test_cost:.4f}" in table
    assert "Full model: 5.0000 GFLOPs, top-1 87.65 %" in table
    assert f"{100 * rep['auc']['value']:.2f} %" in table
    assert "calibration split" in table and "sweep" not in table.lower()


def test_table_without_curve_or_top5():
    rep = build_report(costs=[1.0, 2.0], full_cost=2.0, anytime_top1=[0.5, 0.6])
    table = format_report_table(rep)
    assert "top-5" not in table and "Budgeted" not in table and "AUC" not in table
    assert "Best anytime exit: 2 (top-1 60.00 %)" in table


def test_json_round_trip(run, tmp_path):
    rep, _, _ = run
    path = write_json(tmp_path / "report.json", rep)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == rep
    assert decode_float(json.loads(text)["curve"]["thresholds"][0][-1]) == -math.inf
    assert decode_float(None) != decode_float(None)  # NaN
    assert to_jsonable({"a": float("inf"), "b": torch.tensor(2)}) == {"a": "inf", "b": 2}
    with pytest.raises(TypeError, match="cannot put a object into JSON"):
        to_jsonable(object())
    assert to_jsonable({"o": object}, default=lambda o: o.__name__) == {"o": "object"}
    for bad in ("nan", "Infinity", "0.5", True, [1.0]):
        with pytest.raises(ValueError, match="expected a number, 'inf' or '-inf'"):
            decode_float(bad)


def test_csv_layout(run, tmp_path):
    _, curve, _ = run
    path = write_curve_csv(tmp_path / "curve.csv", curve)
    with path.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "q",
        "threshold_1",
        "threshold_2",
        "threshold_3",
        "threshold_4",
        "cal_accuracy",
        "cal_cost",
        "test_accuracy",
        "test_cost",
        "test_cost_fraction",
        "test_exit_1",
        "test_exit_2",
        "test_exit_3",
        "test_exit_4",
    ]
    assert len(rows) == 1 + 39
    assert float(rows[1][0]) == pytest.approx(0.05)
    assert float(rows[1][4]) == -math.inf
    assert float(rows[5][7]) == curve.test_accuracy[4].item()
    assert sum(int(x) for x in rows[1][10:]) == 200


def test_png_is_valid(run, tmp_path):
    rep, _, _ = run
    path = plot_curve(tmp_path / "curve.png", rep)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # no temporary files left


# ------------------------------------------------------------------------ issue 28/11: self-describing
def test_the_report_says_what_data_software_device_and_date_it_was_made_with(tmp_path):
    """report.json names the data configuration, the versions, the device and the date (format version 3)."""
    from datetime import datetime, timedelta, timezone
    from pathlib import Path

    import lightning
    import timm
    from support.runs import make_run

    from dmpo_lightning.cli import main
    from dmpo_lightning.constants import REPORT_FORMAT_VERSION
    from dmpo_lightning.evaluation.report import read_report
    from dmpo_lightning.version import __version__

    tiny = str(Path(__file__).resolve().parent / "configs" / "tiny.yaml")
    run = make_run(tmp_path)
    out = tmp_path / "report"
    main(["test", "-c", tiny, f"--ckpt_path={run['ckpt']}", f"--evaluation.report_dir={out}"])
    report = read_report(str(out / "report.json"))
    assert report["format_version"] == REPORT_FORMAT_VERSION == 3
    data = report["data"]
    assert data["class"] == "dmpo_lightning.data.datamodule.BenchmarkDataModule"
    assert (data["dataset"], data["root"], data["task"]) == ("synthetic", None, None)
    assert (data["image_size"], data["split_seed"], data["calibration_size"]) == (32, 0, 16)
    assert data["num_classes"] == 4 and data["options"]["batch_size"] == 8
    assert data["preprocessing"]["image_size"] == 32 and len(data["preprocessing"]["mean"]) == 3
    env = report["environment"]
    assert (env["dmpo_lightning"], env["torch"]) == (__version__, torch.__version__)
    assert (env["timm"], env["lightning"]) == (timm.__version__, lightning.__version__)
    assert (env["device"], env["accelerator"], env["processes"]) == ("cpu", "CPUAccelerator", 1)
    made = datetime.fromisoformat(env["date"])
    assert made.tzinfo is not None and abs(datetime.now(timezone.utc) - made) < timedelta(minutes=10)


def test_a_report_without_a_data_module_says_so():
    from dmpo_lightning.evaluation.report import describe_data, describe_environment

    assert describe_data(None) is None
    env = describe_environment()
    assert "device" not in env and env["torch"] == torch.__version__  # no trainer: no device claimed
