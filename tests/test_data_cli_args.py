"""The DataModule's signature works with jsonargparse (what LightningCLI builds from it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torchvision.datasets
from jsonargparse import ArgumentParser
from support.fakes import write_cifar

from dmpo_lightning.data import BenchmarkDataModule


@pytest.fixture(scope="module")
def parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(BenchmarkDataModule, "data")
    return parser


@pytest.mark.parametrize(("value", "expected"), [("5000", 5000), ("0.1", 0.1), ("null", None)])
def test_calibration_size_parses_as_int_or_fraction(
    parser: ArgumentParser, value: str, expected: object
) -> None:
    # jsonargparse may give 5000.0 for an `int | float` option depending on what was parsed before in the
    # process; the data module normalises integral floats > 1 to image counts.
    argv = [
        "--data.calibration_size",
        value,
        "--data.dataset",
        "synthetic",
        "--data.synthetic_sizes",
        "[6000, 8]",
    ]
    parsed = parser.parse_args(argv).data
    dm = BenchmarkDataModule(**parsed.as_dict())
    expected_size = expected if expected is not None else dm.spec.default_calibration_size
    assert dm.calibration_size == expected_size and type(dm.calibration_size) is type(expected_size)


def test_config_values_reach_the_datamodule(parser: ArgumentParser) -> None:
    argv = [
        "--data.dataset",
        "synthetic",
        "--data.in_chans",
        "1",
        "--data.mean",
        "[0.5]",
        "--data.std",
        "[0.25]",
        "--data.synthetic_sizes",
        "[16, 4]",
        "--data.synthetic_num_classes",
        "3",
        "--data.num_workers",
        "0",
    ]
    dm = BenchmarkDataModule(**parser.parse_args(argv).data.as_dict())
    assert dm.num_classes == 3 and dm.data_config.mean == (0.5,) and dm.data_config.std == (0.25,)
    assert dm.hparams["synthetic_sizes"] == (16, 4)


def test_unknown_dataset_is_rejected_by_the_parser(parser: ArgumentParser) -> None:
    with pytest.raises(Exception, match="cifar11"):
        parser.parse_args(["--data.dataset", "cifar11"])


def test_prepare_data_downloads_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    def fake_cifar10(root: str, train: bool, download: bool) -> None:
        calls.append((root, train))
        write_cifar(Path(root), "cifar10")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    with pytest.raises(
        FileNotFoundError, match="does not exist"
    ):  # a missing root is fine only when downloading
        BenchmarkDataModule("cifar10", root=str(tmp_path / "c10"), download=False)
    dm = BenchmarkDataModule(
        "cifar10", root=str(tmp_path / "c10"), download=True, num_workers=0, calibration_size=2
    )
    dm.prepare_data()
    assert calls == [(str(tmp_path / "c10"), True), (str(tmp_path / "c10"), False)]
    dm.setup()
    assert len(dm.split_dataset("test")) == 4
    BenchmarkDataModule(
        "cifar10", root=str(tmp_path / "c10"), download=False, calibration_size=2
    ).prepare_data()
    assert len(calls) == 2
