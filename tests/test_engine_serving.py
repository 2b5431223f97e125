"""Throughput mode in the serving paths: the engine behind EarlyExitPredictor and ``dmpo predict``.

Both must give exactly the per-batch early exit's predictions and exits (and its logits within float noise),
rows in input order, also for the last partial batch, one image and an empty input; and both must score
with the temperatures the thresholds were calibrated with (the artefact's manifest, the thresholds file).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from support.builders import prediction_writer
from support.runs import TINY_HP, make_run

from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY
from dmpo_lightning.data.predict_images import ERROR_KEY
from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.format import MANIFEST_FILE
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.models import MultiExitViT
from dmpo_lightning.models.engine import EngineSession
from dmpo_lightning.models.exit_rules import exit_scores
from dmpo_lightning.module import DMPOModule

TEMPERATURES = [0.4, 2.5, 0.6, 1.0]


def _same(a, b) -> None:
    """Two BatchPredictions agree: identical decisions, logits within float32 noise."""
    assert torch.equal(a.prediction, b.prediction)
    assert torch.equal(a.exit, b.exit)
    assert torch.equal(a.gflops, b.gflops)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.score, b.score, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(a.confidence, b.confidence, atol=1e-5, rtol=0)


def _stage_sizes(monkeypatch) -> list[tuple[int, int]]:
    """Record (stage, batch size) of every MultiExitViT.run_stage call."""
    calls: list[tuple[int, int]] = []
    original = MultiExitViT.run_stage

    def spy(self, k, inputs, *, head=True):
        calls.append((k, int(inputs.shape[0])))
        return original(self, k, inputs, head=head)

    monkeypatch.setattr(MultiExitViT, "run_stage", spy)
    return calls


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    r = make_run(tmp, quantiles=(0.4, 0.7))
    out = export_artefact(str(tmp / "art"), run=str(r["run"]))
    return r, out


# ------------------------------------------------------------------------------------- EarlyExitPredictor
@pytest.mark.parametrize(("input_batch", "engine_batch"), [(8, None), (8, 16), (5, 3), (1, 4), (64, 64)])
def test_predictor_throughput_mode_equals_the_per_batch_path(
    artefact, monkeypatch, input_batch, engine_batch
):
    r, out = artefact
    predictor = EarlyExitPredictor.load(out, budget=0.5)
    x = r["x"][:37]  # 37: the last input batch is partial for every size above
    batches = list(torch.split(x, input_batch))
    expected = [predictor(b) for b in batches]
    assert len({e for p in expected for e in p.exit.tolist()}) >= 2, "samples should use several exits"
    calls = _stage_sizes(monkeypatch)
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


def test_predictor_throughput_mode_one_image_and_empty_input(artefact):
    r, out = artefact
    predictor = EarlyExitPredictor.load(out, budget=0.75)
    (one,) = predictor.predict_batches([r["x"][:1]])
    _same(one, predictor(r["x"][:1]))
    assert list(predictor.predict_batches([])) == []
    with pytest.raises(ValueError, match="empty batch"):
        list(predictor.predict_batches([r["x"][:0]]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(predictor.predict_batches([r["x"]], engine_batch_size=0))


def test_predictor_throughput_mode_is_refused_on_the_onnx_backend(artefact):
    r, out = artefact
    manifest = json.loads((Path(out) / MANIFEST_FILE).read_text())
    predictor = EarlyExitPredictor(manifest, None, budget=0.5, onnx_stages=object())
    with pytest.raises(ValueError, match="needs the torch backend"):
        next(iter(predictor.predict_batches([r["x"]])))
    with pytest.raises(ValueError, match="needs the torch backend"):
        predictor.predict_paths(["does-not-matter.png"], engine=True)


def _write_images(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_predict_paths_engine_gives_the_same_rows_in_the_same_order(artefact, tmp_path):
    _, out = artefact
    predictor = EarlyExitPredictor.load(out, budget=0.5)
    paths = _write_images(tmp_path / "images", 23)
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


def test_export_refuses_bad_temperatures(tmp_path):
    r = make_run(tmp_path)
    data = json.loads(r["thresholds"].read_text())
    data["temperatures"] = [1.0, 0.0, 1.0, 1.0]
    r["thresholds"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match="finite values > 0"):
        export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    assert not (tmp_path / "art").exists()


# ---------------------------------------------------------------------------------------- dmpo predict
class _Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, bad: frozenset[int] = frozenset()) -> None:
        self.x, self.bad = x, bad

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> dict:
        item = {IMAGE_KEY: self.x[i], INDEX_KEY: i, LABEL_KEY: i % 4}
        if self.bad:
            item[ERROR_KEY] = "unreadable" if i in self.bad else ""
        return item


def _same_csv(a: str | None, b: str | None) -> None:
    """Same header, rows, order and decisions; confidence and score within float32 noise."""
    assert a is not None and b is not None
    ra, rb = list(csv.DictReader(io.StringIO(a))), list(csv.DictReader(io.StringIO(b)))
    assert a.splitlines()[0] == b.splitlines()[0] and len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        for key in x:
            if key in ("confidence", "score") and x[key] and y[key]:
                assert math.isclose(float(x[key]), float(y[key]), abs_tol=1e-5, rel_tol=0), (key, x, y)
            else:
                assert x[key] == y[key], (key, x, y)


def _predict_csv(module, x, tmp_path, name, *, batch_size, engine, bad=frozenset(), **options):
    writer = prediction_writer(
        predict_engine=engine, predictions_file=str(tmp_path / f"{name}.csv"), **options
    )
    loader = torch.utils.data.DataLoader(_Images(x, bad), batch_size=batch_size, shuffle=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    outputs = trainer.predict(module, dataloaders=loader)
    text = (tmp_path / f"{name}.csv").read_text() if (tmp_path / f"{name}.csv").exists() else None
    return text, outputs


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = DMPOModule(**TINY_HP)
    with torch.no_grad():
        for p in m.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        scores, _ = exit_scores(m.model(x), m.exit_rule)
    m.exit_thresholds.copy_(torch.tensor([float(scores[:, k].quantile(0.5)) for k in range(3)] + [-math.inf]))
    return m


@pytest.mark.parametrize(("n", "batch_size"), [(37, 8), (1, 8), (16, 16), (9, 4)])
def test_dmpo_predict_engine_writes_the_same_csv(module, tmp_path, monkeypatch, n, batch_size):
    torch.manual_seed(1)
    x = torch.randn(n, 3, 32, 32)
    bad = frozenset({2, 3}) if n > 4 else frozenset()
    per_batch, out_a = _predict_csv(module, x, tmp_path, "a", batch_size=batch_size, engine=False, bad=bad)
    pushes: list[int] = []
    original = EngineSession.push
    monkeypatch.setattr(EngineSession, "push", lambda s, b: pushes.append(len(b)) or original(s, b))
    pooled, out_b = _predict_csv(module, x, tmp_path, "b", batch_size=batch_size, engine=True, bad=bad)
    assert pushes, "predict_engine should run the engine"
    assert sum(pushes) == n - len(bad)
    _same_csv(pooled, per_batch)
    assert per_batch is not None and len(per_batch.strip().splitlines()) == n + 1
    # the outputs trainer.predict returns are the same rows, complete once the epoch ended
    for a, b in zip(out_a, out_b, strict=True):
        assert torch.equal(a["prediction"], b["prediction"]) and torch.equal(a["exit_index"], b["exit_index"])
    assert bool((torch.cat([o["exit_index"] for o in out_b]) >= 0).sum() == n - len(bad))


def test_dmpo_predict_engine_uses_the_loaded_temperatures(module, tmp_path):
    torch.manual_seed(2)
    x = torch.randn(37, 3, 32, 32)
    try:
        module.exit_temperatures.copy_(torch.tensor(TEMPERATURES))
        per_batch, _ = _predict_csv(module, x, tmp_path, "a", batch_size=8, engine=False)
        pooled, _ = _predict_csv(module, x, tmp_path, "b", batch_size=8, engine=True)
        module.exit_temperatures.fill_(1.0)
        raw, _ = _predict_csv(module, x, tmp_path, "c", batch_size=8, engine=True)
    finally:
        module.exit_temperatures.fill_(1.0)
    _same_csv(pooled, per_batch)
    assert raw != pooled, "the temperatures should change some rows"


def test_dmpo_predict_engine_on_an_empty_input(module, tmp_path):
    x = torch.randn(0, 3, 32, 32)
    per_batch, _ = _predict_csv(module, x, tmp_path, "a", batch_size=8, engine=False)
    pooled, _ = _predict_csv(module, x, tmp_path, "b", batch_size=8, engine=True)
    assert pooled == per_batch


@pytest.mark.slow  # fits a tiny model through the CLI, then tests and predicts from its checkpoint
def test_cli_keeps_predict_engine_and_time_early_exit_given_with_a_checkpoint(tmp_path, monkeypatch):
    """``--ckpt_path`` restores the model's options, but not these two evaluation options (regression)."""
    from dmpo_lightning.cli import main

    tiny = str(Path(__file__).resolve().parent / "configs" / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "-c", tiny, "--test_after_fit=false"])
    log_dir = Path(cli.trainer.log_dir)
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    report_dir = tmp_path / "report"
    main(
        [
            "test",
            f"--config={log_dir / 'config.yaml'}",
            f"--ckpt_path={ckpt}",
            f"--evaluation.report_dir={report_dir}",
            "--evaluation.time_early_exit=8",
        ]
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert report.get("early_exit_speed"), "time_early_exit given on the command line was dropped"
    pushes: list[int] = []
    original = EngineSession.push
    monkeypatch.setattr(EngineSession, "push", lambda s, b: pushes.append(len(b)) or original(s, b))
    main(
        [
            "predict",
            f"--config={log_dir / 'config.yaml'}",
            f"--ckpt_path={ckpt}",
            f"--evaluation.thresholds_file={report_dir / 'thresholds.json'}",
            "--evaluation.predict_budget=0.5",
            f"--evaluation.predictions_file={tmp_path / 'p.csv'}",
            "--evaluation.predict_engine=true",
        ]
    )
    assert pushes, "predict_engine given on the command line was dropped"
    assert (tmp_path / "p.csv").exists()


def test_predict_command_engine_flag_writes_the_same_csv(artefact, tmp_path, monkeypatch):
    from dmpo_lightning.deploy.predict_cli import main as predict_main

    _, out = artefact
    paths = _write_images(tmp_path / "images", 11)
    Path(paths[3]).write_bytes(b"broken")
    predict_main([out, str(tmp_path / "images"), "--output", str(tmp_path / "a.csv"), "--batch-size", "4"])
    pushes: list[int] = []
    original = EngineSession.push
    monkeypatch.setattr(EngineSession, "push", lambda s, b: pushes.append(len(b)) or original(s, b))
    args = [out, str(tmp_path / "images"), "--output", str(tmp_path / "b.csv"), "--batch-size", "4"]
    predict_main([*args, "--engine"])
    assert pushes == [3, 4, 3]
    _same_csv((tmp_path / "b.csv").read_text(), (tmp_path / "a.csv").read_text())


# ------------------------------------------------------------------------------------------ EngineSession
def test_session_push_and_flush_return_every_batch_once_in_order(module):
    from dmpo_lightning.models.engine import EarlyExitEngine

    torch.manual_seed(3)
    x = torch.randn(29, 3, 32, 32)
    thresholds = module.exit_thresholds.tolist()
    expected = module.model.forward_early_exit(x, thresholds, temperatures=TEMPERATURES)
    module.model.train()
    try:
        session = EarlyExitEngine(module.model, thresholds, batch_size=8, temperatures=TEMPERATURES).session()
        done = []
        for part in torch.split(x, [3, 0, 9, 1, 16]):
            done += session.push(part)
            assert module.model.training, "each push restores the model's mode"
        assert session.waiting == 29 - sum(o.prediction.shape[0] for o in done)
        done += session.flush()
    finally:
        module.model.eval()
    assert [o.prediction.shape[0] for o in done] == [3, 0, 9, 1, 16]
    assert torch.equal(torch.cat([o.exit_index for o in done]), expected.exit_index)
    assert torch.equal(torch.cat([o.prediction for o in done]), expected.prediction)
    raw = module.model.forward_early_exit(x, thresholds)
    assert not torch.equal(raw.exit_index, expected.exit_index), "the temperatures should matter here"


def test_predict_io_is_the_prediction_writer_the_module_brings_along(module, tmp_path):
    from dmpo_lightning.evaluation.prediction_writer import DMPOPredictionWriter

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(_Images(torch.randn(5, 3, 32, 32), frozenset()), batch_size=2)
    module.train_steps.fill_(1)  # the default writer refuses untrained weights
    try:
        trainer.predict(module, dataloaders=loader)
    finally:
        module.train_steps.zero_()
    writers = [c for c in trainer.callbacks if isinstance(c, DMPOPredictionWriter)]
    assert len(writers) == 1  # brought along with default options: <log_dir>/predictions.csv
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 1 + 5  # header + one row each
    # fit brings the schedule and re-seeding, not the writer
    trainer.state.fn = "fit"
    module.trainer = trainer
    assert not any(isinstance(c, DMPOPredictionWriter) for c in module.configure_callbacks())
    with pytest.raises(
        TypeError, match=r"serves a LightningModule with early exits .* LightningModule lacks"
    ):
        DMPOPredictionWriter().on_predict_start(trainer, pl.LightningModule())
