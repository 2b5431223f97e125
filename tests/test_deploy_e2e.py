"""End to end: dmpo fit + test (tiny Fashion-MNIST model) -> dmpo export -> predict a folder of 200 PNGs.

The predictor's classes and exits must equal the simulated protocol (all-exit forward, exit scores, first
exit whose score passes the calibrated threshold) on the same images, and the outputs `dmpo test` cached,
on both the PyTorch and the ONNX path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dmpo_lightning.cli import main
from dmpo_lightning.console import console_main
from dmpo_lightning.constants import IMAGE_KEY
from dmpo_lightning.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_subset
from dmpo_lightning.deploy.export import resolve_run
from dmpo_lightning.deploy.format import MANIFEST_FILE
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.models.exit_rules import exit_scores
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.predictions import read_predictions

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
NUM_IMAGES = 200
FIT_ARGS = [
    "fit",
    "-c",
    TINY,
    "--data.init_args.dataset=fashion_mnist_subset",
    "--data.init_args.calibration_size=300",
    "--data.init_args.train_subset=512",
    "--data.init_args.batch_size=64",
    "--data.init_args.eval_batch_size=500",
    "--data.init_args.train_augment=false",
    "--model.init_args.img_size=28",
    "--model.init_args.in_chans=1",
    "--model.init_args.backbone_kwargs={patch_size: 7, embed_dim: 32, depth: 4, num_heads: 2}",
    "--model.init_args.peft.method=full",
    "--evaluation.budgets=[0.5, 0.75, 1.0]",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=8",
    "--test_after_fit=true",
]


@pytest.mark.slow
def test_fit_test_export_predict_a_folder_of_pngs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    cli = main(FIT_ARGS)
    run = Path(cli.trainer.log_dir)
    art = tmp_path / "artefact"
    monkeypatch.setattr(sys, "argv", ["dmpo", "export", "--run", str(run), "--output", str(art), "--onnx"])
    console_main()
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    assert manifest["class_names"] == list(FASHION_MNIST_CLASSES)
    assert manifest["preprocessing"]["input_size"] == [1, 28, 28]

    # 200 test images as PNG files in nested folders
    images = load_fashion_mnist_subset().test_images[:NUM_IMAGES]
    folder = tmp_path / "new_images"
    for i, pixels in enumerate(images):
        sub = folder / f"part{i // 50}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(sub / f"img_{i:03d}.png")

    # the simulated protocol on the data module's own test images, with the same checkpoint and thresholds
    found = resolve_run(str(run))
    module = DMPOModule.load_from_checkpoint(found.ckpt_path, map_location="cpu").eval()
    view = cli.datamodule.split_dataset("test")
    x = torch.stack([view[i][IMAGE_KEY] for i in range(NUM_IMAGES)])
    with torch.no_grad():
        scores, preds = exit_scores(module(x), manifest["exit_rule"])
    cached = torch.load(run / "dmpo_test" / "exit_outputs.pt", weights_only=True)["test"]
    order = torch.argsort(cached["index"])[:NUM_IMAGES]
    torch.testing.assert_close(scores, cached["scores"][order], atol=1e-5, rtol=0)  # = what dmpo test saw
    thresholds = json.loads(Path(found.thresholds).read_text())["budgets"]

    spread = set()
    for backend in ("torch", "onnx"):
        predictor = EarlyExitPredictor.load(art, budget=0.5, backend=backend)
        for entry in thresholds:
            predictor.set_budget(entry["budget"])
            t = torch.tensor([float(v) for v in entry["thresholds"]], dtype=scores.dtype)
            exits = assign_exits(scores, t)
            expected = preds[torch.arange(NUM_IMAGES), exits]
            rows = list(predictor.predict_paths(folder, batch_size=64))
            assert len(rows) == NUM_IMAGES
            index = [int(Path(r.path).stem.split("_")[1]) for r in rows]
            assert sorted(index) == list(range(NUM_IMAGES))
            got_class = torch.tensor([r.class_index for r in rows])
            got_exit = torch.tensor([r.exit for r in rows])
            assert int((got_class != expected[index]).sum()) == 0, (backend, entry["budget"])
            assert int((got_exit != exits[index] + 1).sum()) == 0, (backend, entry["budget"])
            assert [r.class_name for r in rows] == [FASHION_MNIST_CLASSES[c] for c in got_class]
            costs = manifest["costs"]["exit_gflops"]
            assert [r.gflops for r in rows] == pytest.approx([costs[e - 1] for e in got_exit.tolist()])
            spread |= set(got_exit.tolist())
    assert len(spread) >= 2, "the calibrated budgets should use more than one exit"

    # the CSV command gives the same rows (budget 0.5)
    from dmpo_lightning.deploy.predict_cli import main as predict_main

    csv_path = tmp_path / "predictions.csv"
    assert predict_main([str(art), str(folder), "--output", str(csv_path), "--budget", "0.5"]) == 0
    predictor = EarlyExitPredictor.load(art, budget=0.5)
    expected_rows = list(predictor.predict_paths(folder))
    got_rows = read_predictions(str(csv_path))
    assert len(got_rows) == NUM_IMAGES and all(r.error is None for r in got_rows)
    assert got_rows == expected_rows
