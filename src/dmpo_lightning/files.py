"""The file-format layer every writer and reader of the package shares.

- Atomic writes (:func:`atomic_write`): a file is written to a temporary file in the target's folder,
  flushed to disk, then moved into place with ``os.replace`` (or a hard link when it must not replace an
  existing file), so a crash or a full disk never leaves a partial file under the target's name, and the
  temporary file is removed on any error. Reports, thresholds, predictions and exports all use it.
- One JSON encoding (:func:`to_jsonable`, :func:`decode_float`, :func:`write_json`): tensors, paths,
  dataclasses and containers become plain JSON; infinities are written as the strings ``"inf"``/``"-inf"``
  and NaN as ``null``, so every file is strict JSON.
- One format check (:func:`check_format`): every file the package writes names its format and format
  version, and a reader refuses another format or version in one sentence that says what the file is and
  how to make a new one.
- One hash for tensors (:func:`tensors_sha256`) and one for files (:func:`file_sha256`).
- Pre-flight checks of output paths (:func:`check_output_file`, :func:`check_writable`), run before any work
  so that an unusable path fails in one sentence instead of after a long run; a write that fails during the
  run on a full or read-only disk is told in one sentence too (:func:`write_failure`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from dmpo_lightning.errors import ConfigError, ConfigFileExistsError
from dmpo_lightning.version import __version__

__all__ = [
    "CLAIM_MARKER",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_format",
    "check_output_file",
    "check_writable",
    "claim_folder",
    "csv_text",
    "decode_float",
    "file_sha256",
    "release_folder",
    "release_on_error",
    "tensors_sha256",
    "to_jsonable",
    "write_failure",
    "write_json",
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
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # a full disk: name the file the user knows, not the temporary one
            if err.filename is not None or err.errno is None:
                raise
            raise OSError(err.errno, err.strerror, str(target)) from err
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
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


CLAIM_MARKER = ".dmpo-claim"
"""File that claims an existing empty folder for one writer (created exclusively; removed on release)."""


def claim_folder(path: str | os.PathLike[str], *, next_free: bool = False, empty: bool = True) -> str:
    """Claim the folder ``path`` for one writer, so two runs never write into the same output folder.

    With ``next_free`` a new folder is made with ``os.mkdir`` (atomic: of two runs, one fails, and takes the
    next name). Otherwise the folder (and its parents) is created if missing and claimed by creating
    :data:`CLAIM_MARKER` in it exclusively (atomic as well); the marker stays until :func:`release_folder`,
    so a folder that is being written is never claimed again.

    Args:
        path: The folder to claim.
        next_free: Make a new folder: ``path``, or if it exists the first free ``<path>_1``, ``<path>_2``...
        empty: Without ``next_free``: claim only a folder that holds nothing (else: anything but another
            claim's marker; the caller checks that what is there may stay).

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
    if not next_free:
        _claim_one(base, empty)
        return base
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    k = 0
    while True:
        candidate = base if k == 0 else f"{base}_{k}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
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


@contextlib.contextmanager
def release_on_error(folder: str | os.PathLike[str] | None) -> Iterator[None]:
    """:func:`release_folder` of a claimed ``folder`` if the block raises (so no empty folder is left)."""
    try:
        yield
    except BaseException:
        if folder is not None:
            release_folder(folder)
        raise


# ------------------------------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` as plain JSON values: dicts (string keys), lists, strings, ints, floats, bools and None.

    Tensors and numpy values become (nested) lists or numbers, paths strings, dataclasses dicts, tuples and
    sets lists; ``+inf``/``-inf`` become the strings ``"inf"``/``"-inf"`` and NaN becomes ``None``, so the
    result is strict JSON (:func:`decode_float` reverses this for one number).

    Args:
        obj: The object.
        default: Called on an object of no other type (as ``json.dumps``'s ``default``); its result is
            converted in turn. ``None``: such an object is an error.

    Raises:
        TypeError: For an object with no JSON form and no ``default``.

    Example:
        >>> to_jsonable({"t": torch.tensor([0.5, float("inf")]), "n": float("nan"), "k": (1, 2)})
        {'t': [0.5, 'inf'], 'n': None, 'k': [1, 2]}
        >>> to_jsonable({"f": len}, default=repr)
        {'f': '<built-in function len>'}
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist(), default)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), default) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, default) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return to_jsonable(obj.tolist(), default)
    if default is not None:
        return to_jsonable(default(obj))
    raise TypeError(f"cannot put a {type(obj).__name__} into JSON: {obj!r}")


def decode_float(value: str | float | int | None) -> float:
    """Inverse of :func:`to_jsonable` for one number: ``"inf"``/``"-inf"`` -> +-inf, ``None`` -> NaN.

    Raises:
        ValueError: For a string other than ``"inf"``/``"-inf"``, or a value that is not a number.

    Example:
        >>> decode_float("-inf"), decode_float(0.5), decode_float(None)
        (-inf, 0.5, nan)
    """
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a number, 'inf' or '-inf', got {value!r}")
    if isinstance(value, str) and value not in ("inf", "-inf"):
        raise ValueError(f"expected a number, 'inf' or '-inf', got {value!r}")
    return float(value)


def write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``obj`` as strict, indented JSON (:func:`to_jsonable`), atomically; returns the path.

    Raises:
        TypeError: ``obj`` holds a value with no JSON form (nothing is written).
        FileExistsError: If ``overwrite`` is off and ``path`` exists.
    """
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text, overwrite=overwrite)


def read_json(path: str | os.PathLike[str], what: str, *, filename: str, writer: str) -> Any:
    """The parsed content of a JSON file the package wrote, or one sentence naming the file.

    Args:
        path: The file.
        what: What the file is, for the message (``"thresholds file"``).
        filename: Its usual name (``"thresholds.json"``), for the message when ``path`` is a folder.
        writer: The command that writes it (``"`dmpo test`"``), for the message when it is missing.

    Raises:
        FileNotFoundError: If ``path`` is a folder or does not exist.
        ValueError: If it is not valid JSON in UTF-8 (an empty, truncated or corrupt file).
    """
    if os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} is a folder; give the {filename} in it ({writer} writes one)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist; {writer} writes {filename}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err})") from err


def check_format(
    data: object,
    path: str | os.PathLike[str],
    *,
    name: str,
    version: int,
    what: str,
    remedy: str,
    older: Mapping[str, int] | None = None,
    error: type[ValueError] = ValueError,
) -> dict[str, Any]:
    """``data`` (a file's parsed content) as a dict, if it is format ``name`` at ``version``; else refuse it.

    The file names its format in ``data["format"]`` and its version in ``data["format_version"]`` (an
    integer, or its decimal string in safetensors metadata).

    Args:
        data: The file's content.
        path: The file (named in the message).
        name: The format tag this package writes.
        version: The one version this package reads.
        what: What the file is, for the message (``"dmpo thresholds file"``).
        remedy: How to make a file of this version (``"re-run `dmpo test` ..."``).
        older: Format tags of earlier versions that had no ``format_version``, with their version.
        error: The exception type raised (a ``ValueError``).

    Raises:
        ValueError: (of type ``error``) in one sentence: not this kind of file, an older or a newer format
            version, or a corrupt version field; it says what the file is and ``remedy``.

    Example:
        >>> check_format({"format": "x", "format_version": 1}, "f.json", name="x", version=2,
        ...              what="x file", remedy="write it again")
        Traceback (most recent call last):
        ...
        ValueError: f.json is a x file of format version 1, written by an older dmpo-lightning; this ...
    """
    tag = data.get("format") if isinstance(data, dict) else None
    if not isinstance(data, dict) or (tag != name and tag not in (older or {})):
        if isinstance(data, dict) and "format" not in data:
            raise error(
                f"{path} is not a {what} that this dmpo-lightning reads (it has no format field: a {what} "
                f"written before format version {version}, or another file); {remedy}"
            )
        raise error(f"{path} is not a {what} (its format is {tag!r}, a {what} has format {name!r}); {remedy}")
    found: object = data.get("format_version") if tag == name else (older or {})[str(tag)]
    if isinstance(found, str) and found.isdigit():
        found = int(found)
    if isinstance(found, bool) or not isinstance(found, int):
        raise error(
            f"{path} is a {what} without a valid format_version ({found!r}), so it is corrupt; {remedy}"
        )
    if found < version:
        raise error(
            f"{path} is a {what} of format version {found}, written by an older dmpo-lightning; this "
            f"dmpo-lightning {__version__} reads format version {version} only: {remedy}"
        )
    if found > version:
        raise error(
            f"{path} is a {what} of format version {found}, newer than this dmpo-lightning {__version__} "
            f"reads (format version {version}): upgrade dmpo-lightning, or {remedy}"
        )
    return data


# ----------------------------------------------------------------------------------------------- hashes
def tensors_sha256(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> str:
    """Hex sha256 over the name, dtype, shape and raw bytes of each tensor, in sorted name order.

    Args:
        tensors: Named tensors (a state dict).
        names: Only these names (default: all).

    Example:
        >>> a = {"w": torch.zeros(2), "b": torch.ones(1)}
        >>> tensors_sha256(a) == tensors_sha256({"b": torch.ones(1), "w": torch.zeros(2)})
        True
        >>> tensors_sha256(a) == tensors_sha256({**a, "w": torch.zeros(2, dtype=torch.float16)})
        False
    """
    digest = hashlib.sha256()
    for name in sorted(tensors if names is None else names):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- output paths
def check_output_file(path: str, option: str) -> None:
    """Refuse an output file that exists, is a folder, or whose folder cannot be created or written.

    Args:
        path: The file to be written.
        option: The option that named it, as the user writes it (named in the message).

    Raises:
        ConfigFileExistsError: If ``path`` exists (it is never overwritten).
        ConfigError: If ``path`` is a folder or cannot be written.
    """
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder; {option} must name a new file (e.g. one inside it)", option)
    if os.path.exists(path):
        raise ConfigFileExistsError(
            f"{path} exists; set {option} to a new path or move the old file away", option=option
        )
    check_writable(os.path.dirname(os.path.abspath(path)), f"{option} {path}", option)


def check_writable(folder: str, what: str, option: str) -> None:
    """Refuse a ``folder`` that neither takes a new entry nor can be created.

    The check creates a temporary folder in ``folder`` (or in its nearest existing parent) and removes it
    again: nothing is left behind.

    Raises:
        ConfigError: Naming ``what`` and ``option``.
    """
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(
            f"{what} cannot be created: {probe} is a file, not a folder; {option} must be a path "
            "under a folder",
            option,
        )
    try:
        created = tempfile.mkdtemp(prefix=".dmpo-write-check-", dir=probe)
    except OSError as err:
        raise ConfigError(
            f"{what} cannot be written ({probe} is not writable: {err.strerror}); {option} must be a "
            "writable location",
            option,
        ) from None
    os.rmdir(created)


DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than this file system allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
"""Errors of a write caused by where it writes, not by the program (:func:`write_failure` tells them)."""


def write_failure(err: BaseException) -> str | None:
    """One sentence for a write that failed because of the disk (full, read-only, no permission), or ``None``.

    Example:
        >>> print(write_failure(OSError(errno.ENOSPC, "No space left on device", "x/last.ckpt")))
        cannot write x/last.ckpt: the disk is full (No space left on device); free space there, or write ...
        >>> write_failure(ValueError("no")) is None
        True
    """
    if not isinstance(err, OSError) or err.errno not in DISK_ERRORS:
        return None
    where = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:  # a copy or move: the target is the file that could not be written
        where = err.filename2
    remedy = (
        "free space there, or write somewhere else"
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        else "make it writable, or write somewhere else"
    )
    return f"cannot write {where}: {DISK_ERRORS[err.errno]} ({err.strerror}); {remedy}"
