"""``dmpo test``'s evaluator: the evaluation options and the callback that runs the early-exit protocol.

``trainer.test(module)`` of a :class:`~dmpo_lightning.module.DMPOModule` brings this callback along with
default options (the module's ``configure_callbacks``); add ``DMPOEvaluator(EvaluationOptions(...))`` to the
trainer's callbacks to choose the rule, budgets or report folder (``dmpo test --evaluation.budgets ...`` does
that). The module's ``test_step`` returns every exit's logits; the evaluator tells the test and calibration
loaders apart by their samples' split tags, scores the exits with the exit rule, collects the per-sample
outputs (DDP-safe and de-duplicated), optionally fits per-exit temperatures, then runs the budgeted-batch
protocol, prints the table, writes the report and logs the summary.

It depends on the small :class:`~dmpo_lightning.evaluation.interface.EarlyExitModule` interface, not on the
module class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from dmpo_lightning.checkpointing import checkpoint_hash, weights_hash
from dmpo_lightning.constants import IMAGE_KEY, SPLIT_KEY
from dmpo_lightning.errors import ConfigError, ConfigFileExistsError
from dmpo_lightning.evaluation.calibration import (
    CalibrationMethod,
    ExitLogitsCollector,
    TemperatureCalibration,
    calibrate_exits,
    check_calibration_method,
)
from dmpo_lightning.evaluation.interface import EarlyExitModule, as_early_exit_module
from dmpo_lightning.evaluation.metrics import ExitOutputsCollector
from dmpo_lightning.evaluation.protocol import BudgetUnitOption
from dmpo_lightning.evaluation.protocol_run import check_budgets, run_test_protocol
from dmpo_lightning.evaluation.report import check_report_dir, describe_data, describe_environment
from dmpo_lightning.evaluation.timing import format_speed_table, time_early_exit
from dmpo_lightning.files import CLAIM_MARKER, claim_folder, release_folder, write_json
from dmpo_lightning.models.exit_rules import ExitRule, exit_scores
from dmpo_lightning.options import OptionGroup

__all__ = [
    "DEFAULT_RULE",
    "DMPOEvaluator",
    "EvaluationOptions",
    "check_trained",
    "log_dir",
    "split_of_batch",
]

DEFAULT_RULE = "confidence"
"""The exit rule of ``dmpo test`` when ``evaluation.rule`` is not set."""


@dataclass(frozen=True)
class EvaluationOptions(OptionGroup):
    """How ``dmpo test`` evaluates and ``dmpo predict`` serves the exits (not part of the model).

    In a config: ``evaluation: {budgets: [0.5]}`` beside ``model:``; on the command line
    ``--evaluation.rule entropy``. These options never change the weights, so they are not stored in the
    checkpoint: ``dmpo test/predict --ckpt_path`` use the values given to them.
    """

    rule: ExitRule | None = None
    """Early-exit rule ``dmpo test`` fits thresholds for: ``confidence`` (max softmax, the default),
    ``entropy``, ``patience`` or a registered one. ``dmpo predict`` uses the rule of its thresholds file (a
    different value given here is refused)."""
    calibration: CalibrationMethod = "none"
    """``temperature`` fits one temperature per exit on the calibration split (NLL) before the thresholds are
    chosen and scores every exit from ``logits / T_k`` (stored in ``thresholds.json``, used by ``dmpo
    predict``; ``dmpo test`` reports each exit's ECE before and after and writes ``reliability.png``);
    ``none`` uses the raw softmax (the default: on the quickstart ``temperature`` lowered top-1 at the 0.33
    budget by 0.1 point, docs/calibration.md)."""
    budgets: tuple[float, ...] = (0.33, 0.5, 0.75, 1.0)
    """Cost budgets ``dmpo test`` reports (fractions of the full cost, or GFLOPs). Each must lie between exit
    1's cost and the full model's: with exits after blocks 3/6/9/12 exit 1 costs a little over 25%."""
    budget_unit: BudgetUnitOption = "fraction"
    """Unit of ``budgets`` and ``predict_budget``: ``fraction`` or ``gflops``."""
    report_dir: str | None = None
    """Where ``dmpo test`` writes its report: a new or empty folder (``None`` = the first free
    ``dmpo_test``, ``dmpo_test_1``, ... in the log folder, or in the run folder of ``--ckpt_path``)."""
    thresholds_file: str | None = None
    """``thresholds.json`` written by ``dmpo test``, used by ``dmpo predict``."""
    predict_budget: float | None = None
    """Budget whose thresholds ``dmpo predict`` uses (must be in ``thresholds_file``)."""
    allow_other_checkpoint_thresholds: bool = False
    """Let ``dmpo predict`` use thresholds fitted on other weights of the same architecture (warns, naming
    both hashes); by default they are refused."""
    predictions_file: str | None = None
    """CSV ``dmpo predict`` writes (``None`` = ``<log_dir>/predictions.csv``)."""
    predict_engine: bool = False
    """``dmpo predict`` pools the samples that continue after each exit across batches, so every stage runs
    on full batches (:class:`~dmpo_lightning.models.engine.EarlyExitEngine`); same CSV rows and order."""
    time_early_exit: int = 0
    """``dmpo test`` also times the real early exit at each budget's thresholds on the first this many test
    images (full model vs per-batch early exit vs engine), in ``report.json`` under ``early_exit_speed``;
    0 = off."""
    allow_untrained: bool = False
    """Evaluate or predict with weights that were never trained (0 optimizer steps) on purpose; by default
    that is refused, so random weights are never reported as results."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_calibration_method(self.calibration)
        n = self.time_early_exit
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(
                "evaluation.time_early_exit must be an integer >= 0 (test images to time, 0 = off); "
                f"got {n!r}"
            )

    @property
    def test_rule(self) -> str:
        """The rule ``dmpo test`` uses: ``rule``, else :data:`DEFAULT_RULE`."""
        return self.rule or DEFAULT_RULE


def log_dir(trainer: pl.Trainer | None) -> str:
    """The trainer's log folder (the current directory without a trainer or logger)."""
    return trainer.log_dir if trainer is not None and trainer.log_dir else os.getcwd()


def check_trained(module: EarlyExitModule, options: EvaluationOptions, what: str, ckpt_path: Any) -> None:
    """Refuse weights that were never trained (0 optimizer steps), unless ``evaluation.allow_untrained``.

    Raises:
        ConfigError: Naming what was asked (``what``) and how to give trained weights.
    """
    if options.allow_untrained or int(module.train_steps) > 0:
        return
    where = (
        f"--ckpt_path {ckpt_path} holds weights that were never trained (0 optimizer steps)"
        if ckpt_path
        else "no checkpoint was given, so the weights are freshly built"
    )
    raise ConfigError(
        f"{what} would report untrained weights: {where}; give the checkpoint of a run that trained "
        "(--ckpt_path <run>/checkpoints/<file>.ckpt), or set evaluation.allow_untrained=true to do it on "
        "purpose",
        option="ckpt_path",
    )


def split_of_batch(batch: Mapping[str, Any]) -> str:
    """``"test"`` or ``"calibration"`` by the batch's first :data:`SPLIT_KEY` tag (untagged: ``"test"``)."""
    tags = batch.get(SPLIT_KEY)
    if tags is None:
        return "test"
    return str(tags[0]) if isinstance(tags, (list, tuple)) else str(tags)


class DMPOEvaluator(pl.Callback):
    """Collects the module's ``test_step`` outputs per split and runs the protocol at the end of the epoch.

    Args:
        options: The evaluation options (rule, calibration, budgets, report folder, ...); a mapping of
            their fields works too.
        claimed_report_dir: A folder the caller has already created exclusively for this report (the CLI
            does, to put the test's config and logs beside it); ``None``: the evaluator claims
            ``options.report_dir`` or the first free ``<log_dir>/dmpo_test[_k]`` itself.

    Attributes:
        collectors: Per-split ``ExitOutputsCollector`` (``test``, ``calibration``, ``test_top5`` for more
            than 5 classes) and, with ``calibration: temperature``, ``ExitLogitsCollector`` (``*_logits``).
        report_dir: The folder this test writes to (set when the test starts).
    """

    def __init__(
        self,
        options: EvaluationOptions | Mapping[str, Any] | None = None,
        *,
        claimed_report_dir: str | None = None,
    ) -> None:
        self.options = EvaluationOptions.coerce(options, name="evaluation")
        self.claimed_report_dir = claimed_report_dir
        self.report_dir: str | None = None
        self.collectors: Any = nn.ModuleDict()
        self._split_of_loader: dict[int, str] = {}
        self._timing_images: list[torch.Tensor] = []
        self._claimed: str | None = None  # a folder this callback created (released again on failure)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse untrained weights and unreachable budgets, claim the report folder, before any batch."""
        module = as_early_exit_module(pl_module, "dmpo test's evaluator")
        o = self.options
        check_trained(module, o, "dmpo test", trainer.ckpt_path)
        check_budgets(o.budgets, o.budget_unit, module.exit_costs())
        self.report_dir = self._claim_report_dir(trainer)
        names = ["test", "calibration"] + (["test_top5"] if int(module.hparams["num_classes"]) > 5 else [])
        collectors: dict[str, nn.Module] = {n: ExitOutputsCollector() for n in names}
        if o.calibration == "temperature":  # temperature scaling needs the logits, N x K x C per split
            collectors.update(test_logits=ExitLogitsCollector(), calibration_logits=ExitLogitsCollector())
        self.collectors = nn.ModuleDict(collectors).to(pl_module.device)  # DDP-synced in compute()
        self._timing_images = []
        module.test_report = None

    def _claim_report_dir(self, trainer: pl.Trainer) -> str:
        """The report folder, created exclusively now (two tests never share one; nothing is overwritten)."""
        if self.claimed_report_dir is not None:
            check_report_dir(self.claimed_report_dir)
            return self.claimed_report_dir
        explicit = self.options.report_dir
        path = explicit or os.path.join(log_dir(trainer), "dmpo_test")
        if trainer.world_size > 1:  # rank 0 claims; the others learn the folder it got
            claimed = self._claim(path, explicit) if trainer.is_global_zero else None
            return str(trainer.strategy.broadcast(claimed))
        return self._claim(path, explicit)

    def _claim(self, path: str, explicit: str | None) -> str:
        if explicit is None:
            path = claim_folder(path, next_free=True)
        else:
            check_report_dir(path)  # a file, or a folder holding a report: one sentence now
            try:
                path = claim_folder(path, empty=False)  # other files of the user's may stay
            except FileExistsError:
                raise ConfigFileExistsError(
                    f"evaluation.report_dir {path} is being written by another dmpo test (it holds "
                    f"{CLAIM_MARKER}); set evaluation.report_dir to another folder",
                    option="evaluation.report_dir",
                ) from None
        self._claimed = path
        return path

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Give back a claimed report folder that is still empty (a failed test leaves nothing behind)."""
        if self._claimed is not None:
            release_folder(self._claimed)
            self._claimed = None

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Forget which test loader held which split (they must stay one-to-one within an epoch)."""
        self._split_of_loader = {}

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Check the batch's split tags before ``test_step`` runs (see :meth:`split`)."""
        self.split(batch, dataloader_idx, len(trainer.num_test_batches))

    def split(self, batch: dict[str, Any], dataloader_idx: int, num_loaders: int = 1) -> str:
        """``"test"`` or ``"calibration"``: the split a test batch comes from, by its :data:`SPLIT_KEY` tags.

        Untagged batches are accepted only from a single test loader (then it is the test split). Mixed
        tags, splits other than test/calibration, and a split spread over several loaders (their sample
        indices would collide) are refused.
        """
        tags = batch.get(SPLIT_KEY)
        how = (
            f"tag every sample with {SPLIT_KEY!r} = 'test' or 'calibration' (BenchmarkDataModule does; wrap "
            "other datasets in dmpo_lightning.data.SplitTagged)"
        )
        if tags is None and num_loaders > 1:
            raise ValueError(
                f"test dataloader {dataloader_idx} of {num_loaders} yields batches without a "
                f"{SPLIT_KEY!r} entry, so the test and calibration splits cannot be told apart; {how}, "
                "or pass the test loader alone (then no thresholds are fitted)"
            )
        names = sorted({str(t) for t in tags}) if isinstance(tags, (list, tuple)) else [split_of_batch(batch)]
        if len(names) != 1:
            raise ValueError(
                f"test dataloader {dataloader_idx} mixes samples of splits {names} in one batch; "
                "give each split its own loader"
            )
        split = names[0]
        if split not in ("test", "calibration"):
            raise ValueError(
                f"test dataloader {dataloader_idx} yields samples of split {split!r}; allowed in "
                "`test` are 'test' and 'calibration' (one loader each)"
            )
        before = self._split_of_loader.setdefault(dataloader_idx, split)
        if before != split:
            raise ValueError(
                f"test dataloader {dataloader_idx} yields samples of both {before!r} and {split!r}; "
                "give each split its own loader"
            )
        others = [i for i, s in self._split_of_loader.items() if s == split and i != dataloader_idx]
        if others:
            raise ValueError(
                f"test dataloaders {others[0]} and {dataloader_idx} both hold {split!r} samples; give "
                "exactly one loader per split (their sample indices would collide)"
            )
        return split

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Score the batch's exits with the rule; collect them; keep test images for ``time_early_exit``."""
        name = self._split_of_loader[dataloader_idx]
        index, y, logits = outputs["index"], outputs["target"], outputs["logits"]
        scores, preds = exit_scores(logits, self.options.test_rule)
        self.collectors[name].update(index, scores, preds, y)
        if f"{name}_logits" in self.collectors:
            self.collectors[f"{name}_logits"].update(index, logits, y)
        if name == "test" and "test_top5" in self.collectors:  # per-sample top-5 hits [B, K]
            hits = (logits.topk(5, dim=-1).indices == y[:, None, None]).any(-1).long()
            self.collectors["test_top5"].update(index, hits.float(), hits, y)
        want = self.options.time_early_exit
        have = sum(int(x.shape[0]) for x in self._timing_images)
        if want and name == "test" and have < want:
            self._timing_images.append(batch[IMAGE_KEY][: want - have].detach().clone())

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the budgeted early-exit protocol, print the table, write the report, log the summary."""
        module = as_early_exit_module(pl_module, "dmpo test's evaluator")
        o = self.options
        c = self.collectors
        if not c["test"].update_called:
            self._reset()
            raise ValueError(
                "no test loader yielded samples of split 'test' (only 'calibration'), so there is nothing to "
                "report; give `test` a loader whose samples are tagged 'test'"
            )
        test = c["test"].compute()
        cal = c["calibration"].compute() if c["calibration"].update_called else None
        top5 = c["test_top5"].compute() if "test_top5" in c else None
        temperature = self._calibrate(test, cal)
        self._reset()
        # Anytime accuracy from the gathered per-sample outputs, each test sample counted once: a
        # DistributedSampler pads the last batch with repeated samples, which a summed accuracy would count.
        top1 = (test["preds"] == test["target"][:, None]).float().mean(dim=0)
        anytime = [{"acc": float(top1[k])} for k in range(module.num_exits)]
        if top5 is not None:
            for k, hits in enumerate(top5["preds"].float().mean(dim=0)):
                anytime[k]["acc_top5"] = float(hits)
        dm = getattr(trainer, "datamodule", None)
        assert self.report_dir is not None, "on_test_start claims the report folder"
        report, summary = run_test_protocol(
            test=test,
            calibration=cal,
            costs=module.exit_costs(),
            exit_blocks=module.model.exit_blocks,
            budgets=o.budgets,
            budget_unit=o.budget_unit,
            exit_rule=o.test_rule,
            hparams={**dict(module.hparams), "evaluation": o.to_dict()},  # the report tells how it was made
            checkpoint_hash=checkpoint_hash(module.model, _path(trainer.ckpt_path)),
            report_dir=self.report_dir,
            is_global_zero=trainer.is_global_zero,
            split_file=getattr(dm, "calibration_indices_path", None),
            anytime_metrics=anytime,
            fingerprint=module.model_fingerprint(),
            weights_hash=weights_hash(module.model),
            temperature=temperature,
            data=describe_data(dm),
            environment=describe_environment(trainer),
        )
        if self._claimed is not None:  # the report is written: drop the claim marker, keep the folder
            release_folder(self._claimed)
            self._claimed = None
        module.test_report = report
        for k, values in enumerate(anytime):
            summary.update({f"test/{name}_exit{k}": v for name, v in values.items()})
        # every rank holds the same gathered values, so the mean over ranks changes nothing
        pl_module.log_dict(summary, add_dataloader_idx=False, sync_dist=True)

    def _reset(self) -> None:
        for collector in self.collectors.values():
            collector.reset()

    def _calibrate(
        self, test: dict[str, torch.Tensor], cal: dict[str, torch.Tensor] | None
    ) -> TemperatureCalibration | None:
        """With ``calibration: temperature``: fit per-exit temperatures, rescore both splits in place."""
        c = self.collectors
        if "test_logits" not in c:
            return None
        if cal is None or not c["calibration_logits"].update_called:
            rank_zero_warn(
                "calibration: temperature needs the calibration split to fit temperatures, and none was "
                "evaluated; the raw (uncalibrated) exit scores are used"
            )
            return None
        test_z, cal_z = c["test_logits"].compute(), c["calibration_logits"].compute()
        for name, out, z in (("test", test, test_z), ("calibration", cal, cal_z)):
            if not torch.equal(out["index"], z["index"]):
                raise RuntimeError(f"{name} logits and scores were collected for different samples")
        rule = self.options.test_rule
        result, (cal["scores"], cal["preds"]), (test["scores"], test["preds"]) = calibrate_exits(
            cal_z["logits"],
            cal_z["target"],
            test_z["logits"],
            test_z["target"],
            lambda logits: exit_scores(logits, rule),
        )
        return result

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``time_early_exit``: time full vs real early exit per budget and add it to ``report.json``."""
        module = as_early_exit_module(pl_module, "dmpo test's evaluator")
        images, self._timing_images = self._timing_images, []
        report = module.test_report
        if not images or report is None or not report.get("budgets") or not trainer.is_global_zero:
            return
        speed = time_early_exit(module, images, report["budgets"], rule=self.options.test_rule)
        report["early_exit_speed"] = speed
        print(format_speed_table(speed))
        assert self.report_dir is not None
        path = os.path.join(self.report_dir, "report.json")
        if os.path.isfile(path):
            write_json(path, report)


def _path(path: Any) -> str | None:
    return None if path is None else str(path)
