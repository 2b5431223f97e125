"""List-file datasets: ``image_list`` and VTAB-1k (the common release layout), their protocol and errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
import yaml
from PIL import Image
from support.builders import TINY_CONFIG
from support.fakes import VTAB_FAKE_SIZES, labels_of, write_image_list, write_list, write_vtab1k

from dmpo_lightning.cli import main
from dmpo_lightning.console import console_main
from dmpo_lightning.constants import IMAGE_KEY
from dmpo_lightning.data import BenchmarkDataModule, DatasetLayoutError
from dmpo_lightning.data.list_files import VTAB1K_GROUPS, VTAB1K_TASKS
from dmpo_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RAW = dict(num_workers=0, batch_size=4, mean=(0.0,), std=(1.0,), persistent_workers=False, image_size=16)
"""Mean 0 / std 1: tensors hold pixel values / 255, so the colour that encodes a label can be read back."""


# ------------------------------------------------------------------------------------------- image_list
def test_image_list_reads_lists_and_class_names(tmp_path: Path) -> None:
    write_image_list(tmp_path, num_classes=3)
    dm = BenchmarkDataModule("image_list", root=str(tmp_path), classes_file="classes.txt", **RAW)
    assert dm.num_classes == 3 and dm.classes == ("class 0", "class 1", "class 2")
    assert labels_of(dm, "test") == [0, 1, 2, 0, 1, 2]  # list order kept
    assert len(labels_of(dm, "train")) + len(labels_of(dm, "calibration")) == 9  # 10 % held out of 9 -> 1


def test_image_list_without_class_names_counts_the_largest_label(tmp_path: Path) -> None:
    write_image_list(tmp_path, num_classes=4, classes=False)
    dm = BenchmarkDataModule("image_list", root=str(tmp_path), calibration_size=2, **RAW)
    assert dm.num_classes == 4 and dm.classes is None


def test_image_list_val_list_is_the_calibration_split_with_val_source_dataset(tmp_path: Path) -> None:
    write_image_list(tmp_path, num_classes=3)
    dm = BenchmarkDataModule(
        "image_list", root=str(tmp_path), val_list="val.txt", val_source="dataset", **RAW
    )
    assert labels_of(dm, "calibration") == [0, 1, 2]
    assert len(dm.split_dataset("train")) == 9  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"has no validation split \(image_list needs a val_list\)"):
        BenchmarkDataModule("image_list", root=str(tmp_path), val_source="dataset", **RAW)


def test_image_list_absolute_list_paths_and_comments(tmp_path: Path) -> None:
    write_image_list(tmp_path / "data", num_classes=2, sizes={"train": 4, "test": 2}, classes=False)
    lists = tmp_path / "lists"
    write_list(lists / "t.txt", [])
    (lists / "t.txt").write_text("# a comment\n\nimages/train/0000 img.jpg 0\nimages/train/0001 img.jpg 1\n")
    dm = BenchmarkDataModule(
        "image_list",
        root=str(tmp_path / "data"),
        train_list=str(lists / "t.txt"),
        calibration_size=1,
        **RAW,
    )
    assert len(dm.split_dataset("train")) + len(dm.split_dataset("calibration")) == 2  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (
            lambda r: (r / "train.txt").unlink(),
            DatasetLayoutError,
            r"train_list: .*train\.txt does not exist",
        ),
        (
            lambda r: ((r / "train.txt").unlink(), (r / "train.txt").mkdir()),
            DatasetLayoutError,
            r"train\.txt is a folder; expected a list file of '<relative/image/path> <integer label>' lines",
        ),
        (
            lambda r: (r / "test.txt").write_bytes("images/test/\xe9t\xe9.jpg 0\n".encode("latin-1")),
            ConfigError,
            r"test\.txt is not UTF-8 text \(byte 0xe9 on line 1\)",
        ),
        (
            lambda r: (r / "train.txt").write_text(
                "images/train/0000 img.jpg 0\nimages/train/0001 img.jpg x\n"
            ),
            DatasetLayoutError,
            r"train\.txt, line 2: expected '<relative/image/path> <integer label >= 0>'",
        ),
        (
            lambda r: (r / "train.txt").write_text("images/train/0000 img.jpg -1\n"),
            DatasetLayoutError,
            r"line 1: expected",
        ),
        (
            lambda r: (r / "images" / "test" / "0003 img.jpg").unlink(),
            DatasetLayoutError,
            r"test\.txt names 1 image file\(s\) that do not exist .*0003 img\.jpg",
        ),
        (
            lambda r: (r / "test.txt").write_text("\n# nothing\n"),
            DatasetLayoutError,
            r"test\.txt lists no images",
        ),
        (
            lambda r: (r / "classes.txt").write_text("a\nb\n"),
            ConfigError,
            r"has label 2 but classes\.txt names 2 classes",
        ),
        (
            lambda r: (r / "classes.txt").write_text("a\nb\na\n"),
            ConfigError,
            r"repeats class name\(s\) \['a'\]",
        ),
        (lambda r: (r / "classes.txt").write_text("a\n\nb\n"), ConfigError, r"line 2 is blank"),
    ],
)
def test_image_list_errors_name_the_file(tmp_path: Path, damage, error, match: str) -> None:
    write_image_list(tmp_path, num_classes=3)
    damage(tmp_path)
    with pytest.raises(error, match=match):  # refused when the data module is built
        BenchmarkDataModule("image_list", root=str(tmp_path), classes_file="classes.txt", **RAW)


def test_list_options_are_refused_for_other_datasets() -> None:
    with pytest.raises(ValueError, match=r"train_list, classes_file apply to dataset 'image_list' only"):
        BenchmarkDataModule("synthetic", train_list="a.txt", classes_file="c.txt")


# ----------------------------------------------------------------------------------------------- vtab1k
def vtab(root: Path, task: str = "cifar", **overrides: object) -> BenchmarkDataModule:
    return BenchmarkDataModule("vtab1k", root=str(root), task=task, **{**RAW, **overrides})  # type: ignore[arg-type]


def test_vtab1k_default_protocol_trains_on_train800_and_calibrates_on_val200(tmp_path: Path) -> None:
    write_vtab1k(tmp_path, ["cifar"])
    dm = vtab(tmp_path)
    assert dm.num_classes == 100 and dm.val_source == "dataset" and dm.calibration_indices is None
    assert len(labels_of(dm, "train")) == VTAB_FAKE_SIZES["train800"]
    assert labels_of(dm, "calibration") == [0, 1, 2, 0]  # val200.txt, in order
    assert labels_of(dm, "test") == [0, 1, 2, 0, 1, 2]


def test_vtab1k_holdout_draws_calibration_from_all_1000_training_images(tmp_path: Path) -> None:
    write_vtab1k(tmp_path, ["dtd"])
    dm = vtab(tmp_path, "dtd", val_source="holdout", calibration_size=3)
    assert dm.num_classes == 47
    n = VTAB_FAKE_SIZES["train800"] + VTAB_FAKE_SIZES["val200"]  # train800val200.txt
    assert len(dm.calibration_indices or ()) == 3 and len(labels_of(dm, "train")) == n - 3
    with pytest.raises(ConfigError, match=r"calibration_size=200 \(200 images\)"):  # default: val200's size
        vtab(tmp_path, "dtd", val_source="holdout")


def test_vtab1k_protocol_defaults_squash_without_augmentation(tmp_path: Path) -> None:
    write_vtab1k(tmp_path, ["eurosat"])
    dm = vtab(tmp_path, "eurosat", interpolation="bicubic")
    assert dm.resize_mode == "squash" and dm.train_augment is False
    image = Image.new("RGB", (40, 10))
    image.paste((255, 255, 255), (20, 0, 40, 10))  # right half white: a centre crop would cut it
    transform = dm.split_dataset("test").transform  # type: ignore[attr-defined]
    expected = T.ToTensor()(image.resize((16, 16), Image.Resampling.BICUBIC))
    assert torch.allclose(transform(image), expected, atol=1 / 255)
    first = dm.split_dataset("train")[0][IMAGE_KEY]
    assert torch.equal(first, dm.split_dataset("train")[0][IMAGE_KEY])  # no random augmentation
    assert (
        vtab(tmp_path, "eurosat", train_augment=True, resize_mode="center_crop").resize_mode == "center_crop"
    )


def test_vtab1k_accepts_the_task_folder_itself_and_the_alias_folders(tmp_path: Path) -> None:
    write_vtab1k(tmp_path, ["cifar", "oxford_iiit_pet"])
    (tmp_path / "cifar").rename(tmp_path / "cifar100")  # NOAH's scripts name the folder cifar100
    assert vtab(tmp_path).num_classes == 100
    assert vtab(tmp_path / "oxford_iiit_pet", "oxford_iiit_pet").num_classes == 37


def test_vtab1k_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"dataset 'vtab1k' needs task: one of the 19 VTAB-1k tasks \(cifar, "
    ):
        BenchmarkDataModule("vtab1k", root=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"task applies to dataset 'vtab1k' only, but dataset is 'synthetic'"
    ):
        BenchmarkDataModule("synthetic", task="cifar")  # type: ignore[arg-type]
    with pytest.raises(
        DatasetLayoutError,
        match=r"VTAB-1k task 'svhn' not found under .*: expected .*svhn/ holding train800\.txt, val200\.txt, "
        r"train800val200\.txt, test\.txt and images/",
    ):
        vtab(tmp_path, "svhn")
    write_vtab1k(tmp_path, ["svhn"])
    (tmp_path / "svhn" / "val200.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"svhn lacks val200\.txt"):
        vtab(tmp_path, "svhn")
    write_vtab1k(tmp_path, ["patch_camelyon"])
    (tmp_path / "patch_camelyon" / "test.txt").write_text("images/test/000000.jpg 7\n")
    with pytest.raises(
        DatasetLayoutError, match=r"has 2 classes but .*test list has label 7; .*another task"
    ):
        vtab(tmp_path, "patch_camelyon")


def test_vtab1k_calibration_size_needs_holdout(tmp_path: Path) -> None:
    write_vtab1k(tmp_path, ["kitti"])
    with pytest.raises(
        ConfigError, match=r"calibration_size=100 applies to val_source='holdout' only; .*val200"
    ):
        vtab(tmp_path, "kitti", calibration_size=100)


def test_vtab1k_indices_file_of_another_task_is_refused(tmp_path: Path) -> None:
    write_vtab1k(tmp_path / "v", ["dmlab", "kitti"])
    dm = vtab(tmp_path / "v", "dmlab", val_source="holdout", calibration_size=2)
    from dmpo_lightning.data.splits import indices_payload, save_indices

    path = save_indices(
        tmp_path / "cal.json",
        indices_payload("vtab1k", 0, 12, list(dm.calibration_indices or ()), "dmlab"),
    )
    assert vtab(tmp_path / "v", "dmlab", val_source="holdout", calibration_indices_file=str(path))
    with pytest.raises(
        ConfigError, match=r"written for task 'dmlab', but this DataModule loads task 'kitti'"
    ):
        vtab(tmp_path / "v", "kitti", val_source="holdout", calibration_indices_file=str(path))
    assert dm.state_dict()["task"] == "dmlab"
    other = vtab(tmp_path / "v", "kitti", val_source="holdout", calibration_size=2)
    with pytest.warns(
        UserWarning, match=r"for dataset 'vtab1k' task 'dmlab', not dataset 'vtab1k' task 'kitti'"
    ):
        other.load_state_dict(dm.state_dict())


def test_vtab1k_tasks_and_groups_match_the_papers() -> None:
    assert len(VTAB1K_TASKS) == 19
    assert {g: len(t) for g, t in VTAB1K_GROUPS.items()} == {"natural": 7, "specialized": 4, "structured": 8}
    assert [VTAB1K_TASKS[t][1] for t in ("cifar", "sun397", "patch_camelyon", "smallnorb_azi")] == [
        100,
        397,
        2,
        18,
    ]


def test_export_of_a_vtab1k_run_squashes_like_the_data_module(tmp_path: Path) -> None:
    from support.runs import SYNTHETIC_DM, make_run

    from dmpo_lightning.deploy.export import export_artefact
    from dmpo_lightning.deploy.format import MANIFEST_FILE
    from dmpo_lightning.deploy.preprocess import build_eval_transform

    write_vtab1k(tmp_path / "v", ["eurosat"])
    hp = {
        **SYNTHETIC_DM,
        "dataset": "vtab1k",
        "task": "eurosat",
        "root": str(tmp_path / "v"),
        "image_size": 32,
    }
    run = make_run(tmp_path, dm=hp)
    folder = Path(export_artefact(str(tmp_path / "art"), run=str(run["run"])))
    pre = json.loads((folder / MANIFEST_FILE).read_text())["preprocessing"]
    assert pre["crop_mode"] == "squash" and pre["resize"] == [32, 32]
    dm = BenchmarkDataModule(**{k: v for k, v in hp.items()}, num_workers=0)  # type: ignore[arg-type]
    reference = dm.split_dataset("test").transform  # type: ignore[attr-defined]
    image = Image.new("RGB", (50, 20), (10, 200, 30))
    image.paste((250, 250, 250), (30, 0, 50, 20))
    assert torch.equal(build_eval_transform(pre)(image), reference(image))


# ---------------------------------------------------------------------------------------------- the CLI
TINY_MODEL = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.backbone=vit_tiny_patch16_224",
    "--model.init_args.pretrained=false",
    "--model.init_args.img_size=32",
    "--model.init_args.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, mlp_ratio: 2}",
    "--model.init_args.exits.blocks=[1, 2, 3, 4]",
    "--model.init_args.exits.moment_dim=32",
    "--model.init_args.peft.adapter_dim=8",
    "--evaluation.budgets=[0.5, 0.75]",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=4",
]


@pytest.mark.parametrize(  # about 3 s each; one group in the fast subset
    "group", [g if g == "natural" else pytest.param(g, marks=pytest.mark.slow) for g in VTAB1K_GROUPS]
)
def test_vtab1k_group_config_trains_and_tests_on_a_fake_release(group: str, tmp_path: Path) -> None:
    task = VTAB1K_GROUPS[group][-1]
    write_vtab1k(tmp_path / "vtab-1k", [task])
    config = ROOT / "configs" / "experiments" / f"vtab1k_{group}.yaml"
    cli = main(
        [
            "fit",
            "-c",
            str(config),
            f"--data.init_args.root={tmp_path / 'vtab-1k'}",
            f"--data.init_args.task={task}",
            *TINY_MODEL,
        ]
    )
    report = json.loads((Path(cli.trainer.log_dir) / "dmpo_test" / "report.json").read_text())
    assert report["num_test"] == VTAB_FAKE_SIZES["test"]
    assert report["num_calibration"] == VTAB_FAKE_SIZES["val200"]  # val200 calibrates the exits
    assert cli.model.hparams.num_classes == VTAB1K_TASKS[task][1]
    assert [b["budget"] for b in report["budgets"]] == [0.5, 0.75]


@pytest.mark.slow
def test_image_list_config_trains_and_tests(tmp_path: Path) -> None:
    write_image_list(tmp_path / "data", num_classes=3, sizes={"train": 12, "test": 6})
    cli = main(
        [
            "fit",
            "-c",
            str(ROOT / "configs" / "data" / "image_list.yaml"),
            "-c",
            str(ROOT / "configs" / "trainer" / "default.yaml"),
            "-c",
            str(ROOT / "configs" / "model" / "dmpo.yaml"),
            f"--data.init_args.root={tmp_path / 'data'}",
            "--data.init_args.classes_file=classes.txt",
            "--data.init_args.calibration_size=4",
            "--test_after_fit=true",
            *TINY_MODEL,
        ]
    )
    report = json.loads((Path(cli.trainer.log_dir) / "dmpo_test" / "report.json").read_text())
    assert report["num_test"] == 6 and report["num_calibration"] == 4


@pytest.mark.parametrize("size", ["100", "0"])
def test_calibration_size_the_data_cannot_hold_is_one_sentence_before_any_run_folder(
    size: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    tiny = TINY_CONFIG  # 48 synthetic training images
    monkeypatch.setattr(sys, "argv", ["dmpo", "fit", "-c", tiny, f"--data.init_args.calibration_size={size}"])
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "calibration_size" in err
    assert ("leaves no training data" if size == "100" else "must be positive") in err
    assert not (tmp_path / "runs").exists(), "no run folder is made"


def test_experiment_configs_are_the_dmpo_model_with_the_vtab_recipe() -> None:
    dmpo = yaml.safe_load((ROOT / "configs" / "model" / "dmpo.yaml").read_text())["model"]
    for group, tasks in VTAB1K_GROUPS.items():
        config = yaml.safe_load((ROOT / "configs" / "experiments" / f"vtab1k_{group}.yaml").read_text())
        init, data = config["model"]["init_args"], config["data"]["init_args"]
        for key in ("backbone", "pretrained", "img_size", "exits", "peft", "schedule"):
            assert init[key] == dmpo["init_args"][key], key
        assert "evaluation" not in init  # evaluation settings are not the model's (the defaults apply)
        assert init["optimizer"]["init_args"] == {"lr": 0.001, "weight_decay": 0.0001}
        assert data["dataset"] == "vtab1k" and data["task"] == tasks[0] and data["val_source"] == "dataset"
        assert data["train_augment"] is False and data["resize_mode"] == "squash"
        assert config["trainer"]["max_epochs"] == 100 and data["batch_size"] == 64


def test_list_images_are_decoded_by_the_one_decoder(tmp_path: Path) -> None:
    """16-bit images are scaled (not clipped to white) and non-finite pixels refused, naming the file."""
    import numpy as np

    from dmpo_lightning.data import UnreadableImageError

    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((16, 16), 20 * 257, dtype=np.uint16)).save(tmp_path / "img" / "deep.png")
    nan = np.full((16, 16), 0.5, dtype=np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "img" / "nan.tif")
    write_list(tmp_path / "train.txt", [("img/deep.png", 0), ("img/deep.png", 1), ("img/deep.png", 0)])
    write_list(tmp_path / "test.txt", [("img/deep.png", 0), ("img/nan.tif", 1)])
    dm = BenchmarkDataModule("image_list", root=str(tmp_path), calibration_size=1, **RAW)
    assert float(dm.split_dataset("test")[0][IMAGE_KEY].mean()) * 255 == pytest.approx(20, abs=0.5)
    with pytest.raises(UnreadableImageError, match=r"nan\.tif .*1 of 256 pixels that are not finite"):
        dm.split_dataset("test")[1]
    with pytest.warns(UserWarning, match=r"left out 1 unreadable image file\(s\) of 'image_list'"):
        skipping = BenchmarkDataModule(
            "image_list", root=str(tmp_path), calibration_size=1, skip_unreadable_images=True, **RAW
        )
    assert len(skipping.split_dataset("test")) == 1  # type: ignore[arg-type]
