"""Bad input gives clear errors: what was wrong, where, and what is allowed."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from support.fakes import write_cifar, write_cub, write_image_folder

from dmpo_lightning.data import BenchmarkDataModule, DatasetLayoutError
from dmpo_lightning.errors import ConfigError


def test_unknown_dataset_lists_the_allowed_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown dataset 'cifar11'; choose one of: cifar10, cifar100, .*synthetic"
    ):
        BenchmarkDataModule("cifar11")  # type: ignore[arg-type]


def test_missing_root_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetLayoutError, match=r"'cifar10' needs root=<folder> laid out as root/cifar-10-batches-py"
    ):
        BenchmarkDataModule("cifar10")
    with pytest.raises(
        DatasetLayoutError, match=r"root='.*nowhere' for dataset 'cub200' does not exist; expected"
    ):
        BenchmarkDataModule("cub200", root=str(tmp_path / "nowhere"))


def test_wrong_cifar_layout_lists_missing_files(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(
        DatasetLayoutError, match=r"expected data_batch_1, .* in .*cifar-10-batches-py; missing: data_batch_3"
    ):
        BenchmarkDataModule("cifar10", root=str(tmp_path), num_workers=0)  # refused when built, before setup


def test_corrupt_cifar_batch(tmp_path: Path) -> None:
    import pickle

    write_cifar(tmp_path, "cifar100")
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": [[1, 2, 3]], "fine_labels": [0]}, f)
    with pytest.raises(ValueError, match=r"expected 'data' uint8 \[N, 3072\]"):
        BenchmarkDataModule("cifar100", root=str(tmp_path), num_workers=0).setup()


def test_cub_files_that_disagree(tmp_path: Path) -> None:
    write_cub(tmp_path)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]))
    with pytest.raises(DatasetLayoutError, match="must list the same image ids"):
        BenchmarkDataModule("cub200", root=str(tmp_path), num_workers=0).setup()
    (tmp_path / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing: train_test_split\.txt"):
        BenchmarkDataModule("cub200", root=str(tmp_path), num_workers=0).setup()


def test_labels_out_of_range_are_reported(tmp_path: Path) -> None:
    write_cub(tmp_path, num_classes=3)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace(" 3\n", " 201\n"))
    with pytest.raises(ValueError, match=r"labels in \[0, 200\] but the dataset has 200 classes"):
        BenchmarkDataModule("cub200", root=str(tmp_path), num_workers=0).setup()


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetLayoutError,
        match=r"root='.*missing' for dataset 'image_folder' does not exist; expected root/train/<class>/",
    ):
        BenchmarkDataModule("image_folder", root=str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"expected one sub-folder per class in .*train; found none"):
        BenchmarkDataModule("image_folder", root=str(tmp_path / "empty"))
    write_image_folder(tmp_path / "noeval", ["a", "b"], {"train": 2})
    with pytest.raises(
        DatasetLayoutError, match=r"no evaluation split .* expected .*val.*/<class>/\.\.\. or .*test"
    ):
        BenchmarkDataModule("image_folder", root=str(tmp_path / "noeval"), num_workers=0).setup()
    write_image_folder(tmp_path / "extra", ["a", "b"], {"train": 2, "val": 1})
    write_image_folder(tmp_path / "extra", ["a", "b", "zebra"], {"val": 1})
    with pytest.raises(DatasetLayoutError, match=r"class folders that the training split lacks: \['zebra'\]"):
        BenchmarkDataModule("image_folder", root=str(tmp_path / "extra"), num_workers=0).setup()


def test_imagenet_needs_1000_classes_and_sorted_val(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["n01", "n02"], {"train": 1, "val": 1})
    with pytest.raises(DatasetLayoutError, match="has 2 class folders, expected 1000"):
        BenchmarkDataModule("imagenet", root=str(tmp_path), num_workers=0).setup()
    flat = tmp_path / "flat"
    write_image_folder(flat, ["n01"], {"train": 1})
    (flat / "val").mkdir()
    (flat / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match=r"must be sorted into val/<wnid>/\*\.JPEG"):
        BenchmarkDataModule("imagenet", root=str(flat), num_workers=0).setup()


@pytest.mark.parametrize(
    ("size", "match"),
    [
        (0, "must be positive"),
        (-5, "must be positive"),
        (
            32,
            r"calibration_size=32 \(32 images\) leaves no training data: the 'synthetic' training split",
        ),
        (1.0, r"use an int number of images \(>= 1\) or a float fraction in \(0, 1\)"),
        (2.5, r"use an int number of images"),
        (-0.1, r"use an int number of images"),
    ],
)
def test_bad_calibration_size(size: float, match: str) -> None:
    # refused when the data module is built (before a trainer makes a run folder), naming the option
    with pytest.raises(ConfigError, match=match) as err:
        BenchmarkDataModule("synthetic", synthetic_sizes=(32, 8), calibration_size=size, num_workers=0)
    assert err.value.option == "data.init_args.calibration_size"


def test_val_source_dataset_requires_a_validation_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"val_source='dataset' but 'synthetic' has no validation split"):
        BenchmarkDataModule("synthetic", val_source="dataset")
    write_image_folder(tmp_path, ["a", "b"], {"train": 2, "val": 1})
    with pytest.raises(ValueError, match=r"needs both val/ and test/ folders"):
        BenchmarkDataModule("image_folder", root=str(tmp_path), val_source="dataset", num_workers=0)


def test_bad_loader_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        BenchmarkDataModule("synthetic", batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        BenchmarkDataModule("synthetic", num_workers=-1)
    with pytest.raises(ValueError, match="train_subset must be a positive integer"):
        BenchmarkDataModule("synthetic", train_subset=0)


def test_download_is_refused_where_impossible(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"download=True is not supported for 'imagenet'.*can be downloaded: cifar10"
    ):
        BenchmarkDataModule("imagenet", root=str(tmp_path), download=True)


def test_indices_file_for_another_dataset_or_out_of_range(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"dataset": "cifar10", "indices": [1, 2]}))
    with pytest.raises(
        ValueError, match=r"written for dataset 'cifar10', but this DataModule loads 'synthetic'"
    ):
        BenchmarkDataModule("synthetic", calibration_indices_file=str(other))
    far = tmp_path / "far.json"
    far.write_text(json.dumps({"dataset": "synthetic", "indices": [1, 99]}))
    with pytest.raises(
        ConfigError, match=r"out of range for a training split of 32 images \(allowed 0\.\.31\): \[99\]"
    ):
        BenchmarkDataModule(
            "synthetic", synthetic_sizes=(32, 8), calibration_indices_file=str(far), num_workers=0
        )
    other_size = tmp_path / "other_size.json"
    other_size.write_text(json.dumps({"dataset": "synthetic", "train_size": 40, "indices": [1, 2]}))
    with pytest.raises(ConfigError, match=r"drawn from a training split of 40 images, but this one has 32"):
        BenchmarkDataModule(
            "synthetic", synthetic_sizes=(32, 8), calibration_indices_file=str(other_size), num_workers=0
        )
    with pytest.raises(FileNotFoundError, match=r"is a folder; give the calibration_indices\.json file"):
        BenchmarkDataModule("synthetic", calibration_indices_file=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BenchmarkDataModule("synthetic", calibration_indices_file=str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        BenchmarkDataModule("synthetic", calibration_indices_file=str(tmp_path / "bad.json"))


def test_mat_datasets_explain_the_missing_scipy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    (base / "imagelabels.mat").write_bytes(b"")
    (base / "setid.mat").write_bytes(b"")
    real_import = builtins.__import__

    def no_scipy(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("scipy"):
            raise ImportError("No module named 'scipy'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(ImportError, match="needs scipy, which is not installed: pip install scipy"):
        BenchmarkDataModule("flowers102", root=str(tmp_path), num_workers=0).setup()
