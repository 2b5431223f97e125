"""What the ``dmpo`` command line was given: one-sentence parse errors, and no written value dropped.

- :class:`DMPOArgumentParser`: jsonargparse's errors as a usage line and the reason, without dumps of the
  parsed values, naming the options as users write them;
- :func:`given_values`: the values the user wrote (config files and command line, without defaults);
- :func:`refuse_dropped_values`: a value the user wrote that the run would not use is refused by name (a
  data option the model's sets, a model option a checkpoint replaces);
- :func:`constructor_error`: the error a class's constructor raised, without jsonargparse's wrapping;
- :func:`check_option_groups`: an option group written as a value (``exits: 4``) is refused in one sentence;
- small settings of the parse: :func:`read_attribute_docstrings` (for ``--help``),
  :func:`wandb_offline_unless_logged_in`, :func:`logger_init_args`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import netrc
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import jsonargparse
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser

from dmpo_lightning.errors import ConfigError
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.options import option_groups

__all__ = [
    "DEBUG_ENV",
    "LINKED",
    "DMPOArgumentParser",
    "check_option_groups",
    "check_trained_classes",
    "constructor_error",
    "debugging",
    "given_values",
    "logger_init_args",
    "read_attribute_docstrings",
    "refuse_dropped_values",
    "wandb_offline_unless_logged_in",
]

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


def debugging() -> bool:
    """Whether tracebacks are wanted (``DMPO_DEBUG=1``, ``--debug`` or jsonargparse's debug mode)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or os.environ.get("JSONARGPARSE_DEBUG", "") != ""


def _tidy_parse_error(message: str) -> str:
    """Jsonargparse's message without dumps of the given value and the ``None`` alternative of unions.

    An option group written as a value (``peft: lora``) is told in one sentence: the mapping to write.
    """
    inner = re.search(r"model\.init_args\.\w+ is a group of options, a mapping: [^\n]*", message)
    if inner:  # said by the parser of the model's arguments; jsonargparse wraps it in the model's union error
        return inner.group(0)
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
    written = re.search(r"Parser key \"(\w+)\":\s+Unable to load config '([^']*)'", message)
    group = option_groups(DMPOModule).get(written.group(1)) if written else None
    if written and group is not None:  # `peft: lora`: jsonargparse took the text for a config file's path
        try:
            group.coerce(written.group(2), name=written.group(1))
        except TypeError as err:
            return f"model.init_args.{err}"
    return "\n".join(keep)


NULLS = ("null", "Null", "NULL", "~")
NESTED_FIELD = re.compile(r"--(model|data)(\.init_args)?\.(\w+)\.(\w+)")


def _nulls_as_mappings(args: list[Any]) -> list[Any]:
    """``--model.init_args.<group>.<field> null`` as ``--model.init_args.<group>={"<field>": null}``.

    jsonargparse 4.53 re-parses a sub-option of a class given by ``class_path`` from ``f"--{key}={value}"``,
    so a ``null`` it already read becomes the text ``None`` (``schedule.switch_epoch: None`` is refused as
    not an int); a mapping takes the other path and keeps the null, as a YAML config does.

    Example:
        >>> _nulls_as_mappings(["--model.init_args.schedule.switch_epoch", "null", "--trainer.max_epochs=2"])
        ['--model.init_args.schedule={"switch_epoch": null}', '--trainer.max_epochs=2']
    """
    out: list[Any] = []
    i = 0
    while i < len(args):
        word = args[i]
        key, eq, value = word.partition("=") if isinstance(word, str) else ("", "", "")
        found = NESTED_FIELD.fullmatch(key)
        following = args[i + 1] if not eq and i + 1 < len(args) else None
        if found and ((eq and value in NULLS) or (not eq and following in NULLS)):
            out.append(f'{key.rsplit(".", 1)[0]}={{"{found.group(4)}": null}}')
            i += 1 if eq else 2
            continue
        out.append(word)
        i += 1
    return out


def check_trained_classes(num_classes: int | None, trained: Any, config: Namespace) -> None:
    """Refuse data of ``num_classes`` classes for a ``--ckpt_path`` model trained on ``trained`` classes.

    Raises:
        ConfigError: Naming both counts and the checkpoint, before anything is built or written.
    """
    if num_classes is None or trained is None or int(trained) == num_classes:
        return
    sub = config.get("subcommand")
    raise ConfigError(
        f"the data has {num_classes} classes but --ckpt_path {config[sub].get('ckpt_path')} was trained on "
        f"{trained}: a trained model keeps its classes, so dmpo {sub} needs data with the same {trained} "
        "classes (fix the data options), or train a new model without --ckpt_path",
        option="ckpt_path",
    )


def check_option_groups(config: Namespace) -> None:
    """Refuse a model option group given as a value (``exits: 4``), which jsonargparse lets through.

    Raises:
        ConfigError: Naming the group and the mapping to write (``exits: {blocks: 4}``).
    """
    for name, group in option_groups(DMPOModule).items():
        value = config.get(f"model.init_args.{name}")
        if value is not None and not isinstance(value, (Namespace, Mapping, group)):
            try:
                group.coerce(value, name=name)
            except TypeError as err:
                raise ConfigError(f"model.init_args.{err}", option=f"model.init_args.{name}") from None


class DMPOArgumentParser(LightningArgumentParser):
    """Parse errors as a short usage line and the reason, without a dump of the parsed values."""

    def parse_args(self, args: Any = None, *more: Any, **kwargs: Any) -> Any:
        """Parse ``args`` (default: the command line); ``--model.init_args.<group>.<field> null`` works."""
        words = sys.argv[1:] if args is None else args
        if isinstance(words, (list, tuple)):
            words = _nulls_as_mappings(list(words))
        return super().parse_args(words, *more, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print ``usage``, a tip and the tidied message to stderr and exit with status 2."""
        message = _tidy_parse_error(message)
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"usage: {prog} [-h] [-c CONFIG] [--print_config] [options]\n"
            f"tip: for the accepted options run: {prog} --help\nerror: {message}\n"
        )
        self.exit(2)


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


def given_values(parser: LightningArgumentParser, args: ArgsType, sub: str | None) -> dict[str, Any]:
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


def refuse_dropped_values(
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
    "Call to compute_fn of link",  # a link's function raised (the data's classes vs the checkpoint's)
    "Problem with given class_path",
    "Expected a <class 'NoneType'>",  # older jsonargparse reports the None alternative of the union first
)


def constructor_error(err: BaseException) -> BaseException:
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


def logger_init_args(config: Any) -> dict[str, Any]:
    """The configured first logger's ``init_args`` as a dict (empty when it is not given as a class)."""
    first = config[0] if isinstance(config, list) and config else config
    init = getattr(first, "init_args", None) if isinstance(first, Namespace) else None
    return init.as_dict() if isinstance(init, Namespace) else dict(init or {})


def read_attribute_docstrings(enabled: bool) -> None:
    """Let ``--help`` show the option groups' field docstrings (it doubles the parser's build time)."""
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=enabled)


def wandb_offline_unless_logged_in() -> None:
    """W&B runs offline unless the user is logged in (``WANDB_API_KEY``, ``wandb login``) or set WANDB_MODE.

    A W&B logger in a config then never blocks or fails on a machine without an account or network.
    """
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        logged_in = False
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"
