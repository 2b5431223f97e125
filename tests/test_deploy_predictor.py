"""deploy/predictor.py: ``EarlyExitPredictor`` on an exported artefact.

Its throughput mode (the engine's pooled stages) gives exactly the per-batch early exit's predictions and
exits (and its logits within float noise), rows in input order, also for the last partial batch, one image
and an empty input; it scores with the temperatures the thresholds were calibrated with; budgets, image
files, image sizes, channel counts and tensor shapes it cannot take are refused in one sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.early_exit import TEMPERATURES, record_stage_calls
from support.fakes import write_random_pngs
from support.runs import SYNTHETIC_DM, make_run

from dmpo_lightning.data.transforms import build_transform, resolve_data_config
from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.format import MANIFEST_FILE
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.deploy.preprocess import ImageSizeError
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.models.exit_rules import exit_scores


def _same(a, b) -> None:
    """Two BatchPredictions agree: identical decisions, logits within float32 noise."""
    assert torch.equal(a.prediction, b.prediction)
    assert torch.equal(a.exit, b.exit)
    assert torch.equal(a.gflops, b.gflops)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.score, b.score, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(a.confidence, b.confidence, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("input_batch", "engine_batch"), [(8, None), (8, 16), (5, 3), (1, 4), (64, 64)])
def test_predictor_throughput_mode_equals_the_per_batch_path(
    shared_artefact, monkeypatch, input_batch, engine_batch
):
    r = shared_artefact
    out = r["art"]
    predictor = EarlyExitPredictor.load(out, budget=0.5)
    x = r["x"][:37]  # 37: the last input batch is partial for every size above
    batches = list(torch.split(x, input_batch))
    expected = [predictor(b) for b in batches]
    assert len({e for p in expected for e in p.exit.tolist()}) >= 2, "samples should use several exits"
    calls = record_stage_calls(monkeypatch)
    got = list(predictor.predict_batches(iter(batches), engine_batch_size=engine_batch))
    assert len(got) == len(batches)
    for a, b in zip(got, expected, strict=True):
        assert a.prediction.shape[0] == b.prediction.shape[0]
        _same(a, b)
    full = engine_batch or input_batch
    # pooled: every stage call but the flush at the end of the input runs a full batch
    assert sum(1 for _, n in calls if n != full) <= predictor.num_exits
    if 1 < full <= 16:  # enough samples continue to fill a later stage's batch
        assert any(k > 0 and n == full for k, n in calls), "later stages should run full pooled batches"


def test_predictor_throughput_mode_one_image_and_empty_input(shared_artefact):
    r = shared_artefact
    out = r["art"]
    predictor = EarlyExitPredictor.load(out, budget=0.75)
    (one,) = predictor.predict_batches([r["x"][:1]])
    _same(one, predictor(r["x"][:1]))
    assert list(predictor.predict_batches([])) == []
    with pytest.raises(ValueError, match="empty batch"):
        list(predictor.predict_batches([r["x"][:0]]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(predictor.predict_batches([r["x"]], engine_batch_size=0))


def test_predictor_throughput_mode_is_refused_on_the_onnx_backend(shared_artefact):
    r = shared_artefact
    out = r["art"]
    manifest = json.loads((Path(out) / MANIFEST_FILE).read_text())
    predictor = EarlyExitPredictor(manifest, None, budget=0.5, onnx_stages=object())
    with pytest.raises(ValueError, match="needs the torch backend"):
        next(iter(predictor.predict_batches([r["x"]])))
    with pytest.raises(ValueError, match="needs the torch backend"):
        predictor.predict_paths(["does-not-matter.png"], engine=True)


def test_predict_paths_engine_gives_the_same_rows_in_the_same_order(shared_artefact, tmp_path):
    out = shared_artefact["art"]
    predictor = EarlyExitPredictor.load(out, budget=0.5)
    paths = write_random_pngs(tmp_path / "images", 23)
    (tmp_path / "images" / "img_05.png").write_bytes(b"not a png")  # an unreadable file in chunk 2
    for i in (8, 9, 10, 11):  # chunk 3 (batch 4) holds only unreadable files
        Path(paths[i]).write_bytes(b"broken")
    for batch_size in (4, 5, 64):
        per_batch = list(predictor.predict_paths(paths, batch_size=batch_size, on_error="report"))
        pooled = list(predictor.predict_paths(paths, batch_size=batch_size, on_error="report", engine=True))
        assert [p.path for p in pooled] == paths
        assert [(p.path, p.class_index, p.exit, p.gflops, p.error is None) for p in pooled] == [
            (p.path, p.class_index, p.exit, p.gflops, p.error is None) for p in per_batch
        ]
        assert sum(p.error is not None for p in pooled) == 5
        ok = [(a.confidence, b.confidence) for a, b in zip(pooled, per_batch, strict=True) if a.error is None]
        assert np.allclose([a for a, _ in ok], [b for _, b in ok], atol=1e-5, rtol=0)
    assert len({p.exit for p in per_batch if p.exit is not None}) >= 2


def _with_temperatures(r) -> None:
    data = json.loads(r["thresholds"].read_text())
    data["temperatures"] = TEMPERATURES
    r["thresholds"].write_text(json.dumps(data))


def _simulated(module, x, thresholds, temperatures):
    with torch.no_grad():
        logits = torch.stack(module.model(x), dim=1)
    scaled = logits / torch.tensor(temperatures).view(1, -1, 1)
    scores, preds = exit_scores(scaled, module.exit_rule)
    exits = assign_exits(scores, torch.tensor(thresholds, dtype=scores.dtype))
    rows = torch.arange(x.shape[0])
    return preds[rows, exits], exits


def test_the_predictor_scores_with_the_calibrated_temperatures(tmp_path):
    """Thresholds fitted on logits / T_k are applied to logits / T_k (they were silently dropped before)."""
    r = make_run(tmp_path, quantiles=(0.4, 0.7))
    _with_temperatures(r)
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    assert json.loads((Path(out) / MANIFEST_FILE).read_text())["temperatures"] == TEMPERATURES
    predictor = EarlyExitPredictor.load(out, budget=0.5)
    assert predictor.temperatures == TEMPERATURES
    x = r["x"]
    pred, exits = _simulated(r["module"], x, predictor.thresholds, TEMPERATURES)
    _, raw_exits = _simulated(r["module"], x, predictor.thresholds, [1.0] * 4)
    assert not torch.equal(exits, raw_exits), "the temperatures should change some exits"
    got = predictor(x)
    assert torch.equal(got.exit, exits + 1) and torch.equal(got.prediction, pred)
    (pooled,) = predictor.predict_batches([x], engine_batch_size=16)
    _same(pooled, got)
    if pytest.importorskip("onnxruntime"):
        out_onnx = export_artefact(str(tmp_path / "art_onnx"), run=str(r["run"]), onnx=True)
        onnx_p = EarlyExitPredictor.load(out_onnx, budget=0.5, backend="onnx", num_threads=1)
        b = onnx_p(x)
        assert torch.equal(b.exit, got.exit) and torch.equal(b.prediction, got.prediction)


def test_budget_without_thresholds_lists_the_available_ones(artefact):
    with pytest.raises(ValueError, match=r"no thresholds for budget 0\.33 .*it has: \[0\.5, 0\.75\]"):
        EarlyExitPredictor.load(artefact["art"], budget=0.33)
    predictor = EarlyExitPredictor.load(artefact["art"], budget=0.75)
    with pytest.raises(ValueError, match=r"it has: \[0\.5, 0\.75\]"):
        predictor.set_budget(0.9)
    assert predictor.budget == 0.75  # unchanged after the refusal


def test_folder_without_images_and_missing_paths(artefact, tmp_path):
    predictor = EarlyExitPredictor.load(artefact["art"])
    (tmp_path / "empty_dir" / "sub").mkdir(parents=True)
    (tmp_path / "empty_dir" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"folder .*empty_dir' holds no image files"):
        predictor.predict_paths(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError, match=r"missing\.png' does not exist"):
        predictor.predict_paths([tmp_path / "missing.png"])
    listing = tmp_path / "list.txt"
    listing.write_text("nothere.png\n")
    with pytest.raises(FileNotFoundError, match=r"names 1 of 1 files that do not exist.*nothere\.png"):
        predictor.predict_paths(listing)


def test_image_of_another_size_for_a_native_size_model_is_refused_with_the_reason(artefact, tmp_path):
    predictor = EarlyExitPredictor.load(artefact["art"])  # synthetic 32 px: images used as they are
    Image.new("RGB", (40, 32), (10, 20, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"wide\.png: image is 40x32 px .*32x32"):
        list(predictor.predict_paths(tmp_path))
    rows = list(predictor.predict_paths(tmp_path, on_error="report"))
    assert [Path(r.path).name for r in rows] == ["ok.png", "wide.png"]
    assert rows[0].error is None and rows[0].exit in (1, 2, 3, 4) and rows[0].class_name is not None
    assert rows[1].class_index is None and rows[1].error.startswith("image is 40x32 px")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = list(predictor.predict_paths(tmp_path, on_error="report", batch_size=1))
    assert [r.error is not None for r in rows] == [True, False, True]
    with pytest.raises(ImageSizeError):
        predictor.transform(Image.new("L", (28, 28)))


def test_other_channel_counts_are_converted_like_training_images(tmp_path):

    dm = {**SYNTHETIC_DM, "dataset": "image_folder", "in_chans": 1}
    r = make_run(tmp_path, dm=dm, in_chans=1)
    predictor = EarlyExitPredictor.load(export_artefact(str(tmp_path / "art"), run=str(r["run"])))
    cfg = resolve_data_config(in_chans=1, default_image_size=224, timm_model=dm["timm_model"], image_size=32)
    reference = build_transform(cfg, in_chans=1, train=False)
    rgba = Image.new("RGBA", (45, 60), (200, 30, 90, 128))
    rgba.save(tmp_path / "rgba.png")
    x = predictor.preprocess([str(tmp_path / "rgba.png")])
    assert x.shape == (1, 1, 32, 32)
    assert torch.equal(x[0], reference(Image.open(tmp_path / "rgba.png").convert("RGB")))
    row = next(iter(predictor.predict_paths(tmp_path / "rgba.png")))
    assert row.error is None and row.exit == int(predictor(x).exit[0])


def test_wrong_tensor_shape_is_refused(artefact):
    predictor = EarlyExitPredictor.load(artefact["art"])
    with pytest.raises(ValueError, match=r"the model takes \[B, 3, 32, 32\]"):
        predictor(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="must be float"):
        predictor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
