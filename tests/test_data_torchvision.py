"""Food-101 and Stanford Cars are indexed by torchvision.datasets; its errors become DatasetLayoutError."""

import json
import shutil
from pathlib import Path

import pytest
from support.fakes import write_food101, write_stanford_cars

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
