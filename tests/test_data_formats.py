"""Every registered dataset loaded through BenchmarkDataModule from fake files in its real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from support.fakes import (
    decode_label,
    write_cifar,
    write_cub,
    write_fashion_mnist,
    write_flowers102,
    write_food101,
    write_image_folder,
    write_imagenet,
    write_stanford_cars,
)
from support.pickles import Payload

from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY
from dmpo_lightning.data import DATASETS, BenchmarkDataModule
from dmpo_lightning.data.registry import dataset_num_classes


def make_dm(dataset: str, root: Path | None, **overrides: object) -> BenchmarkDataModule:
    """Evaluation transforms with mean 0 / std 1, so tensors hold raw pixel values / 255."""
    options = dict(
        dataset=dataset,
        root=None if root is None else str(root),
        num_workers=0,
        batch_size=4,
        calibration_size=2,
        train_augment=False,
        mean=(0.0,),
        std=(1.0,),
        persistent_workers=False,
    )
    options.update(overrides)
    if options.get("val_source") == "dataset":  # the dataset's own split is the calibration split
        options.pop("calibration_size")
    return BenchmarkDataModule(**options)  # type: ignore[arg-type]


def assert_aligned(dm: BenchmarkDataModule, split: str, skip_first_row: bool = False) -> list[int]:
    """Every sample's colour encodes its label; returns the labels of the split."""
    dataset = dm.split_dataset(split)  # type: ignore[arg-type]
    labels = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        image = item[IMAGE_KEY][0, 1:] if skip_first_row else item[IMAGE_KEY][0]
        assert item[INDEX_KEY] == i
        assert decode_label(float(image.mean()) * 255) == item[LABEL_KEY] % 12, (split, i)
        labels.append(item[LABEL_KEY])
    return labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path: Path, name: str) -> None:
    write_cifar(tmp_path, name, per_batch=4)
    dm = make_dm(name, tmp_path)
    assert dm.num_classes == (10 if name == "cifar10" else 100)
    dm.setup("fit")
    assert len(dm.split_dataset("train")) + len(dm.split_dataset("calibration")) == 20
    assert len(dm.split_dataset("test")) == 4
    assert_aligned(dm, "train")
    assert_aligned(dm, "test")
    image = dm.split_dataset("test")[0][IMAGE_KEY]
    assert image.shape == (3, 32, 32)
    # G is an x gradient and B a y gradient in the pickled CHW rows: the HWC reshape must keep them so
    assert torch.allclose(image[1, 5], torch.arange(32) * 8 / 255)
    assert torch.allclose(image[2, :, 5], torch.arange(32) * 8 / 255)
    if name == "cifar10":
        assert dm.classes == tuple(f"c{i}" for i in range(10))


def test_cifar_root_may_point_at_the_batch_folder(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    dm = make_dm("cifar10", tmp_path / "cifar-10-batches-py")
    dm.setup()
    assert len(dm.split_dataset("test")) == 4


@pytest.mark.parametrize("torchvision_layout", [False, True])
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files(tmp_path: Path, torchvision_layout: bool, gz: bool) -> None:
    write_fashion_mnist(tmp_path, n_train=20, n_test=10, torchvision_layout=torchvision_layout, gz=gz)
    dm = make_dm("fashion_mnist", tmp_path, in_chans=1)
    dm.setup()
    image = dm.split_dataset("test")[3][IMAGE_KEY]
    assert image.shape == (1, 28, 28)
    assert torch.allclose(image[0, 0], torch.arange(28) * 9 / 255)  # the gradient row stays the first row
    assert assert_aligned(dm, "test", skip_first_row=True) == [i % 10 for i in range(10)]
    assert len(dm.split_dataset("train")) == 18


def test_fashion_mnist_defaults_to_the_debian_folder() -> None:
    from dmpo_lightning.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, default_root

    if default_root() is None:
        pytest.skip("the Debian package dataset-fashion-mnist is not installed")
    dm = BenchmarkDataModule("fashion_mnist", num_workers=0)
    assert dm.root == DEBIAN_FASHION_MNIST_DIR  # nothing is read before setup


def test_fashion_mnist_subset_is_embedded() -> None:
    dm = BenchmarkDataModule(num_workers=0, batch_size=8)
    assert dm.dataset == "fashion_mnist_subset" and dm.num_classes == 10
    dm.setup()
    assert len(dm.split_dataset("train")) == 9000  # 10,000 minus the default 1,000 calibration images
    assert len(dm.split_dataset("calibration")) == 1000
    assert len(dm.split_dataset("test")) == 2000
    assert dm.classes is not None and dm.classes[9] == "Ankle boot"


def test_food101(tmp_path: Path) -> None:
    write_food101(tmp_path)
    dm = make_dm("food101", tmp_path, image_size=16, calibration_size=1)
    assert dm.num_classes == 101
    dm.setup()
    assert len(dm.split_dataset("test")) == 3
    assert assert_aligned(dm, "test") == [0, 1, 2]
    assert len(assert_aligned(dm, "train")) == 5


def test_flowers102_mat_files(tmp_path: Path) -> None:
    write_flowers102(tmp_path)
    dm = make_dm("flowers102", tmp_path, image_size=16, val_source="dataset")
    assert dm.num_classes == 102
    dm.setup()
    assert dm.calibration_indices is None  # the dataset's own validation split is the calibration split
    assert len(dm.split_dataset("train")) == len(dm.split_dataset("calibration")) == 4
    assert assert_aligned(dm, "test") == [2, 2, 2, 2]  # tstid = images 3, 6, 9, 12 -> label 3 (1-based)
    assert assert_aligned(dm, "calibration") == [1, 1, 1, 1]
    assert_aligned(dm, "train")


def test_cub200(tmp_path: Path) -> None:
    write_cub(tmp_path, num_classes=3, per_class=4)
    dm = make_dm("cub200", tmp_path, image_size=16)
    assert dm.num_classes == 200
    dm.setup()
    assert assert_aligned(dm, "test") == [0, 1, 2]  # the last image of each class is a test image
    assert len(assert_aligned(dm, "train")) == 7 and len(dm.split_dataset("calibration")) == 2
    assert dm.classes == ("001.Bird_0", "002.Bird_1", "003.Bird_2")


def test_stanford_cars_mat_files(tmp_path: Path) -> None:
    write_stanford_cars(tmp_path)
    dm = make_dm("stanford_cars", tmp_path, image_size=16)
    assert dm.num_classes == 196
    dm.setup()
    labels = [dm.split_dataset("test")[i][LABEL_KEY] for i in range(6)]
    assert labels == [(i * 37) % 196 for i in range(6)]
    assert_aligned(dm, "test")
    assert dm.classes is not None and dm.classes[5] == "Car 5"


def test_imagenet_class_folders(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    dm = make_dm("imagenet", tmp_path, image_size=8, calibration_size=100)
    assert dm.num_classes == 1000
    dm.setup()
    assert len(dm.split_dataset("train")) == 900 and len(dm.split_dataset("test")) == 1000
    test = dm.split_dataset("test")
    assert [test[i][LABEL_KEY] for i in (0, 1, 999)] == [0, 1, 999]


@pytest.mark.parametrize("eval_folders", [("val",), ("test",), ("val", "test")])
def test_image_folder(tmp_path: Path, eval_folders: tuple[str, ...]) -> None:
    classes = ["ant", "bee", "cat"]
    write_image_folder(tmp_path, classes, {"train": 3, **dict.fromkeys(eval_folders, 2)})
    dm = make_dm(
        "image_folder", tmp_path, image_size=16, val_source="dataset" if len(eval_folders) == 2 else "holdout"
    )
    assert dm.num_classes == 3
    dm.setup()
    assert dm.classes == tuple(classes)
    assert assert_aligned(dm, "test") == [0, 0, 1, 1, 2, 2]
    assert len(assert_aligned(dm, "train")) == (9 if len(eval_folders) == 2 else 7)
    assert_aligned(dm, "calibration")


def test_image_folder_eval_split_missing_a_class_keeps_labels(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["ant", "bee", "cat"], {"train": 3})
    write_image_folder(tmp_path, ["ant", "bee", "cat"], {"test": 1})
    for path in (tmp_path / "test" / "bee").iterdir():
        path.unlink()
    dm = make_dm("image_folder", tmp_path, image_size=16)
    dm.setup()
    assert assert_aligned(dm, "test") == [0, 2]


def test_synthetic_needs_no_files_and_is_deterministic() -> None:
    dm = BenchmarkDataModule(
        "synthetic",
        num_workers=0,
        synthetic_sizes=(24, 8),
        synthetic_num_classes=4,
        image_size=16,
        train_augment=False,
    )
    assert dm.num_classes == 4
    dm.setup()
    again = BenchmarkDataModule(
        "synthetic",
        num_workers=0,
        synthetic_sizes=(24, 8),
        synthetic_num_classes=4,
        image_size=16,
        train_augment=False,
    )
    again.setup()
    first, second = dm.split_dataset("test")[5], again.split_dataset("test")[5]
    assert torch.equal(first[IMAGE_KEY], second[IMAGE_KEY]) and first[LABEL_KEY] == 1
    assert first[IMAGE_KEY].shape == (3, 16, 16)
    assert len(dm.split_dataset("train")) + len(dm.split_dataset("calibration")) == 24


def test_num_classes_known_without_files() -> None:
    for name, spec in DATASETS.items():
        if spec.num_classes is not None:
            assert dataset_num_classes(spec) == spec.num_classes, name
    expected = {
        "cifar10": 10,
        "cifar100": 100,
        "fashion_mnist": 10,
        "food101": 101,
        "flowers102": 102,
        "cub200": 200,
        "stanford_cars": 196,
        "imagenet": 1000,
    }
    assert {n: DATASETS[n].num_classes for n in expected} == expected


def test_array_dataset_rejects_bad_arrays() -> None:
    from dmpo_lightning.data import ArrayImageDataset

    with pytest.raises(ValueError, match="uint8"):
        ArrayImageDataset(np.zeros((2, 4, 4), dtype=np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="labels must be"):
        ArrayImageDataset(np.zeros((2, 4, 4), dtype=np.uint8), np.zeros(3))


def test_a_crafted_cifar_batch_is_refused_without_running_code(tmp_path, pickle_marker):
    from dmpo_lightning.data.formats import load_cifar

    write_cifar(tmp_path, "cifar10")
    splits = load_cifar(tmp_path, "cifar10")  # the genuine layout (numpy arrays, lists, strings) still loads
    assert len(splits.test) == 4
    crafted = pickle.dumps(Payload(pickle_marker), protocol=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(crafted)
    with pytest.raises(ValueError, match=r"data_batch_3 was not loaded: global .*open is not allowed"):
        load_cifar(tmp_path, "cifar10")
    assert not pickle_marker.exists()
