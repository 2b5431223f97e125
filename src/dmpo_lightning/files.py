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

__all__ = [
    "CLAIM_MARKER",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "claim_folder",
    "csv_text",
    "release_folder",
]


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


CLAIM_MARKER = ".dmpo-claim"
"""File that claims an existing empty folder for one writer (created exclusively; removed on release)."""


def claim_folder(path: str | os.PathLike[str], *, next_free: bool = False, empty: bool = True) -> str:
    """Claim the folder ``path`` for one writer, so two runs never write into the same output folder.

    The folder (and its parents) is created if missing; it is claimed by creating :data:`CLAIM_MARKER` in it
    exclusively (atomic: of two runs, one fails). The marker stays until :func:`release_folder`, so a folder
    that is being written is never claimed again.

    Args:
        path: The folder to claim.
        next_free: If ``path`` is taken, claim the first free ``<path>_1``, ``<path>_2``, ... instead.
        empty: Claim only a folder that holds nothing (else: anything but another claim's marker; the
            caller checks that what is there may stay).

    Returns:
        The claimed folder.

    Raises:
        FileExistsError: If ``path`` is taken (not empty, or claimed) and ``next_free`` is off.
        NotADirectoryError: If ``path`` is a file.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> a = claim_folder(os.path.join(root, "out"), next_free=True)
        >>> b = claim_folder(os.path.join(root, "out"), next_free=True)
        >>> os.path.basename(a), os.path.basename(b)
        ('out', 'out_1')
    """
    base = os.fspath(path)
    k = 0
    while True:
        candidate = base if k == 0 else f"{base}_{k}"
        try:
            _claim_one(candidate, empty)
            return candidate
        except FileExistsError:
            if not next_free:
                raise
            k += 1


def _claim_one(path: str, empty: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file, not a folder")
    os.makedirs(path, exist_ok=True)
    if empty and os.listdir(path):
        raise FileExistsError(f"{path} is not empty")
    fd = os.open(os.path.join(path, CLAIM_MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)  # raised FileExistsError above if another writer created it first


def release_folder(path: str | os.PathLike[str]) -> None:
    """End a :func:`claim_folder`: remove the marker, and the folder itself if nothing was written into it."""
    folder = os.fspath(path)
    with contextlib.suppress(OSError):
        os.remove(os.path.join(folder, CLAIM_MARKER))
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # only an empty folder
