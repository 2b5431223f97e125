"""Predict I/O of :class:`~dmpo_lightning.module.DMPOModule`: thresholds in, predictions CSV out.

The module returns :class:`DMPOPredictionWriter` from ``configure_callbacks`` in ``predict``; you do not
add it yourself. The module's ``predict_step`` runs the real early exit and returns one result dict per
batch; this callback loads the thresholds ``dmpo test`` calibrated before the first batch, collects the
results and, at the end of the epoch, writes the CSV (one file per rank under DDP) and prints its summary.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dmpo_lightning.checkpointing import weight_hashes

if TYPE_CHECKING:
    from dmpo_lightning.module import DMPOModule

__all__ = ["DMPOPredictionWriter", "load_predict_thresholds", "prediction_class_names"]


class DMPOPredictionWriter(pl.Callback):
    """Loads ``thresholds_file`` at ``predict_budget`` before predict, writes ``predictions_file`` after."""

    def __init__(self) -> None:
        self._results: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse an existing CSV and load the thresholds before the first batch."""
        self._results = []
        load_predict_thresholds(_dmpo(pl_module))

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch's result dict (``predict_step``'s output)."""
        # With predict_engine the dict is filled in later, once its samples have left (flush at the end).
        self._results.append(outputs)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the predictions CSV (one file per rank under DDP) and print a summary of it."""
        from dmpo_lightning.evaluation.runner import format_prediction_summary, write_predictions

        module = _dmpo(pl_module)
        module._predict_flush()
        results, self._results = self._results, []
        summary = write_predictions(
            module._predictions_path(),
            results,
            exit_gflops=module.exit_costs().exit_gflops,
            class_names=prediction_class_names(module),
        )
        if summary is None:
            return
        text = format_prediction_summary(summary, module.exit_costs(), module.hparams.in_chans)
        if trainer.world_size > 1:
            print(f"[rank {trainer.global_rank}] {text}")
        else:
            print(text)


def _dmpo(pl_module: pl.LightningModule) -> DMPOModule:
    from dmpo_lightning.module import DMPOModule

    if not isinstance(pl_module, DMPOModule):
        raise TypeError(f"DMPOPredictionWriter serves a DMPOModule, not a {type(pl_module).__name__}")
    return pl_module


def load_predict_thresholds(module: DMPOModule) -> None:
    """Refuse an existing predictions file; load the thresholds calibrated for ``predict_budget``."""
    from dmpo_lightning.evaluation.runner import load_temperatures, load_thresholds

    h = module.hparams
    path = module._predictions_path()
    if os.path.exists(path):
        raise FileExistsError(
            f"{path} exists; set model.init_args.predictions_file to a new path or move the old file away"
        )
    if h.thresholds_file is None:
        if h.predict_budget is not None:
            raise ValueError(
                "predict_budget needs model.thresholds_file (the thresholds.json written by `dmpo test`)"
            )
        if bool(torch.isinf(module.exit_thresholds[:-1]).all()):
            rank_zero_warn(
                "dmpo predict runs without thresholds (no model.thresholds_file): every sample goes to "
                "the last exit. Run `dmpo test` first and pass its thresholds.json and a predict_budget."
            )
        return
    thresholds = load_thresholds(
        h.thresholds_file,
        h.predict_budget,
        module.model_fingerprint(),
        unit=h.budget_unit,
        num_exits=module.num_exits,
        model_hashes=weight_hashes(module.model, module._ckpt_path()),
        allow_other_checkpoint=bool(h.get("allow_other_checkpoint_thresholds", False)),
    )
    module.exit_thresholds.copy_(torch.tensor(thresholds, dtype=module.exit_thresholds.dtype))
    temperatures = load_temperatures(h.thresholds_file, module.num_exits)
    module.exit_temperatures.copy_(torch.tensor(temperatures, dtype=module.exit_temperatures.dtype))
    rank_zero_info(f"early-exit thresholds for budget {h.predict_budget}: {thresholds}")


def prediction_class_names(module: DMPOModule) -> list[str]:
    """Names for the CSV: the checkpoint's, else the data module's, else ``class_<i>``."""
    n = int(module.hparams.num_classes)
    trainer = module._trainer
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    classes = getattr(dm, "classes", None)
    data_names = [str(c) for c in classes] if classes is not None and len(classes) == n else None
    if module.class_names is not None and len(module.class_names) == n:
        if data_names is not None and data_names != list(module.class_names):
            rank_zero_warn(
                f"the checkpoint's class names {list(module.class_names)[:5]} differ from the data "
                f"module's {data_names[:5]}: the model predicts its training classes, so the CSV uses "
                "the checkpoint's names; check that the labels of this dataset mean the same classes"
            )
        return list(module.class_names)
    if data_names is not None:
        return data_names
    rank_zero_warn(
        "the model has no class names (its checkpoint was saved before they were stored, or its data had "
        "none), so the predictions CSV names classes class_0, class_1, ..."
    )
    return [f"class_{i}" for i in range(n)]
