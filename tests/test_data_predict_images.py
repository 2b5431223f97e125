"""``dmpo predict`` on unlabelled images (a folder or a text file of paths) with no training data present.

A tiny model is trained and tested through the CLI on a class-folder dataset, the dataset is deleted, and
``dmpo predict --data.init_args.predict_paths`` runs on ~40 PNG files written here (nested folders, grey and
RGBA images, other sizes, upper-case extensions, one corrupt file). The CSV must hold one row per file with
its path, the class name stored in the checkpoint, the 1-based exit, the counted GFLOPs of that exit, and the
prediction and exit the simulated protocol gives (all-exits forward + exit_scores + assign_exits with the
same thresholds) on the images preprocessed independently with timm's evaluation transform.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from support.builders import TINY_CONFIG
from support.fakes import write_image_folder

from dmpo_lightning.cli import main
from dmpo_lightning.data import BenchmarkDataModule
from dmpo_lightning.data.predict_images import ERROR_KEY, IMAGE_EXTENSIONS, PATH_KEY, list_image_paths
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.files import decode_float
from dmpo_lightning.models.exit_rules import exit_scores
from dmpo_lightning.module import DMPOModule

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG
CLASSES = ["ant", "bee", "cat", "dog"]
BUDGET = 0.5
PREDICTION_HEADER = ["class_index", "class_name", "exit", "confidence", "score", "gflops", "error"]
SPLIT_HEADER = ["index", "label", *PREDICTION_HEADER]
IMAGE_HEADER = ["path", *PREDICTION_HEADER]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fit + test a tiny model on a class-folder dataset, predict its test split, then delete the data."""
    base = tmp_path_factory.mktemp("predict_run")
    old_cwd = os.getcwd()
    os.chdir(base)
    try:
        data = write_image_folder(base / "data", CLASSES, {"train": 10, "test": 3})
        cli = main(
            [
                "fit",
                "-c",
                TINY,
                "--data.init_args.dataset=image_folder",
                f"--data.init_args.root={data}",
                "--data.init_args.calibration_size=12",
                "--test_after_fit=true",
            ]
        )
        log_dir = Path(cli.trainer.log_dir).resolve()
        (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
        thresholds = log_dir / "dmpo_test" / "thresholds.json"
        split_csv = base / "split_predictions.csv"
        main(
            [
                "predict",
                f"--config={log_dir / 'config.yaml'}",
                f"--ckpt_path={ckpt}",
                f"--evaluation.thresholds_file={thresholds}",
                f"--evaluation.predict_budget={BUDGET}",
                f"--evaluation.predictions_file={split_csv}",
            ]
        )
        shutil.rmtree(data)  # from here on no training, calibration or test image exists
    finally:
        os.chdir(old_cwd)
    return {
        "base": base,
        "config": log_dir / "config.yaml",
        "ckpt": ckpt,
        "thresholds": thresholds,
        "split_csv": split_csv,
    }


def _write_new_images(folder: Path) -> dict[str, list[str]]:
    """~40 image files in nested folders; returns the absolute paths by kind."""
    rng = np.random.default_rng(1)
    kinds: dict[str, list[str]] = {"ok": [], "converted": [], "corrupt": []}

    def save(rel: str, size: tuple[int, int], mode: str = "RGB", kind: str = "ok") -> None:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        value = int(rng.integers(20, 235))
        pixels = np.clip(value + rng.integers(-30, 31, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        if mode == "L":
            image = image.convert("L")
        elif mode == "RGBA":
            image = image.convert("RGBA")
        image.save(path)
        kinds[kind].append(os.path.abspath(path))

    for i in range(20):
        save(f"img_{i:02d}.png", (40, 40))
    for i in range(10):
        save(f"nested/a/shot_{i}.PNG", (48, 36))  # upper-case extension, another size and aspect ratio
    for i in range(5):
        save(f"nested/a/b/grey_{i}.png", (32, 32), mode="L", kind="converted")
    save("nested/rgba.png", (40, 40), mode="RGBA", kind="converted")
    save("nested/photo.JPG", (64, 50))
    save("nested/scan.bmp", (30, 30))
    # a PNG cut after 80 bytes: its header is valid, its data is not
    buffer = folder / "nested" / "cut.png"
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(buffer)
    buffer.write_bytes(buffer.read_bytes()[:80])
    kinds["corrupt"].append(os.path.abspath(buffer))
    (folder / "notes.txt").write_text("not an image, not read\n")
    (folder / ".hidden.png").write_bytes(b"hidden files are skipped")
    return kinds


@pytest.fixture(scope="module")
def new_images(run: dict[str, Path]) -> tuple[Path, dict[str, list[str]]]:
    folder = run["base"] / "new_images"
    return folder, _write_new_images(folder)


def _predict(run: dict[str, Path], source: Path, out: Path, *extra: str) -> None:
    main(
        [
            "predict",
            f"--config={run['config']}",
            f"--ckpt_path={run['ckpt']}",
            f"--data.init_args.predict_paths={source}",
            f"--evaluation.thresholds_file={run['thresholds']}",
            f"--evaluation.predict_budget={BUDGET}",
            f"--evaluation.predictions_file={out}",
            *extra,
        ]
    )


def _thresholds(path: Path, budget: float) -> list[float]:
    data = json.loads(path.read_text())
    entry = next(e for e in data["budgets"] if abs(float(e["budget"]) - budget) < 1e-9)
    return [decode_float(t) for t in entry["thresholds"]]


def _simulate(module: DMPOModule, paths: list[str], thresholds: list[float]) -> dict[str, tuple]:
    """Prediction, 1-based exit and confidence per path from the all-exits forward and the protocol.

    The images are preprocessed with timm's own evaluation transform for the backbone's pretrained data
    config at the model's size, not with the package's transform code.
    """
    cfg = timm.data.resolve_data_config(model=module.model.backbone)
    cfg["input_size"] = (3, module.hparams.img_size, module.hparams.img_size)
    transform = timm.data.create_transform(**cfg, is_training=False)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        logits = torch.stack(module(x), dim=1)
    scores, preds = exit_scores(logits, "confidence")  # the rule make_run fitted the thresholds for
    exits = assign_exits(scores, torch.tensor(thresholds, dtype=torch.float64))
    probs = logits.softmax(dim=-1).amax(dim=-1)
    rows = torch.arange(len(paths))
    return {
        p: (int(preds[i, k]), int(k) + 1, float(probs[i, k]))
        for p, i, k in zip(paths, rows.tolist(), exits.tolist(), strict=True)
    }


@pytest.fixture(scope="module")
def folder_run(run, new_images) -> tuple[Path, str]:
    folder, _ = new_images
    out = run["base"] / "folder_predictions.csv"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        _predict(run, folder, out)
    return out, text.getvalue()


@pytest.mark.slow
def test_checkpoint_stores_class_names_and_split_predictions_are_numbered_as_the_report(run):
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == CLASSES
    module = DMPOModule.load_from_checkpoint(run["ckpt"], map_location="cpu")
    assert module.class_names == CLASSES
    header, rows = _read_csv(run["split_csv"])
    assert header == SPLIT_HEADER
    assert len(rows) == 3 * len(CLASSES)
    gflops = module.exit_costs().exit_gflops
    for r in rows:
        k = int(r["exit"])
        assert 1 <= k <= module.num_exits
        assert r["class_name"] == CLASSES[int(r["class_index"])]
        assert float(r["gflops"]) == gflops[k - 1]
    assert sorted(int(r["index"]) for r in rows) == list(range(len(rows)))
    # the same test split and thresholds as the `dmpo test` report: same exit histogram, accuracy and cost
    report = json.loads((run["thresholds"].parent / "report.json").read_text())
    (point,) = [b for b in report["budgets"] if b["budget"] == BUDGET]
    histogram = [sum(int(r["exit"]) == k + 1 for r in rows) for k in range(module.num_exits)]
    assert histogram == point["test_histogram"]
    accuracy = sum(r["class_index"] == r["label"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(point["test_accuracy"])
    assert sum(float(r["gflops"]) for r in rows) / len(rows) == pytest.approx(point["test_cost"])


@pytest.mark.slow
def test_predicting_another_labelled_tree_skips_the_calibration_split_and_warns_on_names(run):
    # the checkpoint's calibration indices (into 40 training images) do not fit this 16-image tree: predict
    # reads only the test split, so they are not checked; its class names differ from the checkpoint's
    other = write_image_folder(run["base"] / "renamed", ["w", "x", "y", "z"], {"train": 4, "test": 1})
    out = run["base"] / "renamed.csv"
    with pytest.warns(UserWarning, match="class names .* differ from the data module's"):
        main(
            [
                "predict",
                f"--config={run['config']}",
                f"--ckpt_path={run['ckpt']}",
                f"--data.init_args.root={other}",
                "--data.init_args.calibration_size=4",
                f"--evaluation.predictions_file={out}",
            ]
        )
    _, rows = _read_csv(out)
    assert {r["class_name"] for r in rows} <= set(CLASSES)


@pytest.mark.slow
def test_predict_on_a_folder_without_the_dataset_matches_the_simulated_protocol(run, new_images, folder_run):
    kinds = new_images[1]
    out, printed = folder_run
    assert not (run["base"] / "data").exists()
    header, rows = _read_csv(out)
    assert header == IMAGE_HEADER
    expected_paths = sorted(kinds["ok"] + kinds["converted"] + kinds["corrupt"])
    assert len(expected_paths) == 39
    assert [r["path"] for r in rows] == expected_paths  # one row per file, sorted, no .txt, no hidden file

    module = DMPOModule.load_from_checkpoint(run["ckpt"], map_location="cpu").eval()
    gflops = module.exit_costs().exit_gflops
    readable = [p for p in expected_paths if p not in kinds["corrupt"]]
    simulated = _simulate(module, readable, _thresholds(run["thresholds"], BUDGET))
    by_path = {r["path"]: r for r in rows}
    for p in readable:
        r = by_path[p]
        pred, exit_number, confidence = simulated[p]
        assert r["error"] == ""
        assert (int(r["class_index"]), int(r["exit"])) == (pred, exit_number), p
        assert r["class_name"] == CLASSES[pred]
        assert float(r["gflops"]) == gflops[exit_number - 1]
        assert float(r["confidence"]) == pytest.approx(confidence, abs=1e-5)
    assert {int(by_path[p]["exit"]) for p in readable} <= set(range(1, module.num_exits + 1))

    (corrupt,) = kinds["corrupt"]
    bad = by_path[corrupt]
    assert bad["error"] and bad["class_index"] == bad["exit"] == bad["gflops"] == bad["class_name"] == ""
    assert "1 not predicted" in printed and corrupt in printed
    assert f"{len(readable)} predicted" in printed
    assert "6 images converted to RGB from another channel layout (L: 5, RGBA: 1)" in printed


@pytest.mark.slow
def test_predict_on_a_list_file_keeps_its_order_and_agrees_with_the_folder_run(run, new_images, folder_run):
    kinds = new_images[1]
    _, folder_rows = _read_csv(folder_run[0])
    by_path = {r["path"]: r for r in folder_rows}
    chosen = [kinds["converted"][2], kinds["ok"][25], kinds["corrupt"][0], kinds["ok"][3], kinds["ok"][3]]
    lists = run["base"] / "lists"
    lists.mkdir()
    entries = [os.path.relpath(p, lists) for p in chosen[:3]] + [chosen[3], ""]
    entries += ["# a comment line", os.path.relpath(chosen[4], lists)]
    (lists / "paths.txt").write_text("\n".join(entries) + "\n")
    out = run["base"] / "list_predictions.csv"
    _predict(run, lists / "paths.txt", out)
    header, rows = _read_csv(out)
    assert header == IMAGE_HEADER
    assert [r["path"] for r in rows] == chosen
    for r in rows:
        other = by_path[r["path"]]
        for key in ("class_index", "class_name", "exit", "gflops", "error"):
            assert r[key] == other[key], (r["path"], key)
        for key in ("confidence", "score"):
            assert (r[key] == other[key] == "") or float(r[key]) == pytest.approx(float(other[key]), abs=1e-5)


@pytest.mark.slow
def test_existing_predictions_file_is_refused_and_kept(run, new_images):
    folder, _ = new_images
    out = run["base"] / "kept.csv"
    out.write_text("user data\n")
    with pytest.raises(FileExistsError, match="exists"):
        _predict(run, folder, out)
    assert out.read_text() == "user data\n"


@pytest.mark.slow
def test_predict_paths_without_a_checkpoint_says_where_the_classes_come_from(run, new_images):
    folder, _ = new_images
    with pytest.raises(ValueError, match=r"number of classes must come from the trained model.*--ckpt_path"):
        main(["predict", f"--config={run['config']}", f"--data.init_args.predict_paths={folder}"])


# ------------------------------------------------------------------------------------------ fast checks
def _datamodule(source: Path | str, **kwargs) -> BenchmarkDataModule:
    options = dict(dataset="image_folder", root="/nonexistent/dataset", image_size=32, num_workers=0)
    return BenchmarkDataModule(**{**options, **kwargs}, predict_paths=str(source))


def _png(path: Path, size=(40, 40), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def test_predict_paths_reads_no_dataset_and_serves_predict_only(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "deep" / "er" / "b.TIFF")
    dm = _datamodule(tmp_path / "imgs")
    assert dm.num_classes is None and dm.classes is None and dm.root is None
    dm.check_num_classes(7)  # nothing to compare with
    with pytest.raises(ValueError, match="serves `dmpo predict` only"):
        dm.setup("fit")
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch[PATH_KEY] == sorted(str(p) for p in (tmp_path / "imgs").rglob("*.*"))
    assert batch[ERROR_KEY] == ["", ""]


def test_grey_model_gets_rgb_files_as_luma(tmp_path):
    path = _png(tmp_path / "rgb.png")
    dm = _datamodule(tmp_path, in_chans=1, mean=(0.5,), std=(0.5,), crop_pct=1.0)
    item = dm.predict_dataset()[0]
    assert item["image"].shape == (1, 32, 32)
    assert item["source_mode"] == "RGB"  # reported as converted
    grey = Image.open(path).convert("L").resize((32, 32), Image.BILINEAR)
    expected = (torch.from_numpy(np.asarray(grey, dtype=np.float32)) / 255 - 0.5) / 0.5
    assert torch.allclose(item["image"][0], expected, atol=1e-5)


def test_small_image_recipe_reports_other_sizes_instead_of_cropping(tmp_path):
    _png(tmp_path / "ok.png", size=(32, 32))
    _png(tmp_path / "big.png", size=(40, 30))
    dm = BenchmarkDataModule(dataset="synthetic", image_size=32, num_workers=0, predict_paths=str(tmp_path))
    items = {Path(i[PATH_KEY]).name: i for i in dm.predict_dataset()}
    assert items["ok.png"][ERROR_KEY] == ""
    assert "40x30 px" in items["big.png"][ERROR_KEY] and "32x32" in items["big.png"][ERROR_KEY]
    assert items["big.png"]["image"].shape == items["ok.png"]["image"].shape == (3, 32, 32)


def test_bad_predict_paths_fail_at_construction_with_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; give a folder of images"):
        _datamodule(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no image files") as err:
        _datamodule(tmp_path / "empty")
    assert all(ext in str(err.value) for ext in IMAGE_EXTENSIONS)
    _png(tmp_path / "there.png")
    listing = tmp_path / "list.txt"
    listing.write_text("there.png\n" + "\n".join(f"gone_{i}.png" for i in range(7)) + "\n")
    with pytest.raises(
        FileNotFoundError, match=r"names 7 of 8 files that do not exist.*gone_0\.png.*\.\.\.$"
    ):
        _datamodule(listing)
    (tmp_path / "blank.txt").write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="names no image"):
        _datamodule(tmp_path / "blank.txt")
    (tmp_path / "binary.dat").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="neither a folder, an image"):
        _datamodule(tmp_path / "binary.dat")


def test_list_image_paths_is_case_insensitive_recursive_and_sorted(tmp_path):
    for name in ("b.JPEG", "a/c.webp", "a/.x/skip.png", "z.Gif", "d.txt", "a/e.tif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    got = [os.path.relpath(p, tmp_path) for p in list_image_paths(tmp_path)]
    assert got == ["a/c.webp", "a/e.tif", "b.JPEG", "z.Gif"]
    assert list_image_paths(tmp_path / "b.JPEG") == [str(tmp_path / "b.JPEG")]


@pytest.mark.slow
def test_ddp_writes_one_file_per_rank_covering_every_image_once(run, new_images, folder_run):
    """Two processes (gloo on CPU): Lightning's predict sampler does not pad, so no image is repeated."""
    folder, _ = new_images
    out = run["base"] / "ddp.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LOCAL_RANK", None)
    args = [
        "predict",
        f"--config={run['config']}",
        f"--ckpt_path={run['ckpt']}",
        f"--data.init_args.predict_paths={folder}",
        f"--evaluation.thresholds_file={run['thresholds']}",
        f"--evaluation.predict_budget={BUDGET}",
        f"--evaluation.predictions_file={out}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "dmpo_lightning", *args],
        cwd=run["base"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert not out.exists()
    shards = [_read_csv(run["base"] / f"ddp.rank{r}.csv") for r in (0, 1)]
    assert all(header == IMAGE_HEADER for header, _ in shards)
    ddp_rows = [r for _, rows in shards for r in rows]
    _, single_rows = _read_csv(folder_run[0])
    assert sorted(r["path"] for r in ddp_rows) == [r["path"] for r in single_rows]
    single = {r["path"]: r for r in single_rows}
    for r in ddp_rows:
        for key in ("class_index", "class_name", "exit", "gflops", "error"):
            assert r[key] == single[r["path"]][key], (r["path"], key)
    assert "[rank 0]" in done.stdout and "[rank 1]" in done.stdout
