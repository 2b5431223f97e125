"""Argument checks shared by the model parts (one definition each; every message says what is allowed)."""

from __future__ import annotations

__all__ = ["check_dropout", "check_positive_int"]


def check_positive_int(value: object, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a ``bool``) greater than 0.

    Example:
        >>> check_positive_int(3, "rank")
        >>> check_positive_int(0, "rank")
        Traceback (most recent call last):
        ...
        ValueError: rank must be a positive integer, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_dropout(value: float, name: str = "dropout") -> None:
    """Raise ``ValueError`` unless ``value`` is a probability in ``[0, 1)`` (NaN is refused).

    Example:
        >>> check_dropout(0.1)
        >>> check_dropout(1.0, "head_dropout")
        Traceback (most recent call last):
        ...
        ValueError: head_dropout must be in [0, 1), got 1.0
    """
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
