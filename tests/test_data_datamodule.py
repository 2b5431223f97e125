"""data/datamodule.py: BenchmarkDataModule: batches, channels, the calibration split and its persistence.

Also its signature as jsonargparse reads it (what LightningCLI builds), the split each batch names, data it
refuses (one class, unreadable images, unless ``skip_unreadable_images``).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torchvision.datasets
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from support.builders import TINY_CONFIG, tiny_module
from support.fakes import write_cifar, write_image_folder

from dmpo_lightning.cli import main
from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY, SPLIT_KEY
from dmpo_lightning.data import BenchmarkDataModule, UnreadableImageError
from dmpo_lightning.data.formats import load_image_folder
from dmpo_lightning.errors import ConfigError


def synthetic(**overrides: object) -> BenchmarkDataModule:
    options = dict(
        dataset="synthetic",
        num_workers=0,
        batch_size=8,
        synthetic_sizes=(32, 8),
        synthetic_num_classes=4,
        image_size=8,
        calibration_size=8,
        persistent_workers=False,
    )
    options.update(overrides)
    return BenchmarkDataModule(**options)  # type: ignore[arg-type]


def test_batches_are_dicts_with_the_agreed_keys_and_dtypes() -> None:
    dm = synthetic()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {IMAGE_KEY, LABEL_KEY, INDEX_KEY, SPLIT_KEY}
    assert batch[SPLIT_KEY] == ["train"] * 8  # test_step tells the test and calibration loaders apart by it
    assert batch[IMAGE_KEY].dtype == torch.float32 and batch[IMAGE_KEY].shape == (8, 3, 8, 8)
    assert batch[LABEL_KEY].dtype == torch.int64 and batch[LABEL_KEY].shape == (8,)
    assert batch[INDEX_KEY].dtype == torch.int64 and batch[INDEX_KEY].shape == (8,)
    indices = torch.cat([b[INDEX_KEY] for b in dm.val_dataloader()])
    assert torch.equal(indices, torch.arange(8))  # position within the split, in order


def test_loader_hooks_and_split_names() -> None:
    dm = synthetic(eval_batch_size=3)
    dm.setup("test")
    test_loaders = dm.test_dataloader()
    assert isinstance(test_loaders, list) and len(test_loaders) == 2
    assert dm.test_split_names == ("test", "calibration")
    assert len(test_loaders[0].dataset) == 8 and len(test_loaders[1].dataset) == 8  # type: ignore[arg-type]
    assert test_loaders[0].batch_size == 3
    assert dm.predict_dataloader().dataset is dm.split_dataset("test")
    assert dm.dataloader("calibration").dataset is dm.calibration_dataloader().dataset
    assert len(dm.dataloader("train").dataset) == 24  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split must be"):
        dm.dataloader("val")  # type: ignore[arg-type]


def test_grey_images_are_replicated_to_three_channels() -> None:
    dm = BenchmarkDataModule(num_workers=0, in_chans=3, batch_size=4, train_augment=False)
    dm.setup()
    image = dm.split_dataset("test")[0][IMAGE_KEY]
    assert image.shape == (3, 28, 28)
    mean, std = torch.tensor(dm.data_config.mean), torch.tensor(dm.data_config.std)
    raw = image * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[0], raw[2], atol=1e-6)


def test_rgb_images_become_grey_for_one_channel_models() -> None:
    dm = synthetic(in_chans=1)
    assert dm.data_config.mean == (pytest.approx((0.485 + 0.456 + 0.406) / 3),)
    dm.setup()
    assert dm.split_dataset("test")[0][IMAGE_KEY].shape == (1, 8, 8)


def test_calibration_split_is_deterministic_disjoint_and_seeded() -> None:
    first, second, other = synthetic(), synthetic(), synthetic(seed=1)
    for dm in (first, second, other):
        dm.setup()
    assert first.calibration_indices == second.calibration_indices
    assert first.calibration_indices != other.calibration_indices
    assert first.calibration_indices is not None and len(first.calibration_indices) == 8
    train = first.split_dataset("train").indices  # type: ignore[attr-defined]
    assert set(train.tolist()).isdisjoint(first.calibration_indices)
    assert len(train) + 8 == 32


def test_train_subset_caps_training_images_without_moving_the_calibration_split() -> None:
    full, capped = synthetic(), synthetic(train_subset=5)
    full.setup(), capped.setup()
    assert capped.calibration_indices == full.calibration_indices
    assert len(capped.split_dataset("train")) == 5


def test_calibration_fraction() -> None:
    dm = synthetic(calibration_size=0.25)
    dm.setup()
    assert dm.calibration_indices is not None and len(dm.calibration_indices) == 8


def test_calibration_split_uses_evaluation_transforms() -> None:
    dm = synthetic(image_size=8, train_augment=True)
    dm.setup()
    calibration = dm.split_dataset("calibration")
    train_view = dm.split_dataset("train")
    names = [type(t).__name__ for t in calibration.transform.transforms]  # type: ignore[attr-defined]
    assert (
        "RandomCrop" not in names and "RandomResizedCrop" not in names and "RandomHorizontalFlip" not in names
    )
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in train_view.transform.transforms]  # type: ignore[attr-defined]
    torch.manual_seed(1)
    a = calibration[0][IMAGE_KEY]
    torch.manual_seed(2)
    assert torch.equal(a, calibration[0][IMAGE_KEY])


def test_state_dict_round_trip_restores_and_rebuilds_lazily() -> None:
    source = synthetic(seed=3)
    source.setup()
    state = source.state_dict()
    assert state["dataset"] == "synthetic" and state["seed"] == 3
    assert state["calibration_indices"] == list(source.calibration_indices or ())

    target = synthetic(seed=0)
    target.setup()
    old_loader = target.val_dataloader()
    with pytest.warns(UserWarning, match="differs"):
        target.load_state_dict(state)
    assert target.calibration_indices == source.calibration_indices
    new_train = set(target.split_dataset("train").indices.tolist())  # type: ignore[attr-defined]
    assert new_train.isdisjoint(target.calibration_indices or ())
    assert target.val_dataloader().dataset is not old_loader.dataset
    assert target.split_dataset("calibration").indices.tolist() == list(source.calibration_indices or ())  # type: ignore[attr-defined]


def test_load_state_dict_applies_the_checkpoints_split() -> None:
    source = synthetic(seed=5)
    source.setup()
    target = synthetic()
    with pytest.warns(UserWarning, match="differs"):
        target.load_state_dict(source.state_dict())
    target.setup()
    assert target.calibration_indices == source.calibration_indices


def test_state_drawn_from_another_training_split_is_ignored_with_a_warning() -> None:
    dm = synthetic()
    before = dm.calibration_indices
    with pytest.warns(UserWarning, match="drawn from a training split of 40 images, this one has 32"):
        dm.load_state_dict({"dataset": "synthetic", "train_size": 40, "calibration_indices": [0, 1]})
    assert dm.calibration_indices == before


def test_state_for_another_dataset_is_ignored_with_a_warning() -> None:
    dm = synthetic()
    dm.setup()
    before = dm.calibration_indices
    with pytest.warns(UserWarning, match="for dataset 'cifar10'"):
        dm.load_state_dict({"dataset": "cifar10", "calibration_indices": [0, 1]})
    assert dm.calibration_indices == before


def test_indices_file_written_to_the_trainer_log_dir_and_reloaded(tmp_path: Path) -> None:
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu")
    dm = synthetic(seed=7)
    dm.trainer = trainer
    dm.setup("fit")
    path = tmp_path / "calibration_indices.json"
    assert dm.calibration_indices_path == path
    payload = json.loads(path.read_text())
    assert payload["dataset"] == "synthetic" and payload["seed"] == 7 and payload["size"] == 8
    assert payload["indices"] == list(dm.calibration_indices or ())

    reloaded = synthetic(seed=0, calibration_indices_file=str(path))
    reloaded.setup()
    assert reloaded.calibration_indices == dm.calibration_indices


class _TinyClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 8 * 8, 4)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.layer(batch[IMAGE_KEY].flatten(1)), batch[LABEL_KEY])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), batch_size=len(batch[LABEL_KEY]))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("test_loss", self._loss(batch), batch_size=len(batch[LABEL_KEY]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoint_carries_the_split_into_a_test_run(tmp_path: Path) -> None:
    options = dict(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer = Trainer(**options)  # type: ignore[arg-type]
    fit_dm = synthetic(seed=11)
    trainer.fit(_TinyClassifier(), datamodule=fit_dm)
    ckpt = tmp_path / "split.ckpt"
    trainer.save_checkpoint(ckpt)

    test_dm = synthetic(seed=0)  # a different seed would draw a different split
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(**options).test(_TinyClassifier(), datamodule=test_dm, ckpt_path=str(ckpt))  # type: ignore[arg-type]
    assert any("differs" in str(w.message) for w in caught)
    assert test_dm.calibration_indices == fit_dm.calibration_indices
    saved = json.loads((tmp_path / "calibration_indices.json").read_text())
    assert saved["indices"] == list(fit_dm.calibration_indices or ())


def test_cifar_default_calibration_size_is_msdnet_convention(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10", per_batch=4)
    # 5,000 held-out images by default; the 20-image fake cannot hold them, which is said when it is built
    with pytest.raises(ConfigError, match=r"calibration_size=5000 \(5000 images\) leaves no training data"):
        BenchmarkDataModule("cifar10", root=str(tmp_path))
    assert BenchmarkDataModule("cifar10", root=str(tmp_path), download=True).calibration_size == 5000


def test_check_num_classes() -> None:
    dm = synthetic()
    dm.check_num_classes(4)
    with pytest.raises(ValueError, match="model predicts 10 classes but dataset 'synthetic' has 4"):
        dm.check_num_classes(10)


def test_workers_load_the_same_batches() -> None:
    dm = synthetic(num_workers=1, persistent_workers=True, train_augment=False)
    dm.setup()
    loader = dm.val_dataloader()
    assert loader.persistent_workers
    with_worker = torch.cat([b[IMAGE_KEY] for b in loader])
    dm.num_workers = 0
    without = torch.cat([b[IMAGE_KEY] for b in dm.val_dataloader()])
    assert torch.equal(with_worker, without)


def test_batches_name_their_split():
    dm = synthetic()
    dm.setup()
    for split in ("train", "calibration", "test"):
        assert set(next(iter(dm.dataloader(split)))[SPLIT_KEY]) == {split}


def test_one_class_data_and_model_are_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"dataset 'synthetic' has 1 class; classification needs at least 2 "
        r"\(check synthetic_num_classes\)",
    ):
        BenchmarkDataModule(dataset="synthetic", synthetic_num_classes=1, num_workers=0)
    write_image_folder(tmp_path / "one", ["only"], {"train": 2, "test": 1})
    with pytest.raises(ValueError, match=r"dataset 'image_folder' under .*one has 1 class"):
        BenchmarkDataModule(dataset="image_folder", root=str(tmp_path / "one"), num_workers=0)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2 .*got 1"):
        tiny_module(num_classes=1)


def test_one_class_data_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"has 1 class; classification needs at least 2"):
        main(["fit", "-c", TINY_CONFIG, "--data.init_args.synthetic_num_classes=1"])


@pytest.fixture
def broken_folder(tmp_path) -> dict[str, Path]:
    root = write_image_folder(tmp_path / "imgs", ["a", "b"], {"train": 6, "test": 2})
    truncated = root / "train" / "a" / "a_1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = root / "test" / "b" / "b_0.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 20)
    return {"root": root, "truncated": truncated, "garbage": garbage}


def _folder_data(root: Path, **kw) -> BenchmarkDataModule:
    return BenchmarkDataModule(
        dataset="image_folder",
        root=str(root),
        image_size=16,
        batch_size=4,
        calibration_size=2,
        num_workers=0,
        **kw,
    )


@pytest.mark.parametrize("which", ["truncated", "garbage"])
def test_unreadable_image_error_names_the_file(broken_folder, which):
    dm = _folder_data(broken_folder["root"])
    dm.setup()
    splits = load_image_folder(broken_folder["root"])  # the files as the data module reads them
    base = splits.train if which == "truncated" else splits.test
    path = str(broken_folder[which])
    index = next(i for i in range(len(base)) if base.path(i) == path)
    with pytest.raises(
        UnreadableImageError,
        match=rf"cannot read image file {re.escape(path)} .*"
        r"skip_unreadable_images=true",
    ):
        base[index]
    if which == "garbage":  # through the test loader, as training/testing meets it
        with pytest.raises(UnreadableImageError, match=re.escape(path)):
            list(dm.dataloader("test"))


def test_skip_unreadable_images_leaves_them_out_and_reports_them(broken_folder):
    with pytest.warns(  # the files are checked when the data module is built
        UserWarning, match=r"left out 2 unreadable image file\(s\) of 'image_folder': \[.*a_1\.jpg"
    ):
        dm = _folder_data(broken_folder["root"], skip_unreadable_images=True)
    dm.setup()
    train, calibration, test = (len(dm.split_dataset(s)) for s in ("train", "calibration", "test"))
    assert (train + calibration, test) == (11, 3)
    for split in ("train", "calibration", "test"):
        for batch in dm.dataloader(split):
            assert batch["image"].shape[1:] == (3, 16, 16)


def test_unreadable_image_through_the_cli(broken_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(broken_folder["root"] / "test")  # only the truncated training image is left
    shutil.copytree(broken_folder["root"] / "train", broken_folder["root"] / "test")
    args = [
        "fit",
        "-c",
        TINY_CONFIG,
        "--data.init_args.dataset=image_folder",
        f"--data.init_args.root={broken_folder['root']}",
        "--data.init_args.calibration_size=2",
        "--trainer.limit_train_batches=null",
        "--trainer.max_epochs=1",
        "--model.init_args.schedule.switch_epoch=0",
    ]
    with pytest.raises(UnreadableImageError, match=r"cannot read image file .*a_1\.jpg"):
        main(args)


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
