"""Glue between the LightningModule's test/predict loops and the protocol: report files and thresholds."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from dmpo_lightning.evaluation.flops import ExitCosts
from dmpo_lightning.evaluation.protocol import budgeted_curve, operating_points
from dmpo_lightning.evaluation.report import (
    build_report,
    decode_float,
    format_report_table,
    plot_curve,
    to_jsonable,
    write_curve_csv,
    write_json,
)

__all__ = [
    "REPORT_FILES",
    "check_budgets",
    "check_report_dir",
    "format_speed_table",
    "load_thresholds",
    "run_test_protocol",
    "time_early_exit",
    "write_predictions",
]

REPORT_FILES = ("report.json", "curve.csv", "accuracy_vs_flops.png", "thresholds.json", "exit_outputs.pt")
THRESHOLDS_FORMAT = "dmpo-thresholds-v1"


def check_report_dir(path: str) -> None:
    """Refuse to write a report where one already is (results are never overwritten by surprise)."""
    existing = [f for f in REPORT_FILES if os.path.exists(os.path.join(path, f))]
    if existing:
        raise FileExistsError(
            f"{path} already holds a dmpo test report ({', '.join(existing)}); set "
            "model.init_args.report_dir to a new folder, or move the old report away"
        )


def check_budgets(budgets: Sequence[float], unit: str, costs: ExitCosts) -> None:
    """Fail before any work on budgets no early-exit policy can meet (below exit 1's cost or above 1.0)."""
    scale = costs.full_gflops if unit == "fraction" else 1.0
    lo, hi = costs.exit_gflops[0] / scale, costs.full_gflops / scale
    what = "fraction of the full model's cost" if unit == "fraction" else "GFLOPs"
    for b in budgets:
        if not lo * (1 - 1e-9) <= float(b) <= hi * (1 + 1e-9):
            raise ValueError(
                f"budget {b} ({what}) is outside the achievable range [{lo:.4g}, {hi:.4g}]: every sample "
                f"leaving at the first exit costs {lo:.4g} and the full model {hi:.4g}; "
                "fix model.init_args.budgets"
            )


def _correct(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return outputs["preds"] == outputs["target"][:, None]


def run_test_protocol(
    *,
    test: Mapping[str, torch.Tensor],
    calibration: Mapping[str, torch.Tensor] | None,
    costs: ExitCosts,
    exit_blocks: Sequence[int],
    budgets: Sequence[float],
    budget_unit: Literal["fraction", "gflops"],
    exit_rule: str,
    hparams: Mapping[str, Any],
    checkpoint_hash: str,
    report_dir: str,
    is_global_zero: bool,
    split_file: str | None,
    anytime_metrics: Sequence[Mapping[str, float]],
    fingerprint: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, float]]:
    """Budgeted-batch evaluation of cached exit outputs; prints the table and writes the report on rank 0.

    Args:
        test: Collected test outputs (``index``, ``scores``, ``preds``, ``target``).
        calibration: Collected calibration outputs, or ``None`` (then only anytime results are reported).
        costs: Counted per-exit costs.
        exit_blocks: Block number of every exit.
        budgets: Cost budgets in ``budget_unit``.
        budget_unit: ``fraction`` of the full cost or ``gflops``.
        exit_rule: The rule that produced the scores.
        hparams: Model configuration, stored in the report.
        checkpoint_hash: Identifies the weights the outputs came from.
        report_dir: Output folder (must not hold a report yet).
        is_global_zero: Only rank 0 prints and writes.
        split_file: The calibration-indices file of the run, if any.
        anytime_metrics: Per exit, ``{"acc": ..., "acc_top5": ...}`` on the test split.
        fingerprint: What a reused thresholds file must match.

    Returns:
        The report dict and a flat dict of summary metrics for the logger.
    """
    costs_g = torch.tensor(costs.exit_gflops, dtype=torch.float64)
    full_g = costs.full_gflops
    top1 = [m["acc"] for m in anytime_metrics]
    top5 = [m["acc_top5"] for m in anytime_metrics] if all("acc_top5" in m for m in anytime_metrics) else None
    unit = "fraction" if budget_unit == "fraction" else "absolute"
    curve, points = None, []
    if calibration is None or calibration["scores"].shape[0] == 0:
        rank_zero_warn(
            "no calibration split was evaluated, so no early-exit thresholds can be fitted; only anytime "
            "(per-exit) results are reported. Use a data module whose test_dataloader returns "
            "[test, calibration] (BenchmarkDataModule does)."
        )
    else:
        cal_scores, cal_correct = calibration["scores"].double(), _correct(calibration)
        test_scores, test_correct = test["scores"].double(), _correct(test)
        curve = budgeted_curve(cal_scores, cal_correct, test_scores, test_correct, costs_g, full_g)
        points = operating_points(
            cal_scores, cal_correct, test_scores, test_correct, costs_g, full_g, budgets, unit
        )
    report = build_report(
        costs=costs_g,
        full_cost=full_g,
        anytime_top1=top1,
        anytime_top5=top5,
        exit_blocks=exit_blocks,
        curve=curve,
        operating_points=points,
        full_accuracy=top1[-1],
        extra={
            "exit_rule": exit_rule,
            "checkpoint_hash": checkpoint_hash,
            "split_indices_file": split_file,
            "num_test": int(test["scores"].shape[0]),
            "num_calibration": 0 if calibration is None else int(calibration["scores"].shape[0]),
            "cost_counting": costs.to_dict(),
            "config": to_jsonable(_plain(hparams)),
        },
    )
    summary: dict[str, float] = {f"test/gflops_exit{k}": float(c) for k, c in enumerate(costs.exit_gflops)}
    summary["test/gflops_full"] = float(full_g)
    for p in points:
        tag = f"budget_{p.budget:g}"
        summary[f"test/{tag}/acc"] = float(p.test_accuracy)
        summary[f"test/{tag}/cost_fraction"] = float(p.test_cost_fraction)
    if report.get("auc"):
        summary["test/auc"] = float(report["auc"]["value"])
    if is_global_zero:
        _write_all(report_dir, report, curve, points, test, calibration, checkpoint_hash, fingerprint)
        print(format_report_table(report))
        print(f"\nreport, curve, plot and thresholds written to {report_dir}")
    return report, summary


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _write_all(
    report_dir: str,
    report: dict[str, Any],
    curve: Any,
    points: Sequence[Any],
    test: Mapping[str, torch.Tensor],
    calibration: Mapping[str, torch.Tensor] | None,
    checkpoint_hash: str,
    fingerprint: Mapping[str, Any],
) -> None:
    os.makedirs(report_dir, exist_ok=True)
    check_report_dir(report_dir)
    write_json(os.path.join(report_dir, "report.json"), report)
    if curve is not None:
        write_curve_csv(os.path.join(report_dir, "curve.csv"), curve)
        thresholds = {
            "format": THRESHOLDS_FORMAT,
            "fingerprint": dict(fingerprint),
            "checkpoint_hash": checkpoint_hash,
            "budgets": [
                {
                    "budget": p.budget,
                    "unit": p.budget_unit,
                    "thresholds": p.thresholds,
                    "cal_cost_fraction": p.cal_cost / curve.full_cost,
                    "test_accuracy": p.test_accuracy,
                }
                for p in points
            ],
            "qs": curve.qs,
            "thresholds_per_q": curve.thresholds,
        }
        write_json(os.path.join(report_dir, "thresholds.json"), to_jsonable(thresholds))
    plot_curve(os.path.join(report_dir, "accuracy_vs_flops.png"), report)
    cache = {"checkpoint_hash": checkpoint_hash, "test": dict(test), "calibration": calibration}
    tmp = os.path.join(report_dir, ".exit_outputs.pt.tmp")
    torch.save(cache, tmp)
    os.replace(tmp, os.path.join(report_dir, "exit_outputs.pt"))


def load_thresholds(
    path: str, budget: float | None, fingerprint: Mapping[str, Any], unit: str = "fraction"
) -> list[float]:
    """Thresholds for ``budget`` from a ``thresholds.json`` written by ``dmpo test``.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a thresholds file, was made for another model (different backbone, exits,
            classes, heads or exit rule), or holds no entry for ``budget`` (the available ones are listed).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"thresholds file {path} does not exist; `dmpo test` writes thresholds.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"thresholds file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"{path} is not a dmpo thresholds file (format {THRESHOLDS_FORMAT})")
    theirs = data.get("fingerprint", {})
    diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
    if diff:
        details = "; ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"thresholds file {path} was calibrated for another model ({details})")
    entries = data.get("budgets", [])
    if budget is None:
        raise ValueError(
            f"choose one of the budgets in {path} with model.init_args.predict_budget: "
            f"{[e['budget'] for e in entries]}"
        )
    want = "fraction" if unit == "fraction" else "absolute"
    for e in entries:
        if abs(float(e["budget"]) - float(budget)) < 1e-9 and e.get("unit", want) == want:
            return [decode_float(t) for t in e["thresholds"]]
    raise ValueError(
        f"budget {budget} ({unit}) is not in {path}; available: {[e['budget'] for e in entries]} "
        "(run `dmpo test` with it in model.init_args.budgets)"
    )


def write_predictions(path: str, rows: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """CSV of per-sample early-exit predictions (atomic write)."""
    if not rows:
        return
    columns = [c for c in ("index", "label", "prediction", "exit_index", "score") if c in rows[0]]
    merged = {c: torch.cat([r[c] for r in rows]).tolist() for c in columns}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns])
        writer.writerows(zip(*(merged[c] for c in columns), strict=False))
    os.replace(tmp, path)


def time_early_exit(
    module: Any,
    images: Sequence[torch.Tensor],
    budgets: Sequence[Mapping[str, Any]],
    *,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Measured ms/image of the full model and of the real early exit at each budget's thresholds.

    The full model (``forward_static``), the per-batch early exit (``module.forward_early_exit``) and the
    batching engine (:class:`~dmpo_lightning.models.engine.EarlyExitEngine`, at the batches' size) run over
    the same test batches, interleaved, ``warmup`` untimed and ``repeats`` timed passes each (median;
    CUDA-synchronised). Next to each measured speed-up is the FLOPs speed-up at the same thresholds, from the
    exit histogram of this very run and the counted per-exit costs.

    Args:
        module: A ``DMPOModule`` (its model, scoring and counted costs are used).
        images: Test batches ``[B, C, H, W]`` on the module's device.
        budgets: The report's ``budgets`` entries (``budget``, ``budget_unit``, ``thresholds``).
        repeats: Timed passes per path.
        warmup: Untimed passes per path first.

    Returns:
        A JSON-ready dict: device, threads, images, batch size and one row per budget.
    """
    import platform
    import statistics
    import time

    from dmpo_lightning.models.engine import EarlyExitEngine

    model = module.model
    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Any) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    costs = module.exit_costs()
    c_k = torch.tensor(costs.exit_macs, dtype=torch.float64)
    n = sum(int(x.shape[0]) for x in images)
    batch = int(images[0].shape[0]) if images else 0
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for entry in budgets:
                thresholds = [decode_float(t) for t in entry["thresholds"]]
                engine = EarlyExitEngine(module, thresholds, batch_size=max(batch, 1))
                paths = {
                    "full": lambda: [model.forward_static(x) for x in images],
                    "early": lambda t=thresholds: [module.forward_early_exit(x, t) for x in images],
                    "engine": lambda e=engine: e.run(images),
                }
                exits = torch.cat([module.forward_early_exit(x, thresholds).exit_index for x in images])
                for _ in range(warmup):
                    for fn in paths.values():
                        timed(fn)
                times: dict[str, list[float]] = {name: [] for name in paths}
                for _ in range(repeats):
                    for name, fn in paths.items():
                        times[name].append(timed(fn))
                med = {name: statistics.median(v) for name, v in times.items()}
                hist = torch.bincount(exits.cpu(), minlength=model.num_exits)
                flops_x = costs.full_macs / float((hist.double() / n * c_k).sum())
                rows.append(
                    {
                        "budget": entry["budget"],
                        "budget_unit": entry.get("budget_unit"),
                        "full_ms_per_image": 1e3 * med["full"] / n,
                        "early_ms_per_image": 1e3 * med["early"] / n,
                        "engine_ms_per_image": 1e3 * med["engine"] / n,
                        "measured_speedup": med["full"] / med["early"],
                        "engine_speedup": med["full"] / med["engine"],
                        "flops_speedup": flops_x,
                        "exit_histogram": hist.tolist(),
                    }
                )
    finally:
        model.train(was_training)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": f"{device} ({name or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "images": n,
        "batch_size": batch,
        "repeats": repeats,
        "timing": "median of interleaved passes over the same test images (per-batch early exit and engine)",
        "budgets": rows,
    }


def format_speed_table(speed: Mapping[str, Any]) -> str:
    """Plain-text table of :func:`time_early_exit`'s result."""
    lines = [
        f"measured early-exit speed on {speed['device']}, {speed['images']} test images, batch "
        f"{speed['batch_size']}, {speed['torch_threads']} threads:",
        "  budget  full ms/img  early ms/img  engine ms/img  measured x  engine x  FLOPs x",
    ]
    for r in speed["budgets"]:
        lines.append(
            f"  {r['budget']:>6g}  {r['full_ms_per_image']:>11.3f}  {r['early_ms_per_image']:>12.3f}  "
            f"{r['engine_ms_per_image']:>13.3f}  {r['measured_speedup']:>10.2f}  "
            f"{r['engine_speedup']:>8.2f}  {r['flops_speedup']:>7.2f}"
        )
    return "\n".join(lines)
