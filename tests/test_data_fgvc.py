"""FGVC: NABirds and Stanford Dogs (official layouts and VPT's splits), VPT's splits for CUB and Cars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from support.fakes import (
    NABIRDS_FAKE_IDS,
    labels_of,
    write_cub,
    write_jpeg,
    write_nabirds,
    write_stanford_dogs,
    write_vpt_splits,
)

from dmpo_lightning.cli import main
from dmpo_lightning.data import BenchmarkDataModule, DatasetLayoutError

ROOT = Path(__file__).resolve().parents[1]
RAW = dict(num_workers=0, batch_size=4, mean=(0.0,), std=(1.0,), persistent_workers=False, image_size=16)


def test_nabirds_official_split_maps_sparse_class_ids_in_order(tmp_path: Path) -> None:
    write_nabirds(tmp_path, per_class=4)
    dm = BenchmarkDataModule("nabirds", root=str(tmp_path), calibration_size=2, train_augment=False, **RAW)
    assert dm.num_classes == 555 and dm.val_source == "holdout"
    assert labels_of(dm, "test") == [0, 1, 2]  # class ids 295, 296, 817 -> labels 0, 1, 2
    assert len(labels_of(dm, "train")) + len(labels_of(dm, "calibration")) == 9
    assert dm.classes == tuple(f"Bird species {c}" for c in NABIRDS_FAKE_IDS)  # from classes.txt


def test_nabirds_vpt_splits_calibrate_on_vpts_val(tmp_path: Path) -> None:
    write_nabirds(tmp_path, per_class=4, vpt=True)
    dm = BenchmarkDataModule("nabirds", root=str(tmp_path / "nabirds"), val_source="dataset", **RAW)
    assert labels_of(dm, "calibration") == [0, 1, 2] and labels_of(dm, "test") == [0, 1, 2]
    assert labels_of(dm, "train") == [0, 0, 1, 1, 2, 2]
    assert dm.classes is not None and dm.classes[2] == "Bird species 817"  # the class-id folder, named


def test_stanford_dogs_official_lists(tmp_path: Path) -> None:
    write_stanford_dogs(tmp_path, per_class=4)
    dm = BenchmarkDataModule("stanford_dogs", root=str(tmp_path), calibration_size=2, **RAW)
    assert dm.num_classes == 120
    assert labels_of(dm, "test") == [0, 1, 2]
    assert dm.classes == ("Chihuahua", "Japanese_spaniel", "Shih-Tzu")


def test_stanford_dogs_vpt_splits(tmp_path: Path) -> None:
    write_stanford_dogs(tmp_path, per_class=5, vpt=True)
    dm = BenchmarkDataModule("stanford_dogs", root=str(tmp_path), val_source="dataset", **RAW)
    assert labels_of(dm, "train") == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert labels_of(dm, "calibration") == [0, 1, 2]
    assert dm.classes == ("Chihuahua", "Japanese_spaniel", "Shih-Tzu")


def test_cub_with_vpt_splits(tmp_path: Path) -> None:
    write_cub(tmp_path, num_classes=3, per_class=4)
    base = tmp_path / "CUB_200_2011"
    rows = [line.split(" ", 1)[1] for line in (base / "images.txt").read_text().splitlines()]
    entries: dict[str, list[tuple[str, object]]] = {"train": [], "val": [], "test": []}
    for k, rel in enumerate(rows):  # 4 images per class: first -> val, last -> test
        entries["val" if k % 4 == 0 else "test" if k % 4 == 3 else "train"].append((rel, 1 + k // 4))
    write_vpt_splits(base, entries)
    dm = BenchmarkDataModule("cub200", root=str(tmp_path), val_source="dataset", **RAW)
    assert labels_of(dm, "calibration") == [0, 1, 2] and len(labels_of(dm, "train")) == 6
    assert dm.classes == ("001.Bird_0", "002.Bird_1", "003.Bird_2")  # the image folders


def test_stanford_cars_with_vpt_splits(tmp_path: Path) -> None:
    base = tmp_path / "stanford_cars"
    entries: dict[str, list[tuple[str, object]]] = {"train": [], "val": [], "test": []}
    for k in range(9):
        rel = f"cars_{'test' if k % 3 == 2 else 'train'}/{k:05d}.jpg"
        write_jpeg(base / rel, k % 3)
        entries[("train", "val", "test")[k % 3]].append((rel, str(k % 3 + 1)))  # string ids sort numerically
    write_vpt_splits(base, entries)
    dm = BenchmarkDataModule("stanford_cars", root=str(tmp_path), val_source="dataset", **RAW)
    assert labels_of(dm, "test") == [2, 2, 2] and labels_of(dm, "calibration") == [1, 1, 1]


@pytest.mark.parametrize(
    ("dataset", "write", "damage", "match"),
    [
        ("nabirds", None, lambda r: None, r"NABirds not found under root=.*: expected root/nabirds/"),
        (
            "nabirds",
            lambda r: write_nabirds(r),
            lambda r: (r / "nabirds" / "train_test_split.txt").unlink(),
            r"NABirds under .* lacks train_test_split\.txt",
        ),
        (
            "nabirds",
            lambda r: write_nabirds(r, vpt=True),
            lambda r: (r / "nabirds" / "val.json").unlink(),
            r"has VPT's split file\(s\) \['train\.json', 'test\.json'\] but lacks \['val\.json'\]",
        ),
        (
            "nabirds",
            lambda r: write_nabirds(r, vpt=True),
            lambda r: (r / "nabirds" / "test.json").write_text("{"),
            r"test\.json is not valid JSON",
        ),
        (
            "stanford_dogs",
            lambda r: write_stanford_dogs(r, vpt=True),
            lambda r: next((r / "stanford_dogs" / "Images").glob("*/*.jpg")).unlink(),
            r"names 1 image file\(s\) that do not exist under .*Images",
        ),
        (
            "stanford_dogs",
            lambda r: write_stanford_dogs(r),
            lambda r: (r / "stanford_dogs" / "lists" / "test_list.mat").unlink(),
            r"lacks train_list\.mat / test_list\.mat",
        ),
        (
            "stanford_dogs",
            lambda r: write_stanford_dogs(r),
            lambda r: (r / "stanford_dogs" / "lists" / "train_list.mat").write_bytes(b"not a mat file"),
            r"train_list\.mat is not a Stanford Dogs list",
        ),
    ],
)
def test_fgvc_layout_errors_name_the_expected_files(tmp_path: Path, dataset, write, damage, match) -> None:
    if write is not None:
        write(tmp_path)
    damage(tmp_path)
    with pytest.raises(DatasetLayoutError, match=match):
        BenchmarkDataModule(dataset, root=str(tmp_path), calibration_size=1, **RAW)


def test_val_source_dataset_without_vpt_splits_says_what_is_missing(tmp_path: Path) -> None:
    write_nabirds(tmp_path)
    with pytest.raises(
        ValueError, match=r"nabirds needs VPT's split files train\.json, val\.json and test\.json"
    ):
        BenchmarkDataModule("nabirds", root=str(tmp_path), val_source="dataset", **RAW)


@pytest.mark.parametrize("dataset", ["nabirds", "stanford_dogs"])
def test_fgvc_experiment_trains_and_tests_on_fakes(dataset: str, tmp_path: Path) -> None:
    writer = {"nabirds": write_nabirds, "stanford_dogs": write_stanford_dogs}[dataset]
    writer(tmp_path / "data", per_class=5, vpt=True)
    config = ROOT / "configs" / "experiments" / f"fgvc_{dataset}.yaml"
    cli = main(
        [
            "fit",
            "-c",
            str(config),
            f"--data.init_args.root={tmp_path / 'data'}",
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.backbone=vit_tiny_patch16_224",
            "--model.init_args.pretrained=false",
            "--model.init_args.img_size=32",
            "--model.init_args.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2}",
            "--model.init_args.exits.blocks=[1, 2, 3, 4]",
            "--model.init_args.exits.moment_dim=32",
            "--model.init_args.peft.adapter_dim=8",
            "--evaluation.budgets=[0.5, 0.75]",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
        ]
    )
    report = json.loads((Path(cli.trainer.log_dir) / "dmpo_test" / "report.json").read_text())
    assert report["num_test"] == 3 and report["num_calibration"] == 3  # VPT's val calibrates the exits


def test_fgvc_experiments_are_the_dmpo_model() -> None:
    dmpo = yaml.safe_load((ROOT / "configs" / "model" / "dmpo.yaml").read_text())["model"]["init_args"]
    for dataset in ("nabirds", "stanford_dogs"):
        config = yaml.safe_load((ROOT / "configs" / "experiments" / f"fgvc_{dataset}.yaml").read_text())
        init = config["model"]["init_args"]
        for key in ("backbone", "pretrained", "img_size", "exits", "peft", "schedule", "optimizer"):
            assert init[key] == dmpo[key], key
        assert config["data"]["init_args"]["dataset"] == dataset
        assert config["data"]["init_args"]["val_source"] == "dataset"
