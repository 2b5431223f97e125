"""benchmarks/gpu_check.sh runs on CPU with --quick and imports only torch, timm and pure-torch parts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("lightning", "pytorch_lightning", "jsonargparse", "torchmetrics", "wandb", "matplotlib")

# A python that cannot import the blocked packages: what a machine with only torch and timm installed sees.
BLOCKER = (
    "import runpy, sys\n"
    f"for name in {BLOCKED!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_without_lightning(tmp_path):
    wrapper = tmp_path / "python_without_lightning"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -c "$BLOCKER" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PYTHON": str(wrapper), "BLOCKER": BLOCKER, "PYTHONPATH": str(ROOT / "src")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["batch_size"], r["budget"]) for r in result["rows"]] == [
        (8, 0.33),
        (8, 0.5),
        (8, 0.33),
        (8, 0.5),
    ]
    for r in result["rows"]:
        assert r["full_images_per_s"] > 0 and r["engine_images_per_s"] > 0 and r["per_batch_images_per_s"] > 0
        assert sum(r["exit_histogram"]) == r["images"] == 24
        assert r["flops_speedup"] > 1
    assert "engine" in proc.stdout and "of FLOPs" in proc.stdout


def test_gpu_check_never_overwrites_a_result(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    out.write_text("{}")
    with pytest.raises(SystemExit, match="exists"):
        module.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert out.read_text() == "{}"
    assert module.histogram_for_budget([0.25, 0.5, 0.75, 1.0], 0.5) == pytest.approx(
        [0.4, 0.3, 0.2, 0.1], abs=0.08
    )


def test_blocker_really_blocks(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import lightning\n")
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(script)], capture_output=True, text=True)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr
