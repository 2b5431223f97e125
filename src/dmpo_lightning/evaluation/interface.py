"""What the evaluation callbacks need from a LightningModule: a small interface, not the module class.

:class:`~dmpo_lightning.evaluation.evaluator.DMPOEvaluator` (``dmpo test``) and
:class:`~dmpo_lightning.evaluation.prediction_writer.DMPOPredictionWriter` (``dmpo predict``) serve any
LightningModule with these members; :class:`~dmpo_lightning.module.DMPOModule` has them. The callbacks
import this protocol, never the module that brings them along, so the package's layers have no cycle.

The test step contract: ``test_step`` returns ``{"index": [B], "target": [B], "logits": [B, K, C]}``
(every exit's logits; the evaluator scores them with the exit rule). The predict step contract:
``predict_step`` returns the dict built by :func:`~dmpo_lightning.evaluation.prediction_writer.predict_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from dmpo_lightning.evaluation.flops import ExitCosts
from dmpo_lightning.models.multi_exit import EarlyExitOutput, MultiExitViT

__all__ = ["EarlyExitModule", "as_early_exit_module"]


@runtime_checkable
class EarlyExitModule(Protocol):
    """A LightningModule with early exits, as the evaluation callbacks use it."""

    hparams: Any
    """``num_classes`` and ``in_chans`` are read; the whole mapping is recorded in ``report.json``."""
    model: MultiExitViT
    """The pure multi-exit model (``exit_blocks``, ``num_exits``): its weights are hashed."""
    exit_thresholds: torch.Tensor
    """``[K]`` thresholds of the real early exit (``+inf`` disables an exit)."""
    exit_temperatures: torch.Tensor
    """``[K]`` per-exit temperatures of the real early exit (1 = none)."""
    exit_rule: str
    """The registered exit rule of the real early exit."""
    class_names: list[str] | None
    """Class names in label order, when known."""
    test_report: dict[str, Any] | None
    """Set by the evaluator to the last report."""
    train_steps: torch.Tensor
    """Training batches these weights were trained on (0: never trained)."""

    @property
    def num_exits(self) -> int:
        """K."""
        ...

    def exit_costs(self) -> ExitCosts:
        """Counted cost of each exit, at the input size of the last test/predict batch."""
        ...

    def model_fingerprint(self) -> dict[str, Any]:
        """What a thresholds file must match to be used with these weights."""
        ...

    def forward_early_exit(
        self, x: torch.Tensor, thresholds: Sequence[float] | None = None, rule: str | None = None
    ) -> EarlyExitOutput:
        """The real early exit of a batch."""
        ...


def as_early_exit_module(pl_module: Any, what: str) -> EarlyExitModule:
    """``pl_module`` as an :class:`EarlyExitModule`, or a ``TypeError`` naming what it lacks."""
    if isinstance(pl_module, EarlyExitModule):
        return pl_module
    missing = [
        name
        for name in ("exit_thresholds", "exit_rule", "train_steps", "exit_costs", "model_fingerprint")
        if not hasattr(pl_module, name)
    ]
    raise TypeError(
        f"{what} serves a LightningModule with early exits (such as DMPOModule); "
        f"{type(pl_module).__name__} lacks {', '.join(missing) or 'members of EarlyExitModule'}"
    )
