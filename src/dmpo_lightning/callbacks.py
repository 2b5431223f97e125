"""Callbacks that ride along with :class:`~dmpo_lightning.module.DMPOModule`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from dmpo_lightning.schedules import TwoPhaseSchedule, WeightSpec

__all__ = ["LossWeightScheduler"]


class LossWeightScheduler(pl.Callback):
    """Applies a :class:`~dmpo_lightning.schedules.TwoPhaseSchedule` to the module at every epoch start.

    It writes the epoch's weights into the module's ``loss_weights`` buffer and logs them as
    ``loss_weight/exit_<k>``. The weights depend only on the epoch number, which Lightning restores on
    resume, so a run resumed in phase 1 switches at the same epoch as an uninterrupted one. The schedule is
    built and validated in ``setup`` (when ``max_epochs`` is known), so a bad schedule fails before training.

    DMPOModule returns this callback from ``configure_callbacks`` built from its own hyperparameters;
    you do not add it yourself.

    Args:
        phase1: Phase-1 weights (preset name or list).
        phase2: Phase-2 weights (preset name or list).
        switch_epoch: First epoch of phase 2 (``None`` = half of ``max_epochs``).
        ramp_epochs: Linear transition length in epochs.
    """

    def __init__(
        self,
        phase1: WeightSpec = "depth_increasing",
        phase2: WeightSpec = "uniform",
        switch_epoch: int | None = None,
        ramp_epochs: int = 0,
    ) -> None:
        self.phase1 = phase1
        self.phase2 = phase2
        self.switch_epoch = switch_epoch
        self.ramp_epochs = ramp_epochs
        self.schedule: TwoPhaseSchedule | None = None
        self.applied_epoch: int | None = None
        self._num_exits: int | None = None
        self._max_epochs: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build (and so validate) the schedule for this run."""
        if stage != "fit":
            return
        self._num_exits = pl_module.num_exits
        # fast_dev_run forces one epoch: a real run's switch epoch must not be rejected for it
        self._max_epochs = None if trainer.fast_dev_run else trainer.max_epochs
        self._build()

    def _build(self) -> None:
        switch = self.switch_epoch
        if switch is None and self._max_epochs is None:
            switch = 1  # fast_dev_run: one epoch, phase 1
        self.schedule = TwoPhaseSchedule(
            self._num_exits,
            self.phase1,
            self.phase2,
            switch_epoch=switch,
            ramp_epochs=self.ramp_epochs,
            max_epochs=self._max_epochs,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write this epoch's weights into the module and log them."""
        assert self.schedule is not None, "LossWeightScheduler.setup was not called"
        weights = self.schedule.weights(trainer.current_epoch)
        pl_module.loss_weights.copy_(torch.tensor(weights, dtype=pl_module.loss_weights.dtype))
        self.applied_epoch = trainer.current_epoch
        pl_module.log_dict(
            {f"loss_weight/exit_{k}": w for k, w in enumerate(weights)}, on_step=False, on_epoch=True
        )

    def state_dict(self) -> dict[str, Any]:
        """Schedule settings and the last epoch applied (for inspection; weights follow from the epoch)."""
        return {
            "phase1": self.phase1 if isinstance(self.phase1, str) else list(self.phase1),
            "phase2": self.phase2 if isinstance(self.phase2, str) else list(self.phase2),
            "switch_epoch": None if self.schedule is None else self.schedule.switch_epoch,
            "ramp_epochs": self.ramp_epochs,
            "applied_epoch": self.applied_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the switch epoch the interrupted run resolved, so resuming never moves the switch."""
        if self.switch_epoch is None and state_dict.get("switch_epoch") is not None:
            self.switch_epoch = int(state_dict["switch_epoch"])
            if self._num_exits is not None:
                self._build()
        self.applied_epoch = state_dict.get("applied_epoch")
