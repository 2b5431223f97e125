"""The ``dmpo`` command: fit / validate / test / predict on LightningCLI, export and serve beside them.

``dmpo fit|validate|test|predict`` are LightningCLI subcommands, extended only through LightningCLI's public
hooks; ``dmpo export`` (:mod:`dmpo_lightning.deploy.cli`) and ``dmpo serve`` (:mod:`dmpo_lightning.serve`)
are subcommands with parsers of their own. Every check of an option lives in the object that uses it (the
schedule, the optimizer factory, the evaluator, the data module); the CLI calls those checks before anything
is written, and turns a :class:`~dmpo_lightning.errors.ConfigError` into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import inspect
import io
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dmpo_lightning.callbacks import InterruptCheckpoint, LossWeightScheduler
from dmpo_lightning.checkpointing import (
    LIGHTNING_CKPT_NAMES,
    UNRESTRICTED_UNPICKLING_REFUSED,
    check_checkpoint_file,
    is_checkpoint_file_path,
    run_folder_of,
    weights_from_checkpoint,
)
from dmpo_lightning.data import BenchmarkDataModule
from dmpo_lightning.data.errors import DatasetLayoutError, UnreadableImageError
from dmpo_lightning.errors import ConfigError, ConfigFileExistsError, ConfigFileNotFoundError
from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions, check_trained
from dmpo_lightning.evaluation.prediction_writer import DMPOPredictionWriter, predictions_path
from dmpo_lightning.evaluation.protocol_run import check_budgets
from dmpo_lightning.evaluation.report import check_report_dir
from dmpo_lightning.files import check_output_file, claim_folder, release_folder
from dmpo_lightning.models.backbone import check_backbone_name
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.optim import check_learning_rates, param_groups
from dmpo_lightning.version import __version__

__all__ = ["DMPOCLI", "console_main", "main"]

LIGHTNING_COMMANDS = {
    "fit": "Train: tune the backbone's adapters and the exits (the loss-weight schedule rides along)",
    "validate": "Per-exit loss and accuracy of a checkpoint on the calibration split",
    "test": "The early-exit protocol: per-exit accuracy and FLOPs, budgets, curve, thresholds, report",
    "predict": "The real early exit over a dataset split or new images, into a predictions CSV",
}
OTHER_COMMANDS = {
    "export": (
        "dmpo_lightning.deploy.cli:console_main",
        "Write a deployable early-exit artefact from a trained run",
    ),
    "serve": (
        "dmpo_lightning.serve.cli:main",
        "Serve an exported artefact over HTTP (needs dmpo-lightning[serve])",
    ),
}
"""``dmpo <command>`` -> ``module:function(argv)`` (returns nothing or an exit status) and its help line."""
DEBUG_ENV = "DMPO_DEBUG"
"""``DMPO_DEBUG=1`` (or ``--debug``) shows the traceback of configuration errors."""
LINKED = {
    "data.init_args.timm_model": "model.init_args.backbone",
    "data.init_args.image_size": "model.init_args.img_size",
    "data.init_args.in_chans": "model.init_args.in_chans",
}
"""Data options the CLI sets from the model's (link target -> source)."""
TRAINING_ONLY = (
    "schedule",
    "label_smoothing",
    "distill",
    "distill_weight",
    "distill_temperature",
    "optimizer",
    "lr_scheduler",
    "warmup_fraction",
    "pretrained",
    "checkpoint_path",
)
"""Model options that only shape training (or the weights a checkpoint replaces): compared on resume only."""
_NOT_GIVEN = object()
LR_EXAMPLE = "--model.init_args.optimizer.init_args.lr=0.001"


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or os.environ.get("JSONARGPARSE_DEBUG", "") != ""


def _tidy_parse_error(message: str) -> str:
    """Jsonargparse's message without dumps of the given value and the ``None`` alternative of unions."""
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
    unknown = re.findall(r"Option '(\w+)' is not accepted", message)
    if unknown and "class_path 'dmpo_lightning.DMPOModule'" in message:
        accepted = ", ".join(p for p in inspect.signature(DMPOModule).parameters if p != "self")
        keep.append(f"  model.init_args accepts: {accepted} (dmpo fit --model.help DMPOModule)")
    if "'evaluation'" in message and ("model" in message or "init_args" in message):
        keep.append(
            "  the evaluation options are not model options: write `evaluation:` at the top level of the "
            "config (beside `model:`), or --evaluation.<option> on the command line"
        )
    for group in ("peft", "exits", "schedule"):
        if f"init_args.{group}" in message and "Expected a <class 'str'>" not in message and "str" in message:
            keep.append(f"  {group} is a group of options, a mapping: e.g. `{group}: {{...}}`")
    return "\n".join(keep)


class DMPOArgumentParser(LightningArgumentParser):
    """Parse errors as a short usage line and the reason, without a dump of the parsed values."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print ``usage``, a tip and the tidied message to stderr and exit with status 2."""
        message = _tidy_parse_error(message)
        if not self.exit_on_error or _debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"usage: {prog} [-h] [-c CONFIG] [--print_config] [options]\n"
            f"tip: for the accepted options run: {prog} --help\nerror: {message}\n"
        )
        self.exit(2)


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


class DMPOCLI(LightningCLI):
    """LightningCLI for DMPO.

    - ``data.num_classes`` is linked into ``model.num_classes``; the model's backbone, input size and channels
      into the data module (a different value written for the data side is refused, never replaced);
    - ``evaluation.*`` (:class:`~dmpo_lightning.evaluation.evaluator.EvaluationOptions`) configures the
      evaluator of ``test`` (and of ``fit --test_after_fit true``) and the writer of ``predict``;
    - with ``--ckpt_path`` the model is rebuilt from the checkpoint's hyperparameters; a model option written
      on the command line or in a config that differs from the checkpoint's is refused by name;
    - every option that can be checked is checked before anything is written, by the objects that use it;
    - nothing of another run is overwritten; validate/test/predict of a run's checkpoint write into a new
      ``dmpo_<subcommand>[_k]`` folder inside that run.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Add ``--version`` to the main parser."""
        parser = super().init_parser(**kwargs)
        parser.add_argument(
            "--version", action="version", version=f"dmpo-lightning {__version__}"
        )
        return parser

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """LightningCLI's parsers, with ``--weights_only`` of every subcommand defaulting to true.

        Lightning's default (null) lets ``torch.load`` decide, which unpickles without restrictions on old
        torch or with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set; ``false`` is refused.
        """
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            self.parser.set_defaults({f"{sub}.weights_only": True for sub in self.subcommands()})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Links between model and data, the evaluation options and the fit-then-test switch."""
        parser.link_arguments(
            "data.num_classes",
            "model.init_args.num_classes",
            compute_fn=self._num_classes,
            apply_on="instantiate",
        )
        for target, source in LINKED.items():
            parser.link_arguments(source, target, apply_on="parse")
        parser.add_class_arguments(EvaluationOptions, "evaluation", instantiate=True, fail_untyped=False)
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run `test` (early-exit protocol and report) on the best/last checkpoint",
        )

    def _num_classes(self, num_classes: int | None) -> int:
        """The data module's class count, or the checkpoint's when the data reads no dataset."""
        if num_classes is not None:
            return num_classes
        if self._checkpoint_num_classes is None:
            raise ConfigError(
                "the data module reads no dataset (data.init_args.predict_paths), so the number of classes "
                "must come from the trained model: give --ckpt_path <run>/checkpoints/<file>.ckpt",
                option="ckpt_path",
            )
        return int(self._checkpoint_num_classes)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does; remember what the user wrote; check ``--ckpt_path`` before it is read.

        LightningCLI then replaces the model's options with the checkpoint's hyperparameters; the values the
        user wrote (a second parse without defaults, jsonargparse's ``defaults=False``) are compared with
        them in :meth:`before_instantiate_classes`.
        """
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        self._given = _given_values(parser, args, sub)
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if is_checkpoint_file_path(ckpt):
            check_checkpoint_file(ckpt)

    def before_instantiate_classes(self) -> None:
        """Refuse unsafe loading, unknown backbones, dropped values and ``last``/``best`` outside fit."""
        sub = self.subcommand
        config = self.config[sub] if sub else self.config
        if config.get("weights_only") not in (True, None):
            value = str(config.get("weights_only")).lower()
            raise ConfigError(
                f"--weights_only={value}: {UNRESTRICTED_UNPICKLING_REFUSED}",
                option="weights_only",
            )
        if sub and config.get("weights_only") is None:
            config["weights_only"] = True  # an explicit null would let torch decide
        ckpt = config.get("ckpt_path")
        if sub != "fit" and ckpt in LIGHTNING_CKPT_NAMES:
            raise ConfigError(
                f"--ckpt_path {ckpt} names a checkpoint of a `dmpo fit` in the same command; dmpo {sub} "
                "runs on its own, so give the checkpoint file (<run>/checkpoints/last.ckpt, or the best one)",
                option="ckpt_path",
            )
        name = config.get("model.init_args.backbone")
        if isinstance(name, str):
            try:
                check_backbone_name(name)
            except ValueError as err:
                raise ConfigError(
                    f"model.init_args.backbone: {err}", option="model.init_args.backbone"
                ) from None
        self._checkpoint_num_classes = config.get("model.init_args.num_classes") if ckpt else None
        _refuse_dropped_values(self._given, config, is_checkpoint_file_path(ckpt), resuming=sub == "fit")

    def instantiate_classes(self) -> None:
        """Build the classes (a checkpoint holds the backbone's weights: no file or download needed).

        A constructor's ``ValueError``/``FileNotFoundError`` on a bad option becomes a :class:`ConfigError`.
        """
        ckpt = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        restoring = weights_from_checkpoint() if is_checkpoint_file_path(ckpt) else contextlib.nullcontext()
        try:
            with restoring:
                super().instantiate_classes()
        except (ConfigError, DatasetLayoutError):
            raise
        except (FileNotFoundError, ValueError) as err:
            inner = _constructor_error(err)
            if isinstance(inner, ConfigError):
                raise inner from err
            kind = ConfigFileNotFoundError if isinstance(inner, FileNotFoundError) else ConfigError
            raise kind(str(inner)) from err

    def after_instantiate_classes(self) -> None:
        """Checkpoints are read with ``weights_only=True``; ``dmpo test`` prints its own report table."""
        sub = self.subcommand
        if sub:
            init = self.config_init[sub]
            if "weights_only" in init:
                init["weights_only"] = True
            if sub == "test" and self._given.get("verbose", _NOT_GIVEN) is _NOT_GIVEN:
                init["verbose"] = False  # the evaluator prints the report; Lightning's table would repeat it
        self._check_num_classes()

    def _check_num_classes(self) -> None:
        """A ``num_classes`` the user wrote must equal the data's."""
        given = self._given.get("model.init_args.num_classes", _NOT_GIVEN)
        data = getattr(self.datamodule, "num_classes", None)
        if given is _NOT_GIVEN or given is None or not isinstance(data, int) or given == data:
            return
        raise ConfigError(
            f"model.init_args.num_classes={given} disagrees with the data, which has {data} classes; the "
            f"model takes num_classes from the data module, so leave it out, set it to {data}, or fix the "
            "data options",
            option="model.init_args.num_classes",
        )

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The trainer, with a per-run CSV folder first, a checkpoint on SIGTERM/SIGINT, and the evaluator."""
        trainer = super().instantiate_trainer(**kwargs)
        first = trainer.loggers[0] if trainer.loggers else None
        if first is not None and not isinstance(first, (CSVLogger, TensorBoardLogger)):
            # trainer.log_dir would be the first logger's shared save_dir (e.g. W&B's runs/): config, split
            # file and report of every run would collide there. A CSV logger first gives each run a folder.
            save_dir = getattr(first, "save_dir", None) or "runs"
            trainer.loggers = [
                CSVLogger(save_dir, name=str(getattr(first, "name", None) or "dmpo")),
                *trainer.loggers,
            ]
        trainer.callbacks.append(InterruptCheckpoint())  # type: ignore[attr-defined]
        return trainer

    # --------------------------------------------------------------------------- before each subcommand
    def before_fit(self) -> None:
        """Check the schedule, optimizer, budgets and log folder before anything is written or trained."""
        model, trainer = self.model, self.trainer
        if isinstance(model, DMPOModule):
            try:
                LossWeightScheduler(model.schedule_options).setup(trainer, model, "fit")  # builds = checks
            except ValueError as err:
                raise ConfigError(str(err), option="model.init_args.schedule") from None
            try:  # torch's own check first ("Invalid learning rate: -0.1"), then NaN/inf
                check_learning_rates(model.optimizer_factory(param_groups(model.model)))
            except ValueError as err:
                text = (
                    str(err)
                    if str(err).startswith("model.init_args")
                    else f"model.init_args.optimizer: {err}"
                )
                if "learning rate" in text and "finite number" not in text:
                    text += "; the learning rate must be a finite number >= 0 (e.g. " + LR_EXAMPLE + ")"
                raise ConfigError(text, option="model.init_args.optimizer") from None
        options = self._evaluation_options()
        if self.config["fit"].get("test_after_fit"):
            if options.report_dir is not None:
                check_report_dir(options.report_dir)
            if isinstance(model, DMPOModule):
                check_budgets(options.budgets, options.budget_unit, model.exit_costs())
            trainer.callbacks.append(DMPOEvaluator(options))  # type: ignore[attr-defined]
        self._protect_training_folder()

    def before_validate(self) -> None:
        """Log into a new folder (inside the checkpoint's run, if it is one), never into a training run's."""
        self._evaluation_folder()

    def before_test(self) -> None:
        """Refuse untrained weights and bad budgets; claim the report folder; attach the evaluator."""
        options = self._evaluation_options()
        if isinstance(self.model, DMPOModule):
            self._refuse_untrained(options)
            check_budgets(options.budgets, options.budget_unit, self.model.exit_costs())
        if options.report_dir is not None:
            check_report_dir(options.report_dir)
        folder = self._evaluation_folder()
        claimed = folder if options.report_dir is None else None
        evaluator = DMPOEvaluator(options, claimed_report_dir=claimed)
        self.trainer.callbacks.append(evaluator)  # type: ignore[attr-defined]

    def before_predict(self) -> None:
        """Refuse untrained weights and an existing predictions file; attach the writer."""
        options = self._evaluation_options()
        if isinstance(self.model, DMPOModule):
            self._refuse_untrained(options)
        self._evaluation_folder()
        check_output_file(predictions_path(self.trainer, options), "evaluation.predictions_file")
        self.trainer.callbacks.append(DMPOPredictionWriter(options))  # type: ignore[attr-defined]

    def after_fit(self) -> None:
        """Optionally evaluate the model just trained (its best checkpoint, else the last weights)."""
        if not self.config["fit"].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        best: str = getattr(callback, "best_model_path", "") if callback is not None else ""
        self.trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True, verbose=False
        )

    # --------------------------------------------------------------------------------------- helpers
    def _evaluation_options(self) -> EvaluationOptions:
        return EvaluationOptions.coerce(
            self.config_init[self.subcommand].get("evaluation"), name="evaluation"
        )

    def _refuse_untrained(self, options: EvaluationOptions) -> None:
        """Without a checkpoint the weights are freshly built: refused now (a checkpoint: once loaded)."""
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if not ckpt:
            check_trained(self.model, options, f"dmpo {self.subcommand}", None)

    def _first_file_logger(self) -> CSVLogger | TensorBoardLogger | None:
        first = self.trainer.loggers[0] if self.trainer.loggers else None
        return first if isinstance(first, (CSVLogger, TensorBoardLogger)) else None

    def _logger_version_given(self) -> bool:
        return self.config[self.subcommand].get("trainer.logger.init_args.version") is not None

    def _protect_training_folder(self) -> None:
        """A new ``fit`` never writes into a named log folder that holds another run (resuming it may)."""
        logger = self._first_file_logger()
        if logger is None or not self._logger_version_given():
            return  # the logger picks a new version_N folder itself
        log_dir = logger.log_dir
        existing = sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []
        if not existing:
            return
        ckpt = self.config["fit"].get("ckpt_path")
        inside = is_checkpoint_file_path(ckpt) and os.path.abspath(ckpt).startswith(
            os.path.abspath(log_dir) + os.sep
        )
        if not (inside or ckpt in LIGHTNING_CKPT_NAMES):
            what = f"--ckpt_path {ckpt} is not one of its checkpoints" if ckpt else "a new `dmpo fit`"
            raise ConfigFileExistsError(
                f"log folder {log_dir} already holds a run ({', '.join(existing[:4])}) and {what}; it is not "
                "overwritten: choose another trainer.logger.init_args.version, or resume that run with "
                f"--ckpt_path {os.path.join(log_dir, 'checkpoints', '<file>.ckpt')}",
                option="trainer.logger.init_args.version",
            )
        if isinstance(logger, CSVLogger) and self.trainer.is_global_zero:
            _continue_csv_log(logger)

    def _evaluation_folder(self) -> str | None:
        """Where validate/test/predict log: ``<run>/dmpo_<subcommand>[_k]`` for a run's checkpoint.

        Testing a run's checkpoint belongs to that run, so its config, metrics and report sit inside the run
        (where ``dmpo export --run`` finds them). A logger folder that holds a training run is never written
        into either. The folder is created exclusively now (two evaluations never share one).
        """
        logger = self._first_file_logger()
        if logger is None or not self.trainer.is_global_zero:
            return None
        sub = self.subcommand
        planned = logger.log_dir
        run = run_folder_of(self.config[sub].get("ckpt_path"))
        if os.path.isdir(planned) and os.listdir(planned):
            parent = planned  # a named version that holds a training run
        elif (
            run is not None
            and not self._logger_version_given()
            and _same_path(logger.root_dir, os.path.dirname(run))
        ):
            parent = run
        else:
            return None
        folder = claim_folder(os.path.join(parent, f"dmpo_{sub}"), next_free=True)
        self.trainer.callbacks.append(ReleaseFolder(folder))  # type: ignore[attr-defined]
        init = _logger_init_args(self.config[sub].get("trainer.logger"))
        init.update(save_dir=parent, name="", version=os.path.basename(folder))
        self.trainer.loggers = [type(logger)(**init), *self.trainer.loggers[1:]]
        rank_zero_info(f"dmpo {sub} of {parent}'s checkpoint writes into {folder}")
        return folder


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _next_free(folder: str, stem: str, suffix: str) -> str:
    k = 1
    while os.path.exists(os.path.join(folder, f"{stem}.{k}{suffix}")):
        k += 1
    return f"{stem}.{k}{suffix}"


def _logger_init_args(config: Any) -> dict[str, Any]:
    """The configured first logger's ``init_args`` as a dict (empty when it is not given as a class)."""
    first = config[0] if isinstance(config, list) and config else config
    init = getattr(first, "init_args", None) if isinstance(first, Namespace) else None
    return init.as_dict() if isinstance(init, Namespace) else dict(init or {})


def _plain(value: Any) -> Any:
    """Config values in one form for comparison (Namespaces and mappings as dicts, tuples as lists)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _given_values(parser: LightningArgumentParser, args: ArgsType, sub: str | None) -> dict[str, Any]:
    """The leaf values the user wrote (config files and command line), by dotted key, without defaults."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            given = (
                parser.parse_object(args, defaults=False)
                if isinstance(args, (dict, Namespace))
                else parser.parse_args(args, defaults=False)
            )
    except (Exception, SystemExit):  # the first parse succeeded; without defaults a required key may lack
        return {}
    config = _plain(given.get(sub) if sub else given)
    return {k: v for key, item in (config or {}).items() for k, v in _leaves(item, key).items()}


def _refuse_dropped_values(
    given: Mapping[str, Any], config: Namespace, from_checkpoint: bool, *, resuming: bool
) -> None:
    """A value the user wrote that the run would not use is refused, naming it (never silently replaced).

    - a data option the CLI sets from the model's (``data.init_args.image_size`` from
      ``model.init_args.img_size``);
    - with ``--ckpt_path``, a model option that differs from the checkpoint's (the model is rebuilt from it);
      outside ``fit`` only the options that shape the trained model count (not :data:`TRAINING_ONLY`).
    """
    for target, source in LINKED.items():
        if (
            target in given
            and given[target] is not None
            and _plain(given[target]) != _plain(config.get(source))
        ):
            raise ConfigError(
                f"{target}={given[target]} would be replaced by {source}={config.get(source)} (the data "
                f"module follows the model); set {source} instead, or leave {target} out",
                option=target,
            )
    if not from_checkpoint:
        return
    differ = [
        (key, value, config.get(key))
        for key, value in given.items()
        if key.startswith("model.init_args.")
        and (resuming or key.split(".")[2] not in TRAINING_ONLY)
        and key in config
        and _plain(value) != _plain(config.get(key))
    ]
    if differ:
        details = "; ".join(
            f"{k.removeprefix('model.init_args.')}: given {v!r}, checkpoint {c!r}" for k, v, c in differ
        )
        raise ConfigError(
            f"the model is rebuilt from --ckpt_path's hyperparameters, and {len(differ)} option(s) given "
            f"here differ from them ({details}); a resumed or evaluated model keeps its architecture and "
            "schedule, so leave these options out (or start a new run without --ckpt_path)",
            option="ckpt_path",
        )


JSONARGPARSE_WRAPPERS = (
    "Does not validate against any of the Union subtypes",
    "Problem with given class_path",
    "Expected a <class 'NoneType'>",  # older jsonargparse reports the None alternative of the union first
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


def _read_attribute_docstrings(enabled: bool) -> None:
    """Let ``--help`` show the option groups' field docstrings (it doubles the parser's build time)."""
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=enabled)


def main(args: ArgsType = None, run: bool = True) -> DMPOCLI:
    """``dmpo fit|validate|test|predict``; ``args`` lets tests call it in-process (``run=False``: build only).

    W&B runs offline unless the user is logged in (``WANDB_API_KEY`` or ``wandb login``), so a W&B logger
    in a config never blocks or fails on a machine without an account or network.
    """
    if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    words = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []
    help_text = any(
        isinstance(w, str) and (w in ("-h", "--help") or w.split("=")[0].endswith(".help")) for w in words
    )
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
            parser_kwargs={"prog": "dmpo"},
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
    finally:
        if help_text:  # back to the default for the next parser built in this process
            _read_attribute_docstrings(False)


def _wandb_logged_in() -> bool:
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_parser() -> argparse.ArgumentParser:
    """The ``dmpo`` program: its subcommands, each with a parser of its own (``dmpo <command> --help``)."""
    parser = argparse.ArgumentParser(
        prog="dmpo",
        description="dmpo: early-exit tuning of pre-trained vision transformers (DMPO) on Lightning.",
        epilog="Options of a command: dmpo <command> --help.  Tracebacks of configuration errors: --debug.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"dmpo-lightning {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, text in LIGHTNING_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False, allow_abbrev=False)
    for name, (_, text) in OTHER_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False, allow_abbrev=False)
    return parser


def _command_main(name: str) -> Callable[[list[str]], Any]:
    module, _, function = OTHER_COMMANDS[name][0].partition(":")
    try:  # imported when used: serve needs the optional [serve] extra
        return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]
    except ImportError as err:
        raise ConfigError(
            f"dmpo {name} is not available here ({err}); install dmpo-lightning[{name}]"
        ) from None


def console_main() -> None:
    """The ``dmpo`` console script.

    A configuration error (:class:`~dmpo_lightning.errors.ConfigError`, a dataset-layout error) prints
    ``dmpo <command>: error: <message>`` and exits with status 2, as a parse error does (an image that cannot
    be read during the run: status 1); ``--debug`` (anywhere) or ``DMPO_DEBUG=1`` shows the traceback.
    SIGTERM or Ctrl+C during a run stops it after the current batch (fit saves ``interrupted.ckpt``) and
    exits with status 128 + the signal.
    """
    debug = _debugging() or "--debug" in sys.argv[1:]
    sys.argv = [a for a in sys.argv if a != "--debug"]
    if debug:
        os.environ.setdefault("JSONARGPARSE_DEBUG", "true")
    command, rest = build_parser().parse_known_args(sys.argv[1:])
    name = command.command
    try:
        if name in OTHER_COMMANDS:
            status = _command_main(name)(rest)
            if isinstance(status, int) and status:
                raise SystemExit(status)
            return
        InterruptCheckpoint.reset()
        main()
    except (ConfigError, DatasetLayoutError, UnreadableImageError) as err:
        if debug:
            raise
        message, option = str(err), getattr(err, "option", None)
        if option and option not in message:
            message = f"{option}: {message}"
        sys.stderr.write(f"dmpo {name}: error: {message}\n({DEBUG_ENV}=1 or --debug shows the traceback)\n")
        # a broken image met during the run is a data error, not a usage error: status 1
        raise SystemExit(1 if isinstance(err, UnreadableImageError) else 2) from None
    except SIGTERMException:
        signum = InterruptCheckpoint.signal or signal.SIGTERM
        saved = InterruptCheckpoint.saved
        where = f"; resume with --ckpt_path {saved}" if saved else ""
        print(f"dmpo {name}: stopped by {signal.Signals(signum).name}{where}", file=sys.stderr)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":  # python -m dmpo_lightning.cli, the same as python -m dmpo_lightning
    console_main()
