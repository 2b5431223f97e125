"""Outputs of ``dmpo test``: the report dict, a printed table, the curve as CSV, a PNG plot, the folder.

All numbers come from one report dict (:func:`build_report`, written as JSON by
:func:`~dmpo_lightning.files.write_json`), so the table, the JSON, the CSV and the plot cannot disagree.
Files are written atomically (:func:`~dmpo_lightning.files.atomic_write`): a crash never leaves a partial
file. The single-file writers write to the path they are given; :func:`write_report_folder` writes the
whole report folder (:data:`REPORT_FILES`) at once and never over an existing report
(:func:`check_report_dir`, which ``dmpo test`` also runs before any work).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning
import timm
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from dmpo_lightning.constants import REPORT_FORMAT, REPORT_FORMAT_VERSION
from dmpo_lightning.errors import ConfigError, ConfigFileExistsError
from dmpo_lightning.evaluation.calibration import plot_reliability
from dmpo_lightning.evaluation.protocol import BudgetedCurve, OperatingPoint, area_under_curve
from dmpo_lightning.files import (
    atomic_write,
    check_format,
    check_writable,
    read_json,
    to_jsonable,
    write_json,
)
from dmpo_lightning.version import __version__

__all__ = [
    "GFLOPS_UNIT",
    "REPORT_DIR_OPTION",
    "REPORT_FILES",
    "build_report",
    "check_report_dir",
    "describe_data",
    "describe_environment",
    "format_report_table",
    "plot_curve",
    "read_report",
    "write_curve_csv",
    "write_report_folder",
]

GFLOPS_UNIT = "GFLOPs = 10^9 multiply-accumulates"
"""The cost unit stated in every output (one multiply-accumulate = one FLOP, the field's convention)."""


# ----------------------------------------------------------------------------------------------- report
def _floats(values: Sequence[float] | Tensor) -> list[float]:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()


def describe_data(datamodule: Any) -> dict[str, Any] | None:
    """What a report says about the data it was computed on (``None``: loaders given without a data module).

    The data module's class and every option it was built with (``options``: its ``hparams``), with the ones
    that decide the numbers named at the top: ``dataset``, ``root``, ``task``, the resolved ``image_size``,
    the calibration split's ``split_seed`` and ``calibration_size``, ``num_classes``; and the resolved
    preprocessing (``mean``, ``std``, ``interpolation``, ``crop_pct``) when the module has one.
    """
    if datamodule is None:
        return None
    options = dict(getattr(datamodule, "hparams", None) or {})
    resolved = getattr(datamodule, "data_config", None)
    preprocessing = (
        dataclasses.asdict(resolved)
        if dataclasses.is_dataclass(resolved) and not isinstance(resolved, type)
        else None
    )
    return to_jsonable(
        {
            "class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "dataset": options.get("dataset"),
            "root": options.get("root"),
            "task": options.get("task"),
            "image_size": (preprocessing or {}).get("image_size", options.get("image_size")),
            "split_seed": options.get("seed"),
            "calibration_size": options.get("calibration_size"),
            "num_classes": getattr(datamodule, "num_classes", None),
            "preprocessing": preprocessing,
            "options": options,
        },
        default=repr,
    )


def describe_environment(trainer: Any = None) -> dict[str, Any]:
    """The software and hardware a report was computed with, and when (UTC).

    The versions of dmpo-lightning, torch, timm, lightning and Python; with a ``trainer``, the device it ran
    on (and the GPU's name), its accelerator, number of processes and precision.
    """
    env: dict[str, Any] = {
        "dmpo_lightning": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    strategy = getattr(trainer, "strategy", None)
    device = getattr(strategy, "root_device", None)
    if isinstance(device, torch.device):
        env["device"] = str(device)
        env["device_name"] = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        )
    if trainer is not None:
        env["accelerator"] = type(getattr(trainer, "accelerator", None)).__name__
        env["processes"] = int(getattr(trainer, "world_size", 1))
        env["precision"] = str(getattr(trainer, "precision", ""))
    return env


def build_report(
    *,
    costs: Sequence[float] | Tensor,
    full_cost: float,
    anytime_top1: Sequence[float] | Tensor,
    anytime_top5: Sequence[float] | Tensor | None = None,
    exit_blocks: Sequence[int] | None = None,
    curve: BudgetedCurve | None = None,
    operating_points: Sequence[OperatingPoint] = (),
    full_accuracy: float | None = None,
    auc_range: tuple[float, float] = (0.25, 1.0),
    cost_unit: str = GFLOPS_UNIT,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the JSON-able report of a test run (EVALUATION.md section 6).

    Exits are numbered from 1 in the report, as in the design document. Accuracies are fractions in
    ``[0, 1]``; costs are in ``cost_unit`` (pass GFLOPs). Non-finite numbers are encoded as described
    in :func:`~dmpo_lightning.files.to_jsonable`. The AUC is that of the dynamic curve's test accuracy
    against test cost fraction (:func:`~dmpo_lightning.evaluation.protocol.area_under_curve`, below-curve
    budgets count 0).

    Args:
        costs: ``C_k`` per exit.
        full_cost: ``F_full``, the cost of the full model (no exit heads).
        anytime_top1: Test top-1 accuracy of every exit alone.
        anytime_top5: Test top-5 accuracy of every exit alone, if measured.
        exit_blocks: Trunk block index of every exit (as the model numbers them), if known.
        curve: The budgeted-batch curve (thresholds from the calibration split), if computed.
        operating_points: Budgets with their calibration-chosen thresholds and test results.
        full_accuracy: Test top-1 accuracy of the full (static) model, if measured.
        auc_range: Cost-fraction range of the AUC.
        cost_unit: Stated in every output.
        extra: Further entries (config, checkpoint hash, split-indices file, ...) merged at the top level.

    Returns:
        A dict of plain JSON types with keys ``format`` and ``format_version`` (what ``report.json`` is),
        ``unit``, ``full_model``, ``exits``, ``best_anytime_exit``, ``curve`` (or None), ``budgets``, ``auc``
        (or None) and those of ``extra``.

    Raises:
        ValueError: If per-exit lengths disagree.

    Example:
        >>> rep = build_report(costs=[1.0, 2.0], full_cost=2.0, anytime_top1=[0.5, 0.75])
        >>> rep["exits"][0]["cost_fraction"], rep["best_anytime_exit"], rep["curve"]
        (0.5, {'exit': 2, 'top1': 0.75}, None)
    """
    costs_l = _floats(costs)
    top1 = _floats(anytime_top1)
    top5 = None if anytime_top5 is None else _floats(anytime_top5)
    blocks = None if exit_blocks is None else [int(b) for b in exit_blocks]
    for name, values in (("anytime_top1", top1), ("anytime_top5", top5), ("exit_blocks", blocks)):
        if values is not None and len(values) != len(costs_l):
            raise ValueError(f"{name} has {len(values)} entries but there are {len(costs_l)} exits (costs)")
    full = float(full_cost)
    exits = [
        {
            "exit": k + 1,
            "block": None if blocks is None else blocks[k],
            "cost": c,
            "cost_fraction": c / full,
            "top1": top1[k],
            "top5": None if top5 is None else top5[k],
        }
        for k, c in enumerate(costs_l)
    ]
    best = max(range(len(top1)), key=lambda k: (top1[k], -k))
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "unit": cost_unit,
        "thresholds_from": "calibration split",
        "full_model": {"cost": full, "top1": full_accuracy},
        "exits": exits,
        "best_anytime_exit": {"exit": best + 1, "top1": top1[best]},
        "curve": None,
        "budgets": [to_jsonable(p) for p in operating_points],
        "auc": None,
    }
    if curve is not None:
        report["curve"] = to_jsonable(curve)
        lo, hi = auc_range
        report["auc"] = {
            "value": area_under_curve(curve.test_cost_fraction, curve.test_accuracy, lo, hi),
            "lo": lo,
            "hi": hi,
            "of": "test top-1 accuracy vs test cost fraction, mean over the range",
        }
    if extra:
        clash = set(extra) & set(report)
        if clash:
            raise ValueError(f"extra keys {sorted(clash)} clash with the report's own keys")
        report.update(extra)
    return to_jsonable(report)


def read_report(path: str) -> dict[str, Any]:
    """The content of a ``report.json`` written by ``dmpo test``, checked to be one of this format.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not valid JSON, not a report, or of another format version (one sentence that
            says to re-run ``dmpo test``).
    """
    data = read_json(path, "report", filename="report.json", writer="`dmpo test`")
    return check_format(
        data,
        path,
        name=REPORT_FORMAT,
        version=REPORT_FORMAT_VERSION,
        what="dmpo test report",
        remedy="re-run `dmpo test` on the checkpoint to write a new report.json",
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _pct(x: Any, digits: int = 2) -> str:
    return "-" if x is None or isinstance(x, str) else f"{100 * x:.{digits}f}"


def _q(q: Any) -> str:
    return q if isinstance(q, str) else f"{q:.4g}"


def _savings_table(report: Mapping[str, Any]) -> list[str]:
    """Per budget: test top-1 next to the full model's, the difference, and the share of its FLOPs saved."""
    full = report["full_model"]
    if full.get("top1") is None or not report["budgets"]:
        return []
    rows = [
        [
            _pct(b["budget_fraction"], 1),
            _pct(b["test_accuracy"]),
            _pct(full["top1"]),
            f"{100 * (b['test_accuracy'] - full['top1']):+.2f}",
            _pct(1.0 - b["test_cost_fraction"], 1),
        ]
        for b in report["budgets"]
    ]
    headers = ["budget %", "test top-1 %", "full model top-1 %", "difference (points)", "FLOPs saved %"]
    return [
        "",
        f"What early exit buys (full model = last exit, {full['cost']:.4f} GFLOPs per image; "
        "FLOPs saved = 1 - test cost / full cost)",
        *_table(headers, rows),
    ]


def format_report_table(report: Mapping[str, Any]) -> str:
    """The printed summary of a report from :func:`build_report`: per exit, per budget, and totals.

    Args:
        report: The report dict.

    Returns:
        A multi-line plain-text table.
    """
    out = ["Early-exit evaluation: results on the test split, thresholds from the calibration split"]
    out.append(f"Cost unit: {report['unit']}")
    full = report["full_model"]["cost"]
    has_top5 = any(e["top5"] is not None for e in report["exits"])
    out += ["", "Anytime prediction (each exit alone)"]
    headers = ["exit", "block", "GFLOPs", "cost %", "top-1 %"] + (["top-5 %"] if has_top5 else [])
    rows = [
        [
            str(e["exit"]),
            "-" if e["block"] is None else str(e["block"]),
            f"{e['cost']:.4f}",
            _pct(e["cost_fraction"], 1),
            _pct(e["top1"]),
        ]
        + ([_pct(e["top5"])] if has_top5 else [])
        for e in report["exits"]
    ]
    out += _table(headers, rows)
    if report["budgets"]:
        k = len(report["exits"])
        out += ["", "Budgeted batch classification (thresholds from the calibration split, results on test)"]
        exits_header = f"test exits % ({'/'.join(str(i + 1) for i in range(k))})"
        headers = [
            "budget %",
            "budget GFLOPs",
            "test top-1 %",
            "test GFLOPs",
            "test cost %",
            exits_header,
            "cal top-1 %",
            "q",
        ]
        rows = []
        for b in report["budgets"]:
            hist = b["test_histogram"]
            total = max(1, sum(hist))
            rows.append(
                [
                    _pct(b["budget_fraction"], 1),
                    f"{b['budget_cost']:.4f}",
                    _pct(b["test_accuracy"]),
                    f"{b['test_cost']:.4f}",
                    _pct(b["test_cost_fraction"], 1),
                    "/".join(f"{100 * h / total:.1f}" for h in hist),
                    _pct(b["cal_accuracy"]),
                    _q(b["q"]),
                ]
            )
        out += _table(headers, rows)
        out += _savings_table(report)
    calibration = report.get("calibration") or {}
    if calibration.get("ece_before") is not None:
        ece = calibration["ece"]
        out += [
            "",
            f"Calibration ({calibration['method']} per exit, fitted on the calibration split; "
            f"ECE on {ece['split']}, {ece['n_bins']} bins, {ece['norm']})",
        ]
        rows = [
            [str(k + 1), f"{t:.3f}", _pct(before), _pct(after)]
            for k, (t, before, after) in enumerate(
                zip(
                    calibration["temperatures"],
                    calibration["ece_before"],
                    calibration["ece_after"],
                    strict=True,
                )
            )
        ]
        out += _table(["exit", "temperature", "ECE before %", "ECE after %"], rows)
    out.append("")
    acc = report["full_model"]["top1"]
    out.append(f"Full model: {full:.4f} GFLOPs" + ("" if acc is None else f", top-1 {_pct(acc)} %"))
    best = report["best_anytime_exit"]
    out.append(f"Best anytime exit: {best['exit']} (top-1 {_pct(best['top1'])} %)")
    if report["auc"] is not None:
        auc = report["auc"]
        span = f"[{auc['lo']:.2f}, {auc['hi']:.2f}]"
        out.append(f"AUC (test top-1 vs cost fraction, mean over {span}): {_pct(auc['value'])} %")
    out.append(f"Unit: {report['unit']}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ files
def write_curve_csv(path: str | os.PathLike[str], curve: BudgetedCurve) -> Path:
    """Write the dynamic curve, one row per q.

    Columns: ``q``, ``threshold_1..K``, ``cal_accuracy``, ``cal_cost``, ``test_accuracy``, ``test_cost``,
    ``test_cost_fraction``, ``test_exit_1..K`` (test sample counts per exit). Infinite values are written
    as ``inf``/``-inf`` (which ``float()`` parses). Costs are in the unit of the curve's costs (GFLOPs).

    Args:
        path: Output file.
        curve: The curve.

    Returns:
        The path written.
    """
    k = curve.thresholds.shape[1]
    header = [
        "q",
        *(f"threshold_{i + 1}" for i in range(k)),
        "cal_accuracy",
        "cal_cost",
        "test_accuracy",
        "test_cost",
        "test_cost_fraction",
        *(f"test_exit_{i + 1}" for i in range(k)),
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    columns = [curve.qs[:, None], curve.thresholds]
    columns += [
        v[:, None]
        for v in (
            curve.cal_accuracy,
            curve.cal_cost,
            curve.test_accuracy,
            curve.test_cost,
            curve.test_cost_fraction,
        )
    ]
    numbers = torch.cat([c.double().cpu() for c in columns], dim=1).tolist()
    for row, hist in zip(numbers, curve.test_histogram.cpu().tolist(), strict=True):
        writer.writerow([repr(x) for x in row] + [str(h) for h in hist])
    data = buf.getvalue().encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def plot_curve(path: str | os.PathLike[str], report: Mapping[str, Any], title: str | None = None) -> Path:
    """Plot test accuracy vs cost as a PNG: anytime points per exit, dynamic curve, budget points.

    x is the cost in GFLOPs (bottom axis) with the fraction of the full model's cost on the top axis;
    y is test top-1 accuracy in percent. Uses matplotlib's Agg canvas directly (no pyplot, no global
    backend change).

    Args:
        path: Output ``.png`` file.
        report: A report from :func:`build_report`.
        title: Figure title (default: what is plotted and where thresholds come from).

    Returns:
        The path written.
    """
    full = report["full_model"]["cost"]
    fig = Figure(figsize=(7.0, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    curve = report["curve"]
    if curve is not None:
        pairs = zip(curve["test_cost"], curve["test_accuracy"], strict=True)
        points = sorted((c, a) for c, a in pairs if c is not None and a is not None)
        ax.plot(
            [c for c, _ in points],
            [100 * a for _, a in points],
            "-",
            color="tab:blue",
            lw=1.5,
            label="dynamic (budgeted batch, q grid)",
        )
    xs = [e["cost"] for e in report["exits"]]
    ys = [100 * e["top1"] for e in report["exits"]]
    ax.plot(xs, ys, "o", color="tab:orange", ms=6, label="anytime (each exit alone)")
    for e, x, y in zip(report["exits"], xs, ys, strict=True):
        ax.annotate(f"exit {e['exit']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if report["budgets"]:
        bx = [b["test_cost"] for b in report["budgets"]]
        by = [100 * b["test_accuracy"] for b in report["budgets"]]
        ax.plot(bx, by, "X", color="tab:red", ms=8, label="budgets (thresholds from calibration)")
        # Budgets that chose the same thresholds share one point: label it once ("50/75/100%").
        labels: dict[tuple[float, float], list[str]] = {}
        for b, x, y in zip(report["budgets"], bx, by, strict=True):
            labels.setdefault((x, y), []).append(f"{100 * b['budget_fraction']:.0f}")
        for (x, y), names in labels.items():
            ax.annotate(
                "/".join(names) + "%",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
                color="tab:red",
            )
    if report["full_model"]["top1"] is not None:
        ax.plot([full], [100 * report["full_model"]["top1"]], "*", color="black", ms=10, label="full model")
    ax.set_xlabel(f"cost per image ({report['unit']})")
    ax.set_ylabel("test top-1 accuracy (%)")
    top = ax.secondary_xaxis("top", functions=(lambda x: x / full, lambda f: f * full))
    top.set_xlabel("fraction of the full model's cost")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    ax.set_title(title or "Test accuracy vs cost (thresholds from the calibration split)", fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


# ----------------------------------------------------------------------------------------------- folder
REPORT_DIR_OPTION = "evaluation.report_dir"
"""The option that names the report folder (named in the messages of :func:`check_report_dir`)."""

REPORT_FILES = (
    "report.json",
    "curve.csv",
    "accuracy_vs_flops.png",
    "thresholds.json",
    "exit_outputs.pt",
    "reliability.png",
)
"""Every file :func:`write_report_folder` may write."""


def check_report_dir(path: str) -> None:
    """Refuse a report folder that holds a report, is a file, or cannot be written, before any work.

    Results are never overwritten by surprise, and an unwritable target fails now, not after the evaluation.

    Raises:
        ConfigFileExistsError: If ``path`` already holds report files.
        ConfigError: If ``path`` (or a parent) is a file, or the folder cannot be created or written.
    """
    existing = [f for f in REPORT_FILES if os.path.exists(os.path.join(path, f))]
    if existing:
        raise ConfigFileExistsError(
            f"{path} already holds a dmpo test report ({', '.join(existing)}); set {REPORT_DIR_OPTION} to a "
            "new folder, or move the old report away",
            option=REPORT_DIR_OPTION,
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(
            f"report_dir {path} is a file; {REPORT_DIR_OPTION} must be a folder (new or empty)",
            option=REPORT_DIR_OPTION,
        )
    # the report is first written to a temporary folder next to ``path``, so its parent must be writable
    check_writable(os.path.dirname(os.path.abspath(path)), f"report_dir {path}", REPORT_DIR_OPTION)
    if os.path.isdir(path):
        check_writable(path, f"report_dir {path}", REPORT_DIR_OPTION)


def write_report_folder(
    report_dir: str,
    report: Mapping[str, Any],
    *,
    curve: BudgetedCurve | None,
    thresholds: Mapping[str, Any] | None,
    outputs: Mapping[str, Any],
) -> None:
    """Write the report folder of ``dmpo test`` (:data:`REPORT_FILES`), complete or not at all.

    Every file is written into a temporary folder next to ``report_dir``, which is then moved into place:
    a failure (full disk, a crash) leaves no partial report that would block a rerun, and an existing
    report is never overwritten (:func:`check_report_dir` runs again first).

    Args:
        report_dir: The report folder (new, or an existing folder without report files).
        report: The report dict of :func:`build_report` (``report.json``, the plot).
        curve: The budgeted-batch curve (``curve.csv``), if computed.
        thresholds: The content of ``thresholds.json``, if thresholds were fitted.
        outputs: The cached per-exit outputs (``exit_outputs.pt``, read with ``torch.load``).
    """
    check_report_dir(report_dir)
    target = os.path.abspath(report_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the report folder gets the usual mode
    try:
        write_json(os.path.join(tmp, "report.json"), report)
        if curve is not None:
            write_curve_csv(os.path.join(tmp, "curve.csv"), curve)
        if thresholds is not None:
            write_json(os.path.join(tmp, "thresholds.json"), thresholds)
        plot_curve(os.path.join(tmp, "accuracy_vs_flops.png"), report)
        if report["calibration"]["method"] != "none":
            plot_reliability(os.path.join(tmp, "reliability.png"), report["calibration"])
        atomic_write(os.path.join(tmp, "exit_outputs.pt"), lambda f: torch.save(dict(outputs), f))
        if not os.path.isdir(target) or not os.listdir(target):
            os.replace(tmp, target)  # atomic; an existing empty folder is replaced
        else:  # a folder the user made holds other files: move the report files in one by one
            _move_files_into(tmp, target)
    except OSError as err:  # a full disk: name the report file, not its temporary folder
        name = err.filename if isinstance(err.filename, str) else ""
        if err.errno is None or not name.startswith(tmp + os.sep):
            raise
        raise OSError(err.errno, err.strerror, os.path.join(target, os.path.relpath(name, tmp))) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_files_into(src: str, dst: str) -> None:
    """Move every file of ``src`` into ``dst``; on a failure the files already moved are taken out again."""
    moved: list[str] = []
    try:
        for name in sorted(os.listdir(src)):
            os.replace(os.path.join(src, name), os.path.join(dst, name))
            moved.append(name)
    except OSError:
        for name in moved:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(dst, name))
        raise
