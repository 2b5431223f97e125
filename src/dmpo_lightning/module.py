"""DMPOModule: the LightningModule that trains and evaluates a multi-exit ViT the DMPO way.

Paper: Decoupled Multi-Predictor Optimization for Inference-Efficient Model Tuning (ICCV 2025),
https://arxiv.org/abs/2511.03245
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dmpo_lightning import checkpointing
from dmpo_lightning.callbacks import AtomicCheckpoints, EpochSeed, LossWeightScheduler
from dmpo_lightning.checkpointing import restoring_from_checkpoint, weights_from_checkpoint
from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY
from dmpo_lightning.errors import ConfigError
from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, split_of_batch
from dmpo_lightning.evaluation.flops import ExitCosts, count_exit_costs, default_input_shape
from dmpo_lightning.evaluation.metrics import exit_accuracy
from dmpo_lightning.evaluation.prediction_writer import DMPOPredictionWriter, predict_batch
from dmpo_lightning.losses import check_finite_loss, distillation_losses, exit_cross_entropies, weighted_sum
from dmpo_lightning.models.adapters import PeftOptions
from dmpo_lightning.models.backbone import build_backbone, warn_if_frozen_random_trunk
from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY
from dmpo_lightning.models.multi_exit import EarlyExitOutput, ExitOptions, MultiExitViT
from dmpo_lightning.optim import (
    check_learning_rates,
    default_optimizer,
    format_parameter_budget,
    param_groups,
    warmup_cosine,
)
from dmpo_lightning.schedules import ScheduleOptions, preset_weights
from dmpo_lightning.serialization import export_trainable, module_from_trainable

__all__ = ["LR_PLAN_KEY", "DMPOModule", "weights_from_checkpoint"]

LR_PLAN_KEY = "dmpo_lr_plan"
"""Checkpoint entry of the default learning-rate schedule: ``{"total_steps": N, "warmup_steps": W}``."""


class DMPOModule(pl.LightningModule):
    """Decoupled Multi-Predictor Optimization of a frozen timm ViT with early exits.

    Every argument is a plain value or an option group of plain values, so ``save_hyperparameters``
    captures the whole method and ``DMPOModule.load_from_checkpoint(path)`` needs no other argument. Each
    DMPO component can be switched off for ablations: ``exits.bypass=False``, ``exits.early_head="linear"``,
    ``schedule.weight_phase1 == schedule.weight_phase2``. The module trains; ``dmpo test``'s protocol and
    ``dmpo predict``'s I/O ride along as callbacks (:meth:`configure_callbacks`), configured by their own
    :class:`~dmpo_lightning.evaluation.evaluator.EvaluationOptions` (not hyperparameters of the model).

    Extension points for subclasses: :meth:`build_model` and :meth:`compute_loss`. A new exit rule is a
    registered name (``models.exit_rules.register_exit_rule``), so reports, thresholds and exported
    artefacts carry it.

    Args:
        num_classes: Classes (linked from the data module by the CLI).
        backbone: timm model name, optionally with a pretrained tag.
        pretrained: Load the backbone's pretrained weights (downloads through timm / the HF hub).
        checkpoint_path: Local timm checkpoint file for the backbone (no download; implies pretrained).
        img_size: Input resolution (``None`` = the backbone's default).
        in_chans: Input channels (1 for grey images; pre-trained patch embeddings are adapted by timm).
        backbone_kwargs: Extra timm constructor arguments (``depth``, ``embed_dim``, ``patch_size``...).
        peft: Trunk tuning (:class:`~dmpo_lightning.models.adapters.PeftOptions`: method, AdaptFormer /
            LoRA / VPT settings); a mapping of its fields works too.
        exits: Exit positions, bypasses and predictors
            (:class:`~dmpo_lightning.models.multi_exit.ExitOptions`).
        schedule: The two-phase loss weights (:class:`~dmpo_lightning.schedules.ScheduleOptions`).
        label_smoothing: Cross-entropy label smoothing.
        distill: ``last``: the last exit teaches the earlier ones (KL at ``distill_temperature``).
        distill_weight: Weight of the distillation term of each early exit.
        distill_temperature: Distillation temperature.
        optimizer: Optimizer factory (default AdamW, lr 1e-3, weight decay 0.05).
        lr_scheduler: Scheduler factory; ``None`` = linear warm-up then cosine, stepped per batch.
        warmup_fraction: Warm-up share of all steps for the default scheduler.
    """

    class_names: list[str] | None = None
    """Class names in label order, restored from ``checkpoint["class_names"]`` (``None`` if unknown)."""
    test_report: dict[str, Any] | None = None
    """The report of the last ``dmpo test`` (set by its evaluator callback)."""
    exit_rule: str = "confidence"
    """The registered exit rule of :meth:`forward_early_exit` (``dmpo predict`` sets its thresholds')."""
    input_shape: tuple[int, ...] | None = None
    """``[C, H, W]`` of the last test/predict batch: the input size :meth:`exit_costs` counts at."""

    # Static types only (no values): nn.Module attribute access is typed ``Tensor | Module`` otherwise.
    hparams: Any  # Lightning's AttributeDict of the __init__ arguments (save_hyperparameters)
    model: MultiExitViT
    loss_weights: torch.Tensor
    exit_thresholds: torch.Tensor
    exit_temperatures: torch.Tensor
    train_steps: torch.Tensor
    metrics: Any  # nn.ModuleDict of MetricCollection per f"{stage}_exit{k}" (train, val)

    def __init__(
        self,
        num_classes: int = 10,
        backbone: str = "vit_base_patch16_224.augreg_in21k",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int | None = None,
        in_chans: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        peft: PeftOptions = PeftOptions(),  # noqa: B008 (frozen dataclasses: immutable defaults)
        exits: ExitOptions = ExitOptions(),  # noqa: B008
        schedule: ScheduleOptions = ScheduleOptions(),  # noqa: B008
        label_smoothing: float = 0.0,
        distill: Literal["none", "last"] = "none",
        distill_weight: float = 1.0,
        distill_temperature: float = 4.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        # plain dicts for save_hyperparameters (it reads these locals); a misspelt field is refused by name
        groups = {
            "peft": PeftOptions.coerce(peft, name="peft").to_dict(),
            "exits": ExitOptions.coerce(exits, name="exits").to_dict(),
            "schedule": ScheduleOptions.coerce(schedule, name="schedule").to_dict(),
        }
        peft, exits, schedule = groups.values()  # type: ignore[assignment]
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams.update(groups)  # the CLI passes its own hparams mapping: keep the plain dicts
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model = self.build_model()
        k = self.model.num_exits
        # Fail at construction, not at the first epoch, on weights that do not fit the exits.
        s = self.schedule_options
        preset_weights(s.weight_phase1, k, name="weight_phase1")
        preset_weights(s.weight_phase2, k, name="weight_phase2")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if distill_weight < 0 or not math.isfinite(distill_weight):
            raise ValueError(f"distill_weight must be finite and >= 0, got {distill_weight}")
        self.register_buffer(
            "loss_weights", torch.tensor(preset_weights(s.weight_phase1, k)), persistent=True
        )
        # Thresholds used by predict (inf = exit disabled); saved with the checkpoint.
        self.register_buffer("exit_thresholds", torch.full((k,), math.inf), persistent=True)
        # Per-exit temperatures of dmpo predict, read from thresholds.json with the thresholds (1 = none).
        self.register_buffer("exit_temperatures", torch.ones(k), persistent=False)
        # Training batches these weights were trained on, saved with them: untrained weights are never
        # reported, predicted with or exported as results (EvaluationOptions.allow_untrained).
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long), persistent=True)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_exit{i}": exit_accuracy(num_classes).clone(prefix=f"{stage}/")
                for stage in ("train", "val")
                for i in range(k)
            }
        )
        self._costs: ExitCosts | None = None
        self._lr_plan: dict[str, int] | None = None  # the default schedule's length, saved with checkpoints
        self._resumed_lr_plan: dict[str, int] | None = None  # the plan of the checkpoint being resumed

    # The option groups, read from the hyperparameters (so an edited hparams entry is what runs).
    @property
    def peft_options(self) -> PeftOptions:
        """How the trunk is tuned."""
        return PeftOptions.coerce(self.hparams.peft, name="peft")

    @property
    def exit_options(self) -> ExitOptions:
        """Where the exits sit and what they are."""
        return ExitOptions.coerce(self.hparams.exits, name="exits")

    @property
    def schedule_options(self) -> ScheduleOptions:
        """The two-phase loss-weight schedule."""
        return ScheduleOptions.coerce(self.hparams.schedule, name="schedule")

    # Extension points
    def build_model(self) -> MultiExitViT:
        """Build the pure model from ``self.hparams``. Override to change the backbone or heads."""
        h = self.hparams
        peft = self.peft_options
        restoring = restoring_from_checkpoint()  # the checkpoint holds the backbone's weights too
        if not restoring:
            warn_if_frozen_random_trunk(h.backbone, h.pretrained, h.checkpoint_path, peft.method)
        backbone = build_backbone(
            h.backbone,
            pretrained=h.pretrained and not restoring,
            checkpoint_path=None if restoring else h.checkpoint_path,
            img_size=h.img_size,
            in_chans=h.in_chans,
            model_kwargs=h.backbone_kwargs,
        )
        return MultiExitViT(backbone, h.num_classes, self.exit_options, peft)

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

    @property
    def num_exits(self) -> int:
        """Number of exits K."""
        return self.model.num_exits

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit ``[B, num_classes]`` (a list of K tensors)."""
        return self.model(x)

    def forward_early_exit(
        self, x: torch.Tensor, thresholds: Sequence[float] | None = None, rule: str | None = None
    ) -> EarlyExitOutput:
        """True early-exit inference, in eval mode whatever the module's mode.

        Args:
            x: Images ``[B, C, H, W]``.
            thresholds: One per exit (default: the stored ``exit_thresholds``).
            rule: A registered exit rule (default: :attr:`exit_rule`).
        """
        t = self.exit_thresholds if thresholds is None else thresholds
        temps = None if bool((self.exit_temperatures == 1).all()) else self.exit_temperatures
        rule = self.exit_rule if rule is None else rule
        EXIT_RULE_REGISTRY.check(rule)
        return self.model.forward_early_exit(x, t, rule, temperatures=temps)

    def _shared_step(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, y = batch[IMAGE_KEY], batch[LABEL_KEY]
        logits = self(x)
        loss, parts = self.compute_loss(logits, y)
        bs = x.shape[0]
        if stage == "train":
            check_finite_loss(loss, parts, self.current_epoch, self.global_step)
        log: dict[str, Any] = {"batch_size": bs, "add_dataloader_idx": False, "sync_dist": stage != "train"}
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", **log)
        self.log_dict({f"{stage}/{k}": v for k, v in parts.items()}, **log)
        for k, z in enumerate(logits):
            if stage == "test":
                break  # test accuracies come from the de-duplicated per-sample outputs (the evaluator)
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

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Count the training steps these weights have had (0 marks untrained weights)."""
        self.train_steps += 1

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

    def test_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Every exit's logits ``[B, K, C]`` with the samples' indices and labels (the evaluator scores them).

        The test split also logs the loss; calibration batches are only run.
        """
        x, y = batch[IMAGE_KEY], batch[LABEL_KEY]
        self.input_shape = tuple(x.shape[1:])
        if INDEX_KEY not in batch:
            raise KeyError(
                f"test batches need an {INDEX_KEY!r} entry (sample index) for the early-exit protocol"
            )
        if split_of_batch(batch) == "test":
            _, logits = self._shared_step(batch, "test")
        else:
            logits = self(x)
        return {"index": batch[INDEX_KEY], "target": y, "logits": torch.stack(logits, 1)}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One row per sample: prediction, 0-based exit, score and confidence, filled by the real early exit.

        The prediction writer (brought along in ``predict``) runs the early exit; images the data module could
        not read (a non-empty ``error`` entry) keep prediction -1 and the reason.
        """
        self.input_shape = tuple(batch[IMAGE_KEY].shape[1:])
        return predict_batch(batch)

    def configure_optimizers(self) -> Any:
        """AdamW (or the injected optimizer) over trainable parameters; warm-up + cosine by default."""
        optimizer = self.optimizer_factory(param_groups(self.model))
        check_learning_rates(optimizer)
        if self.lr_scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ConfigError(
                "the default learning-rate schedule (warm-up, then cosine decay to 0 at the last step) needs "
                "the run's length: set trainer.max_epochs or trainer.max_steps, or give "
                "model.init_args.lr_scheduler",
                option="trainer.max_epochs",
            )
        total = int(steps)
        warmup = round(total * self.hparams.warmup_fraction)
        resumed = self._resumed_lr_plan
        if resumed is not None and resumed["total_steps"] != total:
            warmup = min(resumed["warmup_steps"], total)  # the warm-up already ran (or runs on) as planned
            rank_zero_info(
                f"resuming: the learning-rate schedule is re-planned from {resumed['total_steps']} to "
                f"{total} steps (the same warm-up of {warmup} step{'s' * (warmup != 1)}; the cosine decay "
                f"now ends at step {total})"
            )
        self._lr_plan = {"total_steps": total, "warmup_steps": warmup}
        scheduler = warmup_cosine(optimizer, total_steps=total, warmup_steps=warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        """Callbacks the module brings along.

        Always the loss-weight schedule and per-epoch re-seeding (they act in ``fit`` only; present in every
        stage, a checkpoint's state for them is restored without a warning), and checkpoints that appear under
        their name only when complete (:class:`~dmpo_lightning.callbacks.AtomicCheckpoints`). In ``test``:
        :class:`~dmpo_lightning.evaluation.evaluator.DMPOEvaluator` (the early-exit protocol and report); in
        ``predict``: :class:`~dmpo_lightning.evaluation.prediction_writer.DMPOPredictionWriter` (thresholds
        in, CSV out), each with default options. A callback of a type the trainer already has is not added
        (yours wins, and a trainer that fitted keeps the schedule it used).
        """
        try:
            trainer: pl.Trainer | None = self.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        fn = trainer.state.fn if trainer is not None else None
        wanted: list[pl.Callback] = [
            LossWeightScheduler(self.schedule_options),
            EpochSeed(),
            AtomicCheckpoints(),
        ]
        if fn == "test":
            wanted.append(DMPOEvaluator())
        if fn == "predict":
            wanted.append(DMPOPredictionWriter())
        have = tuple(type(c) for c in getattr(trainer, "callbacks", ()))
        return [c for c in wanted if not any(issubclass(t, type(c)) for t in have)]

    def on_fit_start(self) -> None:
        """Report the trainable-parameter budget per component."""
        rank_zero_info(format_parameter_budget(self.model.count_parameters()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the class names and the plan of the default learning-rate schedule.

        ``checkpoint["class_names"]`` (list of str) when they are known; :data:`LR_PLAN_KEY`, so that a resume
        can tell a changed length.
        """
        checkpointing.store_class_names(self, checkpoint)
        if self._lr_plan is not None:
            checkpoint[LR_PLAN_KEY] = dict(self._lr_plan)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture with a message instead of a size mismatch.

        The learning-rate plan it stored is kept for :meth:`configure_optimizers`: resumed with another length
        (a larger ``trainer.max_epochs``), the schedule is re-planned for it and says so in one line.
        """
        checkpointing.check_checkpoint(self, checkpoint)
        plan = checkpoint.get(LR_PLAN_KEY)
        valid = isinstance(plan, dict) and all(
            isinstance(plan.get(k), int) and plan[k] >= 0 for k in ("total_steps", "warmup_steps")
        )
        self._resumed_lr_plan = dict(plan) if valid else None  # type: ignore[arg-type]

    def exit_costs(self) -> ExitCosts:
        """Counted per-exit cost at :attr:`input_shape` (cached; depends on architecture only)."""
        shape = self.input_shape or default_input_shape(self.model)
        if self._costs is None or self._costs.input_shape != tuple(shape):
            self._costs = count_exit_costs(self.model, shape)
        return self._costs

    def model_fingerprint(self) -> dict[str, Any]:
        """What a thresholds file must match to be reused (``exits.blocks``, ``peft.method``...)."""
        return checkpointing.model_fingerprint(self.hparams, self.model.exit_blocks)

    def export_trainable(self, path: str, *, overwrite: bool = False) -> str:
        """Save what was trained, the thresholds and the config as one ``.safetensors`` file (a few MB).

        See :func:`dmpo_lightning.serialization.export_trainable`; :meth:`from_trainable` reads it back.
        """
        return export_trainable(self, path, overwrite=overwrite)

    @classmethod
    def from_trainable(cls, path: str, **overrides: Any) -> DMPOModule:
        """Rebuild a module from :meth:`export_trainable` output; ``overrides`` replace saved hparams.

        See :func:`dmpo_lightning.serialization.module_from_trainable` (it never unpickles the export).
        """
        return module_from_trainable(cls, path, overrides=overrides)  # type: ignore[no-any-return]

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> DMPOModule:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint`` with ``weights_only=True``, without the backbone's file.

        Unrestricted unpickling is refused; see :func:`dmpo_lightning.checkpointing.load_checkpoint_safely`.

        Raises:
            ValueError: If the checkpoint holds objects other than tensors and plain values.
        """
        return checkpointing.load_checkpoint_safely(super().load_from_checkpoint, args, kwargs)  # type: ignore[no-any-return]
