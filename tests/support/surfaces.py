"""Every surface of the package behind one call per rule, so a rule is tested on all of them at once.

- :data:`PREDICT_SURFACES`: every surface that predicts image files. ``predict_with(surface, run, images,
  out)`` predicts the image files under ``images`` with the trained run ``run`` (``make_run`` +
  ``export_artefact``: ``ckpt``, ``thresholds``, ``art``) and returns what the surface printed and the rows of
  the CSV it wrote (or, for the Python API, the rows it yielded, written with the same writer).
- :data:`EVALUATING_SURFACES`: every entry point that evaluates, predicts with or exports a checkpoint (the
  untrained-weights rule: ``tests/test_surfaces.py``).
- :data:`TENSOR_SURFACES`: every entry point that predicts from tensors (the non-finite-input rule).

A new surface (a command, an API) is one more function in the matching table.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from dmpo_lightning import BenchmarkDataModule, DMPOModule
from dmpo_lightning.cli import main as dmpo_main
from dmpo_lightning.console import console_main
from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.predict_cli import main as deploy_main
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.evaluation.evaluator import EvaluationOptions
from dmpo_lightning.evaluation.prediction_writer import DMPOPredictionWriter
from dmpo_lightning.models.engine import EarlyExitEngine
from dmpo_lightning.predictions import PredictionRow, read_predictions, write_predictions

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
BUDGET = 0.5

Surface = Callable[[dict[str, Any], Path, Path, "int | None"], None]


def _dmpo_predict(run: dict[str, Any], images: Path, out: Path, max_pixels: int | None) -> None:
    dmpo_main(
        [
            "predict",
            "-c",
            TINY,
            f"--ckpt_path={run['ckpt']}",
            f"--data.init_args.predict_paths={images}",
            f"--evaluation.thresholds_file={run['thresholds']}",
            f"--evaluation.predict_budget={BUDGET}",
            f"--evaluation.predictions_file={out}",
            *([f"--data.init_args.predict_max_pixels={max_pixels}"] if max_pixels is not None else []),
        ]
    )


def _predictor(run: dict[str, Any], images: Path, out: Path, max_pixels: int | None) -> None:
    extra = {"max_pixels": max_pixels} if max_pixels is not None else {}
    predictor = EarlyExitPredictor.load(run["art"], budget=BUDGET, **extra)
    rows = predictor.predict_paths(images, batch_size=4, on_error="report")
    write_predictions(str(out), rows, num_exits=predictor.num_exits)


def _deploy_cli(run: dict[str, Any], images: Path, out: Path, max_pixels: int | None) -> None:
    extra = ["--max-pixels", str(max_pixels)] if max_pixels is not None else []
    status = deploy_main(
        [str(run["art"]), str(images), "--output", str(out), "--budget", str(BUDGET), *extra]
    )
    assert status == 0


PREDICT_SURFACES: dict[str, Surface] = {
    "dmpo predict": _dmpo_predict,
    "EarlyExitPredictor": _predictor,
    "python -m dmpo_lightning.deploy": _deploy_cli,
}
"""Each surface that predicts image files, by the name a user knows it by."""

MAX_PIXELS_OPTION = {
    "dmpo predict": "data.init_args.predict_max_pixels",
    "EarlyExitPredictor": "max_pixels",
    "python -m dmpo_lightning.deploy": "--max-pixels",
}
"""How each surface names its pixel limit (its messages must use that name)."""


def predict_with(
    surface: str, run: dict[str, Any], images: Path, out: Path, *, max_pixels: int | None = None
) -> tuple[str, list[PredictionRow]]:
    """Run ``surface`` on ``images``; returns what it printed and its rows (in the CSV's order)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        PREDICT_SURFACES[surface](run, images, out, max_pixels)
    return printed.getvalue(), read_predictions(str(out))


# ------------------------------------------------------------------------------ evaluate, predict, export
class Refused(Exception):
    """A command ended with a non-zero exit status; the message is the ``error:`` line it printed."""


def _console(*argv: str) -> None:
    """``dmpo <argv>`` as the console script runs it; raises :class:`Refused` on a non-zero status."""
    err, saved = io.StringIO(), sys.argv
    sys.argv = ["dmpo", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            console_main()
    except SystemExit as exit_:
        if exit_.code:
            lines = [line for line in err.getvalue().splitlines() if "error:" in line]
            raise Refused(f"status {exit_.code}: {' '.join(lines) or err.getvalue()[-2000:]}") from None
    finally:
        sys.argv = saved


def _trainer(out: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out, **kwargs,
    )  # fmt: skip


def _data() -> BenchmarkDataModule:
    return BenchmarkDataModule(
        dataset="synthetic", synthetic_sizes=(48, 24), synthetic_num_classes=4, calibration_size=16,
        batch_size=8, num_workers=0, image_size=32,
    )  # fmt: skip


def _module(run: dict[str, Any]) -> DMPOModule:
    return DMPOModule.load_from_checkpoint(str(run["ckpt"]))


EVALUATING_SURFACES: dict[str, Callable[[dict[str, Any], Path], Any]] = {
    "Trainer.test": lambda run, out: _trainer(out).test(
        _module(run), datamodule=_data(), ckpt_path=str(run["ckpt"]), weights_only=True
    ),
    "Trainer.predict": lambda run, out: _trainer(out).predict(
        _module(run), datamodule=_data(), ckpt_path=str(run["ckpt"]), weights_only=True
    ),
    "dmpo test": lambda run, out: _console(
        "test", "-c", TINY, f"--ckpt_path={run['ckpt']}", f"--evaluation.report_dir={out / 'report'}"
    ),
    "dmpo predict": lambda run, out: _console(
        "predict", "-c", TINY, f"--ckpt_path={run['ckpt']}", f"--evaluation.predictions_file={out / 'p.csv'}"
    ),
    "dmpo export": lambda run, out: _console(
        "export", f"--ckpt_path={run['ckpt']}", f"--thresholds={run['thresholds']}", f"--output={out / 'art'}"
    ),
    "export_artefact": lambda run, out: export_artefact(
        str(out / "art"), ckpt_path=str(run["ckpt"]), thresholds=str(run["thresholds"])
    ),
}
"""Every entry point that evaluates, predicts with or exports a checkpoint: ``(run, out_folder)``."""


# ----------------------------------------------------------------------------------- predict from tensors
def _writer_rows(run: dict[str, Any], x: torch.Tensor) -> list[str | None]:
    out = Path(run["ckpt"]).parent.parent / "tensor_predictions.csv"
    samples = [{"image": image, "index": torch.tensor(i)} for i, image in enumerate(x)]
    writer = DMPOPredictionWriter(EvaluationOptions(predictions_file=str(out)))
    _trainer(out.parent, callbacks=[writer]).predict(
        _module(run), DataLoader(samples, batch_size=len(samples))
    )
    return [row.error for row in read_predictions(str(out))]


TENSOR_SURFACES: dict[str, Callable[[dict[str, Any], torch.Tensor], Any]] = {
    "EarlyExitPredictor": lambda run, x: EarlyExitPredictor.load(run["art"], budget=BUDGET)(x),
    "DMPOModule.forward_early_exit": lambda run, x: _module(run).forward_early_exit(x),
    "MultiExitViT.forward_early_exit": lambda run, x: _module(run).model.forward_early_exit(x, [0.5] * 4),
    "EarlyExitEngine": lambda run, x: EarlyExitEngine(_module(run).model, [0.5] * 4).run([x]),
    "Trainer.predict (DMPOPredictionWriter)": _writer_rows,
}
"""Every entry point that predicts from image tensors: ``(run, images)``; raises, or returns each error."""
