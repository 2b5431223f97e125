"""Exceptions raised by the data layer."""

from __future__ import annotations


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or does not have the expected layout.

    The message says which files or folders were expected, and where.
    """


class UnreadableImageError(OSError):
    """An image file is truncated, corrupt or not an image; the message names the file."""
