"""Files a user may receive from someone else, read without unpickling arbitrary objects.

Python's pickle (and so a plain ``torch.load``) runs whatever code the file names while it is read. This
module keeps every file the package loads on the safe side of that line (``docs/security.md`` lists them):

- the adapter-only export of :meth:`~dmpo_lightning.DMPOModule.export_trainable` is a single ``.safetensors``
  file: the tensors, plus header metadata that is plain JSON text (format tag, format version, the package
  version that wrote it, the hyper-parameters, a sha256 over the tensor data);
- Lightning checkpoints (``.ckpt``) are read with ``torch.load(..., weights_only=True)``, which only rebuilds
  tensors and plain containers/values and refuses any other object;
- old pickle-based exports (format ``dmpo-trainable-v1``) load with ``weights_only=True`` when they hold only
  tensors and plain values; the opt-in ``allow_pickle=True`` also rebuilds the ``pathlib`` paths such exports
  stored in their hyper-parameters (still torch's restricted unpickler, with exactly those classes allowed:
  nothing in the file is executed), and anything else is refused, naming what the file asked for.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from dmpo_lightning.files import atomic_write_bytes, tensors_sha256, to_jsonable

__all__ = [
    "LEGACY_TRAINABLE_FORMAT",
    "TRAINABLE_FORMAT",
    "TRAINABLE_FORMAT_VERSION",
    "TRAINABLE_SUFFIX",
    "export_trainable",
    "module_from_trainable",
    "read_trainable",
    "weights_only_refusal",
    "write_trainable",
]

TRAINABLE_FORMAT = "dmpo-trainable"
"""``format`` tag in the safetensors header metadata of an adapter-only export."""
TRAINABLE_FORMAT_VERSION = 2
"""Export format version this package writes and the newest it reads (1 was the pickle-based ``.pt``)."""
LEGACY_TRAINABLE_FORMAT = "dmpo-trainable-v1"
"""``format`` key of the old pickle-based export (a ``torch.save`` dict); read, never written."""
TRAINABLE_SUFFIX = ".safetensors"

_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


# ------------------------------------------------------------------------------------------------- writing
def _jsonable(key: str, value: Any) -> Any:
    try:
        return to_jsonable(value)
    except TypeError as err:
        raise TypeError(
            f"hyper-parameter {key!r} cannot be stored ({err}): exports keep hyper-parameters as JSON "
            "(numbers, strings, lists, dicts, None)"
        ) from None


def write_trainable(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    hyper_parameters: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> str:
    """Write an adapter-only export: one ``.safetensors`` file, atomically, never over an existing file.

    Raises:
        ValueError: If ``path`` does not end in ``.safetensors``.
        FileExistsError: If ``path`` exists and ``overwrite`` is false (also when it appears while writing).
        TypeError: If a hyper-parameter is not JSON-serialisable (nothing is written).
    """
    from dmpo_lightning import __version__

    if not str(path).endswith(TRAINABLE_SUFFIX):
        raise ValueError(
            f"export path {path!r} must end in {TRAINABLE_SUFFIX}: the export is a safetensors file "
            "(tensors plus JSON metadata; loading it never runs code)"
        )
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    hparams = {k: _jsonable(k, v) for k, v in hyper_parameters.items()}
    # safetensors refuses tensors that share memory; plain contiguous CPU copies are what is stored anyway
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    metadata = {
        "format": TRAINABLE_FORMAT,
        "format_version": str(TRAINABLE_FORMAT_VERSION),
        "dmpo_lightning_version": __version__,
        "hyper_parameters": json.dumps(hparams, sort_keys=True),
        "tensors_sha256": tensors_sha256(state),
    }
    atomic_write_bytes(path, safetensors_save(state, metadata=metadata), overwrite=overwrite)
    return path


# ------------------------------------------------------------------------------------------------- reading
def _sniff(path: str) -> str:
    """What the file is: ``"safetensors"``, ``"zip"``, ``"pickle"`` or ``"unknown"``.

    ``"zip"`` is a ``torch.save`` archive, ``"pickle"`` a legacy ``torch.save`` file or a raw pickle. Only
    looks at the first bytes; nothing is deserialised.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= _MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
        return "zip"
    if head[:1] == b"\x80":  # pickle PROTO opcode, the first byte of every protocol >= 2 pickle
        return "pickle"
    return "unknown"


def weights_only_refusal(err: BaseException) -> str:
    """The part of torch's long ``weights_only`` error that says what was refused."""
    text = str(err)
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if found else text).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0].split(". Please use")[0].rstrip(".")


def read_trainable(
    path: str, *, allow_pickle: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Hyper-parameters and tensors of an adapter-only export, read without running code from it.

    The file's content decides how it is read, not its name: a safetensors file is read as the current
    format; a ``.safetensors`` name on anything else is refused; other files are taken as the old
    pickle-based export and read with ``torch.load(weights_only=True)``.

    Args:
        path: The export.
        allow_pickle: Only for old pickle-based exports that ``weights_only=True`` refuses: also rebuild the
            ``pathlib`` paths (:data:`LEGACY_SAFE_GLOBALS`) they stored, with torch's restricted unpickler;
            nothing in the file is executed, and any other object is still refused. Warns that the format is
            old.

    Raises:
        ValueError: Corrupt or truncated file, not a dmpo export, a format version newer than this package
            reads, or a pickle holding objects beyond tensors and plain values (and, with
            ``allow_pickle``, the paths of :data:`LEGACY_SAFE_GLOBALS`).
    """
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if str(path).endswith(TRAINABLE_SUFFIX):
        names = {"zip": "a torch.save archive", "pickle": "a Python pickle"}
        what = names.get(kind, "not a safetensors file")
        raise ValueError(
            f"{path} is not a readable dmpo export: it is named {TRAINABLE_SUFFIX} but its content is {what} "
            "(corrupt, truncated or renamed); nothing was loaded from it"
        )
    if kind == "unknown":
        raise ValueError(
            f"{path} is not a readable dmpo export: neither a safetensors file (what export_trainable "
            "writes) nor an old torch.save export"
        )
    return _read_legacy(path, allow_pickle=allow_pickle)


def _read_safetensors(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tag = meta.get("format")
            tensors = {k: f.get_tensor(k) for k in f.keys()} if tag == TRAINABLE_FORMAT else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable dmpo export: corrupt or truncated safetensors file ({err})"
        ) from err
    if tag != TRAINABLE_FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a dmpo trainable-parameter export (format tag {tag!r} in "
            f"its metadata, expected {TRAINABLE_FORMAT!r}); write one with DMPOModule.export_trainable"
        )
    written_by = meta.get("dmpo_lightning_version", "an unknown version")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ValueError(
            f"{path} is not a readable dmpo export: its format_version {meta.get('format_version')!r} is not "
            "an integer (corrupt metadata)"
        ) from None
    if version > TRAINABLE_FORMAT_VERSION:
        from dmpo_lightning import __version__

        raise ValueError(
            f"{path} was written by dmpo-lightning {written_by} in export format version {version}; this "
            f"dmpo-lightning {__version__} reads versions up to {TRAINABLE_FORMAT_VERSION}: upgrade "
            "dmpo-lightning"
        )
    if version < TRAINABLE_FORMAT_VERSION:
        raise ValueError(
            f"{path} claims export format version {version}, but version {TRAINABLE_FORMAT_VERSION} is the "
            "first safetensors one (corrupt metadata)"
        )
    try:
        hparams = json.loads(meta["hyper_parameters"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not a readable dmpo export: its hyper_parameters metadata is missing or not "
            f"JSON ({err})"
        ) from err
    if not isinstance(hparams, dict):
        raise ValueError(f"{path} is not a readable dmpo export: hyper_parameters is not a JSON object")
    expected = meta.get("tensors_sha256")
    if expected is None or tensors_sha256(tensors) != expected:
        raise ValueError(
            f"{path} is not a readable dmpo export: its tensor data does not match the sha256 in its header "
            "(corrupt file)"
        )
    return hparams, tensors


def _read_legacy(path: str, *, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise ValueError(
                f"{path} was not loaded: it is a pickle holding Python objects other than tensors and "
                f"plain values ({weights_only_refusal(err)}), and unpickling such a file can run arbitrary "
                "code. It may be an old pickle-based dmpo export or a crafted file. An old export whose "
                "hyper-parameters hold pathlib paths loads with DMPOModule.from_trainable(path, "
                "allow_pickle=True) (still restricted: nothing in the file is executed); then re-export it "
                "with export_trainable('<name>.safetensors')"
            ) from None
        payload = _legacy_torch_load(path)
        warnings.warn(
            f"{path} is an old pickle-based dmpo export; re-export it with "
            "export_trainable('<name>.safetensors') so that it loads without allow_pickle",
            UserWarning,
            stacklevel=4,  # the caller of DMPOModule.from_trainable
        )
    except Exception as err:
        raise ValueError(f"{path} is not a readable dmpo export ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_TRAINABLE_FORMAT:
        raise ValueError(
            f"{path} is not a dmpo trainable-parameter export (format {TRAINABLE_FORMAT} version "
            f"{TRAINABLE_FORMAT_VERSION} in a {TRAINABLE_SUFFIX} file, or the old {LEGACY_TRAINABLE_FORMAT})"
        )
    hparams, state = payload.get("hyper_parameters"), payload.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise ValueError(f"{path} is not a readable dmpo export: hyper_parameters or state_dict is missing")
    return dict(hparams), dict(state)


LEGACY_SAFE_GLOBALS: tuple[type, ...] = (
    pathlib.PurePath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    pathlib.Path,
    pathlib.PosixPath,
    pathlib.WindowsPath,
)
"""The classes beyond tensors and plain values that ``allow_pickle=True`` lets an old export rebuild."""


def _legacy_torch_load(path: str) -> Any:
    """``allow_pickle=True``: torch's restricted unpickler with :data:`LEGACY_SAFE_GLOBALS` allowed.

    Nothing the file names is executed; a pickle that asks for any other global is refused.
    """
    try:
        with torch.serialization.safe_globals(list(LEGACY_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} was not loaded, even with allow_pickle=True: it holds Python objects beyond tensors, "
            f"plain values and pathlib paths ({weights_only_refusal(err)}); unpickling them could run "
            "arbitrary code, so nothing in the file was executed. If you made the file yourself, load it in "
            "a process you trust with torch.load and save its tensors and plain hyper-parameters again"
        ) from None
    except Exception as err:
        raise ValueError(f"{path} is not a readable dmpo export ({type(err).__name__}: {err})") from err


def export_trainable(module: Any, path: str, *, overwrite: bool = False) -> str:
    """Save a ``DMPOModule``'s trained part (PEFT, bypasses, heads, thresholds) and config, safely loadable.

    A few MB instead of a full backbone; :func:`module_from_trainable` rebuilds the module (the backbone's
    base weights come from ``pretrained``/``checkpoint_path`` as configured). The file is a single
    ``.safetensors`` file: the tensors, and in its header metadata (JSON text) the format tag
    ``dmpo-trainable``, the format version, the package version, the hyper-parameters and a sha256 of
    the tensor data. Loading it never runs code (``docs/security.md``). Written atomically.

    Raises:
        ValueError: If ``path`` does not end in ``.safetensors``.
        FileExistsError: If ``path`` exists and ``overwrite`` is false.
        TypeError: If a hyper-parameter is not JSON-serialisable (nothing is written).
    """
    state = {f"model.{k}": v for k, v in module.model.trainable_state_dict().items()}
    state["loss_weights"] = module.loss_weights
    state["exit_thresholds"] = module.exit_thresholds
    return write_trainable(path, state, dict(module.hparams), overwrite=overwrite)


def module_from_trainable(
    cls: Any, path: str, *, allow_pickle: bool = False, overrides: Mapping[str, Any] | None = None
) -> Any:
    """Rebuild a ``DMPOModule`` (class ``cls``) from :func:`export_trainable` output.

    Reads the ``.safetensors`` export without unpickling anything. An old pickle-based ``.pt`` export
    (format ``dmpo-trainable-v1``) is read with ``torch.load(weights_only=True)``, which loads it when it
    holds only tensors and plain values. Exports written before the option groups (flat hyperparameters)
    are rebuilt with their options moved into the groups.

    Args:
        cls: ``DMPOModule`` or a subclass.
        path: The export.
        allow_pickle: Opt-in for old ``.pt`` exports that ``weights_only=True`` refuses because their
            hyper-parameters hold ``pathlib`` paths: rebuild those too, still with torch's restricted
            unpickler (nothing in the file is executed; any other object is refused). Warns that the
            format is old; re-export such files to ``.safetensors``.
        overrides: Hyper-parameters that replace the saved ones; an option group given as a mapping
            (``evaluation={"report_dir": ...}``) replaces only the fields it names.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: Corrupt or truncated file, not a dmpo export, an export format newer than this
            package, a pickle that needs ``allow_pickle``, or tensors that do not fit the rebuilt model.
    """
    from dmpo_lightning.options import group_legacy_hparams

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no trainable-parameter export at {path}")
    hparams, state_dict = read_trainable(path, allow_pickle=allow_pickle)
    merged = group_legacy_hparams(hparams)
    for key, value in (overrides or {}).items():  # a group given as a mapping updates the fields it names
        saved = merged.get(key)
        merged[key] = (
            {**saved, **value} if isinstance(value, Mapping) and isinstance(saved, Mapping) else value
        )
    module = cls(**merged)
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise ValueError(f"export {path} has parameters this model lacks: {unexpected[:5]}")
    expected = set(state_dict)
    not_loaded = [k for k in module.state_dict() if k in expected and k in missing]
    if not_loaded:
        raise ValueError(f"export {path} could not restore: {not_loaded[:5]}")
    return module
