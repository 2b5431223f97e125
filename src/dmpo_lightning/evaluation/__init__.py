"""Early-exit evaluation: the budgeted-batch protocol, counted costs, metrics and reports.

Names are imported lazily: ``protocol`` and ``flops`` need only torch (and timm), while ``metrics`` needs
torchmetrics and ``report`` matplotlib. The exit rules live with the model
(:mod:`dmpo_lightning.models.exit_rules`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ExitCosts": "flops",
    "count_exit_costs": "flops",
    "BudgetedAccuracy": "metrics",
    "ExitOutputsCollector": "metrics",
    "area_under_curve": "protocol",
    "assign_exits": "protocol",
    "budgeted_curve": "protocol",
    "calibrate_thresholds": "protocol",
    "evaluate_thresholds": "protocol",
    "operating_points": "protocol",
    "select_budgets": "protocol",
    "build_report": "report",
    "format_report_table": "report",
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BudgetedAccuracy",
    "ExitCosts",
    "ExitOutputsCollector",
    "area_under_curve",
    "assign_exits",
    "budgeted_curve",
    "build_report",
    "calibrate_thresholds",
    "count_exit_costs",
    "evaluate_thresholds",
    "format_report_table",
    "operating_points",
    "select_budgets",
]
