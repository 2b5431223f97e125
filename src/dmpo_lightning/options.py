"""Typed option groups, each declared once and shared by the module, the model, PEFT and the evaluator.

A group is a frozen dataclass of plain values. ``DMPOModule`` takes one argument per group (``peft``,
``exits``, ``schedule``, ``evaluation``), so jsonargparse/LightningCLI shows ``--help`` for every field
(``--model.init_args.peft.adapter_dim``) and rejects a misspelt key; the module stores each group as a plain
``dict`` in its hyperparameters (:meth:`OptionGroup.to_dict`), so checkpoints load with
``weights_only=True`` and :meth:`OptionGroup.coerce` turns the dict back into the group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["LEGACY_FLAT_OPTIONS", "OptionGroup", "group_legacy_hparams"]

_G = TypeVar("_G", bound="OptionGroup")


@dataclasses.dataclass(frozen=True)
class OptionGroup:
    """Base of the option groups: conversion from and to plain values."""

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
        """The group as plain values (tuples become lists), for hyperparameters and YAML."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


LEGACY_FLAT_OPTIONS: dict[str, tuple[str, str]] = {}
"""Flat hyperparameter names of checkpoints written before the option groups: ``old name -> (group, field)``.

Each group's module adds its own entries next to the group's definition.
"""


def group_legacy_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` with every flat legacy name moved into its group (for old checkpoints).

    Raises:
        ValueError: A legacy flat name and its group both set the same field to different values.
    """
    out = dict(hparams)
    for old, (group, field) in LEGACY_FLAT_OPTIONS.items():
        if old not in out or (old == group and isinstance(out[old], Mapping)):
            continue
        value = out.pop(old)
        grouped = dict(out.get(group) or {})
        if field in grouped and grouped[field] != value:
            raise ValueError(
                f"hyperparameters set {old}={value!r} (old flat form) and "
                f"{group}.{field}={grouped[field]!r}; keep one"
            )
        grouped[field] = value
        out[group] = grouped
    return out
