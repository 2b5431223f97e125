"""benchmarks/early_exit_speed.py runs in --quick mode and its early exit agrees with the simulated protocol.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.builders import TINY_CONFIG
from support.pickles import torch_file

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG
SCRIPT = ROOT / "benchmarks" / "early_exit_speed.py"


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


TINY_SYNTHETIC = [
    "--synthetic-set",
    "img_size=32",
    "--synthetic-set",
    'backbone_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}',
    "--synthetic-set",
    "exits.blocks=[1, 2, 3, 4]",
    "--synthetic-set",
    "exits.moment_dim=32",
    "--synthetic-set",
    "peft.adapter_dim=8",
]
TINY_TRAIN = [
    "--train-set",
    'backbone_kwargs={"patch_size": 7, "embed_dim": 32, "depth": 4, "num_heads": 2}',
    "--train-set",
    "exits.blocks=[1, 2, 3, 4]",
    "--train-set",
    "exits.moment_dim=32",
    "--train-set",
    "batch_size=8",
]


def test_synthetic_models_engine_targets_and_training_step(bench, tmp_path, capsys):
    result = bench.main(
        [
            "--synthetic",
            "vit_tiny_patch16_224",
            *TINY_SYNTHETIC,
            "--histogram",
            "50",
            "25",
            "15",
            "10",
            "--min-samples",
            "40",
            "--batch-sizes",
            "1",
            "16",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--no-progress",
            "--train-step",
            *TINY_TRAIN,
            "--out",
            str(tmp_path / "syn"),
        ]
    )
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "engine x" in out
    assert "Targets (issue 13):" in out
    assert "vit_tiny_patch16_224 per-batch: measured >= 0.95 x FLOPs at every batch" in out
    assert "vit_tiny_patch16_224 engine: measured >= 0.95 x FLOPs at every batch" in out
    assert "training step DMPO / static PEFT <= 1.25" in out
    assert "this script trains nothing" in out
    (case,) = result["cases"]
    for r in case["rows"]:
        assert r["samples"] == 40
        assert r["exit_histogram"] == [20, 10, 6, 4]  # the requested 50/25/15/10 %
        assert r["prediction_mismatches"] == r["exit_mismatches"] == 0
        assert r["engine_prediction_mismatches"] == r["engine_exit_mismatches"] == 0
        assert r["engine_speedup"] > 0
    assert result["training_step"]["ratio"] > 0
    assert {t["met"] for t in result["targets"]} <= {True, False} and len(result["targets"]) == 3
    assert (tmp_path / "syn.csv").read_text().splitlines()[0].startswith("model,batch_size")


def test_thresholds_for_histogram_reproduce_it(bench):
    torch = pytest.importorskip("torch")
    scores = torch.rand(100, 4)
    t = bench.thresholds_for_histogram(scores, [40, 30, 20, 10])
    from dmpo_lightning.evaluation.protocol import assign_exits

    exits = assign_exits(scores.double(), torch.tensor(t, dtype=torch.float64))
    assert torch.bincount(exits, minlength=4).tolist() == [40, 30, 20, 10]
    assert bench.thresholds_for_histogram(scores, [0, 0, 0, 1])[:3] == [float("inf")] * 3


def test_model_arguments_set_fields_of_the_option_groups(bench):
    base = {"img_size": 224, "exits": {"blocks": [3, 6, 9, 12], "bypass": True}}
    kwargs = bench.with_options(
        base, [("exits.moment_dim", 32), ("peft.method", "lora"), ("img_size", 32), ("peft.adapter_dim", 8)]
    )
    assert kwargs == {
        "img_size": 32,
        "exits": {"blocks": [3, 6, 9, 12], "bypass": True, "moment_dim": 32},
        "peft": {"method": "lora", "adapter_dim": 8},
    }
    assert base["exits"] == {"blocks": [3, 6, 9, 12], "bypass": True}  # the defaults are not changed
    with pytest.raises(ValueError, match="'exit' is not an option group"):
        bench.with_options(base, [("exit.blocks", 1)])


@pytest.mark.slow
def test_benchmark_checkpoint_loader_refuses_a_crafted_ckpt(tmp_path, pickle_marker):
    path = torch_file(tmp_path / "evil.ckpt", pickle_marker, "checkpoint")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
    }
    script = str(ROOT / "benchmarks" / "early_exit_speed.py")
    proc = subprocess.run(
        [sys.executable, script, "--config", TINY_CONFIG, "--ckpt", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode != 0
    assert "evil.ckpt was not loaded: it holds Python objects" in proc.stderr, proc.stderr[-2000:]
    assert not pickle_marker.exists()
