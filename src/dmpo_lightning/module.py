"""DMPOModule: the LightningModule that trains and evaluates a multi-exit ViT the DMPO way.

Paper: Decoupled Multi-Predictor Optimization for Inference-Efficient Model Tuning (ICCV 2025),
https://arxiv.org/abs/2511.03245
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from dmpo_lightning.callbacks import EpochSeed, LossWeightScheduler
from dmpo_lightning.checkpointing import (
    check_architecture,
    checkpoint_hash,
    load_checkpoint_safely,
    restoring_from_checkpoint,
    weights_from_checkpoint,
    weights_hash,
)
from dmpo_lightning.constants import (
    IMAGE_KEY,
    INDEX_KEY,
    LABEL_KEY,
    SPLIT_KEY,
    THRESHOLDS_FINGERPRINT_KEYS,
)
from dmpo_lightning.evaluation.calibration import (
    CalibrationMethod,
    ExitLogitsCollector,
    TemperatureCalibration,
    calibrate_exits,
    check_calibration_method,
)
from dmpo_lightning.evaluation.exit_rules import exit_scores
from dmpo_lightning.evaluation.flops import ExitCosts, count_exit_costs
from dmpo_lightning.evaluation.metrics import ExitOutputsCollector
from dmpo_lightning.evaluation.prediction_writer import DMPOPredictionWriter
from dmpo_lightning.evaluation.protocol import BudgetUnitOption
from dmpo_lightning.losses import distillation_losses, exit_cross_entropies, weighted_sum
from dmpo_lightning.models.adapters import PeftMethod
from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.models.multi_exit import EarlyExitOutput, ExitRule, HeadKind, MultiExitViT
from dmpo_lightning.optim import default_optimizer, param_groups, warmup_cosine
from dmpo_lightning.schedules import WeightSpec, preset_weights
from dmpo_lightning.serialization import (
    read_trainable,
    write_trainable,
)

__all__ = ["DMPOModule", "weights_from_checkpoint"]


class DMPOModule(pl.LightningModule):
    """Decoupled Multi-Predictor Optimization of a frozen timm ViT with early exits.

    Every argument is a plain value, so ``save_hyperparameters`` captures the whole method and
    ``DMPOModule.load_from_checkpoint(path)`` needs no other argument. Each DMPO component can be switched
    off for ablations: ``bypass=False``, ``early_head="linear"``, ``weight_phase1 == weight_phase2``.

    Extension points for subclasses: :meth:`build_model`, :meth:`compute_loss`, :meth:`score_exits`.

    Args:
        num_classes: Classes (linked from the data module by the CLI).
        backbone: timm model name, optionally with a pretrained tag.
        pretrained: Load the backbone's pretrained weights (downloads through timm / the HF hub).
        checkpoint_path: Local timm checkpoint file for the backbone (no download; implies pretrained).
        img_size: Input resolution (``None`` = the backbone's default).
        in_chans: Input channels (1 for grey images; pre-trained patch embeddings are adapted by timm).
        backbone_kwargs: Extra timm constructor arguments (``depth``, ``embed_dim``, ``patch_size``,
            ``num_heads``, ``drop_path_rate``...), for small models.
        exit_blocks: Exit positions: 1-based block numbers, negative from the end; an int n = last n
            blocks; ``None`` = 4 evenly spaced exits ({3, 6, 9, 12} for 12 blocks).
        require_last_exit: Require the last exit after the last block.
        peft: Trunk tuning: ``adaptformer`` (default), ``lora``, ``vpt``, ``linear`` (frozen), ``full``.
        adapter_dim: AdaptFormer bottleneck r.
        adapter_scale: AdaptFormer scale s.
        adapter_dropout: Adapter dropout.
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_targets: Module names LoRA wraps.
        vpt_prompts: VPT prompt tokens.
        vpt_deep: Deep (per-block) prompts.
        bypass: A bypass module in front of each early exit's predictor.
        bypass_dim: Bypass width (``None`` = D / 4).
        detach_trunk: Early exits' gradients do not reach the trunk (ablation).
        early_head: Early-exit predictor: ``moment`` (default), ``isqrt_cov`` or ``linear``.
        final_head: Last-exit predictor (``linear`` = the backbone's norm + a new Linear).
        head_pool: Pooling of linear predictors.
        moment_dim: Projection width of ``moment`` heads.
        moment_groups: Channel groups of ``moment`` heads.
        cov_dim: Reduced width of ``isqrt_cov`` heads.
        cov_iterations: Newton-Schulz iterations of ``isqrt_cov`` heads.
        head_dropout: Dropout before each classifier.
        weight_phase1: Loss weights before ``switch_epoch``: preset or per-exit list.
        weight_phase2: Loss weights from ``switch_epoch`` on.
        switch_epoch: First epoch of phase 2 (``None`` = half of ``max_epochs``).
        ramp_epochs: Linear transition between the phases (0 = hard switch).
        label_smoothing: Cross-entropy label smoothing.
        distill: ``last``: the last exit teaches the earlier ones (KL at ``distill_temperature``).
        distill_weight: Weight of the distillation term of each early exit.
        distill_temperature: Distillation temperature.
        exit_rule: Early-exit rule at evaluation: ``confidence`` (max softmax), ``entropy``, ``patience``.
        calibration: Exit confidences at evaluation: ``temperature`` fits one temperature per exit on the
            calibration split (NLL) before the thresholds are chosen and scores every exit from
            ``logits / T_k`` (stored in ``thresholds.json``, used by ``dmpo predict``); ``none`` uses the
            raw softmax (the default: on the quickstart ``temperature`` lowered top-1 at the 0.33 budget
            by 0.1 point, see ``docs/calibration.md``). ``dmpo test`` reports each exit's ECE before and
            after and writes ``reliability.png`` with ``temperature`` only.
        budgets: Cost budgets reported by ``dmpo test`` (fractions of the full cost, or GFLOPs). Each must
            lie between exit 1's cost and the full model's: with exits after blocks 3/6/9/12, exit 1 costs a
            little over 25%, so 0.25 is not reachable and the default starts at 0.33.
        budget_unit: Unit of ``budgets`` and ``predict_budget``: ``fraction`` or ``gflops``.
        report_dir: Where ``dmpo test`` writes its report (``None`` = ``<log_dir>/dmpo_test``).
        thresholds_file: ``thresholds.json`` written by ``dmpo test``, used by ``dmpo predict``.
        predict_budget: Budget whose thresholds ``dmpo predict`` uses (must be in ``thresholds_file``).
        allow_other_checkpoint_thresholds: Let ``dmpo predict`` use a ``thresholds_file`` fitted on other
            weights of the same architecture (warns, naming both hashes); by default they are refused.
        predictions_file: CSV ``dmpo predict`` writes (``None`` = ``<log_dir>/predictions.csv``).
        predict_engine: Throughput mode of ``dmpo predict``: the samples that continue after each exit are
            pooled across predict batches, so every stage runs on full batches (of the data's batch size;
            :class:`~dmpo_lightning.models.engine.EarlyExitEngine`). Same CSV rows, same order, same
            predictions and exits (confidence and score within float32 rounding); each batch's result is
            filled in once all its samples have left (by the end of the epoch at the latest).
        time_early_exit: ``dmpo test`` also times the real early exit at each budget's thresholds on the first
            this many test images (full model vs per-batch early exit vs engine, ms/image with the device),
            written to ``report.json`` under ``early_exit_speed`` beside the FLOPs speed-up; 0 = off.
        optimizer: Optimizer factory (default AdamW, lr 1e-3, weight decay 0.05).
        lr_scheduler: Scheduler factory; ``None`` = linear warm-up then cosine, stepped per batch.
        warmup_fraction: Warm-up share of all steps for the default scheduler.
    """

    class_names: list[str] | None = None
    """Class names in label order, restored from ``checkpoint["class_names"]`` (``None`` if unknown)."""

    # Static types only (no values): nn.Module attribute access is typed ``Tensor | Module`` otherwise.
    hparams: Any  # Lightning's AttributeDict of the __init__ arguments (save_hyperparameters)
    model: MultiExitViT
    loss_weights: torch.Tensor
    exit_thresholds: torch.Tensor
    exit_temperatures: torch.Tensor
    metrics: Any  # nn.ModuleDict of MetricCollection per f"{stage}_exit{k}"
    test_collectors: Any  # nn.ModuleDict of ExitOutputsCollector / ExitLogitsCollector

    def __init__(
        self,
        num_classes: int = 10,
        backbone: str = "vit_base_patch16_224.augreg_in21k",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int | None = None,
        in_chans: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        exit_blocks: int | Sequence[int] | None = None,
        require_last_exit: bool = True,
        peft: PeftMethod = "adaptformer",
        adapter_dim: int = 64,
        adapter_scale: float = 0.1,
        adapter_dropout: float = 0.0,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: Sequence[str] = ("qkv",),
        vpt_prompts: int = 10,
        vpt_deep: bool = True,
        bypass: bool = True,
        bypass_dim: int | None = None,
        detach_trunk: bool = False,
        early_head: HeadKind = "moment",
        final_head: HeadKind = "linear",
        head_pool: Literal["token", "avg"] = "token",
        moment_dim: int = 512,
        moment_groups: int = 4,
        cov_dim: int = 64,
        cov_iterations: int = 5,
        head_dropout: float = 0.0,
        weight_phase1: WeightSpec = "depth_increasing",
        weight_phase2: WeightSpec = "uniform",
        switch_epoch: int | None = None,
        ramp_epochs: int = 0,
        label_smoothing: float = 0.0,
        distill: Literal["none", "last"] = "none",
        distill_weight: float = 1.0,
        distill_temperature: float = 4.0,
        exit_rule: ExitRule = "confidence",
        calibration: CalibrationMethod = "none",
        budgets: Sequence[float] = (0.33, 0.5, 0.75, 1.0),
        budget_unit: BudgetUnitOption = "fraction",
        report_dir: str | None = None,
        thresholds_file: str | None = None,
        predict_budget: float | None = None,
        allow_other_checkpoint_thresholds: bool = False,
        predictions_file: str | None = None,
        predict_engine: bool = False,
        time_early_exit: int = 0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model = self.build_model()
        k = self.model.num_exits
        # Fail at construction, not at the first epoch, on weights that do not fit the exits.
        preset_weights(weight_phase1, k, name="weight_phase1")
        preset_weights(weight_phase2, k, name="weight_phase2")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        check_calibration_method(calibration)
        if distill_weight < 0 or not math.isfinite(distill_weight):
            raise ValueError(f"distill_weight must be finite and >= 0, got {distill_weight}")
        if isinstance(time_early_exit, bool) or not isinstance(time_early_exit, int) or time_early_exit < 0:
            raise ValueError(
                f"time_early_exit must be an integer >= 0 (test images to time, 0 = off); "
                f"got {time_early_exit!r}"
            )
        self.register_buffer("loss_weights", torch.tensor(preset_weights(weight_phase1, k)), persistent=True)
        # Thresholds used by predict (inf = exit disabled); saved with the checkpoint.
        self.register_buffer("exit_thresholds", torch.full((k,), math.inf), persistent=True)
        # Per-exit temperatures of dmpo predict, read from thresholds.json with the thresholds (1 = none).
        self.register_buffer("exit_temperatures", torch.ones(k), persistent=False)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_exit{i}": self._exit_metrics(num_classes).clone(prefix=f"{stage}/")
                for stage in ("train", "val", "test")
                for i in range(k)
            }
        )
        self.test_collectors = nn.ModuleDict(
            {"test": ExitOutputsCollector(), "calibration": ExitOutputsCollector()}
        )
        if (
            num_classes > 5
        ):  # per-sample top-5 hits [B, K] in the scores/preds slots, de-duplicated like top-1
            self.test_collectors["test_top5"] = ExitOutputsCollector()
        if calibration == "temperature":  # temperature scaling needs the logits, N x K x C per split
            self.test_collectors["test_logits"] = ExitLogitsCollector()
            self.test_collectors["calibration_logits"] = ExitLogitsCollector()
        self._costs: ExitCosts | None = None
        self._input_shape: tuple[int, ...] | None = None
        self._predict_session: Any = None  # predict_engine: the engine pass and the rows it still owes
        self._predict_waiting: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.test_report: dict[str, Any] | None = None
        self._timing_images: list[torch.Tensor] = []

    # ----------------------------------------------------------------------------------------------
    # Extension points
    def build_model(self) -> MultiExitViT:
        """Build the pure model from ``self.hparams``. Override to change the backbone or heads."""
        h = self.hparams
        restoring = restoring_from_checkpoint()  # the checkpoint holds the backbone's weights too
        if not restoring and not h.pretrained and h.checkpoint_path is None and h.peft != "full":
            rank_zero_warn(
                f"peft={h.peft!r} freezes the trunk of backbone {h.backbone!r}, but pretrained=false and no "
                "checkpoint_path is set: the frozen trunk keeps its random initial weights. Set "
                "pretrained=true (or checkpoint_path=<timm weights file>), or use peft='full' to train from "
                "scratch",
                category=UserWarning,
            )
        backbone = build_backbone(
            h.backbone,
            pretrained=h.pretrained and not restoring,
            checkpoint_path=None if restoring else h.checkpoint_path,
            img_size=h.img_size,
            in_chans=h.in_chans,
            model_kwargs=h.backbone_kwargs,
        )
        # Every MultiExitViT option is a module hyperparameter of the same name.
        options = {
            name: h[name]
            for name in inspect.signature(MultiExitViT).parameters
            if name not in ("backbone", "num_classes", "exit_blocks") and name in h
        }
        return MultiExitViT(backbone, h.num_classes, h.exit_blocks, **options)

    def compute_loss(
        self, logits: list[torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and named parts to log. Override to change the objective.

        Default: ``sum_k w_k(t) * CE_k`` with the scheduled weights, plus the distillation term if enabled.
        """
        h = self.hparams
        ce = exit_cross_entropies(logits, target, label_smoothing=h.label_smoothing)
        loss = weighted_sum(ce, self.loss_weights)
        parts = {f"ce_exit{k}": ce[k] for k in range(len(logits))}
        if h.distill == "last":
            kd = distillation_losses(logits, h.distill_temperature)
            loss = loss + h.distill_weight * kd.sum()
            parts.update({f"kd_exit{k}": kd[k] for k in range(len(logits) - 1)})
        return loss, parts

    score_exits_is_local: bool = False
    """``True`` if :meth:`score_exits` scores exit k from exit k's logits alone (e.g. a margin rule).

    The real early exit then calls it with one exit's logits and skips the heads of disabled exits.
    """

    def score_exits(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample, per-exit scores and predictions ``([B, K], [B, K])`` under ``exit_rule``.

        The one scoring path: ``dmpo test``'s simulated protocol and the real early exit of
        :meth:`forward_early_exit` / ``dmpo predict`` both call it (the latter with the logits of exits
        ``0..k`` of the samples still active, so column ``k`` must not depend on later exits or on other
        samples). Override to add a new exit rule; higher scores mean more confident.
        """
        return exit_scores(torch.stack(logits, dim=1), self.hparams.exit_rule)

    def exit_scorer(self) -> Any:
        """The scorer the real early exit uses: :meth:`score_exits` if a subclass overrides it.

        ``None`` otherwise: the built-in incremental ``exit_rule`` (same result as :meth:`score_exits`).
        """
        return None if type(self).score_exits is DMPOModule.score_exits else self.score_exits

    # ----------------------------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        """Number of exits K."""
        return self.model.num_exits

    @staticmethod
    def _exit_metrics(num_classes: int) -> MetricCollection:
        metrics: dict[str, Any] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit ``[B, num_classes]`` (a list of K tensors)."""
        return self.model(x)

    def forward_early_exit(
        self, x: torch.Tensor, thresholds: Sequence[float] | None = None
    ) -> EarlyExitOutput:
        """True early-exit inference with ``thresholds`` (default: the stored ``exit_thresholds``).

        Scores with :meth:`score_exits` (see :meth:`exit_scorer`), in eval mode whatever the module's mode.
        """
        t = self.exit_thresholds if thresholds is None else thresholds
        temps = None if bool((self.exit_temperatures == 1).all()) else self.exit_temperatures
        return self.model.forward_early_exit(
            x,
            t,
            self.hparams.exit_rule,
            self.exit_scorer(),
            scorer_is_local=self.score_exits_is_local,
            temperatures=temps,
        )

    # ----------------------------------------------------------------------------------------------
    def _shared_step(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, y = batch[IMAGE_KEY], batch[LABEL_KEY]
        logits = self(x)
        loss, parts = self.compute_loss(logits, y)
        bs = x.shape[0]
        if stage == "train" and not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.detach().item()} at epoch {self.current_epoch}, "
                f"global step {self.global_step} "
                f"(per-exit parts: { {k: round(float(v), 4) for k, v in parts.items()} }); "
                "lower the learning rate, check the inputs for NaN/inf, or use precision 32"
            )
        self.log(
            f"{stage}/loss",
            loss,
            batch_size=bs,
            prog_bar=stage != "test",
            add_dataloader_idx=False,
            sync_dist=stage != "train",
        )
        self.log_dict(
            {f"{stage}/{k}": v for k, v in parts.items()},
            batch_size=bs,
            add_dataloader_idx=False,
            sync_dist=stage != "train",
        )
        for k, z in enumerate(logits):
            if stage == "test":
                break  # test accuracies come from the de-duplicated per-sample outputs (on_test_epoch_end)
            metrics = self.metrics[f"{stage}_exit{k}"]
            metrics.update(z.detach(), y)
            self.log_dict(
                {f"{name}_exit{k}": m for name, m in metrics.items()},
                batch_size=bs,
                on_step=False,
                on_epoch=True,
                add_dataloader_idx=False,
                prog_bar=(k == len(logits) - 1 and stage == "val"),
            )
        return loss, logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Weighted multi-exit loss on one batch."""
        loss, _ = self._shared_step(batch, "train")
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Per-exit loss and accuracy on the calibration split."""
        self._shared_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Log the last exit's calibration accuracy as ``val/acc_last`` too (a name for any exit count).

        ``configs/trainer/default.yaml`` keeps the best checkpoint by it.
        """
        acc = self.metrics[f"val_exit{self.num_exits - 1}"]["acc"]
        if acc.update_called:
            # compute() syncs over ranks; Lightning's epoch-end compute of val/acc_exit<K-1> reuses it
            self.log("val/acc_last", acc.compute(), add_dataloader_idx=False, sync_dist=True)

    def on_test_start(self) -> None:
        """Refuse to overwrite an earlier report before any work is done."""
        from dmpo_lightning.evaluation.runner import check_budgets, check_report_dir

        check_report_dir(self._report_dir())
        check_budgets(self.hparams.budgets, self.hparams.budget_unit, self.exit_costs())

    def on_test_epoch_start(self) -> None:
        """Forget which test loader held which split (:meth:`test_step` checks they stay one-to-one)."""
        self._test_split_of_loader: dict[int, str] = {}

    def _test_split(self, batch: dict[str, Any], dataloader_idx: int) -> str:
        """``"test"`` or ``"calibration"``: the split a test batch comes from, by its :data:`SPLIT_KEY` tags.

        Untagged batches are accepted only from a single test loader (then it is the test split). Mixed
        tags, splits other than test/calibration, and a split spread over several loaders (their sample
        indices would collide) are refused.
        """
        tags = batch.get(SPLIT_KEY)
        trainer = self._trainer
        num_loaders = len(trainer.num_test_batches) if trainer is not None else 1
        how = (
            f"tag every sample with {SPLIT_KEY!r} = 'test' or 'calibration' (BenchmarkDataModule does; wrap "
            "other datasets in dmpo_lightning.data.SplitTagged)"
        )
        if tags is None:
            if num_loaders > 1:
                raise ValueError(
                    f"test dataloader {dataloader_idx} of {num_loaders} yields batches without a "
                    f"{SPLIT_KEY!r} entry, so the test and calibration splits cannot be told apart; {how}, "
                    "or pass the test loader alone (then no thresholds are fitted)"
                )
            split = "test"
        else:
            names = sorted({str(t) for t in tags}) if isinstance(tags, (list, tuple)) else [str(tags)]
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
        seen = getattr(self, "_test_split_of_loader", None)
        if seen is None:
            seen = self._test_split_of_loader = {}
        before = seen.setdefault(dataloader_idx, split)
        if before != split:
            raise ValueError(
                f"test dataloader {dataloader_idx} yields samples of both {before!r} and {split!r}; "
                "give each split its own loader"
            )
        others = [i for i, s in seen.items() if s == split and i != dataloader_idx]
        if others:
            raise ValueError(
                f"test dataloaders {others[0]} and {dataloader_idx} both hold {split!r} samples; give "
                "exactly one loader per split (their sample indices would collide)"
            )
        return split

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Test split: per-exit metrics and cached outputs; calibration split: cached outputs.

        The split of each loader comes from the batches' :data:`~dmpo_lightning.constants.SPLIT_KEY` tags,
        not from the loader's position (see :meth:`_test_split`).
        """
        name = self._test_split(batch, dataloader_idx)
        x, y = batch[IMAGE_KEY], batch[LABEL_KEY]
        self._input_shape = tuple(x.shape[1:])
        if name == "test":
            _, logits = self._shared_step(batch, "test")
        else:
            logits = self(x)
        scores, preds = self.score_exits(logits)
        index = batch.get(INDEX_KEY)
        if index is None:
            raise KeyError(
                f"test batches need an {INDEX_KEY!r} entry (sample index) for the early-exit protocol"
            )
        self.test_collectors[name].update(index, scores, preds, y)
        if f"{name}_logits" in self.test_collectors:
            self.test_collectors[f"{name}_logits"].update(index, torch.stack(logits, dim=1), y)
        if name == "test" and "test_top5" in self.test_collectors:
            hits = torch.stack([(z.topk(5, dim=-1).indices == y[:, None]).any(-1) for z in logits], dim=1)
            hits = hits.long()
            self.test_collectors["test_top5"].update(index, hits.float(), hits, y)

    def on_test_epoch_end(self) -> None:
        """Run the budgeted early-exit protocol, print the table, write the report, log the summary."""
        from dmpo_lightning.evaluation.runner import run_test_protocol

        if not self.test_collectors["test"].update_called:
            for c in self.test_collectors.values():
                c.reset()
            raise ValueError(
                "no test loader yielded samples of split 'test' (only 'calibration'), so there is nothing to "
                "report; give `test` a loader whose samples are tagged 'test'"
            )
        test = self.test_collectors["test"].compute()
        cal = (
            self.test_collectors["calibration"].compute()
            if self.test_collectors["calibration"].update_called
            else None
        )
        top5 = self.test_collectors["test_top5"].compute() if "test_top5" in self.test_collectors else None
        temperature = self._calibrate_exits(test, cal)
        for c in self.test_collectors.values():
            c.reset()
        costs = self.exit_costs()
        # Anytime accuracy from the gathered per-sample outputs, each test sample counted once: a
        # DistributedSampler pads the last batch with repeated samples, which a summed accuracy would count.
        top1 = (test["preds"] == test["target"][:, None]).float().mean(dim=0)
        anytime = [{"acc": float(top1[k])} for k in range(self.num_exits)]
        if top5 is not None:
            for k, hits in enumerate(top5["preds"].float().mean(dim=0)):
                anytime[k]["acc_top5"] = float(hits)
        report, summary = run_test_protocol(
            test=test,
            calibration=cal,
            costs=costs,
            exit_blocks=self.model.exit_blocks,
            budgets=self.hparams.budgets,
            budget_unit=self.hparams.budget_unit,
            exit_rule=self.hparams.exit_rule,
            hparams=dict(self.hparams),
            checkpoint_hash=checkpoint_hash(self.model, self._ckpt_path()),
            report_dir=self._report_dir(),
            is_global_zero=self.trainer.is_global_zero,
            split_file=self._split_file(),
            anytime_metrics=anytime,
            fingerprint=self.model_fingerprint(),
            weights_hash=weights_hash(self.model),
            temperature=temperature,
        )
        self.test_report = report
        for k, values in enumerate(anytime):
            summary.update({f"test/{name}_exit{k}": v for name, v in values.items()})
        # every rank holds the same gathered values, so the mean over ranks changes nothing
        self.log_dict(summary, add_dataloader_idx=False, sync_dist=True)

    def _calibrate_exits(
        self, test: dict[str, torch.Tensor], cal: dict[str, torch.Tensor] | None
    ) -> TemperatureCalibration | None:
        """With ``calibration: temperature``: fit per-exit temperatures, rescore both splits in place."""
        if "test_logits" not in self.test_collectors:
            return None
        if cal is None or not self.test_collectors["calibration_logits"].update_called:
            rank_zero_warn(
                "calibration: temperature needs the calibration split to fit temperatures, and none was "
                "evaluated; the raw (uncalibrated) exit scores are used"
            )
            return None
        test_z = self.test_collectors["test_logits"].compute()
        cal_z = self.test_collectors["calibration_logits"].compute()
        for name, out, z in (("test", test, test_z), ("calibration", cal, cal_z)):
            if not torch.equal(out["index"], z["index"]):
                raise RuntimeError(f"{name} logits and scores were collected for different samples")
        result, (cal["scores"], cal["preds"]), (test["scores"], test["preds"]) = calibrate_exits(
            cal_z["logits"], cal_z["target"], test_z["logits"], test_z["target"], self.score_exits
        )
        return result

    def on_test_batch_end(
        self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """With ``time_early_exit``: keep the first test images for timing the real early exit."""
        want = self.hparams.get("time_early_exit", 0)
        have = sum(int(x.shape[0]) for x in self._timing_images)
        split = getattr(self, "_test_split_of_loader", {}).get(dataloader_idx)
        if want and split == "test" and have < want:
            self._timing_images.append(batch[IMAGE_KEY][: want - have].detach().clone())

    def on_test_end(self) -> None:
        """With ``time_early_exit``: time full vs real early exit per budget and add it to ``report.json``."""
        images, self._timing_images = self._timing_images, []
        report = self.test_report
        if not images or report is None or not report.get("budgets") or not self.trainer.is_global_zero:
            return
        from dmpo_lightning.evaluation.report import write_json
        from dmpo_lightning.evaluation.runner import format_speed_table, time_early_exit

        speed = time_early_exit(self, images, report["budgets"])
        report["early_exit_speed"] = speed
        print(format_speed_table(speed))
        path = os.path.join(self._report_dir(), "report.json")
        if os.path.isfile(path):
            write_json(path, report)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """True early exit (batch compaction): prediction, 0-based exit, score and confidence per sample.

        Images the data module could not read (a non-empty ``error`` entry, from ``data.predict_paths``)
        are not run; their rows keep prediction -1 and the reason.
        """
        from dmpo_lightning.data.predict_images import ERROR_KEY, PATH_KEY, SOURCE_MODE_KEY

        x = batch[IMAGE_KEY]
        self._input_shape = tuple(x.shape[1:])
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
            if self.hparams.get("predict_engine", False):
                self._predict_push(images, result, rows, batch_size=n)
            else:
                self._fill_predictions(result, rows, self.forward_early_exit(images))
        for key in (INDEX_KEY, LABEL_KEY):
            if key in batch:
                result[key] = batch[key].cpu()
        for key in (PATH_KEY, ERROR_KEY, SOURCE_MODE_KEY):
            if key in batch:
                result[key] = list(batch[key])
        return result

    @staticmethod
    def _fill_predictions(result: dict[str, Any], rows: torch.Tensor, out: EarlyExitOutput) -> None:
        result["prediction"][rows] = out.prediction.cpu()
        result["exit_index"][rows] = out.exit_index.cpu()
        result["score"][rows] = out.score.float().cpu()
        result["confidence"][rows] = out.logits.float().softmax(dim=-1).amax(dim=-1).cpu()

    def _predict_push(
        self, images: torch.Tensor, result: dict[str, Any], rows: torch.Tensor, batch_size: int
    ) -> None:
        """``predict_engine``: queue a batch's readable images; fill in every batch the engine completes."""
        from dmpo_lightning.models.engine import EarlyExitEngine

        if self._predict_session is None:
            engine = EarlyExitEngine(self, self.exit_thresholds, batch_size=batch_size)
            self._predict_session = engine.session()
            self._predict_waiting = []
        self._predict_waiting.append((result, rows))
        for out in self._predict_session.push(images):
            self._fill_predictions(*self._predict_waiting.pop(0), out)

    def _predict_flush(self) -> None:
        """``predict_engine``: run the samples still queued and fill in the rest of the batches."""
        if self._predict_session is None:
            return
        for out in self._predict_session.flush():
            self._fill_predictions(*self._predict_waiting.pop(0), out)
        if self._predict_waiting:  # cannot happen: the engine returns every pushed batch
            raise RuntimeError(f"the early-exit engine lost {len(self._predict_waiting)} predict batches")
        self._predict_session = None

    def configure_optimizers(self) -> Any:
        """AdamW (or the injected optimizer) over trainable parameters; warm-up + cosine by default."""
        optimizer = self.optimizer_factory(param_groups(self.model))
        if self.lr_scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, total_steps=total, warmup_fraction=self.hparams.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        """Callbacks the module brings along: schedule and re-seeding in ``fit``, the writer in ``predict``.

        ``fit``: the loss-weight schedule and per-epoch re-seeding (exact resume); ``predict``:
        :class:`~dmpo_lightning.evaluation.prediction_writer.DMPOPredictionWriter` (thresholds in, CSV out).
        """
        h = self.hparams
        if self._trainer is not None and self.trainer.state.fn == "predict":
            return [DMPOPredictionWriter()]  # thresholds in, predictions CSV out
        if self._trainer is not None and self.trainer.state.fn not in (None, "fit"):
            return []  # only training uses loss weights
        return [
            LossWeightScheduler(h.weight_phase1, h.weight_phase2, h.switch_epoch, h.ramp_epochs),
            EpochSeed(),
        ]

    def on_fit_start(self) -> None:
        """Report the trainable-parameter budget per component."""
        counts = self.model.count_parameters()
        rank_zero_info(
            "trainable parameters: "
            + ", ".join(f"{k} {v:,}" for k, v in counts.items())
            + f" ({100 * counts['trainable'] / max(counts['total'], 1):.2f}% of all)"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the class names (``checkpoint["class_names"]``, list of str) when they are known."""
        names = self.class_names
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        classes = getattr(dm, "classes", None)
        if classes is not None and len(classes) == self.hparams.num_classes:
            names = [str(c) for c in classes]
        if names is not None:
            checkpoint["class_names"] = list(names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture with a message instead of a size mismatch."""
        saved = checkpoint.get("hyper_parameters", {})
        check_architecture(saved, self.model_fingerprint(), self.hparams, self.model.backbone)
        names = checkpoint.get("class_names")
        if isinstance(names, (list, tuple)) and len(names) == self.hparams.num_classes:
            self.class_names = [str(c) for c in names]

    # ----------------------------------------------------------------------------------------------
    def exit_costs(self) -> ExitCosts:
        """Counted per-exit cost at the input size seen in test (cached; depends on architecture only)."""
        shape = self._input_shape or self._default_input_shape()
        if self._costs is None or self._costs.input_shape != tuple(shape):
            self._costs = count_exit_costs(self.model, shape)
        return self._costs

    def _default_input_shape(self) -> tuple[int, ...]:
        pe: Any = self.model.backbone.patch_embed
        return (int(pe.proj.in_channels), *(int(s) for s in pe.img_size))

    def model_fingerprint(self) -> dict[str, Any]:
        """What a thresholds file must match to be reused with this model."""
        fingerprint = {key: self.hparams[key] for key in THRESHOLDS_FINGERPRINT_KEYS}
        fingerprint["exit_blocks"] = list(self.model.exit_blocks)  # resolved (e.g. a count -> positions)
        return fingerprint

    def _log_dir(self) -> str:
        trainer = self._trainer
        if trainer is not None and trainer.log_dir:
            return trainer.log_dir
        return os.getcwd()

    def _report_dir(self) -> str:
        return self.hparams.report_dir or os.path.join(self._log_dir(), "dmpo_test")

    def _predictions_path(self) -> str:
        path = self.hparams.predictions_file or os.path.join(self._log_dir(), "predictions.csv")
        if self._trainer is not None and self.trainer.world_size > 1:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{self.trainer.global_rank}{ext}"
        return path

    def _split_file(self) -> str | None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "calibration_indices_path", None)

    def _ckpt_path(self) -> str | None:
        return getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None

    # ----------------------------------------------------------------------------------------------
    def export_trainable(self, path: str, *, overwrite: bool = False) -> str:
        """Save only what was trained (PEFT, bypasses, heads, thresholds) plus the config, safely loadable.

        A few MB instead of a full backbone; :meth:`from_trainable` rebuilds the module (the backbone's
        base weights come from ``pretrained``/``checkpoint_path`` as configured). The file is a single
        ``.safetensors`` file: the tensors, and in its header metadata (JSON text) the format tag
        ``dmpo-trainable``, the format version, the package version, the hyper-parameters and a sha256 of
        the tensor data. Loading it never runs code (``docs/security.md``). Written atomically.

        Raises:
            ValueError: If ``path`` does not end in ``.safetensors``.
            FileExistsError: If ``path`` exists and ``overwrite`` is false.
            TypeError: If a hyper-parameter is not JSON-serialisable (nothing is written).
        """
        state = {f"model.{k}": v for k, v in self.model.trainable_state_dict().items()}
        state["loss_weights"] = self.loss_weights
        state["exit_thresholds"] = self.exit_thresholds
        return write_trainable(path, state, dict(self.hparams), overwrite=overwrite)

    @classmethod
    def from_trainable(cls, path: str, *, allow_pickle: bool = False, **overrides: Any) -> DMPOModule:
        """Rebuild a module from :meth:`export_trainable` output; ``overrides`` replace saved hparams.

        Reads the ``.safetensors`` export without unpickling anything. An old pickle-based ``.pt`` export
        (format ``dmpo-trainable-v1``) is read with ``torch.load(weights_only=True)``, which loads it when it
        holds only tensors and plain values.

        Args:
            path: The export.
            allow_pickle: Opt-in for old ``.pt`` exports that ``weights_only=True`` refuses because their
                hyper-parameters hold ``pathlib`` paths: rebuild those too, still with torch's restricted
                unpickler (nothing in the file is executed; any other object is refused). Warns that the
                format is old; re-export such files to ``.safetensors``.
            **overrides: Hyper-parameters that replace the saved ones.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: Corrupt or truncated file, not a dmpo export, an export format newer than this
                package, a pickle that needs ``allow_pickle``, or tensors that do not fit the rebuilt model.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no trainable-parameter export at {path}")
        hparams, state_dict = read_trainable(path, allow_pickle=allow_pickle)
        module = cls(**{**hparams, **overrides})
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
        if unexpected:
            raise ValueError(f"export {path} has parameters this model lacks: {unexpected[:5]}")
        expected = set(state_dict)
        not_loaded = [k for k in module.state_dict() if k in expected and k in missing]
        if not_loaded:
            raise ValueError(f"export {path} could not restore: {not_loaded[:5]}")
        return module

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> DMPOModule:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``: safe by default, and without the original backbone weights.

        - The checkpoint is read with ``weights_only=True`` unless the caller passes ``weights_only=False``
          explicitly (warns: that unpickles without restrictions and can run code from the file). Lightning
          itself passes ``weights_only=None`` on to ``torch.load``, whose default depends on the torch version
          (``False`` before 2.6) and on ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
        - Every weight comes from the checkpoint, so ``pretrained``/``checkpoint_path`` are not applied while
          the module is rebuilt: neither the backbone's original weights file nor the network is needed.
        - With the checkpoint file given positionally, a ``checkpoint_path=`` keyword is this module's
          hyperparameter (the backbone weights file), e.g. ``checkpoint_path=None`` to forget a file that
          moved; other keywords are Lightning's (``map_location``, ``strict``, ...) or hparam overrides.

        Raises:
            ValueError: If the checkpoint holds objects other than tensors and plain values.
        """
        return load_checkpoint_safely(super().load_from_checkpoint, args, kwargs)  # type: ignore[no-any-return]
