"""Issue 28, pattern 7: checkpoints appear under their name only when complete; full or read-only disks.

Lightning writes a checkpoint into the system's temporary folder and moves it; across file systems the move is
a copy into the final name, so a disk that filled up left ``epoch=1-step=4.ckpt`` truncated under a valid
name. DMPOModule brings :class:`~dmpo_lightning.callbacks.AtomicCheckpoints`, which writes each checkpoint
into a hidden file in its own folder and renames it. A disk that fails during a command gives one sentence
naming the file (status 1); an output folder that cannot be written is refused before any work (status 2).
"""

from __future__ import annotations

import errno
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from support.builders import TINY_MODULE
from support.runs import make_run

from dmpo_lightning import BenchmarkDataModule, DMPOModule
from dmpo_lightning.callbacks import AtomicCheckpointIO
from dmpo_lightning.console import console_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
ONE_EPOCH = ["--trainer.max_epochs=1", "--model.init_args.schedule.switch_epoch=0"]

real_save = torch.save


def disk_fills_after(limit: int):
    """A ``torch.save`` whose file stops taking bytes after ``limit`` of them, as a full disk does."""

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)):
            return real_save(obj, f, *args, **kwargs)
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:limit])
        raise OSError(errno.ENOSPC, "No space left on device")  # as write(2) reports it: no file name

    return save


def _run(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["dmpo", *argv])
    with pytest.raises(SystemExit) as info:
        console_main()
    return int(info.value.code), capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_written_whole_leaves_nothing_under_its_name(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "epoch=1-step=4.ckpt"
    state = {"state_dict": {"w": torch.randn(64, 64)}, "global_step": 4}
    monkeypatch.setattr(torch, "save", disk_fills_after(1000))
    with pytest.raises(OSError, match="No space left on device") as info:
        AtomicCheckpointIO().save_checkpoint(state, target)
    assert info.value.filename == str(target)  # named by the file the user knows, not the temporary one
    assert list(target.parent.iterdir()) == []  # neither a truncated checkpoint nor a temporary file

    monkeypatch.setattr(torch, "save", real_save)
    AtomicCheckpointIO().save_checkpoint(state, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], state["state_dict"]["w"])
    assert [p.name for p in target.parent.iterdir()] == [target.name]


class CustomIO(TorchCheckpointIO):
    pass


@pytest.mark.parametrize("plugin", [None, CustomIO], ids=["default", "own_checkpoint_io"])
def test_dmpo_module_brings_the_atomic_writer_unless_the_trainer_has_its_own(plugin, tmp_path):
    dm = BenchmarkDataModule(
        dataset="synthetic", synthetic_sizes=(24, 8), synthetic_num_classes=4, calibration_size=8,
        batch_size=8, num_workers=0, image_size=32,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        plugins=[plugin()] if plugin else None,
    )  # fmt: skip
    trainer.fit(DMPOModule(**TINY_MODULE, schedule={"switch_epoch": 0}), datamodule=dm)
    expected = AtomicCheckpointIO if plugin is None else CustomIO
    assert type(trainer.strategy.checkpoint_io) is expected
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert ckpt.name == "epoch=0-step=1.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 1


def test_a_full_disk_during_fit_is_one_sentence_and_leaves_no_truncated_checkpoint(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(torch, "save", disk_fills_after(4096))
    status, err = _run(monkeypatch, capsys, "fit", "-c", TINY, *ONE_EPOCH)
    folder = Path("runs", "dmpo", "version_0", "checkpoints")  # relative to the working folder, tmp_path
    assert status == 1, err[-2000:]
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line == (
        f"dmpo fit: error: cannot write {folder / 'epoch=0-step=2.ckpt'}: the disk is full (No space left "
        "on device); free space there, or write somewhere else"
    )
    assert "Traceback" not in err
    assert list(folder.iterdir()) == []  # no `epoch=0-step=2.ckpt` of 4096 bytes, no temporary file


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (
            ["fit", "-c", TINY, "--trainer.logger.init_args.save_dir={ro}"],
            "trainer.logger.init_args.save_dir",
        ),
        (
            ["test", "-c", TINY, "--ckpt_path={ckpt}", "--evaluation.report_dir={ro}/report"],
            "evaluation.report_dir",
        ),
        (
            ["predict", "-c", TINY, "--ckpt_path={ckpt}", "--evaluation.predictions_file={ro}/p.csv"],
            "evaluation.predictions_file",
        ),
        (["export", "--ckpt_path={ckpt}", "--thresholds={thresholds}", "--output={ro}/art"], "--output"),
    ],
    ids=["fit_log_folder", "test_report_dir", "predict_predictions_file", "export_output"],
)
def test_a_read_only_output_folder_is_refused_before_any_work(argv, option, tmp_path, monkeypatch, capsys):
    """As root every folder is writable, so the write probe fails here the way a read-only folder does."""
    run = make_run(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    mkdtemp = tempfile.mkdtemp

    def probe(*args, **kwargs):
        if str(kwargs.get("dir", "")).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system")
        return mkdtemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", probe)
    words = [a.format(ro=read_only, ckpt=run["ckpt"], thresholds=run["thresholds"]) for a in argv]
    status, err = _run(monkeypatch, capsys, *words)
    assert status == 2, err[-2000:]
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "is not writable: Read-only file system" in line, line
    assert f"{option} must be a writable location" in line, line
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p != read_only)
    assert after == before  # nothing written: no run folder, no empty dmpo_predict folder in the run
