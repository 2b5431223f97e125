"""Typed option groups, each declared once and shared by the module, the model, PEFT and the evaluator.

A group is a frozen dataclass of plain values. ``DMPOModule`` takes one argument per group (``peft``,
``exits``, ``schedule``, ``evaluation``), so jsonargparse/LightningCLI shows ``--help`` for every field
(``--model.init_args.peft.adapter_dim``) and rejects a misspelt key; the module stores each group as a plain
``dict`` in its hyperparameters (:meth:`OptionGroup.to_dict`), so checkpoints load with
``weights_only=True`` and :meth:`OptionGroup.coerce` turns the dict back into the group.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from dmpo_lightning.files import to_jsonable

__all__ = ["OptionGroup", "dotted_options", "option_groups"]

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
            TypeError: ``value`` is neither ``None``, a mapping nor an instance of the group (the message
                shows the mapping to write instead, e.g. ``peft: {method: lora}`` for ``peft: lora``).
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
        first = dataclasses.fields(cls)[0].name
        raise TypeError(
            f"{label} is a group of options, a mapping: e.g. `{label}: {{{first}: {value}}}` (from Python "
            f"also {cls.__name__}(...)), not the {type(value).__name__} {value!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The group as plain JSON values (tuples become lists), for hyperparameters, YAML and files."""
        return {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def dotted_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` with every group's fields under the names a user writes: ``exits.blocks``, ``peft.method``.

    A value that is a mapping or an option group (a group as the module stores it) is replaced by its
    entries, each under ``<name>.<field>``; the other values keep their name. Fingerprints and the
    configuration checks compare these, so a difference is reported under the option's own name.

    Example:
        >>> dotted_options({"num_classes": 3, "peft": {"method": "lora", "lora_rank": 4}})
        {'num_classes': 3, 'peft.method': 'lora', 'peft.lora_rank': 4}
    """
    out: dict[str, Any] = {}
    for name, value in hparams.items():
        fields = value.to_dict() if isinstance(value, OptionGroup) else value
        if isinstance(fields, Mapping):
            out.update({f"{name}.{field}": v for field, v in fields.items()})
        else:
            out[name] = value
    return out


def option_groups(cls: Any) -> dict[str, type[OptionGroup]]:
    """The constructor parameters of ``cls`` that take an option group (those whose default is one).

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Tuning(OptionGroup):
        ...     rank: int = 4
        >>> def build(size: int = 1, tuning: Tuning = Tuning()) -> None: ...
        >>> {name: group.__name__ for name, group in option_groups(build).items()}
        {'tuning': 'Tuning'}
    """
    return {
        name: type(p.default)
        for name, p in inspect.signature(cls).parameters.items()
        if isinstance(p.default, OptionGroup)
    }
