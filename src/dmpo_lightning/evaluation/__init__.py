"""Early-exit evaluation: exit rules, the budgeted-batch protocol, counted costs, metrics and reports."""

from dmpo_lightning.evaluation.exit_rules import ExitRule, exit_score_step, exit_scores
from dmpo_lightning.evaluation.flops import ExitCosts, count_exit_costs
from dmpo_lightning.evaluation.metrics import BudgetedAccuracy, ExitOutputsCollector
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
