"""Files a user may receive from someone else, read without unpickling arbitrary objects.

Python's pickle (and so a plain ``torch.load``) runs whatever code the file names while it is read. This
module keeps every file the package loads on the safe side of that line (``docs/security.md`` lists them):

- the adapter-only export of :meth:`~dmpo_lightning.DMPOModule.export_trainable` is a single ``.safetensors``
  file: the tensors, plus header metadata that is plain JSON text (format tag, format version, the package
  version that wrote it, the hyper-parameters, a sha256 over the tensor data);
- Lightning checkpoints (``.ckpt``) are read with ``torch.load(..., weights_only=True)``, which only rebuilds
  tensors and plain containers/values and refuses any other object;
- any other file given as an export (a pickle, a ``torch.save`` archive, the pickle-based ``.pt`` of export
  format 1) is refused without being deserialised.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from dmpo_lightning.files import atomic_write_bytes, tensors_sha256, to_jsonable
from dmpo_lightning.version import __version__

__all__ = [
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
"""Export format version this package writes and reads (1 was a pickle-based ``.pt``, no longer read)."""
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

    ``"zip"`` is a ``torch.save`` archive, ``"pickle"`` a ``torch.save`` file of the pre-zip format or a raw
    pickle. Only looks at the first bytes; nothing is deserialised.
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


def read_trainable(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Hyper-parameters and tensors of an adapter-only export, read without running code from it.

    The file's content decides how it is read, not its name: only a safetensors file of the current export
    format is read; anything else is refused without being deserialised.

    Raises:
        ValueError: Corrupt or truncated file, not a dmpo export (a pickle or ``torch.save`` file, such as
            the ``.pt`` of export format 1, included), or an export format other than this package's.
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
            f"{path} is not a readable dmpo export: not a safetensors file (what export_trainable writes)"
        )
    raise ValueError(
        f"{path} is not a dmpo export of format version {TRAINABLE_FORMAT_VERSION}: it is "
        f"{'a torch.save archive' if kind == 'zip' else 'a Python pickle'} (the pickle-based .pt export of "
        "format version 1, a checkpoint or another file), which is not read because unpickling can run "
        f"code; rebuild the module from its Lightning checkpoint (DMPOModule.load_from_checkpoint) and "
        f"export it again with export_trainable('<name>{TRAINABLE_SUFFIX}')"
    )


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


def module_from_trainable(cls: Any, path: str, *, overrides: Mapping[str, Any] | None = None) -> Any:
    """Rebuild a ``DMPOModule`` (class ``cls``) from :func:`export_trainable` output.

    Reads the ``.safetensors`` export without unpickling anything (:func:`read_trainable`).

    Args:
        cls: ``DMPOModule`` or a subclass.
        path: The export.
        overrides: Hyper-parameters that replace the saved ones; an option group given as a mapping
            (``evaluation={"report_dir": ...}``) replaces only the fields it names.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: Corrupt or truncated file, not a dmpo export, an export format other than this
            package's, or tensors that do not fit the rebuilt model.
    """
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a folder; give the .safetensors file that export_trainable wrote")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no trainable-parameter export at {path}")
    merged, state_dict = read_trainable(path)
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
