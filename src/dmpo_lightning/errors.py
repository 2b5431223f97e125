"""Exceptions for bad configuration: the ``dmpo`` command prints their message and exits with status 2.

Raise :class:`ConfigError` (or one of its file variants, which are also the matching built-in ``OSError``)
for a value the user set that cannot work: the message says what was wrong and what is allowed. The
command line prints ``dmpo <subcommand>: error: <message>`` without a traceback (``--debug`` or
``DMPO_DEBUG=1`` shows it); Python callers get an ordinary exception.

Example:
    >>> err = ConfigFileExistsError("runs/x exists; choose another folder", option="report_dir")
    >>> isinstance(err, ValueError), isinstance(err, FileExistsError), err.option
    (True, True, 'report_dir')
"""

from __future__ import annotations

__all__ = ["ConfigError", "ConfigFileExistsError", "ConfigFileNotFoundError"]


class ConfigError(ValueError):
    """A configuration value (an option, a file or folder it names) that cannot be used.

    Args:
        message: One sentence: what was wrong and what is allowed.
        option: The option concerned (``evaluation.budgets``), if one.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class ConfigFileExistsError(ConfigError, FileExistsError):
    """An output path already holds results that must not be overwritten."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """An input path given in the configuration does not exist or is not the expected kind of file."""
