"""Typed option groups, each declared once and shared by the module, the model, PEFT and the evaluator.

A group is a frozen dataclass of plain values. ``DMPOModule`` takes one argument per group (``peft``,
``exits``, ``schedule``, ``evaluation``), so jsonargparse/LightningCLI shows ``--help`` for every field
(``--model.init_args.peft.adapter_dim``) and rejects a misspelt key; the module stores each group as a plain
``dict`` in its hyperparameters (:meth:`OptionGroup.to_dict`), so checkpoints load with
``weights_only=True`` and :meth:`OptionGroup.coerce` turns the dict back into the group.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

from dmpo_lightning.files import to_jsonable

__all__ = [
    "LEGACY_FLAT_OPTIONS",
    "OptionGroup",
    "flat_options",
    "group_legacy_hparams",
    "merge_legacy_options",
    "option_name",
    "register_legacy_names",
]

_G = TypeVar("_G", bound="OptionGroup")


@dataclasses.dataclass(frozen=True)
class OptionGroup:
    """Base of the option groups: conversion from and to plain values.

    Lists (from YAML or a checkpoint's hyperparameters) are stored as tuples, so a group stays hashable and
    equal to the same group built in Python.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, _frozen(value))

    @classmethod
    def coerce(cls: type[_G], value: object, *, name: str | None = None) -> _G:
        """``value`` as this group: ``None`` gives the defaults, a mapping its fields, an instance itself.

        Raises:
            ValueError: A mapping has a key that is not a field of the group (the allowed keys are named).
            TypeError: ``value`` is neither ``None``, a mapping nor an instance of the group.
        """
        label = name or cls.__name__
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            allowed = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(str(k) for k in value if k not in allowed)
            if unknown:
                raise ValueError(
                    f"{label} has no option {', '.join(map(repr, unknown))}; "
                    f"its options are {', '.join(allowed)}"
                )
            return cls(**dict(value))
        raise TypeError(
            f"{label} must be a {cls.__name__} or a mapping of its options, got {type(value).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The group as plain JSON values (tuples become lists), for hyperparameters, YAML and files."""
        return {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


LEGACY_FLAT_OPTIONS: dict[str, tuple[str, str]] = {}
"""Flat hyperparameter names of checkpoints written before the option groups: ``old name -> (group, field)``.

Each group's module adds its own entries next to the group's definition (:func:`register_legacy_names`).
The flat names stay the keys of model fingerprints in ``thresholds.json`` and exports (:func:`flat_options`).
"""


def register_legacy_names(
    group: str, cls: type[OptionGroup], renamed: Mapping[str, str] | None = None
) -> None:
    """Record the flat names of ``cls``'s fields as hyperparameter ``group``: the field name, or ``renamed``.

    ``renamed`` maps a field to its old flat name where they differ (``{"method": "peft"}``).
    """
    renamed = dict(renamed or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(renamed) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {unknown[0]!r}")
    for field in sorted(fields):
        LEGACY_FLAT_OPTIONS[renamed.get(field, field)] = (group, field)


def option_name(key: str) -> str:
    """The name a user writes for the flat fingerprint ``key``: ``exit_blocks`` -> ``exits.blocks``.

    Keys that are no group field (``num_classes``, ``backbone``) are returned as they are.

    >>> import dmpo_lightning.module  # the groups register their flat names on import
    >>> option_name("exit_blocks"), option_name("peft"), option_name("num_classes")
    ('exits.blocks', 'peft.method', 'num_classes')
    """
    group, field = LEGACY_FLAT_OPTIONS.get(key, (None, key))
    return f"{group}.{field}" if group else key


def flat_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` (grouped or flat) with every grouped field also under its flat name.

    Fingerprints of trained models (``thresholds.json``, exports, the architecture check) keep the flat
    names (``exit_blocks``, ``peft``, ``exit_rule``...), so files written before the groups still match.
    """
    grouped = group_legacy_hparams(hparams)
    out = dict(grouped)
    for old, (group, field) in LEGACY_FLAT_OPTIONS.items():
        values = grouped.get(group)  # not `out`: the flat `peft` (the method) replaces the group there
        if isinstance(values, Mapping) and field in values:
            out[old] = to_jsonable(values[field])
        elif isinstance(values, OptionGroup):
            out[old] = to_jsonable(getattr(values, field))
    return out


def group_legacy_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` with every flat legacy name moved into its group (for old checkpoints).

    Raises:
        ValueError: A legacy flat name and its group both set the same field to different values.
    """
    out = dict(hparams)
    for old, (group, field) in LEGACY_FLAT_OPTIONS.items():  # a group's old flat name (`peft: lora`) first
        if old == group and old in out and not isinstance(out[old], (Mapping, OptionGroup)):
            out[old] = {field: out[old]}
    for old, (group, field) in LEGACY_FLAT_OPTIONS.items():
        if old not in out or old == group:
            continue
        value = out.pop(old)
        given = out.get(group)
        grouped = given.to_dict() if isinstance(given, OptionGroup) else dict(given or {})
        if field in grouped and grouped[field] != value:
            raise ValueError(
                f"hyperparameters set {old}={value!r} (old flat form) and "
                f"{group}.{field}={grouped[field]!r}; keep one"
            )
        grouped[field] = value
        out[group] = grouped
    return out


def merge_legacy_options(
    groups: Mapping[str, type[OptionGroup]],
    given: Mapping[str, Any],
    legacy: Mapping[str, Any],
    *,
    owner: str,
) -> dict[str, dict[str, Any]]:
    """Each option group of ``given`` as a plain dict, with the flat names of old checkpoints moved in.

    ``given`` maps a group's argument name to its value (a group, a mapping or ``None``); ``legacy`` holds
    the flat keyword arguments (``exit_blocks=...``). A flat name given from Python warns (``FutureWarning``);
    inside :func:`~dmpo_lightning.checkpointing.weights_from_checkpoint` (loading a checkpoint) it does not.

    Raises:
        TypeError: A name that is neither an argument nor a known flat name.
        ValueError: A flat name and its group set the same field to different values.
    """
    from dmpo_lightning.checkpointing import restoring_from_checkpoint

    for name, value in given.items():
        if isinstance(value, str) and name in LEGACY_FLAT_OPTIONS:  # the old flat `peft: lora`
            legacy = {**legacy, name: value}
            given = {**given, name: None}
    unknown = sorted(k for k in legacy if k not in LEGACY_FLAT_OPTIONS)
    if unknown:
        raise TypeError(
            f"{owner} got unknown option(s) {', '.join(map(repr, unknown))}; the options are its arguments "
            f"and the fields of its groups {', '.join(groups)} (e.g. exits.blocks, peft.adapter_dim)"
        )
    out = {name: groups[name].coerce(value, name=name).to_dict() for name, value in given.items()}
    for old, value in legacy.items():
        group, field = LEGACY_FLAT_OPTIONS[old]
        cls = groups[group]
        new, default, current = (
            cls.coerce({field: value}).to_dict()[field],
            cls().to_dict()[field],
            out[group][field],
        )
        if current not in (default, new):
            raise ValueError(
                f"{old}={value!r} (old flat form) and {group}.{field}={current!r} disagree; keep one"
            )
        out[group][field] = new
    if legacy and not restoring_from_checkpoint():
        moved = ", ".join(f"{old} -> {'.'.join(LEGACY_FLAT_OPTIONS[old])}" for old in legacy)
        warnings.warn(
            f"flat {owner} options are deprecated, use the option groups: {moved}",
            FutureWarning,
            stacklevel=3,
        )
    return out
