"""Training callbacks: the ones DMPOModule brings along, and the one the ``dmpo`` command adds.

:class:`~dmpo_lightning.module.DMPOModule` brings the loss-weight schedule, the per-epoch seeding and
checkpoints written whole or not at all (:class:`AtomicCheckpoints`); the ``dmpo`` command adds a stop (and,
in fit, a checkpoint) on SIGTERM and Ctrl+C.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import shutil
import signal
import threading
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dmpo_lightning.files import atomic_write, check_writable, release_folder
from dmpo_lightning.schedules import ScheduleOptions, TwoPhaseSchedule

__all__ = [
    "AtomicCheckpointIO",
    "AtomicCheckpoints",
    "EpochSeed",
    "InterruptCheckpoint",
    "LossWeightScheduler",
    "ReleaseFolder",
    "SaveConfigNoOverwrite",
    "check_log_folder",
    "continue_csv_log",
    "epoch_seed",
    "planned_epochs",
]


class LossWeightScheduler(pl.Callback):
    """Applies a :class:`~dmpo_lightning.schedules.TwoPhaseSchedule` to the module at every epoch start.

    It writes the epoch's weights into the module's ``loss_weights`` buffer and logs them as
    ``loss_weight/exit_<k>``. The weights depend only on the epoch number, which Lightning restores on
    resume, so a run resumed in phase 1 switches at the same epoch as an uninterrupted one. The schedule is
    built and validated in ``setup`` (when ``max_epochs`` is known), so a bad schedule fails before training.

    DMPOModule returns this callback from ``configure_callbacks`` built from its own hyperparameters;
    you do not add it yourself.

    Args:
        options: The module's :class:`~dmpo_lightning.schedules.ScheduleOptions` (or a mapping of them).
    """

    def __init__(self, options: ScheduleOptions | Mapping[str, Any] | None = None) -> None:
        self.options = ScheduleOptions.coerce(options, name="schedule")
        self.switch_epoch = self.options.switch_epoch  # resolved from the interrupted run on resume
        self.schedule: TwoPhaseSchedule | None = None
        self.applied_epoch: int | None = None
        self.num_exits: int | None = None
        self.max_epochs: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build (and so validate) the schedule for this run."""
        if stage != "fit":
            return
        self.num_exits = int(getattr(pl_module, "num_exits"))  # noqa: B009 (any module with exits)
        self.max_epochs = planned_epochs(trainer)
        self._build()

    def _build(self) -> None:
        assert self.num_exits is not None, "LossWeightScheduler.setup was not called"
        switch = self.switch_epoch
        if switch is None and self.max_epochs is None:
            switch = 1  # fast_dev_run: one epoch, phase 1
        options = dataclasses.replace(self.options, switch_epoch=switch)
        self.schedule = TwoPhaseSchedule(self.num_exits, options, max_epochs=self.max_epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write this epoch's weights into the module and log them."""
        assert self.schedule is not None, "LossWeightScheduler.setup was not called"
        weights = self.schedule.weights(trainer.current_epoch)
        buffer = pl_module.get_buffer("loss_weights")
        buffer.copy_(torch.tensor(weights, dtype=buffer.dtype))
        self.applied_epoch = trainer.current_epoch
        pl_module.log_dict(
            {f"loss_weight/exit_{k}": w for k, w in enumerate(weights)},
            on_step=False,
            on_epoch=True,
            sync_dist=True,  # the same on every rank; syncing only silences Lightning's DDP warning
        )

    def state_dict(self) -> dict[str, Any]:
        """Schedule settings and the last epoch applied (for inspection; weights follow from the epoch)."""
        return {
            **self.options.to_dict(),
            "switch_epoch": None if self.schedule is None else self.schedule.switch_epoch,
            "applied_epoch": self.applied_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the switch epoch the interrupted run resolved, so resuming never moves the switch."""
        if self.switch_epoch is None and state_dict.get("switch_epoch") is not None:
            self.switch_epoch = int(state_dict["switch_epoch"])
            if self.num_exits is not None:
                self._build()
                rank_zero_info(
                    f"resumed: the loss-weight switch stays at epoch {self.switch_epoch}, where the "
                    "interrupted run resolved schedule.switch_epoch=null"
                )
        self.applied_epoch = state_dict.get("applied_epoch")


def planned_epochs(trainer: pl.Trainer) -> int | None:
    """The run's ``max_epochs`` (``None``: unknown, unbounded, or ``fast_dev_run``'s single epoch)."""
    if getattr(trainer, "fast_dev_run", False):  # a real run's switch epoch must not be rejected for it
        return None
    return trainer.max_epochs


def epoch_seed(base_seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed that depends only on the run's seed, the epoch and the process rank.

    Examples:
        >>> epoch_seed(0, 2) == epoch_seed(0, 2) != epoch_seed(0, 3)
        True
    """
    sequence = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(epoch), int(rank)])
    return int(sequence.generate_state(1)[0])


class EpochSeed(pl.Callback):
    """Re-seeds Python, NumPy and torch at the start of every training epoch, from (seed, epoch, rank).

    Lightning checkpoints do not hold the random-number generators' states, so a run resumed with
    ``--ckpt_path`` would otherwise shuffle and augment its next epochs differently from an uninterrupted run.
    With this callback the randomness of epoch e (shuffle order, augmentations, dropout, drop-path) is a
    function of the epoch number alone, and a run resumed from an end-of-epoch checkpoint reproduces the
    uninterrupted one bit for bit on the same hardware (CPU, or deterministic GPU kernels).

    The seed is the one ``seed_everything`` set (``PL_GLOBAL_SEED``; LightningCLI's ``seed_everything``
    option); without it the callback does nothing. Data-loader workers are seeded from the main process at
    each epoch, except persistent workers (``persistent_workers=True`` with ``num_workers > 0``), which keep
    their own generator across epochs: with those, and from mid-epoch checkpoints, resuming is statistically
    but not bitwise equivalent.

    Lightning creates the data iterator of the first epoch of a ``fit`` early (when ``configure_optimizers``
    asks for ``estimated_stepping_batches``, otherwise at the start of the fit loop): it draws the shuffle
    seed and pre-fetches a batch before ``on_fit_start`` or ``on_train_epoch_start`` run. So the first epoch
    is seeded in ``setup`` (epoch 0) or, when resuming, in ``load_state_dict`` (the epoch after the last
    fully trained one, stored in this callback's checkpoint state), both of which run before; later epochs
    are seeded in ``on_train_epoch_start``, before their iterator is created. Sanity-check validation runs
    with isolated RNG state, so it does not shift the streams.

    DMPOModule returns this callback from ``configure_callbacks``; you do not add it yourself.
    """

    def __init__(self) -> None:
        self.seeded_epoch: int | None = None
        self.last_seed: int | None = None
        self.last_trained_epoch: int | None = None  # last epoch whose training batches all ran
        self._rank = 0

    @staticmethod
    def _base_seed() -> int | None:
        value = os.environ.get("PL_GLOBAL_SEED")
        try:
            return None if value is None else int(value)
        except ValueError:
            return None

    def _seed(self, epoch: int, rank: int) -> None:
        self.seeded_epoch = epoch
        base = self._base_seed()
        if base is None:
            return
        seed = epoch_seed(base, epoch, rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device
        self.last_seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Seed epoch 0 before Lightning builds the first training iterator (a resume re-seeds on load)."""
        if stage != "fit":
            return
        self._rank = trainer.global_rank
        self.last_trained_epoch = None
        self._seed(trainer.current_epoch, self._rank)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed every later epoch before its data iterator is created."""
        if self.seeded_epoch != trainer.current_epoch:
            self._seed(trainer.current_epoch, trainer.global_rank)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Note when an epoch's last training batch has run (a checkpoint after it resumes with the next)."""
        if batch_idx + 1 >= trainer.num_training_batches:
            self.last_trained_epoch = trainer.current_epoch

    def state_dict(self) -> dict[str, Any]:
        """The last fully trained epoch, so a resumed run knows which epoch to seed first."""
        return {"last_trained_epoch": self.last_trained_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Seed the epoch the resumed run starts with.

        Lightning restores callbacks before it creates that epoch's data iterator.
        """
        last = state_dict.get("last_trained_epoch")
        self.last_trained_epoch = None if last is None else int(last)
        if self.last_trained_epoch is not None:
            self._seed(self.last_trained_epoch + 1, self._rank)


class InterruptCheckpoint(pl.Callback):
    """On SIGTERM or Ctrl+C (SIGINT), stop after the current batch; in ``fit`` save ``interrupted.ckpt``.

    Lightning notices SIGTERM (``trainer.received_sigterm``) only at the end of a training epoch, and a
    Ctrl+C interrupts wherever it lands, with no resumable checkpoint. This callback stops every stage at the
    next batch end: ``fit`` saves the full training state next to the run's checkpoints (as a mid-epoch
    ``ModelCheckpoint`` would, never over an existing file), ``test``/``predict`` write nothing. The ``dmpo``
    command then exits with status 128 + the signal and names the checkpoint to resume from. A second Ctrl+C
    interrupts at once.
    """

    saved: str | None = None
    """The checkpoint written at the last interruption (``None``: none)."""
    signal: int | None = None
    """The signal that stopped the last run."""

    def __init__(self) -> None:
        self._previous: Any = None

    @classmethod
    def reset(cls) -> None:
        """Forget an earlier interruption (a new run starts)."""
        cls.saved = None
        cls.signal = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Turn the first Ctrl+C into a stop at the next batch end (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give Ctrl+C back its previous meaning."""
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        InterruptCheckpoint.signal = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C interrupts at once

    def _check(self, trainer: pl.Trainer) -> None:
        # under DDP, Lightning broadcasts SIGTERM at the next batch start and stops every rank together
        if trainer.received_sigterm and trainer.world_size == 1 and InterruptCheckpoint.signal is None:
            InterruptCheckpoint.signal = signal.SIGTERM
        if InterruptCheckpoint.signal is not None and trainer.world_size == 1:
            raise SIGTERMException

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop after a training batch once a signal arrived."""
        self._check(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop after a validation batch once a signal arrived."""
        self._check(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop after a test batch once a signal arrived (no report is written)."""
        self._check(trainer)

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop after a predict batch once a signal arrived (no predictions file is written)."""
        self._check(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Save the checkpoint (fit only), never over an existing file."""
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints"
        )
        path = os.path.join(folder, "interrupted.ckpt")
        k = 1
        while os.path.exists(path):
            path = os.path.join(folder, f"interrupted-v{k}.ckpt")
            k += 1
        trainer.save_checkpoint(path)
        InterruptCheckpoint.saved = path


class SaveConfigNoOverwrite(SaveConfigCallback):
    """Save the run's config as ``config.yaml``, never replacing one (a resume writes ``config.<k>.yaml``)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Pick a free file name on rank 0, then save as Lightning does."""
        if not self.already_saved and self.save_to_log_dir:
            log_dir, name = trainer.log_dir, self.config_filename
            if trainer.is_global_zero and log_dir and os.path.exists(os.path.join(log_dir, name)):
                stem, suffix = os.path.splitext(name)
                name = _next_free(log_dir, stem, suffix)
                rank_zero_info(
                    f"{os.path.join(log_dir, self.config_filename)} is kept; this run's config: {name}"
                )
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


class ReleaseFolder(pl.Callback):
    """Ends the claim of an evaluation's folder (``files.claim_folder``) when the run ends."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The run is over: the folder may be claimed again only if it stayed empty."""
        release_folder(self.folder)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """A failed run ends its claim too."""
        release_folder(self.folder)


def check_log_folder(trainer: pl.Trainer) -> None:
    """Refuse a log folder (the first logger's ``save_dir``, else ``default_root_dir``) that is not writable.

    Raises:
        ConfigError: Naming the option to change, before any work.
    """
    logs = trainer.loggers[0].save_dir if trainer.loggers else None
    option = "trainer.logger.init_args.save_dir" if logs else "trainer.default_root_dir"
    check_writable(logs or trainer.default_root_dir, "the run's log folder", option)


def _next_free(folder: str, stem: str, suffix: str) -> str:
    k = 1
    while os.path.exists(os.path.join(folder, f"{stem}.{k}{suffix}")):
        k += 1
    return f"{stem}.{k}{suffix}"


def continue_csv_log(logger: CSVLogger) -> None:
    """A resumed run appends to its folder's ``metrics.csv`` and writes ``hparams.<k>.yaml`` beside the old.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; the file is copied first and
    put back, and the writer continues it (a new column rewrites the header, keeping every old row).
    """
    log_dir = logger.log_dir
    metrics = os.path.join(log_dir, "metrics.csv")
    backup = None
    if os.path.isfile(metrics):
        backup = f"{metrics}.resume-backup"
        shutil.copy2(metrics, backup)
    writer = logger.experiment  # deletes metrics.csv
    if backup is not None:
        os.replace(backup, metrics)
        with open(metrics, newline="") as f:
            header = next(csv.reader(f), [])
        writer.metrics_keys = sorted(header)
    if os.path.exists(os.path.join(log_dir, writer.NAME_HPARAMS_FILE)):
        writer.NAME_HPARAMS_FILE = _next_free(log_dir, "hparams", ".yaml")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, except that a checkpoint gets its final name only when complete.

    Lightning writes a checkpoint into the system's temporary folder and then moves it; when that folder is on
    another file system (as ``/tmp`` often is), the move copies into the final name, so a disk that fills up
    leaves a truncated ``epoch=1-step=4.ckpt`` that looks valid until it is loaded. This plugin writes a local
    checkpoint into a hidden temporary file in the checkpoint's own folder, flushes it to disk and renames it
    (:func:`dmpo_lightning.files.atomic_write`): the file under the final name is complete or absent, and the
    temporary file is removed on any error. Remote paths (``s3://``...) go through Lightning's own writer.

    :class:`AtomicCheckpoints` (which DMPOModule brings along) installs it; to use it with another module,
    pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` whole or not at all (local paths)."""
        if storage_options is not None or "://" in os.fspath(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class AtomicCheckpoints(pl.Callback):
    """Makes the trainer write checkpoints with :class:`AtomicCheckpointIO`.

    Only Lightning's default writer is replaced (a ``CheckpointIO`` of your own, an asynchronous or an XLA one
    stays). DMPOModule returns this callback from ``configure_callbacks``; you do not add it yourself.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install the atomic writer before the first checkpoint is saved."""
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
