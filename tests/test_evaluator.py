"""evaluation/evaluator.py: ``DMPOEvaluator``, the protocol run of ``trainer.test`` and the report it writes.

The test and calibration loaders are told apart by the split their batches name, never by position; the
report folder is checked before the evaluation runs (a file, an unwritable folder), filled only once the
evaluation succeeded (a failed write leaves no partial folder, the results are printed first) and never
overwrites a report; untrained weights are evaluated only on request; ``time_early_exit`` times the real
early exit into the report.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from support.builders import ONE_EPOCH, TINY_CONFIG, evaluator, tiny_module
from torch.utils.data import DataLoader

from dmpo_lightning import BenchmarkDataModule
from dmpo_lightning.cli import main
from dmpo_lightning.constants import SPLIT_KEY
from dmpo_lightning.data import SplitTagged
from dmpo_lightning.evaluation import report as report_module
from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions

TINY = TINY_CONFIG


@pytest.fixture
def data() -> BenchmarkDataModule:
    dm = BenchmarkDataModule(
        dataset="synthetic",
        synthetic_sizes=(40, 12),
        synthetic_num_classes=4,
        calibration_size=8,
        batch_size=8,
        num_workers=0,
        image_size=32,
    )
    dm.setup()
    return dm


def _trainer(tmp_path: Path) -> Trainer:
    """A trainer whose evaluator writes its report to ``tmp_path/report`` (random weights on purpose)."""
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[evaluator(budgets=[0.75], report_dir=str(tmp_path / "report"))],
    )


def test_test_splits_are_identified_by_name_not_position(data, tmp_path):
    model = tiny_module()
    # calibration first: a positional rule would fit thresholds on the test split and test on calibration
    _trainer(tmp_path).test(model, dataloaders=[data.dataloader("calibration"), data.dataloader("test")])
    report = model.test_report
    assert report is not None
    assert report["num_test"] == 12 and report["num_calibration"] == 8
    assert (tmp_path / "report" / "thresholds.json").is_file()


class _Untagged(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        item.pop(SPLIT_KEY)
        return item


def _loader(dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=8)


@pytest.mark.parametrize(
    ("loaders", "match"),
    [
        (
            lambda d: [_Untagged(d.split_dataset("test")), _Untagged(d.split_dataset("calibration"))],
            r"test dataloader 0 of 2 yields batches without a 'split' entry, so the test and calibration "
            r"splits cannot be told apart",
        ),
        (
            lambda d: [
                d.split_dataset("test"),
                d.split_dataset("calibration"),
                d.split_dataset("calibration"),
            ],
            r"test dataloaders 1 and 2 both hold 'calibration' samples; give exactly one loader per split",
        ),
        (
            lambda d: [d.split_dataset("calibration")],
            r"no test loader yielded samples of split 'test' \(only 'calibration'\)",
        ),
        (
            lambda d: [d.split_dataset("test"), d.split_dataset("train")],
            r"test dataloader 1 yields samples of split 'train'; allowed in `test` are 'test' and "
            r"'calibration'",
        ),
    ],
    ids=["untagged", "two_calibration_loaders", "calibration_only", "train_split"],
)
def test_ambiguous_test_loaders_are_refused(data, tmp_path, loaders, match):
    model = tiny_module()
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path).test(model, dataloaders=[_loader(d) for d in loaders(data)])
    assert not (tmp_path / "report" / "thresholds.json").exists()


def test_split_tagged_wraps_custom_datasets(data, tmp_path):
    model = tiny_module()
    test = SplitTagged(_Untagged(data.split_dataset("test")), "test")
    cal = SplitTagged(_Untagged(data.split_dataset("calibration")), "calibration")
    _trainer(tmp_path).test(model, dataloaders=[_loader(cal), _loader(test)])
    assert model.test_report["num_test"] == 12 and model.test_report["num_calibration"] == 8
    with pytest.raises(ValueError, match="split must be 'train', 'calibration' or 'test', got 'val'"):
        SplitTagged(test, "val")


def test_a_single_untagged_test_loader_is_the_test_split(data, tmp_path):
    model = tiny_module()
    with pytest.warns(UserWarning, match="no calibration split was evaluated"):
        _trainer(tmp_path).test(model, dataloaders=_loader(_Untagged(data.split_dataset("test"))))
    assert model.test_report["num_test"] == 12 and model.test_report["num_calibration"] == 0


@pytest.mark.slow
def test_a_failed_report_write_leaves_no_partial_folder_and_the_table_is_printed(
    tmp_path, monkeypatch, capsys
):
    cli = main(["fit", "-c", TINY, *ONE_EPOCH])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    report = tmp_path / "report"
    args = ["test", "-c", TINY, f"--ckpt_path={ckpt}", f"--evaluation.report_dir={report}"]

    def disk_full(*args, **kwargs):  # the plot is the 4th of 5 files: report.json, curve.csv, thresholds.json
        raise OSError(errno.ENOSPC, "No space left on device")

    capsys.readouterr()
    with monkeypatch.context() as mp:
        mp.setattr(report_module, "plot_curve", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            main(args)
    out = capsys.readouterr().out
    assert "Early-exit evaluation: results on the test split" in out  # the results were printed first
    assert "Budgeted early exit" in out or "budget" in out.lower()
    assert not report.exists()
    assert not [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".report")
    ]  # no temporary folder left

    main(args)  # the rerun is not blocked
    # reliability.png is written only with calibration: temperature
    assert sorted(p.name for p in report.iterdir()) == sorted(
        set(report_module.REPORT_FILES) - {"reliability.png"}
    )


def test_report_goes_into_an_existing_empty_folder(tmp_path):
    cli = main(["fit", "-c", TINY, *ONE_EPOCH, "--trainer.limit_train_batches=1"])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    for folder in ("empty", "notes"):
        main(
            [
                "test",
                "-c",
                TINY,
                f"--ckpt_path={ckpt}",
                f"--evaluation.report_dir={tmp_path / folder}",
            ]
        )
        written = {p.name for p in (tmp_path / folder).iterdir()}
        assert set(report_module.REPORT_FILES) - {"reliability.png"} <= written
    assert (tmp_path / "notes" / "readme.txt").read_text() == "mine"


@pytest.mark.skipif(
    hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0, reason="root writes"
)
def test_a_read_only_report_dir_fails_before_the_evaluation(tmp_path):
    cli = main(["fit", "-c", TINY, *ONE_EPOCH, "--trainer.limit_train_batches=1"])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"report_dir .*locked/report cannot be written .*not writable"):
            main(
                [
                    "test",
                    "-c",
                    TINY,
                    f"--ckpt_path={ckpt}",
                    f"--evaluation.report_dir={locked}/report",
                ]
            )
    finally:
        locked.chmod(0o700)


def test_an_unwritable_report_dir_fails_before_the_evaluation(tmp_path, monkeypatch, capsys):
    """As root every folder is writable, so the write probe fails here the way a read-only folder does."""
    cli = main(["fit", "-c", TINY, *ONE_EPOCH, "--trainer.limit_train_batches=1"])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    mkdtemp = tempfile.mkdtemp

    def read_only(*args, **kwargs):  # tmp_path, where locked/report would be made (not the log folder runs/)
        probe = str(kwargs.get("prefix", "")).startswith(".dmpo-write-check-")
        if probe and os.path.samefile(kwargs.get("dir", "."), tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return mkdtemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    capsys.readouterr()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(
        ValueError, match=r"report_dir .*/locked/report cannot be written \(.* is not writable: "
    ):
        main(
            [
                "test",
                "-c",
                TINY,
                f"--ckpt_path={ckpt}",
                f"--evaluation.report_dir={tmp_path}/locked/report",
            ]
        )
    assert "Early-exit evaluation" not in capsys.readouterr().out  # failed before the evaluation ran
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_untrained_evaluation_only_on_request(tmp_path):
    report = tmp_path / "untrained"
    main(["test", "-c", TINY, "--evaluation.allow_untrained=true", f"--evaluation.report_dir={report}"])
    assert json.loads((report / "report.json").read_text())["checkpoint_hash"].startswith("weights:")


@pytest.mark.slow
def test_dmpo_test_times_the_real_early_exit_into_the_report(tmp_path):
    args = ["-c", TINY_CONFIG, "--evaluation.time_early_exit=16", "--evaluation.allow_untrained=true"]
    cli = main([*args, f"--evaluation.report_dir={tmp_path / 'r'}"], run=False)
    timing = DMPOEvaluator(cli.config_init["evaluation"])
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[timing]
    )
    trainer.test(cli.model, datamodule=cli.datamodule)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    speed = report["early_exit_speed"]
    assert speed["images"] == 16 and speed["device"].startswith("cpu")
    assert [r["budget"] for r in speed["budgets"]] == [b["budget"] for b in report["budgets"]] == [0.5, 0.75]
    for r in speed["budgets"]:
        assert r["full_ms_per_image"] > 0 and r["early_ms_per_image"] > 0 and r["engine_ms_per_image"] > 0
        assert sum(r["exit_histogram"]) == 16 and r["flops_speedup"] >= 1


def test_time_early_exit_option_is_validated():
    with pytest.raises(ValueError, match="time_early_exit must be an integer >= 0"):
        EvaluationOptions(time_early_exit=-1)
