"""Checkpoint safety and identity for :class:`~dmpo_lightning.module.DMPOModule`, kept out of the module.

- :func:`weights_from_checkpoint`: rebuild a module without its backbone's original weights (every weight
  comes from the checkpoint about to be loaded);
- :func:`load_checkpoint_safely`: Lightning's ``load_from_checkpoint`` with ``weights_only=True`` by default
  and a one-sentence refusal of checkpoints that hold arbitrary objects;
- :func:`check_architecture`: refuse a checkpoint of another architecture with a message instead of a
  tensor-size mismatch;
- :func:`weights_hash`, :func:`checkpoint_hash`, :func:`weight_hashes`: what ``dmpo test`` stores in
  ``thresholds.json`` and what ``dmpo predict`` and the deployment artefact compare it with.
- :func:`model_fingerprint`: the architecture a ``thresholds.json`` records, under the option names a user
  writes (``exits.blocks``, ``peft.method``...);
- :func:`store_class_names`, :func:`check_checkpoint`: the module's ``on_save_checkpoint`` /
  ``on_load_checkpoint``.

The module's ``load_from_checkpoint`` and ``on_load_checkpoint`` are thin delegations to this file (its
``export_trainable``/``from_trainable`` to :mod:`dmpo_lightning.serialization`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import torch

from dmpo_lightning.constants import ARCHITECTURE_KEYS, THRESHOLDS_FINGERPRINT_KEYS
from dmpo_lightning.errors import ConfigError, ConfigFileNotFoundError
from dmpo_lightning.files import file_sha256, tensors_sha256
from dmpo_lightning.models.backbone import backbone_depth, resolve_exit_blocks
from dmpo_lightning.options import dotted_options
from dmpo_lightning.serialization import weights_only_refusal

UNRESTRICTED_UNPICKLING_REFUSED = (
    "weights_only must be true: checkpoints are read only with torch's restricted unpickler (tensors and "
    "plain values), because unrestricted unpickling runs any code the file holds; a checkpoint written by "
    "`dmpo fit` loads that way, and one holding other Python objects must be re-saved with only its "
    "state_dict and plain hyper-parameters"
)

__all__ = [
    "LIGHTNING_CKPT_NAMES",
    "check_architecture",
    "check_checkpoint",
    "check_checkpoint_file",
    "checkpoint_hash",
    "is_checkpoint_file_path",
    "load_checkpoint_safely",
    "model_fingerprint",
    "restoring_from_checkpoint",
    "run_folder_of",
    "store_class_names",
    "weight_hashes",
    "weights_from_checkpoint",
    "weights_hash",
]

_WEIGHTS_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dmpo_weights_from_checkpoint", default=False
)


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Modules built inside this context skip the backbone's pre-trained weights (no file, no download).

    For rebuilding a module whose every weight is about to be loaded from its own Lightning checkpoint
    (``load_from_checkpoint``, ``dmpo test --ckpt_path``): ``pretrained``/``checkpoint_path`` stay in the
    hyperparameters, but the original weights file or the network is not needed.
    """
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def restoring_from_checkpoint() -> bool:
    """Whether the caller runs inside :func:`weights_from_checkpoint`."""
    return _WEIGHTS_FROM_CHECKPOINT.get()


def load_checkpoint_safely(load: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Run Lightning's ``load_from_checkpoint`` (``load``) safely, with the module's argument conventions.

    - The checkpoint is always read with ``weights_only=True``: unpickling without restrictions could run
      code from the file, so an explicit ``weights_only`` other than ``True`` (or ``None``) is refused.
    - Inside :func:`weights_from_checkpoint`, so the backbone's original weights are not needed.
    - With the checkpoint file given positionally, a ``checkpoint_path=`` keyword is the module's
      hyperparameter (the backbone weights file), applied to the loaded module's hparams.

    Raises:
        ValueError: If the checkpoint holds objects other than tensors and plain values, is damaged or no
            Lightning checkpoint, or the caller asks for unrestricted unpickling.
        FileNotFoundError: If a checkpoint file is missing (or a folder).
    """
    override: dict[str, Any] = {}
    if args:
        checkpoint_path, args = args[0], tuple(args[1:])
        if "checkpoint_path" in kwargs:
            override["checkpoint_path"] = kwargs.pop("checkpoint_path")
    else:
        checkpoint_path = kwargs.pop("checkpoint_path")
    if kwargs.pop("weights_only", True) not in (True, None):
        raise ValueError(UNRESTRICTED_UNPICKLING_REFUSED)
    kwargs["weights_only"] = True
    if isinstance(checkpoint_path, os.PathLike):
        checkpoint_path = os.fspath(checkpoint_path)
    if is_checkpoint_file_path(checkpoint_path):  # missing, a folder, damaged, not a checkpoint: one sentence
        check_checkpoint_file(checkpoint_path, option="checkpoint")
    try:
        with weights_from_checkpoint():
            module = load(checkpoint_path, *args, **kwargs)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint {checkpoint_path} was not loaded: it holds Python objects other than tensors "
            f"and plain values ({weights_only_refusal(err)}), and unpickling it could run arbitrary "
            "code. Checkpoints written by `dmpo fit` hold only those; re-save this one with only its "
            "state_dict and plain hyper-parameters"
        ) from None
    for key, value in override.items():
        module.hparams[key] = value
    return module


def check_architecture(
    saved: Mapping[str, Any], fingerprint: Mapping[str, Any], backbone: torch.nn.Module
) -> None:
    """Refuse saved hyperparameters of another architecture than ``fingerprint`` describes.

    Args:
        saved: The checkpoint's hyperparameters (grouped, as ``DMPOModule`` saves them).
        fingerprint: The model's :func:`model_fingerprint`.
        backbone: The model's backbone (its depth resolves a saved ``exits.blocks`` count).

    Raises:
        ConfigError: (a ``ValueError``) One of :data:`~dmpo_lightning.constants.ARCHITECTURE_KEYS` differs
            (both values named).
    """
    theirs_all = dotted_options(saved)
    for key in ARCHITECTURE_KEYS:
        if key not in theirs_all:
            continue
        theirs, ours = theirs_all[key], fingerprint.get(key)
        if key == "exits.blocks":
            with contextlib.suppress(ValueError):
                theirs = list(resolve_exit_blocks(theirs, backbone_depth(backbone), require_last=False))
        if theirs != ours:
            raise ConfigError(
                f"checkpoint was trained with {key}={theirs!r} but this model has {key}={ours!r}; "
                "use the checkpoint's own config (dmpo test --config <run>/config.yaml) or load it with "
                "DMPOModule.load_from_checkpoint(path)",
                option="ckpt_path",
            )


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's trained weights in memory (the same however they were loaded; as float32).

    ``model`` is a :class:`~dmpo_lightning.models.multi_exit.MultiExitViT` (its ``trainable_state_dict``).
    """
    state = model.trainable_state_dict()  # type: ignore[operator]
    return f"weights:{tensors_sha256({k: v.float() for k, v in state.items()})}"


def _file_hash(path: str | None) -> str | None:
    return f"file:{file_sha256(path)}" if path and os.path.isfile(path) else None


def checkpoint_hash(model: torch.nn.Module, ckpt_path: str | None) -> str:
    """sha256 of the checkpoint file ``ckpt_path``, or :func:`weights_hash` if there is no such file."""
    return _file_hash(ckpt_path) or weights_hash(model)


def weight_hashes(model: torch.nn.Module, ckpt_path: str | None) -> list[str]:
    """Every hash ``dmpo test`` may have stored for these weights: in memory and of the checkpoint file."""
    file_hash = _file_hash(ckpt_path)
    return [weights_hash(model)] + ([file_hash] if file_hash else [])


def model_fingerprint(hparams: Mapping[str, Any], exit_blocks: Sequence[int]) -> dict[str, Any]:
    """What a ``thresholds.json`` records and must match (:data:`THRESHOLDS_FINGERPRINT_KEYS`).

    The keys are the option names a user writes (``exits.blocks``, ``peft.method``);
    ``exit_blocks`` are the resolved positions (a count such as ``blocks: 2`` becomes the block numbers).
    """
    options = dotted_options(hparams)
    fingerprint = {key: options[key] for key in THRESHOLDS_FINGERPRINT_KEYS}
    fingerprint["exits.blocks"] = list(exit_blocks)
    return fingerprint


def store_class_names(module: Any, checkpoint: dict[str, Any]) -> None:
    """``checkpoint["class_names"]``: the data module's class names, else the module's, when known."""
    names = module.class_names
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer (a checkpoint saved by hand)
        trainer = None
    classes = getattr(getattr(trainer, "datamodule", None), "classes", None)
    if classes is not None and len(classes) == module.hparams.num_classes:
        names = [str(c) for c in classes]
    if names is not None:
        checkpoint["class_names"] = list(names)


def check_checkpoint(module: Any, checkpoint: Mapping[str, Any]) -> None:
    """Refuse a checkpoint of another architecture than ``module``'s; restore its class names.

    Raises:
        ValueError: See :func:`check_architecture`.
    """
    saved = checkpoint.get("hyper_parameters", {})
    check_architecture(saved, module.model_fingerprint(), module.model.backbone)
    names = checkpoint.get("class_names")
    if isinstance(names, (list, tuple)) and len(names) == module.hparams.num_classes:
        module.class_names = [str(c) for c in names]


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")
"""``ckpt_path`` values Lightning resolves itself (they name checkpoints of a fit in the same process)."""


def is_checkpoint_file_path(path: Any) -> TypeGuard[str]:
    """Whether ``ckpt_path`` names a local file (not ``last``/``best``/``hpc``, a registry or a URL)."""
    return (
        isinstance(path, str)
        and bool(path)
        and path not in LIGHTNING_CKPT_NAMES
        and not path.startswith("registry")
        and "://" not in path
    )


def check_checkpoint_file(path: str, option: str = "ckpt_path") -> None:
    """Refuse a missing, folder-typed or non-Lightning local checkpoint in one sentence, before any work.

    The file is opened with ``mmap`` and ``weights_only=True``: only its key list is read, and a file holding
    arbitrary pickled objects is refused as well.

    Raises:
        ConfigFileNotFoundError: For a missing path or a folder (its ``.ckpt`` files are named).
        ConfigError: For a file that is not a Lightning checkpoint (what it holds instead is named).
    """
    if os.path.isdir(path):
        found = sorted(
            os.path.relpath(os.path.join(d, f), path)
            for d, _, files in os.walk(path)
            for f in files
            if f.endswith(".ckpt")
        )
        hint = f"its checkpoints: {', '.join(found[:5])}" if found else "it holds no .ckpt file"
        raise ConfigFileNotFoundError(
            f"{option} {path!r} is a folder, not a checkpoint file; give one .ckpt file ({hint})",
            option=option,
        )
    if not os.path.isfile(path):
        raise ConfigFileNotFoundError(
            f"{option} {path!r} does not exist; give the .ckpt file a `dmpo fit` run wrote "
            "(runs/<name>/version_N/checkpoints/*.ckpt)",
            option=option,
        )
    damaged = _damaged_entry(path)
    if damaged is not None:
        raise ConfigError(
            f"{option} {path!r} is corrupt: its entry {damaged!r} does not match the checksum written with "
            "it (damaged on disk or in a copy), so its weights would be wrong; nothing was loaded from it: "
            "copy it again or use another checkpoint",
            option=option,
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{option} {path} was not loaded: it holds Python objects other than tensors and plain values "
            f"({weights_only_refusal(err)}), and unpickling it could run arbitrary code. Checkpoints written "
            "by `dmpo fit` hold only those; re-save this one with only its state_dict and plain "
            "hyper-parameters",
            option=option,
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(
            f"{option} {path!r} is not a readable Lightning checkpoint (torch.load failed with "
            f"{type(err).__name__}: an empty, truncated or corrupt file, or not a torch.save file); give "
            "a .ckpt file written by `dmpo fit` (it is read with weights_only=True, so a file holding "
            "arbitrary pickled objects is refused as well)",
            option=option,
        ) from err
    required = ("state_dict", "pytorch-lightning_version")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            what = "a bare state_dict (torch.save(model.state_dict()))"
        elif isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("dmpo-trainable"):
            what = "a trainable-parameter export (load it with DMPOModule.from_trainable)"
        else:
            missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
            what = f"a {type(ckpt).__name__} without the {' and '.join(map(repr, missing))} entries"
        raise ConfigError(
            f"{option} {path!r} holds {what}, not a Lightning checkpoint; give a .ckpt file written by "
            "`dmpo fit` (runs/<name>/version_N/checkpoints/*.ckpt)",
            option=option,
        )


def _damaged_entry(path: str) -> str | None:
    """The first entry of a ``torch.save`` archive whose bytes fail their CRC-32, if any.

    ``torch.load`` does not check the checksums, so flipped bits in the tensor data load as wrong weights.
    Files that are no zip archive are left to ``torch.load`` (which refuses them).
    """
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
        return f"<the archive: {err}>"


def run_folder_of(ckpt_path: Any) -> str | None:
    """The run folder of a checkpoint ``<run>/checkpoints/<file>.ckpt`` written by ``dmpo fit``, if it is one.

    A run folder holds the run's ``config.yaml`` or ``hparams.yaml`` next to ``checkpoints/``.
    """
    if not is_checkpoint_file_path(ckpt_path):
        return None
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    if os.path.basename(folder) != "checkpoints":
        return None
    run = os.path.dirname(folder)
    has_run_files = any(os.path.isfile(os.path.join(run, f)) for f in ("config.yaml", "hparams.yaml"))
    return run if has_run_files else None
