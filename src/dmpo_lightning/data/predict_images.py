"""Unlabelled images for ``dmpo predict``: list a folder or a text file of paths, read each image safely.

An image that cannot be read (corrupt, truncated, not an image) does not stop the run: its item carries
the reason in :data:`ERROR_KEY` and a zero placeholder image, and the predictions CSV reports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY

__all__ = [
    "ERROR_KEY",
    "IMAGE_EXTENSIONS",
    "PATH_KEY",
    "SOURCE_MODE_KEY",
    "ImagePathDataset",
    "list_image_paths",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File endings read from a folder (compared case-insensitively)."""

PATH_KEY = "path"
"""Batch key of each image's absolute path (a list of ``str``)."""

ERROR_KEY = "error"
"""Batch key of why an image could not be used (``""`` when it was read)."""

SOURCE_MODE_KEY = "source_mode"
"""Batch key of the file's PIL mode when it was converted to the model's channels (``""`` otherwise)."""

MAX_LISTED = 5
"""How many missing files an error message names."""


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(folder: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            os.path.abspath(os.path.join(dirpath, f))
            for f in filenames
            if not f.startswith(".") and _is_image_name(f)
        )
    if not found:
        raise ValueError(
            f"predict_paths folder {str(folder)!r} holds no image files (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}, any letter case; hidden files and folders are skipped)"
        )
    return sorted(found)


def _read_list(list_file: Path) -> list[str]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"predict_paths {str(list_file)!r} is neither a folder, an image ({', '.join(IMAGE_EXTENSIONS)}) "
            "nor a UTF-8 text file of image paths (one per line)"
        ) from None
    base = list_file.parent
    entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise ValueError(
            f"predict_paths list {str(list_file)!r} names no image (one path per line; blank lines and lines "
            "starting with # are skipped)"
        )
    paths = [os.path.abspath(os.path.join(base, os.path.expanduser(e))) for e in entries]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        raise FileNotFoundError(
            f"predict_paths list {str(list_file)!r} names {len(missing)} of {len(paths)} files that do not "
            f"exist (relative paths are read from the list's folder): {shown}"
        )
    return paths


def list_image_paths(source: str | os.PathLike[str]) -> list[str]:
    """The images to predict on, as absolute paths.

    Args:
        source: A folder (searched recursively for :data:`IMAGE_EXTENSIONS`, any case; hidden files and
            folders skipped; sorted by path), one image file, or a UTF-8 text file with one path per line
            (relative to the text file's folder; blank lines and ``#`` comments skipped; order kept).

    Returns:
        Absolute paths (symbolic links are not resolved).

    Raises:
        FileNotFoundError: If ``source`` or a listed file does not exist (the first few are named).
        ValueError: If the folder holds no image or the list names none.
    """
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_dir():
        return _scan_folder(path)
    if not path.exists():
        raise FileNotFoundError(
            f"predict_paths {str(path)!r} does not exist; give a folder of images, an image file or a text "
            "file with one image path per line"
        )
    if _is_image_name(path.name):
        return [os.path.abspath(path)]
    return _read_list(path)


class ImagePathDataset(Dataset):
    """Image files for prediction, read with the evaluation transform; unreadable files become error items.

    Items are ``{IMAGE_KEY: tensor [C, H, W], INDEX_KEY: position, PATH_KEY: path, ERROR_KEY: reason or "",
    SOURCE_MODE_KEY: original PIL mode if converted, else ""}``. An error item's image is zeros.

    Images are opened like the training images (modes other than grey ``L`` and ``RGB`` are converted to
    ``RGB``: alpha dropped, palettes expanded), then ``transform`` sets the model's channels (grey
    replicated to RGB, RGB to grey luma) and size.

    Args:
        paths: Image files.
        transform: PIL image -> normalised tensor ``[C, H, W]`` (the data module's evaluation transform).
        in_chans: Model input channels (1 or 3).
        image_size: Model input side in pixels.
        exact_size: If true, the transform does not resize (small-image recipe): an image of another size is
            reported as an error item instead of being silently cropped or padded.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        in_chans: int,
        image_size: int,
        exact_size: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.in_chans = in_chans
        self.image_size = image_size
        self.exact_size = exact_size
        self.target_mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: str) -> tuple[torch.Tensor, str]:
        with Image.open(path) as opened:  # by name, so PIL's messages name the file, not a file object
            opened.load()
            mode = opened.mode
            image = opened.copy() if mode in ("L", "RGB") else opened.convert("RGB")
        if self.exact_size and image.size != (self.image_size, self.image_size):
            w, h = image.size
            raise ValueError(
                f"image is {w}x{h} px but this model reads {self.image_size}x{self.image_size} images "
                "without resizing (the dataset's small-image evaluation transform); resize it first"
            )
        tensor = self.transform(image)
        return tensor, ("" if mode == self.target_mode else mode)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            tensor, source_mode = self._read(path)
            error = ""
        except Exception as err:  # any unreadable file becomes a reported row, not a crash
            tensor = torch.zeros(self.in_chans, self.image_size, self.image_size)
            source_mode = ""
            error = f"{type(err).__name__}: {err}".replace("\n", " ").strip()
        return {
            IMAGE_KEY: tensor,
            INDEX_KEY: index,
            PATH_KEY: path,
            ERROR_KEY: error,
            SOURCE_MODE_KEY: source_mode,
        }
