"""The real `dmpo` command in a subprocess: exit statuses, error output and SIGTERM.

- a configuration error prints one ``dmpo <subcommand>: error: ...`` line, no traceback, exit status 2
  (``DMPO_DEBUG=1`` / ``--debug`` show the traceback); a parse error has no dump of the parsed values;
- SIGTERM during ``fit`` exits non-zero (143) and leaves a checkpoint that resumes; during ``predict`` it
  exits 143 and writes no predictions file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from support.runs import make_run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
TESTS = str(ROOT / "tests")


class SlowAfterFirstBatch(pl.Callback):
    """Writes ``started`` after the first training batch, then makes every batch slow (room for a signal)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path("started").touch()
        time.sleep(0.5)


class SlowAfterFirstPredictBatch(pl.Callback):
    """Writes ``started`` after the first predict batch, then makes every batch slow (room for a signal)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        Path("started").touch()
        time.sleep(1.0)


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": path, **extra}


def _dmpo(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmpo_lightning", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=300,
    )


@pytest.mark.slow
def test_a_configuration_error_is_one_line_and_exit_status_2(tmp_path):
    out = _dmpo(tmp_path, "fit", "-c", TINY, "--model.init_args.num_classes=7")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert (
        "dmpo fit: error: model.init_args.num_classes=7 disagrees with the data, which has 4 classes"
        in out.stderr
    )
    assert not list(tmp_path.iterdir())  # nothing written

    debug = _dmpo(tmp_path, "fit", "-c", TINY, "--model.init_args.num_classes=7", DMPO_DEBUG="1")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.slow
def test_a_parse_error_has_no_dump_of_the_parsed_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text().replace("adapter_dim: 8", "adapter_dim: abc"))
    out = _dmpo(tmp_path, "fit", "-c", str(bad))
    assert out.returncode == 2
    assert (
        'Parser key "peft.adapter_dim":' in out.stderr
        and "Expected a <class 'int'>. Got value: abc" in out.stderr
    )
    assert "Given value" not in out.stderr and "'backbone_kwargs'" not in out.stderr  # the dump is gone
    assert len(out.stderr) < 800, out.stderr


def _sigterm_once_started(cwd: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    """Runs ``dmpo <args>``, sends SIGTERM once a callback wrote ``started``; the process and its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmpo_lightning", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (cwd / "started").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"dmpo {args[0]} did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err


@pytest.mark.slow
def test_sigterm_during_fit_exits_non_zero_with_a_resumable_checkpoint(tmp_path):
    args = ["fit", "-c", TINY, "--trainer.max_epochs=50", "--model.init_args.schedule.switch_epoch=1"]
    args += ["--trainer.limit_train_batches=4", f"--trainer.callbacks+={__name__}.SlowAfterFirstBatch"]
    proc, err = _sigterm_once_started(tmp_path, args)  # mid-epoch 0: no end-of-epoch checkpoint exists yet
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    (ckpt,) = (tmp_path / "runs" / "dmpo" / "version_0" / "checkpoints").glob("*.ckpt")
    assert ckpt.name == "interrupted.ckpt"
    assert f"dmpo fit: stopped by SIGTERM; resume with --ckpt_path {ckpt.relative_to(tmp_path)}" in err
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert 1 <= saved["global_step"] < 4 and saved["epoch"] == 0
    assert {"EpochSeed", "LossWeightScheduler"} <= set(saved["callbacks"])
    assert saved["optimizer_states"] and saved["loops"]["fit_loop"]

    resumed = _dmpo(tmp_path, "fit", "-c", TINY, "--trainer.max_epochs=2", "--trainer.limit_train_batches=4",
                    f"--ckpt_path={ckpt}")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (done,) = (tmp_path / "runs" / "dmpo" / "version_1" / "checkpoints").glob("*.ckpt")
    assert done.name == "epoch=1-step=8.ckpt"  # the rest of epoch 0, then epoch 1


@pytest.mark.slow
def test_sigterm_during_predict_exits_143_and_writes_no_predictions(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "predictions.csv"
    args = ["predict", "-c", TINY, f"--ckpt_path={run['ckpt']}", f"--evaluation.predictions_file={out}"]
    args += ["--data.init_args.batch_size=2", f"--trainer.callbacks+={__name__}.SlowAfterFirstPredictBatch"]
    proc, err = _sigterm_once_started(tmp_path, args)  # after the first of 12 batches
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "dmpo predict: stopped by SIGTERM" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if "predictions" in p.name]  # no partial or temporary file
