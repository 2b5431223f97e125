"""Image loading and the evaluation transform of a trained model, rebuilt from an artefact's manifest.

The steps are those of :func:`dmpo_lightning.data.transforms.build_transform` with ``train=False`` (a test
pins them equal): convert to the model's channels (grey images replicated to RGB, RGB converted to grey
with PIL's ITU-R 601-2 luma), then either ``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)``,
``Resize((size, size))`` (``crop_mode: squash``, VTAB-1k) or, for small datasets used at their own size, the
image as it is (which must then have exactly that size), then ``ToTensor`` and ``Normalize(mean, std)``.
Image files are decoded by :func:`dmpo_lightning.images.decode_image` (the one decoder of training and
prediction). Imports only PIL, torch and torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchvision.transforms as T
from PIL import Image

from dmpo_lightning.images import ImageSizeError, check_exact_size

__all__ = ["ImageSizeError", "build_eval_transform", "resize_for"]

_INTERPOLATIONS = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


def build_eval_transform(pre: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised ``[C, H, W]`` tensor, from an artefact's ``preprocessing`` entry."""
    channels, size = int(pre["input_size"][0]), int(pre["input_size"][-1])
    mode = "L" if channels == 1 else "RGB"
    resize: Any = pre.get("resize")
    steps: list[Callable[[Any], Any]] = []
    if pre.get("crop_mode") == "center":
        interp = _INTERPOLATIONS[pre["interpolation"]]
        steps += [T.Resize(int(resize), interpolation=interp), T.CenterCrop(size)]
    elif pre.get("crop_mode") == "squash":  # the whole image to size x size (VTAB-1k's protocol)
        steps += [T.Resize((size, size), interpolation=_INTERPOLATIONS[pre["interpolation"]])]
    steps += [T.ToTensor(), T.Normalize(pre["mean"], pre["std"])]
    tail = T.Compose(steps)
    native = pre.get("crop_mode") not in ("center", "squash")

    def transform(image: Image.Image) -> torch.Tensor:
        if native:
            check_exact_size(image, size)
        if image.mode != mode:
            image = image.convert(mode)
        return tail(image)

    return transform


def resize_for(image_size: int, crop_pct: float) -> int:
    """Shorter-side resize of the evaluation transform, ``floor(image_size / crop_pct)`` (timm's rule)."""
    return math.floor(image_size / crop_pct)
