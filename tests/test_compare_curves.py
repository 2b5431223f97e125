"""benchmarks/compare_curves.py: matched-cost accuracy from a pretrain_tune curves.csv."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_curves.py"


@pytest.fixture(scope="module")
def cc():
    spec = importlib.util.spec_from_file_location("compare_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "kind", "point", "test_cost_fraction", "test_accuracy"])
        w.writerows(rows)


def test_interpolates_along_the_curve_and_averages_seeds(cc, tmp_path, capsys):
    path = tmp_path / "curves.csv"
    _write(
        path,
        [
            # a: from 0.2 to 0.6, accuracy rising 0.5 -> 0.9; two seeds 0.1 apart
            ("a", 0, "dynamic", 0.1, 0.2, 0.5),
            ("a", 0, "dynamic", 0.2, 0.6, 0.9),
            ("a", 1, "dynamic", 0.1, 0.2, 0.6),
            ("a", 1, "dynamic", 0.2, 0.6, 1.0),
            ("a", 0, "budget", 0.5, 0.5, 0.0),  # not a dynamic row: ignored
            # b starts later (0.4), flat at 0.8
            ("b", 0, "dynamic", 0.1, 0.4, 0.8),
            ("b", 0, "dynamic", 0.2, 0.5, 0.8),
        ],
    )
    curves = cc.read_curves(path)
    cost, acc = curves["a"][0]
    assert cc.accuracy_at(cost, acc, 0.4) == pytest.approx(0.7)
    assert math.isnan(cc.accuracy_at(cost, acc, 0.1))  # below the cheapest point
    assert cc.accuracy_at(cost, acc, 0.9) == pytest.approx(0.9)  # above the dearest: last accuracy
    # common range starts at b's first cost (0.4): a's mean over [0.4, 1] = (0.7..0.9 over 0.2, then 0.9)
    assert cc.mean_accuracy(cost, acc, 0.4, n=60001) == pytest.approx((0.8 * 0.2 + 0.9 * 0.4) / 0.6, abs=1e-4)
    out = cc.main([str(path), "--costs", "0.3,0.4"])
    lines = out.splitlines()
    assert lines[0].startswith("| variant | 30% | 40% | mean 40.0-100%")
    a_row = next(line for line in lines if line.startswith("| a |"))
    assert "65.00 ± 7.07" in a_row and "75.00 ± 7.07" in a_row  # seeds 0.6/0.7 at 0.3, 0.7/0.8 at 0.4
    b_row = next(line for line in lines if line.startswith("| b |"))
    assert b_row.split("|")[2].strip() == "—"  # b cannot reach 30 %
    assert "80.00" in b_row.split("|")[3]


def test_rejects_unknown_variants_and_bad_costs(cc, tmp_path):
    path = tmp_path / "curves.csv"
    _write(path, [("a", 0, "dynamic", 0.1, 0.2, 0.5)])
    with pytest.raises(SystemExit, match=r"no dynamic curve for \['zzz'\]"):
        cc.main([str(path), "--variants", "zzz"])
    with pytest.raises(SystemExit, match=r"--costs must be fractions in \(0, 1\]"):
        cc.main([str(path), "--costs", "30"])
    with pytest.raises(SystemExit, match="does not exist"):
        cc.main([str(tmp_path / "missing.csv")])
