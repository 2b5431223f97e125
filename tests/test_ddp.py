"""Multi-process (DDP, gloo on CPU).

`dmpo fit` trains and tests with 2 processes, and the per-exit test metrics and the early-exit report cover
the whole test and calibration splits exactly once, as a single process computes them. The split sizes are
odd (23 test, 15 calibration images), so DistributedSampler pads each split with a repeated sample: a metric
that sums over the padded shards would count it twice.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.builders import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG
ODD_SPLITS = [
    "--data.init_args.synthetic_sizes=[49, 23]",  # 34 train + 15 calibration, 23 test
    "--data.init_args.calibration_size=15",
    "--data.init_args.synthetic_num_classes=7",  # > 5 classes: top-5 accuracy is reported too
    "--trainer.max_epochs=1",
    "--model.init_args.schedule.switch_epoch=0",
]
NUM_TEST, NUM_CAL, NUM_EXITS = 23, 15, 4


def _dmpo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LOCAL_RANK", None)
    out = subprocess.run(
        [sys.executable, "-m", "dmpo_lightning", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _test_metrics(metrics_csv: Path) -> dict[str, float]:
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for r in rows for k, v in r.items() if k.startswith("test/") and v}


def _numbers(report: dict) -> dict:
    """What the early-exit protocol computed (leaves out paths and the config)."""
    return {
        "num_test": report["num_test"],
        "num_calibration": report["num_calibration"],
        "checkpoint_hash": report["checkpoint_hash"],
        "exits": report["exits"],
        "full_model": report["full_model"],
        "best_anytime_exit": report["best_anytime_exit"],
        "budgets": report["budgets"],
        "curve": report["curve"],
        "auc": report["auc"],
    }


def _assert_close(a, b, path="report"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
def test_ddp_fit_and_test_match_a_single_process_on_the_whole_dataset(tmp_path):
    # fit + test with 2 processes (DistributedSampler shards and pads every split)
    _dmpo(
        tmp_path,
        "fit",
        "-c",
        TINY,
        *ODD_SPLITS,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--test_after_fit=true",
        "--evaluation.report_dir=report_ddp",
    )
    (ckpt,) = (tmp_path / "runs" / "dmpo" / "version_0" / "checkpoints").glob("*.ckpt")
    # the same checkpoint tested by one process
    _dmpo(
        tmp_path,
        "test",
        "-c",
        TINY,
        *ODD_SPLITS,
        "--trainer.devices=1",
        "--trainer.accelerator=cpu",
        f"--ckpt_path={ckpt}",
        "--evaluation.report_dir=report_single",
    )

    ddp = json.loads((tmp_path / "report_ddp" / "report.json").read_text())
    single = json.loads((tmp_path / "report_single" / "report.json").read_text())
    assert ddp["num_test"] == single["num_test"] == NUM_TEST  # not 24 (padded) nor 12 (one rank's shard)
    assert ddp["num_calibration"] == single["num_calibration"] == NUM_CAL
    assert ddp["checkpoint_hash"] == single["checkpoint_hash"] == f"file:{_sha256(ckpt)}"
    for report in (ddp, single):
        for e in report["exits"]:  # accuracies over 23 samples, each counted once
            assert round(e["top1"] * NUM_TEST, 3) == pytest.approx(round(e["top1"] * NUM_TEST), abs=1e-3)
            assert round(e["top5"] * NUM_TEST, 3) == pytest.approx(round(e["top5"] * NUM_TEST), abs=1e-3)
    _assert_close(_numbers(ddp), _numbers(single))

    # the cached per-sample outputs cover every index once, in order, with the same predictions
    cache_ddp = torch.load(tmp_path / "report_ddp" / "exit_outputs.pt", weights_only=False)
    cache_single = torch.load(tmp_path / "report_single" / "exit_outputs.pt", weights_only=False)
    for split, n in (("test", NUM_TEST), ("calibration", NUM_CAL)):
        assert torch.equal(cache_ddp[split]["index"], torch.arange(n))
        assert torch.equal(cache_ddp[split]["preds"], cache_single[split]["preds"])
        assert torch.equal(cache_ddp[split]["target"], cache_single[split]["target"])
        torch.testing.assert_close(
            cache_ddp[split]["scores"], cache_single[split]["scores"], rtol=1e-5, atol=1e-6
        )

    # the per-exit metrics sent to the logger agree as well
    logged_ddp = _test_metrics(tmp_path / "runs" / "dmpo" / "version_0" / "metrics.csv")
    single_csv = tmp_path / "runs" / "dmpo" / "version_0" / "dmpo_test" / "metrics.csv"  # inside the run
    logged_single = _test_metrics(single_csv)
    names = [f"test/{m}_exit{k}" for m in ("acc", "acc_top5") for k in range(NUM_EXITS)]
    names += ["test/auc", "test/budget_0.5/acc", "test/budget_0.75/acc"]
    for name in names:
        assert logged_ddp[name] == pytest.approx(logged_single[name], abs=1e-6), name
    for k, e in enumerate(single["exits"]):
        assert logged_single[f"test/acc_exit{k}"] == pytest.approx(e["top1"], abs=1e-6)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
