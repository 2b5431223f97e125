"""Resuming and determinism.

A run interrupted in phase 1 of the loss-weight schedule and resumed with ``dmpo fit --ckpt_path`` switches
phases at the same epoch, continues the learning-rate schedule and ends with bit-identical weights; a run
resumed to train longer (a larger ``trainer.max_epochs``) re-plans the learning-rate schedule for its new
length and says so; a checkpoint loads for test/predict in a fresh process from config + checkpoint alone.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch

from dmpo_lightning.callbacks import EpochSeed, epoch_seed
from dmpo_lightning.cli import main
from dmpo_lightning.module import LR_PLAN_KEY
from dmpo_lightning.predictions import SAMPLE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
PHASE1 = [0.25, 0.5, 0.75, 1.0]  # depth_increasing, 4 exits
PHASE2 = [1.0, 1.0, 1.0, 1.0]  # uniform
COMMON = [
    "-c",
    TINY,
    "--trainer.max_epochs=4",
    "--model.init_args.schedule.switch_epoch=2",
    "--trainer.callbacks+=LearningRateMonitor",
    "--trainer.callbacks.logging_interval=step",
    f"--trainer.callbacks+={__name__}.RecordLossWeights",
]


class CrashAtEpoch(pl.Callback):
    """Simulates a pre-emption: the process dies when ``epoch`` starts (after epoch - 1 was checkpointed)."""

    def __init__(self, epoch: int = 2) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated pre-emption at the start of epoch {self.epoch}")


class RecordLossWeights(pl.Callback):
    """Records the module's ``loss_weights`` buffer as the first training batch of every epoch sees it."""

    seen: ClassVar[dict[int, list[float]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            RecordLossWeights.seen[trainer.current_epoch] = pl_module.loss_weights.tolist()


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _logged_weights(rows: list[dict[str, str]]) -> dict[int, list[float]]:
    out = {}
    for r in rows:
        if r.get("loss_weight/exit_0"):
            out[int(r["epoch"])] = [float(r[f"loss_weight/exit_{k}"]) for k in range(4)]
    return out


def _logged_lr(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        lrs = {k: float(v) for k, v in r.items() if k.startswith("lr-") and v}
        if lrs:
            out.setdefault(int(r["step"]), {}).update(lrs)
    return out


@pytest.mark.slow
def test_resume_in_phase1_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    # A: uninterrupted, 4 epochs, phase 2 from epoch 2.
    RecordLossWeights.seen = {}
    full = main(["fit", *COMMON])
    full_seen = dict(RecordLossWeights.seen)
    full_rows = _metrics(Path(full.trainer.log_dir))

    # B: the same run dies when epoch 2 starts; the default ModelCheckpoint kept the end of epoch 1 (phase 1).
    RecordLossWeights.seen = {}
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        main(["fit", *COMMON, f"--trainer.callbacks+={__name__}.CrashAtEpoch"])
    crashed_seen = dict(RecordLossWeights.seen)
    crashed_dir = tmp_path / "runs" / "dmpo" / "version_1"
    (ckpt,) = (crashed_dir / "checkpoints").glob("*.ckpt")
    assert ckpt.name == "epoch=1-step=4.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["state_dict"]["loss_weights"].tolist() == PHASE1
    assert saved["callbacks"]["EpochSeed"] == {"last_trained_epoch": 1}
    assert saved["callbacks"]["LossWeightScheduler"]["switch_epoch"] == 2

    # C: resume B from its checkpoint with the same config.
    RecordLossWeights.seen = {}
    resumed = main(["fit", *COMMON, f"--ckpt_path={ckpt}"])
    resumed_seen = dict(RecordLossWeights.seen)
    resumed_rows = _metrics(Path(resumed.trainer.log_dir))
    assert resumed.trainer.current_epoch == 4 and resumed.trainer.global_step == full.trainer.global_step == 8

    # Loss weights: the buffer seen by training and the logged values switch at epoch 2 in both runs.
    expected = {0: PHASE1, 1: PHASE1, 2: PHASE2, 3: PHASE2}
    assert full_seen == expected
    assert crashed_seen == {0: PHASE1, 1: PHASE1}
    assert resumed_seen == {2: PHASE2, 3: PHASE2}
    assert _logged_weights(full_rows) == expected
    assert _logged_weights(_metrics(crashed_dir)) == {0: PHASE1, 1: PHASE1}
    assert _logged_weights(resumed_rows) == {2: PHASE2, 3: PHASE2}
    assert resumed.model.loss_weights.tolist() == full.model.loss_weights.tolist() == PHASE2

    # Learning rate: the warm-up + cosine schedule continues where it stopped (same value at every step).
    full_lr, resumed_lr, crashed_lr = (
        _logged_lr(full_rows),
        _logged_lr(resumed_rows),
        _logged_lr(_metrics(crashed_dir)),
    )
    assert sorted(full_lr) == list(range(8)) and sorted(resumed_lr) == [4, 5, 6, 7]
    assert {s: full_lr[s] for s in range(4)} == crashed_lr
    assert {s: full_lr[s] for s in range(4, 8)} == resumed_lr
    trunk = [full_lr[s]["lr-AdamW/trunk"] for s in range(8)]
    assert trunk[4] < trunk[3] and trunk[7] < trunk[4]  # a decaying schedule, not a constant

    # Training curves and final weights are identical, bit for bit (EpochSeed re-seeds every epoch).
    def losses(rows, steps):
        return {
            int(r["step"]): float(r["train/loss"])
            for r in rows
            if r.get("train/loss") and int(r["step"]) in steps
        }

    assert losses(resumed_rows, range(4, 8)) == losses(full_rows, range(4, 8))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    opt_a, opt_b = full.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            other = opt_b["state"][key][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (key, name)


@pytest.mark.slow
def test_resuming_to_train_longer_replans_the_learning_rate_schedule(tmp_path, caplog):
    """Issue 28/1: resumed with a larger max_epochs, training runs to the new end with the LR decayed to 0.

    Before, a short run crashed on resume (``KeyError: '_schedulers'``) and a longer one restored the old
    cosine length, so the LR climbed back to its peak. The warm-up is not run again.
    """
    common = [
        "-c",
        TINY,
        "--model.init_args.warmup_fraction=0.3",
        "--model.init_args.schedule.switch_epoch=1",
    ]
    common += ["--trainer.callbacks+=LearningRateMonitor", "--trainer.callbacks.logging_interval=step"]
    short = main(["fit", *common, "--trainer.max_epochs=2"])
    (ckpt,) = (Path(short.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    assert ckpt.name == "epoch=1-step=4.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved[LR_PLAN_KEY] == {"total_steps": 4, "warmup_steps": 1}  # round(4 * 0.3)

    with caplog.at_level(logging.INFO):
        longer = main(["fit", *common, "--trainer.max_epochs=10", f"--ckpt_path={ckpt}"])
    replanned = [r.getMessage() for r in caplog.records if "re-planned" in r.getMessage()]
    assert replanned == [
        "resuming: the learning-rate schedule is re-planned from 4 to 20 steps (the same warm-up of 1 step; "
        "the cosine decay now ends at step 20)"
    ]
    trainer = longer.trainer
    assert trainer.current_epoch == 10 and trainer.global_step == 20  # trained to the new end
    (scheduler,) = [c.scheduler for c in trainer.lr_scheduler_configs]
    assert scheduler.last_epoch == 20
    assert max(scheduler.get_last_lr()) == pytest.approx(0.0, abs=1e-12)  # decayed to 0 after the last step

    lrs = _logged_lr(_metrics(Path(trainer.log_dir)))
    assert sorted(lrs) == list(range(4, 20))
    trunk = [lrs[s]["lr-AdamW/trunk"] for s in range(4, 20)]
    # the cosine of the new length from step 4 on, after the 1-step warm-up (a warm-up of round(20 * 0.3) = 6
    # steps would start again at 5/6 of the peak and climb)
    expected = [1e-3 * (1 + math.cos(math.pi * (s - 1) / 19)) / 2 for s in range(4, 20)]
    assert trunk == pytest.approx(expected, rel=1e-6)
    assert all(a > b for a, b in itertools.pairwise(trunk))
    assert torch.load(next((Path(trainer.log_dir) / "checkpoints").glob("*.ckpt")), weights_only=True)[
        LR_PLAN_KEY
    ] == {"total_steps": 20, "warmup_steps": 1}


def test_epoch_seed_depends_on_seed_epoch_and_rank(monkeypatch):
    seeds = {epoch_seed(s, e, r) for s in (0, 1) for e in (0, 1, 2) for r in (0, 1)}
    assert len(seeds) == 12 and all(0 <= s < 2**32 for s in seeds)
    assert epoch_seed(0, 3, 1) == epoch_seed(0, 3, 1)

    callback = EpochSeed()
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    callback.load_state_dict({"last_trained_epoch": 4})  # a resume re-seeds for epoch 5
    assert callback.seeded_epoch == 5 and callback.last_seed == epoch_seed(7, 5, 0)
    after_resume = torch.rand(3)
    torch.manual_seed(epoch_seed(7, 5, 0))
    assert torch.equal(after_resume, torch.rand(3))
    assert callback.state_dict() == {"last_trained_epoch": 4}

    monkeypatch.delenv("PL_GLOBAL_SEED")  # no seed_everything: leave the generators alone
    torch.manual_seed(123)
    EpochSeed().load_state_dict({"last_trained_epoch": 0})
    state = torch.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.slow
def test_checkpoint_loads_for_test_and_predict_in_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "-c", TINY, "--trainer.max_epochs=1", "--model.init_args.schedule.switch_epoch=0"])
    log_dir = Path(cli.trainer.log_dir)
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    config = log_dir / "config.yaml"
    script = textwrap.dedent(
        f"""
        import torch
        from dmpo_lightning import DMPOModule
        from dmpo_lightning.cli import main
        module = DMPOModule.load_from_checkpoint({str(ckpt)!r}, map_location="cpu")
        torch.save(module.state_dict(), "loaded_state.pt")
        main(["test", "-c", {str(config)!r}, "--ckpt_path", {str(ckpt)!r}])
        main(["predict", "-c", {str(config)!r}, "--ckpt_path", {str(ckpt)!r}])
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]

    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    loaded = torch.load("loaded_state.pt", weights_only=False)
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)

    # `dmpo test` and `dmpo predict` of the run's checkpoint each wrote a new folder inside that run
    (report,) = (tmp_path / "runs" / "dmpo").glob("version_*/dmpo_test/report.json")
    data = json.loads(report.read_text())
    assert data["num_test"] == 24 and data["num_calibration"] == 16
    assert data["checkpoint_hash"].startswith("file:")
    (predictions,) = (tmp_path / "runs" / "dmpo").glob("version_*/dmpo_predict/predictions.csv")
    lines = predictions.read_text().splitlines()
    assert lines[0] == ",".join(SAMPLE_COLUMNS)  # the one predictions schema
    assert len(lines) == 1 + 24
    assert {line.split(",")[4] for line in lines[1:]} == {"4"}  # no thresholds: all at the last exit
