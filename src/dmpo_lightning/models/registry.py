"""Name -> implementation tables for the model's extension points: exit rules, predictors and PEFT methods.

Each extension point keeps one :class:`Registry` in the file that implements it
(``models/exit_rules.py``, ``models/heads.py``, ``models/adapters.py``). Adding an implementation is one
function or class plus one ``@REGISTRY.register("name")`` line in that file. The ``Literal`` type that the
CLI (jsonargparse) shows in ``--help`` and uses to reject typos is built from the registry at the end of the
same file (:meth:`Registry.literal`), so the names are written once.

A name registered later from another module (a plugin) works everywhere the registry is asked (building a
model, scoring exits), but is not one of the CLI's choices: the ``Literal`` was fixed when the defining file
was imported.

Example:
    >>> colours: Registry[int] = Registry("colour")
    >>> _ = colours.register("red")(1)
    >>> @colours.register("green")
    ... def green() -> int:
    ...     return 2
    >>> colours.names()
    ('red', 'green')
    >>> colours.get("green")()
    2
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    ValueError: unknown colour 'blue'; allowed: red, green
    >>> from typing import get_args
    >>> get_args(colours.literal())
    ('red', 'green')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, Literal, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered table ``name -> implementation`` for one kind of extension.

    Args:
        kind: What the entries are, for error messages (``"exit rule"``, ``"PEFT method"``, ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator (or plain call) that registers ``obj`` under ``name`` and returns it unchanged.

        Raises:
            ValueError: If ``name`` is not a non-empty identifier-like string or is already registered.
        """
        if not isinstance(name, str) or not name or not name.replace("_", "a").isalnum():
            raise ValueError(
                f"a {self.kind} name must be a non-empty string of letters, digits and _; got {name!r}"
            )
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; choose another name")

        def add(obj: T) -> T:
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The implementation registered under ``name``.

        Raises:
            ValueError: If ``name`` is unknown (the message lists the allowed names).
        """
        self.check(name)
        return self._entries[name]

    def check(self, name: object) -> None:
        """Raise ``ValueError`` (listing the allowed names) unless ``name`` is registered."""
        if not isinstance(name, str) or name not in self._entries:
            allowed = ", ".join(self._entries)
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {allowed}")

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def literal(self) -> Any:
        """``Literal[name_1, ...]`` of the names registered now (for signatures read by jsonargparse)."""
        if not self._entries:
            raise ValueError(f"no {self.kind} is registered yet")
        return Literal[self.names()]  # type: ignore[valid-type]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
