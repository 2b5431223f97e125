"""benchmarks/vtab1k.py: the VTAB-1k benchmark runs all 19 tasks (quick mode, fake releases), tabulates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dmpo_lightning.data.list_files import VTAB1K_GROUPS, VTAB1K_TASKS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_quick_mode_runs_all_19_tasks_on_fakes(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import vtab1k as bench  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    payload = bench.main(["--quick", "--output", str(tmp_path / "out")])
    assert [r["task"] for r in payload["results"]] == list(VTAB1K_TASKS)
    assert not [r for r in payload["results"] if "error" in r], payload["results"]
    table = (tmp_path / "out" / "table.md").read_text()
    for label in ("mean natural", "mean specialized", "mean structured", "mean of group means", "mean of 19"):
        assert label in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "failed" not in table and set(VTAB1K_TASKS) <= set(rows)
    # the group mean is the mean of its tasks, as printed
    nat = [float(rows[t].split("|")[-3]) for t in VTAB1K_GROUPS["natural"]]
    assert float(rows["**mean natural**"].split("|")[-3]) == pytest.approx(sum(nat) / len(nat), abs=0.01)
    with pytest.raises(SystemExit, match="results are never overwritten"):
        bench.main(["--quick", "--tasks", "dtd", "--output", str(tmp_path / "out")])


def test_benchmark_table_from_reports(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import vtab1k as bench  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    results = [
        {"task": "cifar", "budgets": {"50 %": 0.5, "100 %": 0.7}, "full_model": 0.7, "auc": 0.6},
        {"task": "dtd", "budgets": {"50 %": 0.3, "100 %": 0.5}, "full_model": 0.4, "auc": 0.2},
        {"task": "eurosat", "budgets": {"50 %": 0.9, "100 %": 0.9}, "full_model": 0.9, "auc": 0.8},
        {"task": "kitti", "error": "ValueError: boom"},
    ]
    summary = bench.summarise(results)
    rows = dict(summary["rows"])
    assert summary["columns"] == ["50 %", "100 %", "full model", "AUC"]
    assert rows["mean natural (2/7 tasks)"]["50 %"] == pytest.approx(0.4)
    assert rows["mean specialized (1/4 tasks)"]["full model"] == pytest.approx(0.9)
    assert rows["mean structured (1/8 tasks)"]["50 %"] is None  # a failed task leaves its means empty
    assert rows["mean of group means"]["50 %"] is None
    bench.write_tables(summary, tmp_path, "t")
    assert "| kitti | failed | failed | failed | failed |" in (tmp_path / "table.md").read_text()
