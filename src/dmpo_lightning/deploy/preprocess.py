"""Image loading and the evaluation transform of a trained model, rebuilt from an artefact's manifest.

The steps are those of :func:`dmpo_lightning.data.transforms.build_transform` with ``train=False`` (a test
pins them equal): convert to the model's channels (grey images replicated to RGB, RGB converted to grey
with PIL's ITU-R 601-2 luma), then either ``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)`` or, for
small datasets used at their own size, the image as it is (which must then have exactly that size), then
``ToTensor`` and ``Normalize(mean, std)``. Imports only PIL, torch and torchvision.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torchvision.transforms as T
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "ImageSizeError", "build_eval_transform", "list_images", "load_image"]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp", ".pgm")
"""File endings searched for in folders (case-insensitive)."""

_INTERPOLATIONS = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


class ImageSizeError(ValueError):
    """An image the model cannot take as trained (a small-image model used without resizing)."""


def load_image(path: str) -> Image.Image:
    """Open an image as a grey (``L``) or ``RGB`` PIL image, other modes converted to RGB (as in training)."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def build_eval_transform(pre: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised ``[C, H, W]`` tensor, from an artefact's ``preprocessing`` entry."""
    channels, size = int(pre["input_size"][0]), int(pre["input_size"][-1])
    mode = "L" if channels == 1 else "RGB"
    resize: Any = pre.get("resize")
    steps: list[Callable[[Any], Any]] = []
    if pre.get("crop_mode") == "center":
        interp = _INTERPOLATIONS[pre["interpolation"]]
        steps += [T.Resize(int(resize), interpolation=interp), T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(pre["mean"], pre["std"])]
    tail = T.Compose(steps)
    native = pre.get("crop_mode") != "center"

    def transform(image: Image.Image) -> torch.Tensor:
        if native and image.size != (size, size):
            raise ImageSizeError(
                f"image is {image.size[0]}x{image.size[1]} px but this model was trained on {size}x{size} "
                "images used as they are (no resizing in its preprocessing); resize it to "
                f"{size}x{size} first"
            )
        if image.mode != mode:
            image = image.convert(mode)
        return tail(image)

    return transform


def resize_for(image_size: int, crop_pct: float) -> int:
    """Shorter-side resize of the evaluation transform, ``floor(image_size / crop_pct)`` (timm's rule)."""
    return math.floor(image_size / crop_pct)


def list_images(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand a folder (recursively, sorted), a text file of paths, or a list of files and folders.

    Raises:
        FileNotFoundError: Naming the first path that does not exist.
        ValueError: If no image file is found (the searched extensions are listed).
    """
    items: Sequence[str | os.PathLike]
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for item in items:
        p = os.fspath(item)
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} does not exist; give image files, folders of images or a .txt list")
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [
                    os.path.join(root, f)
                    for f in files
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                ]
            out += sorted(found)
        elif p.lower().endswith(".txt"):
            base = os.path.dirname(os.path.abspath(p))
            with open(p, encoding="utf-8") as f:
                listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            for entry in listed:
                full = entry if os.path.isabs(entry) else os.path.join(base, entry)
                if not os.path.isfile(full):
                    raise FileNotFoundError(f"{full} (listed in {p}) does not exist")
                out.append(full)
        else:
            out.append(p)
    if not out:
        where = os.fspath(items[0]) if len(items) == 1 else [os.fspath(i) for i in items]
        raise ValueError(
            f"no images found in {where}; searched recursively for {', '.join(IMAGE_EXTENSIONS)}"
        )
    return out
