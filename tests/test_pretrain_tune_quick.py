"""Smoke test of benchmarks/pretrain_tune.py --quick (a tiny model on a few hundred Fashion-MNIST images)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dmpo_lightning.data.fashion_mnist import default_root

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pretrain_tune.py"

pytestmark = pytest.mark.skipif(
    default_root() is None, reason="needs the Debian package dataset-fashion-mnist (full Fashion-MNIST)"
)


def _load_benchmark():
    """Import benchmarks/pretrain_tune.py (not a package) under its own module name."""
    if "pretrain_tune" in sys.modules:
        return sys.modules["pretrain_tune"]
    spec = importlib.util.spec_from_file_location("pretrain_tune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_tune"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["pretrain_tune"]
        raise
    return module


def test_quick_benchmark_writes_table_curves_plot_and_reuses_the_cache(tmp_path, capsys):
    bench = _load_benchmark()
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = [
        "--quick",
        "--cache-dir",
        str(cache),
        "--variants",
        "static_peft,sdn_linear,dmpo,exit_entropy",
        "--seeds",
        "2",
        "--train-size",
        "100",
        "--calibration-size",
        "60",
        "--test-size",
        "100",
    ]
    payload = bench.main([*args, "--output", str(out)])

    # One markdown table: a row per variant, the budget columns, "—" below the first exit's cost.
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] in printed
    header = table.splitlines()[0]
    for column in ("25%", "33%", "50%", "75%", "100%", "AUC", "trainable params", "time vs static PEFT"):
        assert column in header
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:] if line.startswith("| ")}
    assert set(rows) == {"static_peft", "sdn_linear", "dmpo", "exit_entropy (= dmpo run)"}
    static_cells = [c.strip() for c in rows["static_peft"].split("|")[2:7]]
    assert static_cells[:4] == ["—"] * 4 and static_cells[4] != "—"  # one exit: only the full cost
    assert "±" in rows["dmpo"] and "1.00x" in rows["static_peft"]

    # Seeds, shared runs and the dmpo test protocol's reports.
    results = payload["results"]
    assert sorted(r["seed"] for r in results if r["variant"] == "dmpo") == [0, 1]
    entropy = next(r for r in results if r["variant"] == "exit_entropy")
    assert entropy["trained_as"] == "dmpo" and entropy["exit_rule"] == "entropy"
    for r in results:
        assert (Path(r["report_dir"]) / "report.json").is_file()
    assert payload["environment"]["quick"] is True
    assert json.loads((out / "results.json").read_text())["rows"]
    with open(out / "curves.csv") as f:
        kinds = {row["kind"] for row in csv.DictReader(f)}
    assert kinds == {"anytime", "budget", "dynamic"}
    assert (out / "accuracy_vs_cost.png").stat().st_size > 0

    # The pre-trained source model is a timm state dict in the cache, reused by the next run.
    assert payload["pretrain"]["reused"] is False
    assert Path(payload["checkpoint"]).is_file()
    again = bench.main([*args, "--variants", "linear_probe", "--output", str(tmp_path / "out2")])
    assert again["pretrain"]["reused"] is True and again["checkpoint"] == payload["checkpoint"]

    # An existing output folder is never overwritten.
    with pytest.raises(SystemExit, match="never overwritten"):
        bench.main([*args, "--output", str(out)])


def test_variant_settings_come_from_the_config_files_scaled_to_the_benchmark():
    bench = _load_benchmark()
    settings = bench.Settings()
    dmpo = bench.module_kwargs("dmpo", settings, bench.MODEL_CONFIGS)
    assert dmpo["exit_blocks"] == [3, 6, 9, 12] and dmpo["early_head"] == "moment" and dmpo["bypass"] is True
    assert dmpo["adapter_dim"] == settings.adapter_dim and "backbone" not in dmpo and "budgets" not in dmpo
    switches = [
        bench.module_kwargs(f"switch_{p}", settings, bench.MODEL_CONFIGS)["switch_epoch"]
        for p in (25, 50, 75)
    ]
    assert switches == [1, 2, 3]  # 25/50/75 of 100 epochs -> of 4
    assert bench.module_kwargs("static_peft", settings, bench.MODEL_CONFIGS)["exit_blocks"] == 1
    names = ["dmpo", "switch_50", "exit_patience", "sdn_moment", "phase2_only"]
    jobs = bench.plan(names, settings, bench.MODEL_CONFIGS, {v: [0] for v in names})
    # identical training settings share one run: switch_50 = dmpo (switch at half), phase2_only = sdn_moment
    assert [(j.name, j.rules) for j in jobs] == [
        ("dmpo", {"confidence": ["dmpo", "switch_50"], "patience": ["exit_patience"]}),
        ("sdn_moment", {"confidence": ["sdn_moment", "phase2_only"]}),
    ]
