"""The one image decoder and image lister: `dmpo predict`, the predictor, the server and the datasets.

:func:`decode_image` turns a file of any mode PIL reads into an 8-bit grey (``L``) or ``RGB`` PIL image in
the range the models were trained on, or refuses it with one sentence (:class:`ImageError`):

- ``L`` and ``RGB`` are kept; ``1`` (bilevel) becomes ``L``; palette, alpha, CMYK, YCbCr... become ``RGB``
  (alpha dropped, palettes expanded), as the training images are;
- 16-bit grey (``I;16``, PNG and TIFF) is scaled to 8 bit (``v / 257``, 65535 -> 255), not clipped; 32-bit
  integer grey (``I``) holding 0..65535 is read as 16-bit, other values are refused;
- 32-bit float grey (``F``, TIFF) must hold values in [0, 1] (the float convention) and is scaled by 255;
  other ranges are refused with the range found, and NaN or infinite pixels are refused with their count
  (a prediction on them would be meaningless);
- a file whose header says it has more than ``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS`) is
  refused before it is decoded.

Imports only the standard library, numpy and PIL (no torch, no Lightning).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "ImageError",
    "ImageSizeError",
    "check_exact_size",
    "check_max_pixels",
    "decode_image",
    "list_images",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)
"""File endings read from a folder (compared case-insensitively)."""

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest image decoded by default (67.1 megapixels, e.g. 8192 x 8192); larger files are refused from
their header. A decoded 8192 x 8192 RGB image takes 201 MB."""

MAX_LISTED = 5
"""How many missing files an error message names."""

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_KEPT = ("L", "RGB")


class ImageError(ValueError):
    """An image file that cannot be used: unreadable, too large, or with pixels outside the allowed range."""


class ImageSizeError(ImageError):
    """An image the model cannot take as trained (a small-image model used without resizing)."""


def check_exact_size(image: Image.Image, size: int) -> None:
    """Refuse an image that is not ``size`` x ``size`` px, for models whose preprocessing does not resize.

    Raises:
        ImageSizeError: Naming both sizes.
    """
    if image.size != (size, size):
        raise ImageSizeError(
            f"image is {image.size[0]}x{image.size[1]} px but this model was trained on {size}x{size} images "
            f"used as they are (no resizing in its preprocessing); resize it to {size}x{size} first"
        )


class DecodedImage(NamedTuple):
    """What :func:`decode_image` returns.

    Attributes:
        image: An ``L`` or ``RGB`` PIL image of 8-bit pixels.
        source_mode: The file's own PIL mode (``"RGBA"``, ``"I;16"``, ``"F"``...).
    """

    image: Image.Image
    source_mode: str


def check_max_pixels(max_pixels: int, option: str = "max_pixels") -> int:
    """``max_pixels`` if it is a positive integer.

    Raises:
        ValueError: Otherwise, naming ``option`` (the setting as the user writes it).
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"{option} must be a positive integer (a pixel count), got {max_pixels!r}")
    return max_pixels


def _scaled_16bit(values: np.ndarray, mode: str) -> Image.Image:
    if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageError(
            f"the image holds 32-bit integer pixels from {values.min()} to {values.max()}; integer images "
            "must hold 8-bit (0-255) or 16-bit (0-65535) values; convert it to an 8- or 16-bit image"
        )
    eight = np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    return Image.fromarray(eight, mode="L")


def _scaled_float(values: np.ndarray) -> Image.Image:
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ImageError(
            f"the image has {bad} of {values.size} pixels that are not finite numbers (NaN or infinity); "
            "only finite pixel values can be predicted"
        )
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0.0 or high > 1.0:
        raise ImageError(
            f"the image holds 32-bit float pixels from {low:g} to {high:g}; float images must hold values "
            "in [0, 1] (scaled to 0-255 like the 8-bit training images); scale it to [0, 1] or save it as "
            "an 8- or 16-bit image"
        )
    eight = np.rint(values.astype(np.float64) * 255.0).astype(np.uint8)
    return Image.fromarray(eight, mode="L")


def _as_training_mode(opened: Image.Image) -> Image.Image:
    mode = opened.mode
    if mode in _KEPT:
        return opened.copy()
    if mode == "1":
        return opened.convert("L")
    if mode in _SIXTEEN_BIT or mode == "I":
        return _scaled_16bit(np.asarray(opened), mode)
    if mode == "F":
        return _scaled_float(np.asarray(opened, dtype=np.float32))
    return opened.convert("RGB")


def decode_image(
    path: str | os.PathLike[str] | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, option: str = "max_pixels"
) -> DecodedImage:
    """Read an image file as an 8-bit ``L`` or ``RGB`` PIL image in the training range (see the module).

    Args:
        path: The image file, or its content as ``bytes`` (an upload to the server).
        max_pixels: Refuse files whose header gives more pixels than this, before decoding them.
        option: How the too-large message names the limit (the setting as the user writes it).

    Raises:
        ImageError: With one sentence (no exception type name) if the file is missing, not an image,
            truncated, larger than ``max_pixels``, or holds pixels outside the allowed range.
    """
    limit = check_max_pixels(max_pixels, option)
    name = "the upload" if isinstance(path, bytes) else os.fspath(path)
    source = io.BytesIO(path) if isinstance(path, bytes) else name
    try:
        with warnings.catch_warnings():
            # our own limit is checked below; PIL's warning threshold (89 MP) would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                width, height = opened.size
                if width * height > limit:
                    raise ImageError(
                        f"the image is {width}x{height} px = {width * height:,} pixels, more than the limit "
                        f"of {limit:,} pixels; shrink it first or raise {option}"
                    )
                opened.load()
                mode = opened.mode
                image = _as_training_mode(opened)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{name} is a folder, not an image file") from None
    except Image.DecompressionBombError as err:
        raise ImageError(
            f"the image is larger than PIL decodes ({' '.join(str(err).split())}); shrink it first"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # what PIL raises for broken files
        message = " ".join(str(err).split()) or "no details"
        raise ImageError(f"the file is not a readable image ({message})") from None
    return DecodedImage(image, mode)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(folder: Path, what: str) -> list[str]:
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
            f"{what}: folder {str(folder)!r} holds no image files (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}, any letter case; hidden files and folders are skipped)"
        )
    return sorted(found)


def _read_list(list_file: Path, what: str) -> list[str]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"{what}: {str(list_file)!r} is neither a folder, an image ({', '.join(IMAGE_EXTENSIONS)}) nor a "
            "UTF-8 text file of image paths (one per line)"
        ) from None
    base = list_file.parent
    entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise ValueError(
            f"{what}: list {str(list_file)!r} names no image (one path per line; blank lines and lines "
            "starting with # are skipped)"
        )
    paths = [os.path.abspath(os.path.join(base, os.path.expanduser(e))) for e in entries]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        raise FileNotFoundError(
            f"{what}: list {str(list_file)!r} names {len(missing)} of {len(paths)} files that do not "
            f"exist (relative paths are read from the list's folder): {shown}"
        )
    return paths


def _list_one(source: str | os.PathLike[str], what: str) -> list[str]:
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_dir():
        return _scan_folder(path, what)
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: {str(path)!r} does not exist; give a folder of images, an image file or a text file "
            "with one image path per line"
        )
    if _is_image_name(path.name):
        return [os.path.abspath(path)]
    return _read_list(path, what)


def list_images(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, what: str = "images"
) -> list[str]:
    """The image files to predict, as absolute paths (symbolic links are not resolved).

    Args:
        sources: One or several of: a folder (searched recursively for :data:`IMAGE_EXTENSIONS`, any letter
            case; hidden files and folders skipped; sorted by path), an image file, or a UTF-8 text file
            with one path per line (relative to the text file's folder; blank lines and ``#`` comments
            skipped; order kept). Several sources are listed one after the other.
        what: How error messages name the sources (the option as the user writes it).

    Raises:
        FileNotFoundError: If a source or a listed file does not exist (the first few are named).
        ValueError: If a folder holds no image, a list names none, or no source is given.
    """
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise ValueError(f"{what}: no image, folder or list given")
    return [p for item in items for p in _list_one(item, what)]
