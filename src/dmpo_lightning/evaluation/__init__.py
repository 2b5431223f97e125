"""Early-exit evaluation: exit rules, the budgeted-batch protocol, counted costs, metrics and reports."""

from typing import Any

from dmpo_lightning.evaluation.exit_rules import ExitRule, exit_score_step, exit_scores
from dmpo_lightning.evaluation.flops import ExitCosts, count_exit_costs
from dmpo_lightning.evaluation.protocol import (
    area_under_curve,
    assign_exits,
    budgeted_curve,
    calibrate_thresholds,
    evaluate_thresholds,
    operating_points,
    select_budgets,
)
from dmpo_lightning.evaluation.report import build_report, format_report_table

__all__ = [
    "BudgetedAccuracy",
    "ExitCosts",
    "ExitOutputsCollector",
    "ExitRule",
    "area_under_curve",
    "assign_exits",
    "budgeted_curve",
    "build_report",
    "calibrate_thresholds",
    "count_exit_costs",
    "evaluate_thresholds",
    "exit_score_step",
    "exit_scores",
    "format_report_table",
    "operating_points",
    "select_budgets",
]


def __getattr__(name: str) -> Any:
    # The torchmetrics-based collectors load on first use, so inference code that only needs the exit
    # rules (dmpo_lightning.deploy.predictor) does not import torchmetrics.
    if name in ("BudgetedAccuracy", "ExitOutputsCollector"):
        from dmpo_lightning.evaluation import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'dmpo_lightning.evaluation' has no attribute {name!r}")
