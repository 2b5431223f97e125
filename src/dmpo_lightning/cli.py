"""The ``dmpo`` command: a LightningCLI with fit / validate / test / predict and linked arguments."""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import math
import netrc
import os
import pickle
import shutil
import signal
import sys
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from jsonargparse._common import debug_mode_active
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

import dmpo_lightning
from dmpo_lightning.callbacks import LossWeightScheduler
from dmpo_lightning.checkpointing import UNRESTRICTED_UNPICKLING_REFUSED
from dmpo_lightning.data import BenchmarkDataModule
from dmpo_lightning.data.errors import DatasetLayoutError, UnreadableImageError
from dmpo_lightning.errors import ConfigError, ConfigFileExistsError, ConfigFileNotFoundError
from dmpo_lightning.models.backbone import check_backbone_name
from dmpo_lightning.module import DMPOModule, weights_from_checkpoint
from dmpo_lightning.optim import param_groups

__all__ = ["DMPOCLI", "console_main", "main"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEBUG_ENV = "DMPO_DEBUG"
"""``DMPO_DEBUG=1`` (or ``--debug``) shows the traceback of configuration errors."""

FIT_ONLY_CALLBACKS_WARNING = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be "
    r"provided during `Trainer` instantiation\. Please add the following callbacks: "
    r"\[(?:'(?:LossWeightScheduler|EpochSeed)'(?:, )?)+\]\."
)
"""Lightning's warning when a test/predict trainer lacks the fit-only callbacks DMPOModule adds in ``fit``
(they only schedule training); a warning naming any other callback is kept."""


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
"""``ckpt_path`` values Lightning resolves itself (no file to check)."""


def _is_local_ckpt(path: Any) -> bool:
    return (
        isinstance(path, str)
        and bool(path)
        and path not in SPECIAL_CKPT_PATHS
        and not path.startswith("registry")
        and "://" not in path
    )


def _check_ckpt_file(path: str) -> None:
    """A missing, folder-typed or non-Lightning local ``--ckpt_path`` fails before any run folder exists."""
    if not _is_local_ckpt(path):
        return
    if os.path.isdir(path):
        found = sorted(
            os.path.relpath(os.path.join(d, f), path)
            for d, _, files in os.walk(path)
            for f in files
            if f.endswith(".ckpt")
        )
        hint = f"its checkpoints: {', '.join(found[:5])}" if found else "it holds no .ckpt file"
        raise ConfigFileNotFoundError(
            f"ckpt_path {path!r} is a folder, not a checkpoint file; give one .ckpt file ({hint})",
            option="ckpt_path",
        )
    if not os.path.isfile(path):
        raise ConfigFileNotFoundError(
            f"ckpt_path {path!r} does not exist; give the .ckpt file a `dmpo fit` run wrote "
            "(runs/<name>/version_N/checkpoints/*.ckpt) or one of: " + ", ".join(SPECIAL_CKPT_PATHS),
            option="ckpt_path",
        )
    try:  # mmap: the check reads the key list, not every tensor
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(
            f"ckpt_path {path!r} is not a readable Lightning checkpoint (torch.load failed with "
            f"{type(err).__name__}); give a .ckpt file written by `dmpo fit` (it is read with "
            "weights_only=True, so a file holding arbitrary pickled objects is refused as well)",
            option="ckpt_path",
        ) from err
    required = ("state_dict", "pytorch-lightning_version")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            what = "a bare state_dict (torch.save(model.state_dict()))"
        elif isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("dmpo-trainable"):
            what = "a trainable-parameter export (load it with DMPOModule.from_trainable)"
        else:
            missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
            what = f"a {type(ckpt).__name__} without the {' and '.join(map(repr, missing))} entries"
        raise ConfigError(
            f"ckpt_path {path!r} holds {what}, not a Lightning checkpoint; give a .ckpt file written by "
            "`dmpo fit` (runs/<name>/version_N/checkpoints/*.ckpt)",
            option="ckpt_path",
        )


def _tidy_parse_error(message: str) -> str:
    """Tidy jsonargparse's union errors: no dump of the whole given value, no ``None`` alternative."""
    keep = []
    for line in message.splitlines():
        stripped = line.strip()
        if stripped.startswith(("Given value type:", "Given value:", "Subtypes:")):
            continue
        if stripped == "- Expected a <class 'NoneType'>":
            continue
        head, sep, value = line.partition("Got value: ")
        if sep and len(value) > 80:  # a whole Namespace(...) / dict of the model's arguments
            line = f"{head}{sep}{value[:60]}..."
        keep.append(line)
    return "\n".join(keep)


class DMPOArgumentParser(LightningArgumentParser):
    """Parse errors as a short usage line and the reason, without a dump of the parsed values."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print ``usage``, a tip and the tidied message to stderr and exit with status 2."""
        message = _tidy_parse_error(message)
        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"usage: {prog} [-h] [-c CONFIG] [--print_config] [options]\n"
            f"tip: for the accepted options run: {prog} --help\nerror: {message}\n"
        )
        self.exit(2)


def _next_free(folder: str, stem: str, suffix: str) -> str:
    k = 1
    while os.path.exists(os.path.join(folder, f"{stem}.{k}{suffix}")):
        k += 1
    return f"{stem}.{k}{suffix}"


class SaveConfigNoOverwrite(SaveConfigCallback):
    """Save the run's config as ``config.yaml``, never replacing one that is there.

    A resumed run (``dmpo fit --ckpt_path`` into its own folder) writes ``config.1.yaml``, ``config.2.yaml``.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Pick a free file name on rank 0, then save as Lightning does."""
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir
            name = self.config_filename
            if trainer.is_global_zero and log_dir and os.path.exists(os.path.join(log_dir, name)):
                stem, suffix = os.path.splitext(name)
                name = _next_free(log_dir, stem, suffix)
                rank_zero_info(
                    f"{os.path.join(log_dir, self.config_filename)} is kept; this run's config: {name}"
                )
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


class SigtermCheckpoint(pl.Callback):
    """On SIGTERM, stop after the current batch and save a resumable ``interrupted.ckpt``.

    Lightning notices SIGTERM (``trainer.received_sigterm``) only at the end of an epoch and then exits with
    status 0; this callback stops at the next batch end, saves the full training state (as a mid-epoch
    ``ModelCheckpoint`` would) next to the run's checkpoints, and :func:`main` exits with status 143.
    """

    saved: str | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Raise Lightning's SIGTERM exception once the signal arrived."""
        # under DDP, Lightning broadcasts the signal at the next batch start and stops every rank together
        if trainer.received_sigterm and trainer.world_size == 1:
            raise SIGTERMException

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
        SigtermCheckpoint.saved = path


class DMPOCLI(LightningCLI):
    """LightningCLI for DMPO.

    - ``data.num_classes`` is linked into ``model.num_classes`` (written once, in the data config);
    - the model's backbone name, input size and channels are linked into the data module, which reads
      mean/std/interpolation from the backbone's timm pretrained config;
    - ``--test_after_fit true`` on ``fit`` runs ``test`` on the finished model (the quickstart does);
    - ``dmpo test``/``predict`` need ``--ckpt_path`` (or ``--allow_untrained true``);
    - every option that can be checked is checked before the first training step or evaluation batch;
    - nothing of another run is overwritten: a new ``fit`` refuses a named logger version whose folder holds a
      run; a resume into its own folder appends to ``metrics.csv`` and writes ``config.<k>.yaml`` and
      ``hparams.<k>.yaml``; ``validate``/``test``/``predict`` log into ``<version>_<subcommand>`` instead of a
      training run's folder.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Add ``--version`` to the main parser."""
        parser = super().init_parser(**kwargs)
        parser.add_argument(
            "--version", action="version", version=f"dmpo-lightning {dmpo_lightning.__version__}"
        )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Links between model and data, and the fit-then-test switch."""
        parser.link_arguments(
            "data.num_classes",
            "model.init_args.num_classes",
            compute_fn=self._linked_num_classes,
            apply_on="instantiate",
        )
        parser.link_arguments("model.init_args.backbone", "data.init_args.timm_model", apply_on="parse")
        parser.link_arguments("model.init_args.img_size", "data.init_args.image_size", apply_on="parse")
        parser.link_arguments("model.init_args.in_chans", "data.init_args.in_chans", apply_on="parse")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run `test` (early-exit protocol and report) on the best/last checkpoint",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="test/predict without --ckpt_path: evaluate freshly built (untrained) weights on purpose",
        )

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        """``--weights_only`` of fit/validate/test/predict defaults to true (Lightning's default is null).

        With null, ``torch.load`` decides, and before torch 2.6 (or with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
        set) it unpickles ``--ckpt_path`` without restrictions, which runs any code the file holds.
        """
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            parser.set_defaults(weights_only=True)
        return parser

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """An explicit ``--weights_only null`` also reads the checkpoint safely (``false`` is refused)."""
        fn_kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in fn_kwargs:
            fn_kwargs["weights_only"] = True
        return fn_kwargs

    def _linked_num_classes(self, num_classes: int | None) -> int:
        """The data module's class count, or the checkpoint's when the data reads no dataset.

        ``data.predict_paths`` (unlabelled images) leaves ``data.num_classes`` unknown; the model is then
        built with the number of classes it was trained with.
        """
        if num_classes is not None:
            return num_classes
        known = getattr(self, "_checkpoint_num_classes", None)
        if known is None:
            raise ValueError(
                "the data module reads no dataset (data.init_args.predict_paths), so the number of classes "
                "must come from the trained model: give --ckpt_path <run>/checkpoints/<file>.ckpt"
            )
        return int(known)

    def before_instantiate_classes(self) -> None:
        """Refuse ``--weights_only false``; check the backbone name before the data module reads its config.

        Otherwise the data module's error would name the linked ``timm_model``, not the option the user set.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        weights_only = config.get("weights_only")
        if weights_only not in (True, None):
            raise ConfigError(
                f"--weights_only={str(weights_only).lower()}: {UNRESTRICTED_UNPICKLING_REFUSED}",
                option="weights_only",
            )
        model = config.get("model")
        init = model.get("init_args") if model is not None and hasattr(model, "get") else None
        name = init.get("backbone") if init is not None else None
        if isinstance(name, str):
            try:
                check_backbone_name(name)
            except ValueError as err:
                raise ConfigError(
                    f"model.init_args.backbone: {err}", option="model.init_args.backbone"
                ) from None

    def instantiate_classes(self) -> None:
        """Build the classes (no backbone weights file when a checkpoint has the weights), then check them.

        Constructor errors (``ValueError``/``FileNotFoundError`` on a bad option) become :class:`ConfigError`.
        """
        sub = self.subcommand
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        restoring = weights_from_checkpoint() if _is_local_ckpt(ckpt) else contextlib.nullcontext()
        try:
            with restoring:
                super().instantiate_classes()
        except (ConfigError, DatasetLayoutError):
            raise
        except (FileNotFoundError, ValueError) as err:
            # jsonargparse wraps a constructor's error in a union error that dumps every model option
            inner = _constructor_error(err)
            if isinstance(inner, ConfigError):
                raise inner from err
            kind = ConfigFileNotFoundError if isinstance(inner, FileNotFoundError) else ConfigError
            raise kind(str(inner)) from err
        self._check_num_classes()

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The trainer, with a per-run folder for every logger, SIGTERM handling and a tidy test table."""
        trainer = super().instantiate_trainer(**kwargs)
        first = trainer.loggers[0] if trainer.loggers else None
        if first is not None and not isinstance(first, (CSVLogger, TensorBoardLogger)):
            # trainer.log_dir would be the first logger's shared save_dir (e.g. W&B's runs/): config, split
            # file and report of every run would collide there. A CSV logger first gives each run a folder.
            save_dir = getattr(first, "save_dir", None) or "runs"
            name = getattr(first, "name", None) or "dmpo"
            trainer.loggers = [CSVLogger(save_dir, name=str(name)), *trainer.loggers]
        # Trainer.callbacks is assigned at runtime by Lightning's callback connector, not declared on Trainer
        trainer.callbacks.append(SigtermCheckpoint())  # type: ignore[attr-defined]
        loop = trainer.test_loop
        print_results = loop._print_results
        # a deliberate per-instance patch of Lightning's results table printer
        loop._print_results = lambda results, stage: print_results(_drop_repeated_columns(results), stage)  # type: ignore[method-assign]
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=FIT_ONLY_CALLBACKS_WARNING)
            super()._run_subcommand(subcommand)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does, and remember the ``num_classes`` the user wrote, if any.

        The parsed config cannot tell a ``num_classes: 10`` the user wrote from the signature's default 10;
        a second parse without defaults (jsonargparse's ``defaults=False``) holds only what the command line
        and the config files set.
        """
        super().parse_arguments(parser, args)
        self._explicit_num_classes = _explicit_num_classes(parser, args)

    def _check_num_classes(self) -> None:
        """A ``num_classes`` the user wrote must equal the model's (from the data, else the checkpoint)."""
        explicit = getattr(self, "_explicit_num_classes", _UNKNOWN)
        data = getattr(self.datamodule, "num_classes", None)
        if explicit is _UNKNOWN:  # the second parse failed: only a non-default value is surely the user's
            explicit = getattr(self, "_given_num_classes", None)
            if explicit == inspect.signature(DMPOModule).parameters["num_classes"].default:
                explicit = None
        if explicit is None:
            return
        if isinstance(data, int):
            if explicit != data:
                raise ConfigError(
                    f"model.init_args.num_classes={explicit} disagrees with the data, which has {data} "
                    "classes; the model takes num_classes from the data module, so leave it out, set it to "
                    f"{data}, or fix the data options",
                    option="model.init_args.num_classes",
                )
            return
        built = getattr(getattr(self.model, "hparams", None), "get", lambda _k: None)("num_classes")
        if isinstance(built, int) and explicit != built:
            raise ConfigError(
                f"model.init_args.num_classes={explicit} disagrees with the checkpoint, which was trained "
                f"with {built} classes; the model takes num_classes from --ckpt_path when the data reads no "
                f"dataset, so leave it out or set it to {built}",
                option="model.init_args.num_classes",
            )

    def before_fit(self) -> None:
        """Validate schedule, optimizer, budgets and outputs before anything is written or trained."""
        if isinstance(self.model, DMPOModule):
            schedule = LossWeightScheduler(self.model.schedule_options)
            try:
                schedule.setup(self.trainer, self.model, "fit")
            except ValueError as err:
                raise ConfigError(str(err), option="model.init_args.schedule.switch_epoch") from err
            _check_ramp(schedule, self.trainer)
            self._check_optimizer()
            if self.config[self.subcommand].get("test_after_fit"):
                self._check_test_outputs()
        self._protect_run_folders()

    def before_validate(self) -> None:
        """Keep a training run's log folder untouched."""
        self._protect_run_folders()

    def before_test(self) -> None:
        """Refuse untrained weights, bad budgets and unwritable report folders before the first batch."""
        self._refuse_untrained()
        self._protect_run_folders()
        if isinstance(self.model, DMPOModule):
            self._check_test_outputs()

    def before_predict(self) -> None:
        """Refuse untrained weights and an existing or unwritable predictions file before the first batch."""
        from dmpo_lightning.evaluation.prediction_writer import predictions_path
        from dmpo_lightning.files import check_output_file

        self._refuse_untrained()
        self._protect_run_folders()
        if isinstance(self.model, DMPOModule):
            self.model.trainer = self.trainer
            check_output_file(predictions_path(self.model), "model.init_args.evaluation.predictions_file")

    def _check_test_outputs(self) -> None:
        from dmpo_lightning.evaluation.evaluator import report_dir
        from dmpo_lightning.evaluation.protocol_run import check_budgets
        from dmpo_lightning.evaluation.report import check_report_dir

        model = self.model
        model.trainer = self.trainer  # the default report folder is under the trainer's log folder
        o = model.evaluation_options
        check_budgets(o.budgets, o.budget_unit, model.exit_costs())
        check_report_dir(report_dir(model))

    def _check_optimizer(self) -> None:
        """A negative, infinite or NaN learning rate fails here, before the run folder exists."""
        example = "e.g. --model.init_args.optimizer.init_args.lr=0.001"
        try:
            optimizer = self.model.optimizer_factory(param_groups(self.model.model))
        except ValueError as err:
            if "learning rate" in str(err).lower() or "lr" in str(err):
                raise ConfigError(
                    f"model.init_args.optimizer: {err}; the learning rate must be a finite number "
                    f">= 0 ({example})",
                    option="model.init_args.optimizer.init_args.lr",
                ) from err
            raise ConfigError(
                f"model.init_args.optimizer: {err}", option="model.init_args.optimizer"
            ) from err
        for group in optimizer.param_groups:
            lr = float(group.get("lr", 0.0))
            if not (math.isfinite(lr) and lr >= 0):
                raise ConfigError(
                    f"model.init_args.optimizer: learning rate {lr} is not allowed; the learning rate "
                    f"must be a finite number >= 0 ({example})",
                    option="model.init_args.optimizer.init_args.lr",
                )

    def _refuse_untrained(self) -> None:
        sub = self.subcommand
        config = self.config[sub]
        if config.get("ckpt_path") or config.get("allow_untrained"):
            return
        raise ConfigError(
            f"dmpo {sub} without --ckpt_path would evaluate freshly built, untrained weights (random "
            "exits and adapters); give --ckpt_path <run>/checkpoints/<file>.ckpt, or --allow_untrained "
            "true to do it on purpose",
            option="ckpt_path",
        )

    def _protect_run_folders(self) -> None:
        """Never write into another run's folder (named logger versions; ``version_N`` ones are new)."""
        sub = self.subcommand
        ckpt = self.config[sub].get("ckpt_path")
        for logger in self.trainer.loggers:
            if not isinstance(logger, (CSVLogger, TensorBoardLogger)) or logger._version is None:
                continue  # the logger picks a new version_N folder itself
            log_dir = logger.log_dir
            existing = sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []
            if not existing:
                continue
            # a resume continues in its own run's folder only (the checkpoint lies inside it)
            resuming = ckpt in SPECIAL_CKPT_PATHS or (
                _is_local_ckpt(ckpt) and os.path.abspath(ckpt).startswith(os.path.abspath(log_dir) + os.sep)
            )
            if sub == "fit" and not resuming:
                what = f"--ckpt_path {ckpt} is not one of its checkpoints" if ckpt else "a new `dmpo fit`"
                raise ConfigFileExistsError(
                    f"log folder {log_dir} already holds a run ({', '.join(existing[:4])}) and {what}; it is "
                    "not overwritten: choose another trainer.logger.init_args.version, or resume that run "
                    f"with --ckpt_path {os.path.join(log_dir, 'checkpoints', '<file>.ckpt')}",
                    option="trainer.logger.init_args.version",
                )
            if sub == "fit":
                if isinstance(logger, CSVLogger) and self.trainer.is_global_zero:
                    _continue_csv_log(logger)
                continue
            base = logger._version if isinstance(logger._version, str) else f"version_{logger._version}"
            version, k = f"{base}_{sub}", 1
            while os.path.exists(os.path.join(logger.root_dir, version)):
                version, k = f"{base}_{sub}_{k}", k + 1
            logger._version = version  # the loggers create their folder lazily, so this is in time
            rank_zero_warn(
                f"{log_dir} holds a training run; dmpo {sub} logs to {logger.log_dir} instead (an "
                "evaluation never writes into a training run's folder; name a new "
                "trainer.logger.init_args.version to choose)"
            )

    def _parse_ckpt_path(self) -> None:
        """Take the architecture from ``--ckpt_path``'s hyperparameters, but keep the ``evaluation`` group.

        As LightningCLI (>= 2.3) does, the model config is replaced by the checkpoint's hyperparameters,
        which would silently drop ``--model.init_args.evaluation.budgets``/``report_dir``/``thresholds_file``
        given to ``dmpo test`` or ``dmpo predict``; those options do not change the weights, so the user's
        values win.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if isinstance(ckpt_path, str) and ckpt_path:
            _check_ckpt_file(ckpt_path)
        config = self.config[sub] if sub else self.config
        init = config["model"].get("init_args") if config.get("model") is not None else None
        kept = init.get("evaluation") if init is not None else None
        if init is not None:
            self._given_num_classes = init.get("num_classes")  # before the checkpoint's value replaces it
        if not (sub and isinstance(ckpt_path, str) and os.path.isfile(ckpt_path)):
            return
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile) as err:
            raise ConfigError(
                f"ckpt_path {ckpt_path!r} is not a readable Lightning checkpoint (torch.load failed with "
                f"{type(err).__name__}); give a .ckpt file written by `dmpo fit` (it is read with "
                "weights_only=True, so a file holding arbitrary pickled objects is refused as well)",
                option="ckpt_path",
            ) from err
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if hparams:
            if "_class_path" in hparams:  # as LightningCLI passes a subclass's saved init args
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            try:
                self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
            except SystemExit:
                sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
                raise
        model_init = self.config[sub]["model"].get("init_args") if self.config[sub].get("model") else None
        if model_init is not None:
            if kept is not None:
                model_init["evaluation"] = kept
            self._checkpoint_num_classes = model_init.get("num_classes")

    def after_fit(self) -> None:
        """Optionally evaluate the model just trained."""
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        ckpt = None
        callback = self.trainer.checkpoint_callback
        best: str = getattr(callback, "best_model_path", "") if callback is not None else ""
        if best:  # ModelCheckpoint's best file (Lightning's Checkpoint base type does not declare it)
            ckpt = best
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)


JSONARGPARSE_WRAPPERS = (
    "Does not validate against any of the Union subtypes",
    "Problem with given class_path",
    "Expected a <class 'NoneType'>",  # older jsonargparse reports the None alternative of the union first
)


def _read_attribute_docstrings(enabled: bool) -> None:
    """Let jsonargparse show the option groups' field docstrings (``peft.adapter_dim: ...``) in ``--help``.

    Only for help: reading them doubles the time to build the parser (0.65 -> 1.4 s per config here).
    """
    import jsonargparse

    try:
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=enabled)
    except (AttributeError, TypeError):  # older jsonargparse
        jsonargparse.set_docstring_parse_options(attribute_docstrings=enabled)


def _wants_help(args: ArgsType) -> bool:
    words = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []
    return any(
        isinstance(w, str) and (w in ("-h", "--help") or w.split("=")[0].endswith(".help")) for w in words
    )


def _constructor_error(err: BaseException) -> BaseException:
    """The error a class's constructor raised, without jsonargparse's wrapping (which dumps the options)."""
    inner = err
    while isinstance(inner.__cause__, Exception) and (
        str(inner).startswith(JSONARGPARSE_WRAPPERS) or type(inner).__module__.startswith("jsonargparse")
    ):
        inner = inner.__cause__
    if str(inner).startswith(JSONARGPARSE_WRAPPERS):  # older jsonargparse: only the union message has it
        chain: list[BaseException] = []
        e: BaseException | None = err
        while e is not None and e not in chain:
            chain.append(e)
            e = e.__cause__
        for e in chain:
            for line in str(e).splitlines():
                reason = line.strip()[2:] if line.strip().startswith("- ") else ""
                if reason and not reason.startswith(JSONARGPARSE_WRAPPERS):
                    return ValueError(reason)
    return inner


_UNKNOWN = object()


def _explicit_num_classes(parser: LightningArgumentParser, args: ArgsType) -> Any:
    """``model.init_args.num_classes`` as the user gave it (None: not given; ``_UNKNOWN``: cannot tell)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            if isinstance(args, (dict, Namespace)):
                given = parser.parse_object(args, defaults=False)
            else:
                given = parser.parse_args(args, defaults=False)
        sub = given.get("subcommand")
        config = given[sub] if sub else given
        value = config.get("model.init_args.num_classes")
    except (Exception, SystemExit):
        return _UNKNOWN
    return value if value is None or isinstance(value, int) else _UNKNOWN


def _check_ramp(schedule: LossWeightScheduler, trainer: pl.Trainer) -> None:
    """A ramp that ends after the last epoch never reaches phase 2's weights: refuse it before training."""
    s = schedule.schedule
    max_epochs = schedule._max_epochs
    if s is None or not max_epochs or max_epochs < 1 or s.ramp_epochs == 0 or s.phase1 == s.phase2:
        return
    full = s.switch_epoch + s.ramp_epochs  # first epoch with phase 2's weights alone
    if full > max_epochs - 1:
        raise ConfigError(
            f"switch_epoch={s.switch_epoch} with ramp_epochs={s.ramp_epochs} reaches phase 2's "
            "weights only at "
            f"epoch {full}, after the last epoch {max_epochs - 1} (max_epochs={max_epochs}); allowed: "
            f"ramp_epochs <= {max(max_epochs - 1 - s.switch_epoch, 0)}, an earlier switch_epoch or "
            "more epochs",
            option="model.init_args.schedule.ramp_epochs",
        )


def _continue_csv_log(logger: CSVLogger) -> None:
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


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(torch.equal(torch.as_tensor(a).float(), torch.as_tensor(b).float()))
    except (TypeError, ValueError, RuntimeError):
        return a == b


def _drop_repeated_columns(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop a dataloader's column of Lightning's test table whose every value repeats an earlier column.

    The test summary is logged once, at epoch end, and Lightning copies it into every dataloader's results:
    the calibration dataloader's column would show the test values again.
    """
    kept: list[dict[str, Any]] = []
    for result in results:
        repeated = bool(kept) and all(
            any(key in k and _same(k[key], value) for k in kept) for key, value in result.items()
        )
        if not repeated:
            kept.append(result)
    return kept


HELP_DESCRIPTION = """\
dmpo: early-exit tuning of pre-trained vision transformers (DMPO) on Lightning.
Subcommands: fit, validate, test, predict (below) and export (see the end of this help)."""

HELP_EPILOG = """\
other subcommands:
  export                Write a deployable early-exit artefact (manifest, safetensors weights,
                        calibrated thresholds, optional ONNX stages) from a trained run;
                        options: dmpo export --help"""


class _KeepLinesHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help layout, with the description and epilog printed as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def main(args: ArgsType = None, run: bool = True) -> DMPOCLI:
    """Entry point of ``dmpo`` and ``python -m dmpo_lightning``; ``args`` lets tests call it in-process.

    With ``run=False`` the classes are only instantiated (no subcommand), as in ``LightningCLI(run=False)``.

    W&B runs offline unless the user is logged in (``WANDB_API_KEY`` or ``wandb login``), so a W&B logger
    in a config never blocks or fails on a machine without an account or network.
    """
    if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    SigtermCheckpoint.saved = None
    help_text = _wants_help(args)
    if help_text:
        _read_attribute_docstrings(True)
    try:
        return DMPOCLI(
            DMPOModule,
            BenchmarkDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=0,
            parser_class=DMPOArgumentParser,
            parser_kwargs={
                "prog": "dmpo",
                "description": HELP_DESCRIPTION,
                "epilog": HELP_EPILOG,
                "formatter_class": _KeepLinesHelpFormatter,
            },
            save_config_callback=SaveConfigNoOverwrite,
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "dmpo"},
                },
            },
            args=args,
            run=run,
        )
    except SIGTERMException:
        saved = SigtermCheckpoint.saved
        where = f"; resume with --ckpt_path {saved}" if saved else " before a checkpoint could be saved"
        print(f"dmpo: stopped by SIGTERM{where}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if help_text:  # back to the default for the next parser built in this process
            _read_attribute_docstrings(False)


def console_main() -> None:
    """The ``dmpo`` console script: like :func:`main`, but returns nothing (so the exit status is 0).

    ``dmpo export ...`` is not a Lightning subcommand; it goes to :mod:`dmpo_lightning.deploy.cli`.
    A configuration error (:class:`~dmpo_lightning.errors.ConfigError`, a dataset-layout error) prints
    ``dmpo <subcommand>: error: <message>`` and exits with status 2, as a parse error does (an image file
    that cannot be read during the run: the same line naming the file, status 1); ``--debug``
    (anywhere on the command line) or ``DMPO_DEBUG=1`` shows the traceback instead.
    """
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from dmpo_lightning.deploy.cli import console_main as export_main

        export_main(sys.argv[2:])
        return
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if "--debug" in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != "--debug"]
        debug = True
    if debug:
        os.environ.setdefault("JSONARGPARSE_DEBUG", "true")
    try:
        main()
    except (ConfigError, DatasetLayoutError, UnreadableImageError) as err:
        if debug:
            raise
        sub = next((a for a in sys.argv[1:] if a in SUBCOMMANDS), None)
        message = str(err)
        option = getattr(err, "option", None)
        if option and option not in message:
            message = f"{option}: {message}"
        sys.stderr.write(f"dmpo{' ' + sub if sub else ''}: error: {message}\n")
        sys.stderr.write(f"(--debug or {DEBUG_ENV}=1 shows the traceback)\n")
        # a broken image met during the run is a data error, not a usage error: status 1
        raise SystemExit(1 if isinstance(err, UnreadableImageError) else 2) from None


if __name__ == "__main__":  # python -m dmpo_lightning.cli, the same as python -m dmpo_lightning
    console_main()
