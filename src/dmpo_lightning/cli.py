"""The ``dmpo`` command: fit / validate / test / predict on LightningCLI, export and serve beside them.

``dmpo fit|validate|test|predict`` are LightningCLI subcommands, extended only through LightningCLI's public
hooks; ``dmpo export`` (:mod:`dmpo_lightning.deploy.cli`) and ``dmpo serve`` (:mod:`dmpo_lightning.serve`)
are subcommands with parsers of their own. Every check of an option lives in the object that uses it (the
schedule, the optimizer factory, the evaluator, the data module); the CLI calls those checks before anything
is written, and turns a :class:`~dmpo_lightning.errors.ConfigError` into one line and exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from dmpo_lightning.callbacks import (
    InterruptCheckpoint,
    LossWeightScheduler,
    ReleaseFolder,
    SaveConfigNoOverwrite,
    check_log_folder,
    continue_csv_log,
)
from dmpo_lightning.checkpointing import (
    LIGHTNING_CKPT_NAMES,
    UNRESTRICTED_UNPICKLING_REFUSED,
    check_checkpoint_file,
    is_checkpoint_file_path,
    run_folder_of,
    weights_from_checkpoint,
)
from dmpo_lightning.data import BenchmarkDataModule
from dmpo_lightning.data.errors import DatasetLayoutError
from dmpo_lightning.errors import ConfigError, ConfigFileExistsError, ConfigFileNotFoundError
from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions, check_trained
from dmpo_lightning.evaluation.prediction_writer import DMPOPredictionWriter, predictions_path
from dmpo_lightning.evaluation.protocol_run import check_budgets
from dmpo_lightning.evaluation.report import check_report_dir
from dmpo_lightning.files import check_output_file, claim_folder, release_on_error
from dmpo_lightning.models.backbone import check_backbone_name
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.optim import check_learning_rates, param_groups
from dmpo_lightning.parsing import (
    LINKED,
    DMPOArgumentParser,
    check_option_groups,
    check_trained_classes,
    constructor_error,
    given_values,
    logger_init_args,
    read_attribute_docstrings,
    refuse_dropped_values,
    wandb_offline_unless_logged_in,
)
from dmpo_lightning.version import __version__

__all__ = ["DMPOCLI", "main"]

_NOT_GIVEN = object()
LR_EXAMPLE = "--model.init_args.optimizer.init_args.lr=0.001"


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
        parser.add_argument("--version", action="version", version=f"dmpo-lightning {__version__}")
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
        """The data module's class count (refused if the checkpoint's differs), else the checkpoint's."""
        check_trained_classes(num_classes, self._checkpoint_num_classes, self.config)
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
        self._given = given_values(parser, args, sub)
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
        refuse_dropped_values(self._given, config, is_checkpoint_file_path(ckpt), resuming=sub == "fit")
        check_option_groups(config)

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
            inner = constructor_error(err)
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
        check_log_folder(trainer)  # before any work
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
        with release_on_error(self._evaluation_folder()):  # a refusal leaves no empty dmpo_predict folder
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
            continue_csv_log(logger)

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
            and os.path.abspath(logger.root_dir) == os.path.abspath(os.path.dirname(run))
        ):
            parent = run
        else:
            return None
        folder = claim_folder(os.path.join(parent, f"dmpo_{sub}"), next_free=True)
        self.trainer.callbacks.append(ReleaseFolder(folder))  # type: ignore[attr-defined]
        init = logger_init_args(self.config[sub].get("trainer.logger"))
        init.update(save_dir=parent, name="", version=os.path.basename(folder))
        self.trainer.loggers = [type(logger)(**init), *self.trainer.loggers[1:]]
        rank_zero_info(f"dmpo {sub} of {parent}'s checkpoint writes into {folder}")
        return folder


def main(args: ArgsType = None, run: bool = True) -> DMPOCLI:
    """``dmpo fit|validate|test|predict``; ``args`` lets tests call it in-process (``run=False``: build only).

    W&B runs offline unless the user is logged in (:func:`.parsing.wandb_offline_unless_logged_in`).
    """
    wandb_offline_unless_logged_in()
    words = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []
    help_text = any(
        isinstance(w, str) and (w in ("-h", "--help") or w.split("=")[0].endswith(".help")) for w in words
    )
    if help_text:
        read_attribute_docstrings(True)
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
            read_attribute_docstrings(False)
