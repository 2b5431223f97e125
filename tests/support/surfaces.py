"""Every surface that predicts image files, behind one call, so a rule is tested on all of them at once.

``predict_with(surface, run, images, out)`` predicts the image files under ``images`` with the trained run
``run`` (``make_run`` + ``export_artefact``: ``ckpt``, ``thresholds``, ``art``) and returns what the surface
printed and the rows of the CSV it wrote (or, for the Python API, the rows it yielded, written with the same
writer). A new surface (the HTTP server) is one more function in :data:`PREDICT_SURFACES`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmpo_lightning.cli import main as dmpo_main
from dmpo_lightning.deploy.predict_cli import main as deploy_main
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
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
