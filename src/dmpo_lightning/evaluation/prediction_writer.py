"""Predict I/O of :class:`~dmpo_lightning.module.DMPOModule`: thresholds in, predictions CSV out.

The module returns :class:`DMPOPredictionWriter` from ``configure_callbacks`` in ``predict``; you do not
add it yourself. The module's ``predict_step`` runs the real early exit and returns one result dict per
batch (with ``evaluation.predict_engine`` it leaves the images to this callback, whose engine session runs
them on full batches and fills the dicts in once their samples have left); this callback loads the
thresholds ``dmpo test`` calibrated before the first batch, collects the results and, at the end of the
epoch, writes the CSV (one file per rank under DDP) and prints its summary.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dmpo_lightning.checkpointing import weight_hashes
from dmpo_lightning.evaluation.evaluator import as_dmpo_module, log_dir
from dmpo_lightning.predictions import format_prediction_summary, rows_from_outputs, write_predictions

if TYPE_CHECKING:
    from dmpo_lightning.models.multi_exit import EarlyExitOutput
    from dmpo_lightning.module import DMPOModule

__all__ = [
    "PENDING_KEY",
    "DMPOPredictionWriter",
    "fill_predictions",
    "load_predict_thresholds",
    "predict_batch",
    "prediction_class_names",
    "predictions_path",
]

PENDING_KEY = "_pending_images"
"""Key of a ``predict_step`` result whose readable images wait for the engine (``predict_engine``)."""


class DMPOPredictionWriter(pl.Callback):
    """Loads ``thresholds_file`` at ``predict_budget`` before predict, writes ``predictions_file`` after."""

    def __init__(self) -> None:
        self._results: list[dict[str, Any]] = []
        self._session: Any = None  # predict_engine: the engine pass and the rows it still owes
        self._waiting: list[tuple[dict[str, Any], torch.Tensor]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse an existing CSV and load the thresholds before the first batch."""
        self._results, self._session, self._waiting = [], None, []
        load_predict_thresholds(as_dmpo_module(pl_module))

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch's result dict (``predict_step``'s output); queue its images for the engine."""
        self._results.append(outputs)
        pending = outputs.pop(PENDING_KEY, None)
        if pending is None:
            return
        images, rows = pending  # filled in later, once its samples have left (flush at the end)
        if self._session is None:
            from dmpo_lightning.models.engine import EarlyExitEngine

            module = as_dmpo_module(pl_module)
            engine = EarlyExitEngine(module, module.exit_thresholds, batch_size=int(rows.numel()))
            self._session = engine.session()
        self._waiting.append((outputs, rows))
        for out in self._session.push(images):
            fill_predictions(*self._waiting.pop(0), out)

    def _flush(self) -> None:
        """``predict_engine``: run the samples still queued and fill in the rest of the batches."""
        if self._session is None:
            return
        for out in self._session.flush():
            fill_predictions(*self._waiting.pop(0), out)
        if self._waiting:  # cannot happen: the engine returns every pushed batch
            raise RuntimeError(f"the early-exit engine lost {len(self._waiting)} predict batches")
        self._session = None

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the predictions CSV (one file per rank under DDP) and print a summary of it."""
        module = as_dmpo_module(pl_module)
        self._flush()
        results, self._results = self._results, []
        costs = module.exit_costs()
        rows = rows_from_outputs(
            results, class_names=prediction_class_names(module), exit_gflops=costs.exit_gflops
        )
        summary = write_predictions(predictions_path(module), rows, num_exits=module.num_exits)
        if summary is None:
            return
        text = format_prediction_summary(
            summary,
            full_gflops=costs.full_gflops,
            in_chans=module.hparams.in_chans,
            budget=module.evaluation_options.predict_budget,
        )
        if trainer.world_size > 1:
            print(f"[rank {trainer.global_rank}] {text}")
        else:
            print(text)


def predict_batch(module: DMPOModule, batch: dict[str, Any]) -> dict[str, Any]:
    """``DMPOModule.predict_step``: the real early exit of a batch's readable images, one row per sample.

    Rows: prediction, 0-based exit, score and confidence; images the data module could not read (a
    non-empty ``error`` entry, from ``data.predict_paths``) are not run and keep prediction -1 and the
    reason. With ``evaluation.predict_engine`` the images wait under :data:`PENDING_KEY` for this file's
    :class:`DMPOPredictionWriter`, whose engine session fills the rows in.
    """
    from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY
    from dmpo_lightning.data.predict_images import ERROR_KEY, PATH_KEY, SOURCE_MODE_KEY

    x = batch[IMAGE_KEY]
    module._input_shape = tuple(x.shape[1:])
    errors = batch.get(ERROR_KEY)
    valid = torch.tensor([not e for e in errors], dtype=torch.bool) if errors is not None else None
    n = x.shape[0]
    result: dict[str, Any] = {
        "prediction": torch.full((n,), -1, dtype=torch.long),
        "exit_index": torch.full((n,), -1, dtype=torch.long),
        "score": torch.full((n,), math.nan),
        "confidence": torch.full((n,), math.nan),
    }
    rows = valid if valid is not None else torch.ones(n, dtype=torch.bool)
    if bool(rows.any()):
        images = x if valid is None else x[valid.to(x.device)]
        if module.evaluation_options.predict_engine:
            result[PENDING_KEY] = (images, rows)
        else:
            fill_predictions(result, rows, module.forward_early_exit(images))
    for key in (INDEX_KEY, LABEL_KEY):
        if key in batch:
            result[key] = batch[key].cpu()
    for key in (PATH_KEY, ERROR_KEY, SOURCE_MODE_KEY):
        if key in batch:
            result[key] = list(batch[key])
    return result


def fill_predictions(result: dict[str, Any], rows: torch.Tensor, out: EarlyExitOutput) -> None:
    """Write an early exit's outputs into the ``rows`` of a ``predict_step`` result dict."""
    result["prediction"][rows] = out.prediction.cpu()
    result["exit_index"][rows] = out.exit_index.cpu()
    result["score"][rows] = out.score.float().cpu()
    result["confidence"][rows] = out.logits.float().softmax(dim=-1).amax(dim=-1).cpu()


def predictions_path(module: DMPOModule) -> str:
    """``evaluation.predictions_file`` (else ``<log_dir>/predictions.csv``), one per rank under DDP."""
    path = module.evaluation_options.predictions_file or os.path.join(log_dir(module), "predictions.csv")
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        root, ext = os.path.splitext(path)
        path = f"{root}.rank{trainer.global_rank}{ext}"
    return path


def load_predict_thresholds(module: DMPOModule) -> None:
    """Refuse an existing predictions file; load the thresholds calibrated for ``predict_budget``."""
    from dmpo_lightning.evaluation.thresholds import load_temperatures, load_thresholds

    o = module.evaluation_options
    path = predictions_path(module)
    if os.path.exists(path):
        raise FileExistsError(
            f"{path} exists; set model.init_args.evaluation.predictions_file to a new path or move the old "
            "file away"
        )
    if o.thresholds_file is None:
        if o.predict_budget is not None:
            raise ValueError(
                "evaluation.predict_budget needs evaluation.thresholds_file (the thresholds.json written by "
                "`dmpo test`)"
            )
        if bool(torch.isinf(module.exit_thresholds[:-1]).all()):
            rank_zero_warn(
                "dmpo predict runs without thresholds (no evaluation.thresholds_file): every sample goes to "
                "the last exit. Run `dmpo test` first and pass its thresholds.json and a predict_budget."
            )
        return
    trainer = module._trainer
    thresholds = load_thresholds(
        o.thresholds_file,
        o.predict_budget,
        module.model_fingerprint(),
        unit=o.budget_unit,
        num_exits=module.num_exits,
        model_hashes=weight_hashes(module.model, getattr(trainer, "ckpt_path", None)),
        allow_other_checkpoint=o.allow_other_checkpoint_thresholds,
    )
    module.exit_thresholds.copy_(torch.tensor(thresholds, dtype=module.exit_thresholds.dtype))
    temperatures = load_temperatures(o.thresholds_file, module.num_exits)
    module.exit_temperatures.copy_(torch.tensor(temperatures, dtype=module.exit_temperatures.dtype))
    rank_zero_info(f"early-exit thresholds for budget {o.predict_budget}: {thresholds}")


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
