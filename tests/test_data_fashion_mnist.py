"""idx reader, class-balanced selection and the embedded Fashion-MNIST subset."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from support.fakes import fashion_arrays, write_fashion_mnist, write_idx

from dmpo_lightning.data import DatasetLayoutError, load_fashion_mnist, load_fashion_mnist_subset, read_idx
from dmpo_lightning.data.fashion_mnist import (
    FashionMNISTArrays,
    class_balanced_indices,
    find_fashion_mnist_files,
    make_subset,
)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "x-idx3-ubyte", array, gz=gz)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte"), array)


def test_read_idx_rejects_garbage_and_truncation(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="is not an idx file"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((4, 2), dtype=np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header declares shape"):
        read_idx(tmp_path / "short")


def test_find_files_in_both_layouts(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "plain")
    write_fashion_mnist(tmp_path / "tv", torchvision_layout=True, gz=False)
    assert find_fashion_mnist_files(tmp_path / "plain")["train_images"].name == "train-images-idx3-ubyte.gz"
    assert find_fashion_mnist_files(tmp_path / "tv")["test_labels"].parent.name == "raw"
    arrays = load_fashion_mnist(tmp_path / "plain")
    assert arrays.train_images.shape == (20, 28, 28) and arrays.test_labels.tolist() == list(range(10))


def test_missing_idx_file_names_what_was_expected(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"t10k-labels-idx1-ubyte\[\.gz\].*FashionMNIST/raw"):
        find_fashion_mnist_files(tmp_path)


def test_class_balanced_indices_are_balanced_sorted_and_seeded() -> None:
    labels = np.repeat(np.arange(4), 10)
    first = class_balanced_indices(labels, 3, seed=0)
    assert np.bincount(labels[first]).tolist() == [3, 3, 3, 3]
    assert np.all(np.diff(first) > 0)
    assert np.array_equal(first, class_balanced_indices(labels, 3, seed=0))
    assert not np.array_equal(first, class_balanced_indices(labels, 3, seed=1))
    with pytest.raises(ValueError, match="fewer than per_class=11"):
        class_balanced_indices(labels, 11, seed=0)


def test_make_subset_selects_matching_images_and_labels() -> None:
    images, labels = fashion_arrays(40)
    arrays = FashionMNISTArrays(images, labels, images[:20], labels[:20])
    subset = make_subset(arrays, train_per_class=2, test_per_class=1, seed=0)
    assert subset["train_images"].shape == (20, 28, 28) and subset["test_images"].shape == (10, 28, 28)
    source = subset["train_source_indices"]
    assert np.array_equal(subset["train_labels"], labels[source])
    assert np.array_equal(subset["train_images"], images[source])


def test_embedded_subset_has_the_documented_shape_balance_and_size() -> None:
    asset = resources.files("dmpo_lightning.data").joinpath("assets/fashion_mnist_subset.npz")
    assert len(asset.read_bytes()) <= 8 * 1024 * 1024
    notice = resources.files("dmpo_lightning.data").joinpath("assets/FASHION_MNIST_NOTICE.txt").read_text()
    assert "Permission is hereby granted" in notice and "Zalando" in notice
    arrays = load_fashion_mnist_subset()
    assert arrays.train_images.shape == (10000, 28, 28) and arrays.test_images.shape == (2000, 28, 28)
    assert arrays.train_images.dtype == np.uint8
    assert np.bincount(arrays.train_labels).tolist() == [1000] * 10
    assert np.bincount(arrays.test_labels).tolist() == [200] * 10
    assert not arrays.train_images.flags.writeable  # cached arrays are shared: read-only
