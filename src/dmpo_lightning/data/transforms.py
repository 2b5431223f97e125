"""Train and evaluation transforms, configured from a timm model's pretrained data config.

Two regimes:

* **Resized** (the usual ViT setting, e.g. CIFAR upsampled to 224 px, or any natural-image dataset):
  train = ``RandomResizedCrop(image_size)`` + horizontal flip; eval = ``Resize(floor(image_size /
  crop_pct))`` + ``CenterCrop(image_size)``, exactly as timm's ``transforms_imagenet_eval``
  (``resize_mode="center_crop"``), or ``Resize((image_size, image_size))``, the whole image squashed to the
  input size without keeping its aspect ratio (``resize_mode="squash"``, the VTAB-1k protocol).
* **Native small** (a 28 / 32 px dataset used at its own size): train = ``RandomCrop(image_size,
  padding=4)`` + horizontal flip, the standard CIFAR recipe; eval = the image as it is. A random-resized
  crop of a 32 px image kept at 32 px throws away too much, and a centre crop would cut the border of
  every test image, so neither is used here.

Both end with ``ToTensor`` and ``Normalize(mean, std)``. Channels are set first: grey images are
replicated to RGB when the model takes 3 channels, RGB images are converted to grey (ITU-R 601-2 luma,
PIL's ``convert("L")``) when it takes 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torchvision.transforms as T
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import resolve_data_config as timm_resolve
from timm.models import load_model_config_from_hf, parse_model_name

Interpolation = Literal["nearest", "bilinear", "bicubic"]
"""Resize interpolation modes accepted by the DataModule."""

ResizeMode = Literal["center_crop", "squash"]
"""How the evaluation transform sizes an image: ``center_crop`` (shorter side to ``image_size / crop_pct``,
then a centre crop; timm's rule) or ``squash`` (both sides to ``image_size``; nothing is cut off)."""

NATIVE_SMALL_MAX_SIZE = 64
"""Datasets whose images are at most this many pixels wide, used at that size, get the small-image recipe."""

SMALL_IMAGE_PADDING = 4
"""Padding of ``RandomCrop`` in the small-image recipe (the CIFAR standard)."""

_INTERPOLATIONS = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class DataConfig:
    """Resolved preprocessing settings.

    Attributes:
        image_size: Side of the square model input.
        mean: Per-channel mean, one value per model input channel.
        std: Per-channel standard deviation, one value per model input channel.
        interpolation: Resize interpolation.
        crop_pct: Centre-crop fraction of the evaluation transform.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float


def timm_data_config(model_name: str) -> dict[str, Any]:
    """A timm model's data config read from its registered pretrained config, without building it.

    Registry names read timm's metadata (nothing is downloaded). ``hf-hub:<owner>/<repo>`` names read the
    repo's ``config.json`` from the local Hugging Face cache, else (``timm/`` repos) timm's registry entry
    of the same name, else fetch that ``config.json`` (a few kB; the model build fetches it anyway).
    ``local-dir:<folder>`` names read ``<folder>/config.json``.

    Args:
        model_name: A timm model name, optionally with a pretrained tag, e.g.
            ``vit_base_patch16_224.augreg_in21k``, or an ``hf-hub:`` / ``local-dir:`` name.

    Returns:
        ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct`` and ``crop_mode``.

    Raises:
        ValueError: If timm has no pretrained config for the name.
    """
    cfg = _source_pretrained_cfg(model_name)
    if cfg is None:
        try:
            registered = timm.get_pretrained_cfg(model_name, allow_unregistered=False)
        except RuntimeError:
            registered = None
        cfg = registered.to_dict() if registered is not None else None
    if cfg is None:
        raise ValueError(
            f"timm_model={model_name!r}: timm {timm.__version__} has no pretrained config for this name, so "
            "mean/std/image size cannot be read from it; use a registered name (timm.list_pretrained()) or "
            "leave timm_model unset and pass image_size, mean, std, interpolation and crop_pct"
        )
    return timm_resolve(pretrained_cfg=cfg)


def _source_pretrained_cfg(model_name: str) -> dict[str, Any] | None:
    """The pretrained config of an ``hf-hub:`` or ``local-dir:`` name (``None`` for registry names)."""
    try:
        source, model_id = parse_model_name(model_name)
    except ValueError:
        return None
    if source == "local-dir":
        path = os.path.join(os.path.expanduser(model_id), "config.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            found = json.load(f).get("pretrained_cfg")
        return found if isinstance(found, dict) else None
    if source != "hf-hub":
        return None

    repo, _, revision = model_id.partition("@")
    cached = try_to_load_from_cache(repo, "config.json", revision=revision or None)
    if isinstance(cached, str):
        with open(cached, encoding="utf-8") as f:
            found = json.load(f).get("pretrained_cfg")
        if isinstance(found, dict):
            return found
    owner, _, name = repo.partition("/")
    registered = timm.get_pretrained_cfg(name) if owner == "timm" and timm.list_pretrained(name) else None
    if registered is not None:
        return registered.to_dict()
    try:
        return dict(load_model_config_from_hf(model_id)[0])
    except Exception as err:  # offline and not cached, no such repo: the backbone check words it
        if type(err).__module__.startswith("huggingface_hub"):
            return None
        raise


def _per_channel(values: Sequence[float], in_chans: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if len(values) == 3 and in_chans == 1:
        return (sum(values) / 3,)
    raise ValueError(f"{name} must have 1 or in_chans={in_chans} values, got {len(values)}: {values}")


def resolve_data_config(
    *,
    in_chans: int,
    default_image_size: int,
    timm_model: str | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> DataConfig:
    """Combine explicit values, a timm model's config and the dataset default, in that priority.

    Without a timm model, mean/std are timm's ImageNet defaults, interpolation is bilinear and crop_pct
    is timm's default (0.875).

    Args:
        in_chans: Model input channels (1 or 3); mean/std are adapted to it.
        default_image_size: The dataset's default size, used when nothing else sets one.
        timm_model: A timm model name whose pretrained config supplies the defaults.
        image_size: Explicit model input size.
        mean: Explicit mean.
        std: Explicit standard deviation.
        interpolation: Explicit interpolation (``nearest``, ``bilinear``, ``bicubic``).
        crop_pct: Explicit centre-crop fraction in (0, 1].

    Returns:
        The resolved configuration.

    Raises:
        ValueError: If a value is out of range or the timm model is unknown.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    base: dict[str, Any] = {
        "input_size": (3, default_image_size, default_image_size),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "interpolation": "bilinear",
        "crop_pct": DEFAULT_CROP_PCT,
    }
    if timm_model is not None:
        base.update(timm_data_config(timm_model))
    size = image_size if image_size is not None else int(base["input_size"][-1])
    interp = interpolation if interpolation is not None else str(base["interpolation"])
    pct = float(crop_pct if crop_pct is not None else base["crop_pct"])
    if size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {size}")
    if interp not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interp!r}")
    if not 0 < pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {pct}")
    cfg_std = _per_channel(std if std is not None else base["std"], in_chans, "std")
    if any(s <= 0 for s in cfg_std):
        raise ValueError(f"std values must be positive, got {cfg_std}")
    cfg_mean = _per_channel(mean if mean is not None else base["mean"], in_chans, "mean")
    return DataConfig(size, cfg_mean, cfg_std, interp, pct)


class ConvertMode:
    """Convert a PIL image to ``"L"`` or ``"RGB"`` (a picklable class, so DataLoader workers can copy it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return ``image`` in the target mode."""
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def is_native_small(cfg: DataConfig, native_size: int | None) -> bool:
    """Whether the small-image recipe applies (images used at their own size of at most 64 px)."""
    return native_size is not None and native_size == cfg.image_size and native_size <= NATIVE_SMALL_MAX_SIZE


def build_transform(
    cfg: DataConfig,
    *,
    in_chans: int,
    train: bool,
    native_size: int | None = None,
    resize_mode: ResizeMode = "center_crop",
) -> Callable[[Image.Image], Any]:
    """The train (augmenting) or evaluation transform, PIL image -> normalised float tensor ``[C, H, W]``.

    Args:
        cfg: Resolved settings.
        in_chans: Model input channels (1 or 3).
        train: Augmenting train transform if true, deterministic evaluation transform if false.
        native_size: The dataset's fixed image size, if any (selects the small-image recipe).
        resize_mode: The evaluation resize (``center_crop`` or ``squash``; see :data:`ResizeMode`).

    Returns:
        A ``torchvision.transforms.Compose``.

    Raises:
        ValueError: On an unknown ``resize_mode``.
    """
    if resize_mode not in ("center_crop", "squash"):
        raise ValueError(f"resize_mode must be 'center_crop' or 'squash', got {resize_mode!r}")
    steps: list[Callable[[Any], Any]] = [ConvertMode("L" if in_chans == 1 else "RGB")]
    size, interp = cfg.image_size, _INTERPOLATIONS[cfg.interpolation]
    if is_native_small(cfg, native_size):
        if train:
            steps += [T.RandomCrop(size, padding=SMALL_IMAGE_PADDING), T.RandomHorizontalFlip()]
    elif train:
        steps += [T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip()]
    elif resize_mode == "squash":
        steps += [T.Resize((size, size), interpolation=interp)]
    else:
        steps += [T.Resize(math.floor(size / cfg.crop_pct), interpolation=interp), T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)
