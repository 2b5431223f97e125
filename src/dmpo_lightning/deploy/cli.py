"""``dmpo export``: command-line front end of :func:`~dmpo_lightning.deploy.export.export_artefact`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.format import read_manifest
from dmpo_lightning.files import write_failure

__all__ = ["build_parser", "console_main", "main"]

DESCRIPTION = """\
Write one deployable artefact (a directory: manifest.json + weights.safetensors [+ onnx/]) from a trained
run: the weights, model options, preprocessing, class names, exit rule, every calibrated operating point
(budget -> thresholds, calibration and test accuracy and cost), the counted cost of each exit and the
checkpoint hash. Load it with dmpo_lightning.deploy.EarlyExitPredictor.load(path, budget=...).
"""

EPILOG = """\
examples:
  dmpo export --run runs/quickstart/version_0 --output artefacts/quickstart
  dmpo export --ckpt_path run/checkpoints/last.ckpt --thresholds run/dmpo_test/thresholds.json \\
      --report run/dmpo_test/report.json --output artefacts/model --onnx
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``dmpo export`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="dmpo export",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_argument_group("inputs (--run, or --ckpt_path with --thresholds)")
    src.add_argument("--run", help="run folder runs/<name>/version_N (after dmpo fit + dmpo test)")
    src.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", help="checkpoint (.ckpt) to export")
    src.add_argument("--thresholds", help="thresholds.json written by dmpo test for that checkpoint")
    src.add_argument("--report", help="report.json of the same dmpo test (calibration accuracy and cost)")
    parser.add_argument("--output", "-o", required=True, help="artefact directory to create (must not exist)")
    parser.add_argument(
        "--embed-backbone",
        "--embed_backbone",
        dest="embed_backbone",
        action="store_true",
        help="embed every weight (default: only what was trained, plus a reference and sha256 of the "
        "frozen pre-trained backbone weights; for peft: full or a randomly initialised backbone "
        "everything is embedded anyway)",
    )
    parser.add_argument(
        "--merge",
        dest="merge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fold the trained PEFT modules into the frozen weights (base-model FLOPs per block); default: "
        "on for the methods registered as mergeable (lora). AdaptFormer and VPT cannot be folded",
    )
    parser.add_argument(
        "--allow-untrained",
        "--allow_untrained",
        dest="allow_untrained",
        action="store_true",
        help="export a checkpoint saved before any training step (global_step 0); refused otherwise",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write one ONNX graph per stage (needs dmpo-lightning[export])",
    )
    parser.add_argument(
        "--class-names",
        "--class_names",
        dest="class_names",
        help="text file with one class name per line, in label order (default: from the checkpoint/dataset)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dmpo export``: parse ``argv`` (without the ``export`` word), export, return the exit status.

    A refused export prints one line ``dmpo export: error: ...`` and returns 2; nothing is written then.
    A full or read-only disk while writing prints one line too and returns 1 (the artefact is written whole
    or not at all).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = _read_class_names(args.class_names) if args.class_names else None
        path = export_artefact(
            args.output,
            run=args.run,
            ckpt_path=args.ckpt_path,
            thresholds=args.thresholds,
            report=args.report,
            embed_backbone=args.embed_backbone,
            merge=args.merge,
            onnx=args.onnx,
            class_names=names,
            allow_untrained=args.allow_untrained,
        )
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk while writing: nothing is left under --output
        message = write_failure(err)
        if message is None:
            raise
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 1
    found = read_manifest(path)["inputs"]["found"]
    print(f"wrote artefact {path}" + (f" ({found})" if found else ""), file=sys.stderr)
    return 0


def _read_class_names(path: str) -> list[str]:
    """One class name per line (surrounding blanks stripped, blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"--class-names {path} is not a UTF-8 text file (one class name per line)") from None
    except IsADirectoryError:
        raise ValueError(
            f"--class-names {path} is a folder; give a text file with one name per line"
        ) from None


def console_main(argv: Sequence[str] | None = None) -> None:
    """``dmpo export`` as a console command: returns on success, exits with :func:`main`'s status else."""
    status = main(argv)
    if status:
        raise SystemExit(status)
