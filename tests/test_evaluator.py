"""evaluation/evaluator.py: ``DMPOEvaluator``, the protocol run of ``trainer.test`` and the report it writes.

The test and calibration loaders are told apart by the split their batches name, never by position; the
report folder is checked before the evaluation runs (a file, an unwritable folder), filled only once the
evaluation succeeded (a failed write leaves no partial folder, the results are printed first) and never
overwrites a report; untrained weights are evaluated only on request; ``time_early_exit`` times the real
early exit into the report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from support.builders import TINY_CONFIG, evaluator, tiny_module
from torch.utils.data import DataLoader

from dmpo_lightning import BenchmarkDataModule
from dmpo_lightning.constants import SPLIT_KEY
from dmpo_lightning.data import SplitTagged

TINY = TINY_CONFIG
ONE_EPOCH = ["--trainer.max_epochs=1", "--model.init_args.schedule.switch_epoch=0"]


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
