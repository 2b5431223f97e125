"""evaluation/prediction_writer.py: what ``dmpo predict`` writes (``DMPOPredictionWriter``).

With ``predict_engine`` (the engine's pooled stages) it writes exactly the per-batch early exit's CSV (rows
in input order, the last partial batch, one image, an empty input, unreadable images), with the temperatures
the module loaded; ``trainer.predict(module)`` brings a writer along, ``fit`` does not.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from support.builders import prediction_writer
from support.compare import assert_same_csv
from support.early_exit import TEMPERATURES, thresholded_module

from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY
from dmpo_lightning.data.predict_images import ERROR_KEY
from dmpo_lightning.evaluation.prediction_writer import DMPOPredictionWriter
from dmpo_lightning.models.engine import EngineSession


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
    return thresholded_module()


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
    assert_same_csv(pooled, per_batch)
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
    assert_same_csv(pooled, per_batch)
    assert raw != pooled, "the temperatures should change some rows"


def test_dmpo_predict_engine_on_an_empty_input(module, tmp_path):
    x = torch.randn(0, 3, 32, 32)
    per_batch, _ = _predict_csv(module, x, tmp_path, "a", batch_size=8, engine=False)
    pooled, _ = _predict_csv(module, x, tmp_path, "b", batch_size=8, engine=True)
    assert pooled == per_batch


def test_predict_io_is_the_prediction_writer_the_module_brings_along(module, tmp_path):

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
