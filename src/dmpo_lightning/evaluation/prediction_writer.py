"""``dmpo predict``'s writer: thresholds in, the real early exit of every batch, predictions CSV out.

``trainer.predict(module)`` of a :class:`~dmpo_lightning.module.DMPOModule` brings this callback along with
default options (the module's ``configure_callbacks``); add ``DMPOPredictionWriter(EvaluationOptions(...))``
to the trainer's callbacks to choose the thresholds file, budget and CSV (``dmpo predict --evaluation.*``
does that). Before the first batch it loads the thresholds, temperatures and exit rule ``dmpo test``
calibrated into the module; the module's ``predict_step`` hands over each batch's readable images, which
this callback runs through the real early exit (per batch, or with ``evaluation.predict_engine`` pooled
across batches by the engine so every stage runs on full batches) and writes into the batch's result dict;
at the end of the epoch it writes the CSV (one file per rank under DDP) and prints its summary.

It depends on the small :class:`~dmpo_lightning.evaluation.interface.EarlyExitModule` interface, not on the
module class.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dmpo_lightning.checkpointing import weight_hashes
from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY
from dmpo_lightning.data.predict_images import ERROR_KEY, PATH_KEY, SOURCE_MODE_KEY
from dmpo_lightning.errors import ConfigError
from dmpo_lightning.evaluation.evaluator import EvaluationOptions, check_trained, log_dir
from dmpo_lightning.evaluation.interface import EarlyExitModule, as_early_exit_module
from dmpo_lightning.evaluation.thresholds import load_temperatures, load_thresholds, thresholds_rule
from dmpo_lightning.files import check_output_file
from dmpo_lightning.models.engine import EarlyExitEngine, EngineSession
from dmpo_lightning.models.multi_exit import EarlyExitOutput
from dmpo_lightning.predictions import format_prediction_summary, rows_from_outputs, write_predictions

__all__ = [
    "PENDING_KEY",
    "DMPOPredictionWriter",
    "fill_predictions",
    "predict_batch",
    "predictions_path",
]

PENDING_KEY = "pending_images"
"""Key of a ``predict_step`` result under which its readable images wait for the writer's early exit."""


class DMPOPredictionWriter(pl.Callback):
    """Loads ``thresholds_file`` at ``predict_budget`` before predict, writes ``predictions_file`` after.

    Args:
        options: The evaluation options (thresholds file, budget, predictions file, engine, ...); a mapping
            of their fields works too.
    """

    def __init__(self, options: EvaluationOptions | Mapping[str, Any] | None = None) -> None:
        self.options = EvaluationOptions.coerce(options, name="evaluation")
        self.path: str | None = None
        self._results: list[dict[str, Any]] = []
        self._session: EngineSession | None = None  # predict_engine: the engine pass and its rows
        self._waiting: list[tuple[dict[str, Any], torch.Tensor]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse untrained weights and an existing CSV; load the thresholds before the first batch."""
        module = as_early_exit_module(pl_module, "dmpo predict's writer")
        self._results, self._session, self._waiting = [], None, []
        check_trained(module, self.options, "dmpo predict", trainer.ckpt_path)
        self.path = predictions_path(trainer, self.options)
        check_output_file(self.path, "evaluation.predictions_file")
        load_predict_thresholds(module, self.options, trainer.ckpt_path)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Run the batch's readable images through the early exit and fill in its result dict."""
        self._results.append(outputs)
        pending = outputs.pop(PENDING_KEY, None)
        if pending is None:
            return
        images, rows = pending
        module = as_early_exit_module(pl_module, "dmpo predict's writer")
        if not self.options.predict_engine:
            fill_predictions(outputs, rows, module.forward_early_exit(images))
            return
        if self._session is None:  # filled in later, once its samples have left (flush at the end)
            engine = EarlyExitEngine(pl_module, module.exit_thresholds, batch_size=int(rows.numel()))
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
        module = as_early_exit_module(pl_module, "dmpo predict's writer")
        self._flush()
        results, self._results = self._results, []
        assert self.path is not None, "on_predict_start sets the path"
        costs = module.exit_costs()
        names = prediction_class_names(module, trainer)
        rows = rows_from_outputs(results, class_names=names, exit_gflops=costs.exit_gflops)
        summary = write_predictions(self.path, rows, num_exits=module.num_exits)
        if summary is None:
            return
        text = format_prediction_summary(
            summary,
            full_gflops=costs.full_gflops,
            in_chans=int(module.hparams["in_chans"]),
            budget=self.options.predict_budget,
        )
        print(f"[rank {trainer.global_rank}] {text}" if trainer.world_size > 1 else text)


NON_FINITE_SAMPLE = "the sample holds NaN or infinite values; only finite inputs can be predicted"
"""The ``error`` of a predict row whose input tensor is not finite."""


def predict_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``DMPOModule.predict_step``: one result row per sample, the readable images waiting for the writer.

    Rows: prediction, 0-based exit, score and confidence (filled in by :class:`DMPOPredictionWriter`);
    images the data module could not read (a non-empty ``error`` entry, from ``data.predict_paths``) are not
    run and keep prediction -1 and the reason, as do samples with NaN or infinite values
    (:data:`NON_FINITE_SAMPLE`).
    """
    x = batch[IMAGE_KEY]
    errors = batch.get(ERROR_KEY)
    finite = torch.isfinite(x).flatten(1).all(dim=1).cpu()
    if not bool(finite.all()):  # refused per sample, as an unreadable image is (not class 0, score NaN)
        errors = [
            e or ("" if ok else NON_FINITE_SAMPLE)
            for e, ok in zip(errors or [""] * len(finite), finite.tolist(), strict=True)
        ]
        batch = {**batch, ERROR_KEY: errors}
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
        result[PENDING_KEY] = (x if valid is None else x[valid.to(x.device)], rows)
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


def predictions_path(trainer: pl.Trainer | None, options: EvaluationOptions) -> str:
    """``evaluation.predictions_file`` (else ``<log_dir>/predictions.csv``), one per rank under DDP."""
    path = options.predictions_file or os.path.join(log_dir(trainer), "predictions.csv")
    if trainer is not None and trainer.world_size > 1:
        root, ext = os.path.splitext(path)
        path = f"{root}.rank{trainer.global_rank}{ext}"
    return path


def load_predict_thresholds(module: EarlyExitModule, options: EvaluationOptions, ckpt_path: Any) -> None:
    """Load the thresholds, temperatures and exit rule calibrated for ``predict_budget`` into the module."""
    o = options
    if o.thresholds_file is None:
        if o.predict_budget is not None:
            raise ConfigError(
                "evaluation.predict_budget needs evaluation.thresholds_file (the thresholds.json written by "
                "`dmpo test`)",
                option="evaluation.predict_budget",
            )
        if bool(torch.isinf(module.exit_thresholds[:-1]).all()):
            rank_zero_warn(
                "dmpo predict runs without thresholds (no evaluation.thresholds_file): every sample goes to "
                "the last exit. Run `dmpo test` first and pass its thresholds.json and a predict_budget."
            )
        return
    thresholds = load_thresholds(
        o.thresholds_file,
        o.predict_budget,
        module.model_fingerprint(),
        unit=o.budget_unit,
        num_exits=module.num_exits,
        model_hashes=weight_hashes(module.model, None if ckpt_path is None else str(ckpt_path)),
        allow_other_checkpoint=o.allow_other_checkpoint_thresholds,
    )
    rule = thresholds_rule(o.thresholds_file)
    if o.rule is not None and o.rule != rule:
        raise ConfigError(
            f"evaluation.rule={o.rule} disagrees with {o.thresholds_file}, whose thresholds were fitted for "
            f"the {rule} rule; leave evaluation.rule out (the file's rule is used), or run `dmpo test "
            f"--evaluation.rule {o.rule}` for thresholds of that rule",
            option="evaluation.rule",
        )
    module.exit_thresholds.copy_(torch.tensor(thresholds, dtype=module.exit_thresholds.dtype))
    temperatures = load_temperatures(o.thresholds_file, module.num_exits)
    module.exit_temperatures.copy_(torch.tensor(temperatures, dtype=module.exit_temperatures.dtype))
    module.exit_rule = rule
    rank_zero_info(f"early-exit thresholds ({rule} rule) for budget {o.predict_budget}: {thresholds}")


def prediction_class_names(module: EarlyExitModule, trainer: pl.Trainer | None) -> list[str]:
    """Names for the CSV: the checkpoint's, else the data module's, else ``class_<i>``."""
    n = int(module.hparams["num_classes"])
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
