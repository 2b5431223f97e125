"""Exceptions raised by the data layer."""

from __future__ import annotations


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or does not have the expected layout.

    The message says which files or folders were expected, and where.
    """
