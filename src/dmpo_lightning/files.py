"""Atomic file writes: the one implementation used for reports, thresholds, predictions and exports.

A file is written to a temporary file in the target's folder, flushed to disk, then moved into place with
``os.replace`` (or a hard link when it must not replace an existing file), so a crash or a full disk never
leaves a partial file under the target's name, and the temporary file is removed on any error.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "csv_text"]


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[IO[bytes]], object],
    *,
    overwrite: bool = True,
) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then move it into place.

    An existing target keeps its permission bits; a new file gets ``0o644``.

    Args:
        path: The target file; its folder is created if missing.
        write: Writes the content to the open binary file it is given.
        overwrite: Replace an existing ``path``. Without it the move is a hard link, which fails if ``path``
            appeared in the meantime (on file systems without hard links: a last existence check, then a
            rename).

    Returns:
        The target path.

    Raises:
        FileExistsError: If ``overwrite`` is off and ``path`` exists.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write_text(target, "one").read_text()
        'one'
        >>> atomic_write_bytes(target, b"two", overwrite=False)
        Traceback (most recent call last):
        ...
        FileExistsError: ... exists; pass overwrite=True or choose another path
        >>> sorted(p.name for p in target.parent.iterdir())  # no temporary file left behind
        ['a.txt']
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} exists; pass overwrite=True or choose another path")
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, target)
            return target
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise FileExistsError(f"{target} exists; pass overwrite=True or choose another path") from None
        except OSError:  # no hard links here (some network or FAT file systems)
            if target.exists():
                raise FileExistsError(
                    f"{target} exists; pass overwrite=True or choose another path"
                ) from None
            os.replace(tmp, target)
        return target
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data), overwrite=overwrite)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, overwrite: bool = True, encoding: str = "utf-8"
) -> Path:
    """:func:`atomic_write` of ``text``, encoded; no newline translation."""
    return atomic_write(path, lambda f: f.write(text.encode(encoding)), overwrite=overwrite)


def csv_text(rows: Iterable[Sequence[object]]) -> str:
    """Rows as CSV text, with the ``csv`` module's defaults (CRLF line ends, minimal quoting)."""
    import csv

    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
