"""``python -m dmpo_lightning.deploy``: predict image files with an artefact, writing a predictions CSV.

No Lightning is imported. The CSV is the one predictions schema (:mod:`dmpo_lightning.predictions`):
``path, class_index, class_name, exit, confidence, score, gflops, error``, the same as ``dmpo predict``
writes; ``exit`` is numbered from 1 as in the ``dmpo test`` report. An image that cannot be used
(unreadable, of a size the model cannot take, with NaN pixels, too large) gets a row with its ``error`` and
empty predictions, and is counted in the summary; the run does not stop. A missing path, an empty folder, a
bad budget or an existing output file fail before anything is written; the CSV appears under its name only
when complete.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from dmpo_lightning.deploy.predictor import EarlyExitPredictor, check_device
from dmpo_lightning.images import DEFAULT_MAX_PIXELS, check_max_pixels
from dmpo_lightning.predictions import format_prediction_summary, write_predictions

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m dmpo_lightning.deploy",
        description="Predict image files with a `dmpo export` artefact (true early exit) and write a CSV.",
    )
    parser.add_argument("artefact", help="artefact directory written by `dmpo export`")
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or text lists of paths")
    parser.add_argument("--output", "-o", required=True, help="CSV file to write (must not exist)")
    parser.add_argument("--budget", type=float, default=0.5, help="calibrated budget to run at (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--device", default="cpu", help="torch device (torch backend)")
    parser.add_argument("--backbone-weights", help="local timm weights file of a referenced backbone")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images with more pixels than this, from their header, before decoding them "
        f"(default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="throughput mode (torch backend): pool the samples that continue after each exit across "
        "batches so every stage runs full batches; same rows, same order",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command: write the CSV, print its summary; returns the exit status (2: refused input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_max_pixels(args.max_pixels, "--max-pixels")
        if args.backend == "torch":
            check_device(args.device, "--device")
        elif args.device != "cpu":
            raise ValueError(
                f"--device {args.device!r}: the onnx backend runs on the CPU; leave --device out"
            )
        if os.path.isdir(args.output):
            raise ValueError(
                f"--output {args.output} is a folder; give a new file (e.g. {args.output}/predictions.csv)"
            )
        if os.path.exists(args.output):
            raise FileExistsError(
                f"{args.output} exists; choose another --output (files are never overwritten)"
            )
        predictor = EarlyExitPredictor.load(
            args.artefact,
            budget=args.budget,
            device=args.device,
            backend=args.backend,
            backbone_weights=args.backbone_weights,
            max_pixels=args.max_pixels,
        )
        predictor.max_pixels_option = "--max-pixels"
        rows = predictor.predict_paths(
            args.images, batch_size=args.batch_size, on_error="report", engine=args.engine
        )
        summary = write_predictions(args.output, rows, num_exits=predictor.num_exits)
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    assert summary is not None  # predict_paths refuses an empty input before the first row
    print(
        format_prediction_summary(
            summary,
            full_gflops=float(predictor.manifest["costs"]["full_gflops"]),
            in_chans=predictor.input_size[0],
            budget=predictor.budget,
        )
    )
    return 0
