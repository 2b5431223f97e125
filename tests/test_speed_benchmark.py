"""benchmarks/early_exit_speed.py runs in --quick mode and its early exit agrees with the simulated protocol.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "early_exit_speed.py"
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("early_exit_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quick(out=None):
    args = [
        "--quick",
        "--config",
        TINY,
        "--batch-sizes",
        "1",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--diagnose",
    ]
    return args + (["--out", str(out)] if out else [])


def test_quick_mode_prints_the_table_and_matches_the_protocol(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = bench.main(_quick(tmp_path / "speed"))
    out = capsys.readouterr().out
    assert "UNTRAINED" in out
    assert "measured x" in out and "FLOPs x" in out
    assert "equal the simulated protocol" in out
    rows = result["rows"]
    assert [r["batch_size"] for r in rows] == [1, 8]
    for r in rows:
        assert r["prediction_mismatches"] == 0 and r["exit_mismatches"] == 0
        assert sum(r["exit_histogram"]) == r["samples"] == 24  # the tiny config's synthetic test split
        assert r["measured_speedup"] > 0 and r["flops_speedup"] > 0
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["model"]["trained"] is False
    assert (tmp_path / "speed.csv").read_text().count("\n") == 3  # header + 2 batch sizes
    # --diagnose: the cost model with timed C_k
    assert all(r["timed_cost_speedup"] > 0 and len(r["timed_exit_fractions"]) == 4 for r in rows)
    # an existing result is never overwritten
    with pytest.raises(FileExistsError):
        bench.main(_quick(tmp_path / "speed.json"))


def test_arguments_are_checked(bench):
    with pytest.raises(SystemExit):
        bench.parse_args([])  # neither --ckpt nor --quick
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--ckpt", "x.ckpt"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--thresholds", "t.json"])
