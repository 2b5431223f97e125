"""The held-out calibration split: size resolution, seeded draw, and its JSON file."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dmpo_lightning.errors import ConfigError, ConfigFileNotFoundError
from dmpo_lightning.files import atomic_write_text

INDICES_FILENAME = "calibration_indices.json"
"""Name of the file written into the run's log directory."""

FORMAT_VERSION = 1


SIZE_OPTION = "data.init_args.calibration_size"


def check_calibration_size(size: float) -> None:
    """Refuse a calibration size that no training split can hold (zero, negative, a fraction >= 1).

    What needs the training split's length is checked by :func:`calibration_count`.

    Raises:
        ConfigError: Naming ``calibration_size`` and what is allowed.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise ConfigError(f"calibration_size must be an int or a float, got {size!r}", option=SIZE_OPTION)
    if isinstance(size, numbers.Integral) or (size > 1 and float(size).is_integer()):
        if int(size) <= 0:
            raise ConfigError(
                f"calibration_size={size!r} must be positive: a number of images >= 1 or a fraction in "
                "(0, 1)",
                option=SIZE_OPTION,
            )
    elif not 0 < size < 1:
        raise ConfigError(
            f"calibration_size={size!r}: use an int number of images (>= 1) or a float fraction in (0, 1)",
            option=SIZE_OPTION,
        )


def calibration_count(size: float, train_size: int, dataset: str) -> int:
    """Number of training images to hold out.

    Args:
        size: An ``int`` (or integral float > 1) is a number of images; a float in (0, 1) a fraction of
            the training split (rounded to the nearest image).
        train_size: Images in the dataset's training split.
        dataset: Dataset name, for messages.

    Returns:
        The count, at least 1 and at most ``train_size - 1``.

    Raises:
        ConfigError: If the size is not positive, leaves no training image, or is a non-integral float > 1.
    """
    check_calibration_size(size)
    if isinstance(size, numbers.Integral) or (size > 1 and float(size).is_integer()):
        count = int(size)
        what = f"{count} images"
    else:
        count = max(1, round(size * train_size))
        what = f"fraction {size} = {count} images"
    if count >= train_size:
        raise ConfigError(
            f"calibration_size={size!r} ({what}) leaves no training data: the {dataset!r} training split "
            f"has {train_size} images; allowed: at most {train_size - 1} images or a fraction in (0, 1)",
            option=SIZE_OPTION,
        )
    return count


def draw_split(train_size: int, count: int, seed: int) -> list[int]:
    """Sorted indices of ``count`` training images drawn without replacement with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(train_size, generator=generator)[:count].tolist())


def remaining_indices(train_size: int, held_out: Sequence[int], seed: int, cap: int | None) -> list[int]:
    """The training indices not held out, optionally capped at ``cap`` images chosen with ``seed``.

    The cap takes images in the order of the same permutation that draws the calibration split, so
    changing the cap never changes the calibration split.

    Returns:
        Sorted indices.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_size, generator=generator)
    keep = torch.ones(train_size, dtype=torch.bool)
    keep[torch.as_tensor(list(held_out), dtype=torch.long)] = False
    rest = order[keep[order]]
    if cap is not None:
        rest = rest[:cap]
    return sorted(rest.tolist())


def check_indices(indices: Sequence[int], train_size: int, source: str) -> list[int]:
    """Validate held-out indices read from a file or checkpoint.

    Returns:
        The indices, sorted, as ``int``.

    Raises:
        ConfigError: If an index is not an integer, out of range or repeated, or the split would leave no
            training data.
    """
    if isinstance(indices, (str, bytes)) or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices
    ):
        raise ConfigError(f"{source}: calibration indices must be a list of integers")
    values = [int(i) for i in indices]
    if not values:
        raise ConfigError(f"{source}: the calibration split is empty")
    bad = [i for i in values if not 0 <= i < train_size]
    if bad:
        raise ConfigError(
            f"{source}: calibration indices out of range for a training split of {train_size} images "
            f"(allowed 0..{train_size - 1}): {bad[:5]}{' ...' if len(bad) > 5 else ''}; the split was drawn "
            "for other data (another dataset, task, list file or val_source)"
        )
    if len(set(values)) != len(values):
        raise ConfigError(f"{source}: calibration indices contain duplicates")
    if len(values) >= train_size:
        raise ConfigError(
            f"{source}: {len(values)} calibration indices leave no training data ({train_size} images)"
        )
    return sorted(values)


def indices_payload(
    dataset: str, seed: int, train_size: int, indices: Sequence[int], task: str | None = None
) -> dict[str, Any]:
    """The JSON object saved beside a run (and inside checkpoints); ``task`` only for VTAB-1k."""
    payload = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "seed": seed,
        "train_size": train_size,
        "size": len(indices),
        "indices": list(indices),
    }
    if task is not None:
        payload["task"] = task
    return payload


def save_indices(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON (creating parent folders; whole or not at all) and return the path."""
    return atomic_write_text(path, json.dumps(payload))


def load_indices(path: str | Path, dataset: str, task: str | None = None) -> dict[str, Any]:
    """Read a calibration-indices file and check it belongs to ``dataset`` (and VTAB-1k ``task``).

    Args:
        path: A file written by :func:`save_indices`.
        dataset: The dataset it must describe.
        task: The VTAB-1k task it must describe, if any.

    Returns:
        The payload (``indices`` still unchecked against the training split's size).

    Raises:
        FileNotFoundError: If the file is missing or a folder.
        ValueError: If it is not such a file or describes another dataset or task.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigFileNotFoundError(
            f"calibration_indices_file={str(path)!r} is a folder; give the {INDICES_FILENAME} file in it",
            option="data.init_args.calibration_indices_file",
        )
    if not path.is_file():
        raise ConfigFileNotFoundError(
            f"calibration_indices_file={str(path)!r} does not exist",
            option="data.init_args.calibration_indices_file",
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"calibration_indices_file={str(path)!r} is not valid JSON: {error}",
            option="data.init_args.calibration_indices_file",
        ) from error
    option = "data.init_args.calibration_indices_file"
    if not isinstance(payload, dict) or not isinstance(payload.get("indices"), list):
        raise ConfigError(
            f"calibration_indices_file={str(path)!r} must hold a JSON object with an 'indices' list "
            f"(as written to {INDICES_FILENAME} by BenchmarkDataModule)",
            option=option,
        )
    version = payload.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ConfigError(
            f"calibration_indices_file={str(path)!r} has format_version {version!r}, newer than this "
            f"dmpo-lightning reads ({FORMAT_VERSION}): upgrade dmpo-lightning, or let the run draw a new "
            "split",
            option=option,
        )
    if payload.get("dataset") != dataset:
        raise ConfigError(
            f"calibration_indices_file={str(path)!r} was written for dataset {payload.get('dataset')!r}, "
            f"but this DataModule loads {dataset!r}",
            option=option,
        )
    if payload.get("task") != task:
        raise ConfigError(
            f"calibration_indices_file={str(path)!r} was written for task {payload.get('task')!r}, but this "
            f"DataModule loads task {task!r}",
            option=option,
        )
    return payload
