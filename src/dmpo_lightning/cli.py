"""The ``dmpo`` command: a LightningCLI with fit / validate / test / predict and linked arguments."""

from __future__ import annotations

import netrc
import os
import pickle
import sys
import warnings
import zipfile
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import dmpo_lightning
from dmpo_lightning.callbacks import LossWeightScheduler
from dmpo_lightning.data import BenchmarkDataModule
from dmpo_lightning.models.backbone import check_backbone_name
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.serialization import UnsafeLoadWarning

__all__ = ["DMPOCLI", "console_main", "main"]


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


EVALUATION_OPTIONS = (
    "exit_rule",
    "calibration",
    "budgets",
    "budget_unit",
    "report_dir",
    "thresholds_file",
    "predict_budget",
    "allow_other_checkpoint_thresholds",
    "predictions_file",
)
"""Model options that only affect evaluation; ``dmpo test/predict --ckpt_path`` keeps the user's values."""

SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
"""``ckpt_path`` values Lightning resolves itself (no file to check)."""


def _check_ckpt_file(path: str) -> None:
    """A missing local ``--ckpt_path`` fails at once, before any run folder is created."""
    if path in SPECIAL_CKPT_PATHS or path.startswith("registry") or "://" in path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ckpt_path {path!r} does not exist; give the .ckpt file a `dmpo fit` run wrote "
            "(runs/<name>/version_N/checkpoints/*.ckpt) or one of: " + ", ".join(SPECIAL_CKPT_PATHS)
        )


class DMPOCLI(LightningCLI):
    """LightningCLI for DMPO.

    - ``data.num_classes`` is linked into ``model.num_classes`` (written once, in the data config);
    - the model's backbone name, input size and channels are linked into the data module, which reads
      mean/std/interpolation from the backbone's timm pretrained config;
    - ``--test_after_fit true`` on ``fit`` runs ``test`` on the finished model (the quickstart does).
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
        """An explicit ``--weights_only null`` also reads the checkpoint safely; ``false`` warns."""
        fn_kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in fn_kwargs:
            if fn_kwargs["weights_only"] is None:
                fn_kwargs["weights_only"] = True
            elif not fn_kwargs["weights_only"] and fn_kwargs.get("ckpt_path"):
                warnings.warn(
                    f"--weights_only=false: unpickling {fn_kwargs['ckpt_path']} without restrictions; this "
                    "runs any code the file holds. Only do this for checkpoints you made yourself or trust.",
                    UnsafeLoadWarning,
                    stacklevel=2,
                )
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
        """Check the backbone name before the data module reads its timm config.

        Otherwise the data module's error would name the linked ``timm_model``, not the option the user set.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        init = model.get("init_args") if model is not None and hasattr(model, "get") else None
        name = init.get("backbone") if init is not None else None
        if isinstance(name, str):
            try:
                check_backbone_name(name)
            except ValueError as err:
                raise ValueError(f"model.init_args.backbone: {err}") from None

    def before_fit(self) -> None:
        """Validate the loss-weight schedule against ``trainer.max_epochs`` before anything is written."""
        if isinstance(self.model, DMPOModule):
            h = self.model.hparams
            schedule = LossWeightScheduler(h.weight_phase1, h.weight_phase2, h.switch_epoch, h.ramp_epochs)
            schedule.setup(self.trainer, self.model, "fit")

    def _parse_ckpt_path(self) -> None:
        """Take the architecture from ``--ckpt_path``'s hyperparameters, but keep evaluation options.

        LightningCLI (>= 2.3) replaces the model config by the checkpoint's hyperparameters, which would
        silently drop ``--model.init_args.budgets``/``report_dir``/``thresholds_file``... given to
        ``dmpo test`` or ``dmpo predict``. Those options do not change the weights, so the user's values win.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if isinstance(ckpt_path, str) and ckpt_path:
            _check_ckpt_file(ckpt_path)
        kept: dict[str, Any] = {}
        init = None
        if sub and self.config[sub].get("model") is not None:
            init = self.config[sub]["model"].get("init_args")
            if init is not None:
                kept = {k: init[k] for k in EVALUATION_OPTIONS if k in init}
        try:
            super()._parse_ckpt_path()
        except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile) as err:
            raise ValueError(
                f"ckpt_path {ckpt_path!r} is not a readable Lightning checkpoint (torch.load failed with "
                f"{type(err).__name__}); give a .ckpt file written by `dmpo fit` (it is read with "
                "weights_only=True, so a file holding arbitrary pickled objects is refused as well)"
            ) from err
        if kept:
            init = self.config[sub]["model"]["init_args"]
            for key, value in kept.items():
                init[key] = value
        if isinstance(ckpt_path, str) and os.path.isfile(ckpt_path) and self.config[sub].get("model"):
            model_init = self.config[sub]["model"].get("init_args")
            self._checkpoint_num_classes = model_init.get("num_classes") if model_init is not None else None

    def after_fit(self) -> None:
        """Optionally evaluate the model just trained."""
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        ckpt = None
        callback = self.trainer.checkpoint_callback
        if callback is not None and getattr(callback, "best_model_path", ""):
            ckpt = callback.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)


def main(args: ArgsType = None, run: bool = True) -> DMPOCLI:
    """Entry point of ``dmpo`` and ``python -m dmpo_lightning``; ``args`` lets tests call it in-process.

    With ``run=False`` the classes are only instantiated (no subcommand), as in ``LightningCLI(run=False)``.

    W&B runs offline unless the user is logged in (``WANDB_API_KEY`` or ``wandb login``), so a W&B logger
    in a config never blocks or fails on a machine without an account or network.
    """
    if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    return DMPOCLI(
        DMPOModule,
        BenchmarkDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "dmpo"},
            },
        },
        args=args,
        run=run,
    )


def console_main() -> None:
    """The ``dmpo`` console script: like :func:`main`, but returns nothing (so the exit status is 0).

    ``dmpo export ...`` is not a Lightning subcommand; it goes to :mod:`dmpo_lightning.deploy.cli`.
    """
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from dmpo_lightning.deploy.cli import console_main as export_main

        export_main(sys.argv[2:])
        return
    main()
