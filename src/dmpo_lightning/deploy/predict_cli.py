"""``python -m dmpo_lightning.deploy``: predict a folder of images with an artefact, writing a CSV.

No Lightning is imported. Columns: ``path, class_index, class_name, exit, confidence, gflops, error``;
``exit`` is numbered from 1 as in the ``dmpo test`` report. An image that cannot be read (or has a size
the model cannot take) gets a row with its ``error`` and empty predictions, and is counted in the summary;
the run does not stop. A missing path, an empty folder, a bad budget or an existing output file fail before
anything is written; the CSV is written to a temporary name and renamed at the end.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence

__all__ = ["COLUMNS", "main"]

COLUMNS = ("path", "class_index", "class_name", "exit", "confidence", "gflops", "error")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m dmpo_lightning.deploy",
        description="Predict image files with a `dmpo export` artefact (true early exit) and write a CSV.",
    )
    parser.add_argument("artefact", help="artefact directory written by `dmpo export`")
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or .txt lists of paths")
    parser.add_argument("--output", "-o", required=True, help="CSV file to write (must not exist)")
    parser.add_argument("--budget", type=float, default=0.5, help="calibrated budget to run at (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--device", default="cpu", help="torch device (torch backend)")
    parser.add_argument("--backbone-weights", help="local timm weights file of a referenced backbone")
    parser.add_argument(
        "--engine",
        action="store_true",
        help="throughput mode (torch backend): pool the samples that continue after each exit across "
        "batches so every stage runs full batches; same rows, same order",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the command; returns the summary (also printed)."""
    from dmpo_lightning.deploy.predictor import EarlyExitPredictor

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
        )
        rows = predictor.predict_paths(
            args.images, batch_size=args.batch_size, on_error="report", engine=args.engine
        )
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    parent = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(args.output)}.tmp")
    n = failed = 0
    gflops = 0.0
    exits = [0] * predictor.num_exits
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for r in rows:
                n += 1
                if r.error is not None:
                    failed += 1
                else:
                    gflops += float(r.gflops or 0.0)
                    exits[int(r.exit or 1) - 1] += 1
                writer.writerow(
                    [
                        r.path,
                        "" if r.class_index is None else r.class_index,
                        r.class_name or "",
                        "" if r.exit is None else r.exit,
                        "" if r.confidence is None else f"{r.confidence:.6f}",
                        "" if r.gflops is None else repr(r.gflops),
                        r.error or "",
                    ]
                )
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    ok = n - failed
    summary = {
        "images": n,
        "unreadable": failed,
        "mean_gflops": gflops / ok if ok else float("nan"),
        **{f"exit_{k + 1}": c for k, c in enumerate(exits)},
    }
    print(
        f"{ok} of {n} images predicted at budget {predictor.budget} ({failed} unreadable, listed with their "
        f"error in the CSV); exits {exits}; mean {summary['mean_gflops']:.4g} GFLOPs per image; "
        f"wrote {args.output}",
        file=sys.stderr,
    )
    return summary
