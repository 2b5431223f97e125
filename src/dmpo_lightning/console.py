"""The ``dmpo`` program: its subcommands, each with a parser of its own.

``dmpo fit|validate|test|predict`` run the LightningCLI of :mod:`dmpo_lightning.cli`; ``dmpo export``
(:mod:`dmpo_lightning.deploy.cli`) and ``dmpo serve`` (:mod:`dmpo_lightning.serve.cli`) run their own
parsers. A configuration error prints ``dmpo <command>: error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from dmpo_lightning.callbacks import InterruptCheckpoint
from dmpo_lightning.cli import main
from dmpo_lightning.data.errors import DatasetLayoutError, UnreadableImageError
from dmpo_lightning.errors import ConfigError
from dmpo_lightning.files import write_failure
from dmpo_lightning.parsing import DEBUG_ENV, debugging
from dmpo_lightning.version import __version__

__all__ = ["build_parser", "console_main"]

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
    A write that a full or read-only disk fails prints one such line too and exits with status 1. SIGTERM or
    Ctrl+C during a run stops it after the current batch (fit saves ``interrupted.ckpt``) and exits with
    status 128 + the signal.
    """
    debug = debugging() or "--debug" in sys.argv[1:]
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
    except OSError as err:  # a full or read-only disk during the run: one sentence, status 1
        failure = write_failure(err)
        if failure is None or debug:
            raise
        sys.stderr.write(f"dmpo {name}: error: {failure}\n({DEBUG_ENV}=1 or --debug shows the traceback)\n")
        raise SystemExit(1) from None
    except SIGTERMException:
        signum = InterruptCheckpoint.signal or signal.SIGTERM
        saved = InterruptCheckpoint.saved
        where = f"; resume with --ckpt_path {saved}" if saved else ""
        print(f"dmpo {name}: stopped by {signal.Signals(signum).name}{where}", file=sys.stderr)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":  # python -m dmpo_lightning.console, the same as python -m dmpo_lightning
    console_main()
