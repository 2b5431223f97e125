"""Unlabelled images for ``dmpo predict``: list a folder or a text file of paths, read each image safely.

An image that cannot be read (corrupt, truncated, not an image) does not stop the run: its item carries
the reason in :data:`ERROR_KEY` and a zero placeholder image, and the predictions CSV reports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from dmpo_lightning.constants import ERROR_KEY, IMAGE_KEY, INDEX_KEY, PATH_KEY, SOURCE_MODE_KEY
from dmpo_lightning.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    check_exact_size,
    check_max_pixels,
    decode_image,
    list_images,
)
from dmpo_lightning.predictions import error_sentence

__all__ = [
    "ERROR_KEY",
    "IMAGE_EXTENSIONS",
    "PATH_KEY",
    "SOURCE_MODE_KEY",
    "ImagePathDataset",
    "list_image_paths",
]


def list_image_paths(source: str | os.PathLike[str]) -> list[str]:
    """The images ``predict_paths`` names, as absolute paths (:func:`dmpo_lightning.images.list_images`).

    Raises:
        FileNotFoundError: If ``source`` or a listed file does not exist (the first few are named).
        ValueError: If the folder holds no image or the list names none.
    """
    return list_images(source, what="predict_paths")


class ImagePathDataset(Dataset):
    """Image files for prediction, read with the evaluation transform; unreadable files become error items.

    Items are ``{IMAGE_KEY: tensor [C, H, W], INDEX_KEY: position, PATH_KEY: path, ERROR_KEY: reason or "",
    SOURCE_MODE_KEY: original PIL mode if converted, else ""}``. An error item's image is zeros.

    Images are decoded like the training images (:func:`dmpo_lightning.images.decode_image`: 16-bit and
    float pixels scaled to 8 bit, other modes converted to ``RGB``, non-finite pixels and files over
    ``max_pixels`` refused), then ``transform`` sets the model's channels (grey replicated to RGB, RGB to
    grey luma) and size.

    Args:
        paths: Image files.
        transform: PIL image -> normalised tensor ``[C, H, W]`` (the data module's evaluation transform).
        in_chans: Model input channels (1 or 3).
        image_size: Model input side in pixels.
        exact_size: If true, the transform does not resize (small-image recipe): an image of another size is
            reported as an error item instead of being silently cropped or padded.
        max_pixels: Files whose header gives more pixels are reported as error items without being decoded.
        max_pixels_option: How messages name ``max_pixels`` (the setting as the user writes it).
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        in_chans: int,
        image_size: int,
        exact_size: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_pixels_option: str = "max_pixels",
    ) -> None:
        self.paths = list(paths)
        self.max_pixels = check_max_pixels(max_pixels, max_pixels_option)
        self.max_pixels_option = max_pixels_option
        self.transform = transform
        self.in_chans = in_chans
        self.image_size = image_size
        self.exact_size = exact_size
        self.target_mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: str) -> tuple[torch.Tensor, str]:
        image, mode = decode_image(path, max_pixels=self.max_pixels, option=self.max_pixels_option)
        if self.exact_size:
            check_exact_size(image, self.image_size)
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
            error = error_sentence(err)
        return {
            IMAGE_KEY: tensor,
            INDEX_KEY: index,
            PATH_KEY: path,
            ERROR_KEY: error,
            SOURCE_MODE_KEY: source_mode,
        }
