"""The early-exit protocol of ``dmpo test`` over collected exit outputs: budgets in, report folder out.

:func:`check_budgets` refuses budgets no policy can meet before any work; :func:`run_test_protocol` fits the
thresholds on the calibration split, evaluates them on the test split, prints the table and writes the report
folder (:func:`~dmpo_lightning.evaluation.report.write_report_folder`, with ``thresholds.json`` from
:mod:`dmpo_lightning.evaluation.thresholds`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from dmpo_lightning.errors import ConfigError
from dmpo_lightning.evaluation.calibration import TemperatureCalibration
from dmpo_lightning.evaluation.flops import ExitCosts
from dmpo_lightning.evaluation.protocol import (
    BudgetUnitOption,
    budgeted_curve,
    check_budget_range,
    operating_points,
    protocol_budget_unit,
)
from dmpo_lightning.evaluation.report import (
    build_report,
    describe_environment,
    format_report_table,
    write_report_folder,
)
from dmpo_lightning.evaluation.thresholds import thresholds_file_content
from dmpo_lightning.files import to_jsonable

__all__ = ["check_budgets", "run_test_protocol"]


def check_budgets(budgets: Sequence[float], unit: str, costs: ExitCosts) -> None:
    """Fail before any work on budgets no early-exit policy can meet (below exit 1's cost or above 1.0)."""
    try:
        check_budget_range(
            budgets, costs.exit_gflops[0], costs.full_gflops, protocol_budget_unit(unit), "GFLOPs"
        )
    except ValueError as err:
        raise ConfigError(f"{err}; fix evaluation.budgets", option="evaluation.budgets") from None


def _correct(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return outputs["preds"] == outputs["target"][:, None]


def run_test_protocol(
    *,
    test: Mapping[str, torch.Tensor],
    calibration: Mapping[str, torch.Tensor] | None,
    costs: ExitCosts,
    exit_blocks: Sequence[int],
    budgets: Sequence[float],
    budget_unit: BudgetUnitOption,
    exit_rule: str,
    hparams: Mapping[str, Any],
    checkpoint_hash: str,
    report_dir: str,
    is_global_zero: bool,
    split_file: str | None,
    anytime_metrics: Sequence[Mapping[str, float]],
    fingerprint: Mapping[str, Any],
    weights_hash: str | None = None,
    temperature: TemperatureCalibration | None = None,
    data: Mapping[str, Any] | None = None,
    environment: Mapping[str, Any] | None = None,
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
        weights_hash: Hash of the evaluated weights themselves (``weights:...``), stored in
            ``thresholds.json`` next to ``checkpoint_hash`` so ``dmpo predict`` can recognise the same weights
            whether they come from a checkpoint file or from memory.
        temperature: Per-exit temperatures the scores were computed with (``calibration: temperature``),
            with the ECE before/after; ``None`` = raw scores.
        data: The data the outputs came from (:func:`~dmpo_lightning.evaluation.report.describe_data`).
        environment: Versions, device and date (default: :func:`~dmpo_lightning.evaluation.report.
            describe_environment` without a trainer).

    Returns:
        The report dict and a flat dict of summary metrics for the logger.
    """
    costs_g = torch.tensor(costs.exit_gflops, dtype=torch.float64)
    full_g = costs.full_gflops
    top1 = [m["acc"] for m in anytime_metrics]
    top5 = [m["acc_top5"] for m in anytime_metrics] if all("acc_top5" in m for m in anytime_metrics) else None
    unit = protocol_budget_unit(budget_unit)
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
            "calibration": {"method": "none"} if temperature is None else temperature.to_report(),
            "checkpoint_hash": checkpoint_hash,
            "split_indices_file": split_file,
            "num_test": int(test["scores"].shape[0]),
            "num_calibration": 0 if calibration is None else int(calibration["scores"].shape[0]),
            "cost_counting": costs.to_dict(),
            "config": to_jsonable(hparams, default=repr),
            "data": None if data is None else dict(data),
            "environment": dict(environment) if environment is not None else describe_environment(),
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
    if temperature is not None:
        for k in range(len(costs.exit_gflops)):
            summary[f"test/ece_exit{k}"] = float(temperature.ece_before[k])
            summary[f"test/ece_calibrated_exit{k}"] = float(temperature.ece_after[k])
    if is_global_zero:
        print(format_report_table(report))  # first: a failing write must not cost the user the results
        temperatures = report["calibration"].get("temperatures")
        thresholds = None
        if curve is not None:
            thresholds = thresholds_file_content(
                curve,
                points,
                rule=exit_rule,
                fingerprint=fingerprint,
                checkpoint_hash=checkpoint_hash,
                weights_hash=weights_hash,
                temperatures=temperatures,
            )
        outputs = {
            "checkpoint_hash": checkpoint_hash,
            "test": dict(test),
            "calibration": calibration,
            "temperatures": temperatures,  # the scores are of logits / T_k
        }
        write_report_folder(report_dir, report, curve=curve, thresholds=thresholds, outputs=outputs)
        print(f"\nreport, curve, plot and thresholds written to {report_dir}")
    return report, summary
