"""Food-101, Flowers-102 and Stanford Cars are indexed by torchvision.datasets; its errors become ours."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.fakes import (
    accept_as_official_flowers102,
    write_flowers102,
    write_food101,
    write_jpeg,
    write_stanford_cars,
)

from dmpo_lightning.data import formats
from dmpo_lightning.data.datasets import ImageListDataset
from dmpo_lightning.data.errors import DatasetLayoutError


def test_food101_is_read_through_torchvision(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets as tvd

    calls = []
    real = tvd.Food101

    def spy(*args, **kwargs):
        calls.append(kwargs["split"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tvd, "Food101", spy)
    write_food101(tmp_path)
    splits = formats.load_food101(tmp_path)
    assert calls == ["train", "test"]
    assert isinstance(splits.train, ImageListDataset) and len(splits.train) == 6 and len(splits.test) == 3
    assert [splits.test[i][1] for i in range(3)] == [0, 1, 2]
    # root given one level deep (the food-101 folder itself) reads the same
    assert len(formats.load_food101(tmp_path / "food-101").train) == 6


def test_food101_missing_images_folder_is_a_layout_error(tmp_path: Path) -> None:
    write_food101(tmp_path)
    shutil.rmtree(tmp_path / "food-101" / "images")
    with pytest.raises(DatasetLayoutError, match=r"Food-101 not found .*missing: images"):
        formats.load_food101(tmp_path)


def test_food101_splits_with_different_classes_are_refused(tmp_path: Path) -> None:
    write_food101(tmp_path)
    test_json = tmp_path / "food-101" / "meta" / "test.json"
    meta = json.loads(test_json.read_text())
    meta.pop("dish_0")
    test_json.write_text(json.dumps(meta))
    with pytest.raises(DatasetLayoutError, match=r"must list the same classes.*dish_0"):
        formats.load_food101(tmp_path)


def test_food101_malformed_json_is_a_layout_error(tmp_path: Path) -> None:
    write_food101(tmp_path)
    (tmp_path / "food-101" / "meta" / "train.json").write_text("{not json")
    with pytest.raises(DatasetLayoutError, match=r"could not be read as root/food-101/"):
        formats.load_food101(tmp_path)


def test_a_folder_torchvision_cannot_find_by_name_is_explained(tmp_path: Path) -> None:
    write_food101(tmp_path)
    renamed = tmp_path / "my_food"
    (tmp_path / "food-101").rename(renamed)
    with pytest.raises(DatasetLayoutError, match=r"torchvision reads <root>/food-101/.*named 'my_food'"):
        formats.load_food101(renamed)


def test_stanford_cars_is_read_through_torchvision(tmp_path: Path) -> None:
    write_stanford_cars(tmp_path, per_split=4)
    splits = formats.load_stanford_cars(tmp_path)
    assert [splits.test[i][1] for i in range(4)] == [(i * 37) % 196 for i in range(4)]
    assert splits.train.classes[5] == "Car 5"


def test_stanford_cars_without_test_annotations_is_a_layout_error(tmp_path: Path) -> None:
    write_stanford_cars(tmp_path, per_split=2)
    (tmp_path / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing: cars_test_annos_withlabels\.mat"):
        formats.load_stanford_cars(tmp_path)


def test_stanford_cars_corrupt_annotations_are_a_layout_error(tmp_path: Path) -> None:
    write_stanford_cars(tmp_path, per_split=2)
    (tmp_path / "stanford_cars" / "devkit" / "cars_train_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetLayoutError, match=r"Stanford Cars under root=.* could not be read"):
        formats.load_stanford_cars(tmp_path)


def _spy(monkeypatch, class_name: str) -> list[str]:
    import torchvision.datasets as tvd

    calls: list[str] = []
    real = getattr(tvd, class_name)

    def spy(*args, **kwargs):
        calls.append(kwargs["split"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tvd, class_name, spy)
    return calls


def test_flowers102_is_read_through_torchvision(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets.flowers102 import Flowers102

    calls = _spy(monkeypatch, "Flowers102")
    write_flowers102(tmp_path, n_images=9)
    splits = formats.load_flowers102(tmp_path)
    assert calls == ["train", "test", "val"]
    assert isinstance(splits.val, ImageListDataset)
    if hasattr(Flowers102, "classes"):  # torchvision's class names (newer releases); else None, as before
        assert splits.train.classes == tuple(Flowers102.classes) and len(splits.train.classes) == 102
    else:
        assert splits.train.classes is None
    # root given one level deep (the flowers-102 folder itself) reads the same
    assert len(formats.load_flowers102(tmp_path / "flowers-102").test) == 3


def test_flowers102_splits_and_labels_follow_setid_and_imagelabels(tmp_path: Path) -> None:
    """As the reader before torchvision: split = setid.mat's list in its order, label = imagelabels - 1."""
    savemat = pytest.importorskip("scipy.io").savemat
    rng = np.random.default_rng(3)
    n = 30
    labels = rng.integers(1, 103, size=n).astype(np.uint8)  # 1-based, any of the 102 classes
    base = tmp_path / "flowers-102"
    for i in range(1, n + 1):
        write_jpeg(base / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1]) % 12)
    order = rng.permutation(np.arange(1, n + 1))  # ids neither sorted nor contiguous per split
    ids = {"train": order[:10], "val": order[10:17], "test": order[17:]}
    savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(
        base / "setid.mat",
        {"trnid": ids["train"][None], "valid": ids["val"][None], "tstid": ids["test"][None]},
    )
    accept_as_official_flowers102(base)
    splits = formats.load_flowers102(tmp_path)
    for name, dataset in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        assert [dataset.path(i) for i in range(len(dataset))] == [
            str(base / "jpg" / f"image_{i:05d}.jpg") for i in ids[name]
        ], name
        assert dataset.labels.tolist() == [int(labels[i - 1]) - 1 for i in ids[name]], name
    image, label = splits.val[0]
    assert image.size == (20, 16) and label == int(labels[ids["val"][0] - 1]) - 1


@pytest.mark.parametrize("edited", ["imagelabels.mat", "setid.mat"])
def test_flowers102_mat_file_that_is_not_the_official_one_is_named(tmp_path: Path, edited: str) -> None:
    write_flowers102(tmp_path, n_images=6)
    path = tmp_path / "flowers-102" / edited
    path.write_bytes(path.read_bytes() + b"\0")  # torchvision's MD5 check (with the fakes' sums) now fails
    with pytest.raises(
        DatasetLayoutError,
        match=rf"Flowers102 under .*flowers-102: {edited} does not match the official release "
        r"\(torchvision checks the MD5 sums.*download it again from https://www\.robots\.ox\.ac\.uk/.* "
        r"\(download=true makes torchvision replace it there\)",
    ):
        formats.load_flowers102(tmp_path)


def test_flowers102_missing_files_are_listed(tmp_path: Path) -> None:
    write_flowers102(tmp_path, n_images=6)
    (tmp_path / "flowers-102" / "setid.mat").unlink()
    shutil.rmtree(tmp_path / "flowers-102" / "jpg")
    with pytest.raises(
        DatasetLayoutError,
        match=r"Flowers102 not found under root=.*: expected jpg, imagelabels\.mat, setid\.mat in "
        r".*flowers-102; missing: jpg, setid\.mat",
    ):
        formats.load_flowers102(tmp_path)


def test_flowers102_in_a_folder_torchvision_cannot_find_by_name_is_explained(tmp_path: Path) -> None:
    write_flowers102(tmp_path, n_images=3)
    (tmp_path / "flowers-102").rename(tmp_path / "oxford_flowers")
    with pytest.raises(DatasetLayoutError, match=r"torchvision reads <root>/flowers-102/.*'oxford_flowers'"):
        formats.load_flowers102(tmp_path / "oxford_flowers")


def test_flowers102_setid_naming_an_unknown_image_is_a_layout_error(tmp_path: Path) -> None:
    savemat = pytest.importorskip("scipy.io").savemat
    write_flowers102(tmp_path, n_images=6)
    base = tmp_path / "flowers-102"
    savemat(base / "setid.mat", {"trnid": [[1, 99]], "valid": [[2, 5]], "tstid": [[3, 6]]})
    accept_as_official_flowers102(base)
    with pytest.raises(
        DatasetLayoutError, match=r"Flowers102 under root=.* could not be read as root/flowers-102/"
    ):
        formats.load_flowers102(tmp_path)
