"""Dataset classes that return ``(PIL image, int label)``: in-memory arrays, image files, synthetic images.

Transforms and the batch dictionary are added by :class:`~dmpo_lightning.data.datamodule.BenchmarkDataModule`,
so these classes stay plain and picklable (DataLoader workers receive copies).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from dmpo_lightning.constants import IMAGE_KEY, INDEX_KEY, LABEL_KEY, SPLIT_KEY
from dmpo_lightning.data.errors import DatasetLayoutError, UnreadableImageError
from dmpo_lightning.images import ImageError, decode_image


class DatasetSplits(NamedTuple):
    """The splits a dataset provides; ``val`` is ``None`` when it has no validation split of its own."""

    train: Dataset
    test: Dataset
    val: Dataset | None = None


class ArrayImageDataset(Dataset):
    """Images held in a uint8 array ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB), with labels ``[N]``.

    Args:
        images: The images.
        labels: Integer labels, one per image.
        classes: Class names in label order, if known.

    Raises:
        ValueError: If the shapes or dtype are not as described.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str] | None = None) -> None:
        if (
            images.dtype != np.uint8
            or images.ndim not in (3, 4)
            or (images.ndim == 4 and images.shape[3] != 3)
        ):
            raise ValueError(
                f"images must be uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N] with N = {len(images)} images, got shape {labels.shape}")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.classes = tuple(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


def load_image(path: str) -> Image.Image:
    """An image file as a grey (``L``) or ``RGB`` PIL image (:func:`dmpo_lightning.images.decode_image`).

    The one decoder of training and prediction: other modes converted to RGB, 16-bit and float images scaled
    to 8 bit (not clipped), images with NaN or infinite pixels or over ``DEFAULT_MAX_PIXELS`` refused.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        UnreadableImageError: Naming the file and the reason, if it cannot be used.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        return decode_image(path).image
    except ImageError as err:
        raise UnreadableImageError(
            f"cannot read image file {path} ({err}); replace or remove it, or set the data module's "
            "skip_unreadable_images=true to leave unreadable files out"
        ) from err


class ImageListDataset(Dataset):
    """Image files read on demand, given their paths and labels.

    Paths are kept in one byte buffer with offsets rather than a list of ``str``: DataLoader workers
    touching a million Python objects copy their pages (reference counts), which grows memory per
    worker on ImageNet-sized lists; numpy buffers are shared.

    Args:
        paths: The image files.
        labels: Integer labels, one per file.
        classes: Class names in label order, if known.

    Raises:
        ValueError: If paths and labels differ in number.
    """

    def __init__(
        self, paths: Sequence[str | Path], labels: Sequence[int], classes: Sequence[str] | None = None
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} image paths but {len(labels)} labels")
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.cumsum([0, *(len(e) for e in encoded)], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes) if classes is not None else None

    def path(self, index: int) -> str:
        """The file of sample ``index``."""
        return os.fsdecode(self._buffer[self._offsets[index] : self._offsets[index + 1]].tobytes())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_image(self.path(index)), int(self.labels[index])

    def without_unreadable(self, workers: int = 1) -> tuple[ImageListDataset, list[str]]:
        """A copy without the files :func:`load_image` cannot decode, and the paths left out.

        Decodes every image once (in ``workers`` threads), so it costs about one pass over the files.
        """

        def readable(i: int) -> bool:
            try:
                load_image(self.path(i))
            except UnreadableImageError:
                return False
            return True

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            ok = list(pool.map(readable, range(len(self))))
        if all(ok):
            return self, []
        keep = [i for i, good in enumerate(ok) if good]
        dropped = [self.path(i) for i, good in enumerate(ok) if not good]
        kept = ImageListDataset([self.path(i) for i in keep], self.labels[keep].tolist(), self.classes)
        return kept, dropped


def list_class_folders(directory: Path) -> list[str]:
    """Sorted names of the sub-folders of ``directory`` (hidden ones skipped).

    Raises:
        DatasetLayoutError: If ``directory`` is missing or has no sub-folder.
    """
    if not directory.is_dir():
        raise DatasetLayoutError(
            f"expected the folder {directory} with one sub-folder per class; it does not exist"
        )
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetLayoutError(f"expected one sub-folder per class in {directory}; found none")
    return classes


def scan_class_folders(
    directory: Path, classes: Sequence[str], allow_missing: bool = False
) -> ImageListDataset:
    """Index ``directory/<class>/**/<image>`` with a fixed class list (label = position in ``classes``).

    Using the training split's class list for every split keeps labels aligned even when a class folder
    is missing from an evaluation split.

    Args:
        directory: The split folder.
        classes: Class names in label order.
        allow_missing: Whether a class folder may be absent or empty (allowed for evaluation splits).

    Returns:
        The dataset, samples sorted by class then path.

    Raises:
        DatasetLayoutError: If a class folder holds no image (unless allowed) or a folder is not a class.
    """
    known = set(classes)
    extra = sorted(set(list_class_folders(directory)) - known)
    if extra:
        raise DatasetLayoutError(
            f"{directory} has class folders that the training split lacks: {extra[:10]}"
            f"{' ...' if len(extra) > 10 else ''}; every split must use the training split's classes"
        )
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(directory / name, followlinks=True):
            found.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS))
        if not found:
            empty.append(name)
        paths.extend(sorted(found))
        labels.extend([label] * len(found))
    if empty and not allow_missing:
        raise DatasetLayoutError(
            f"no image files ({', '.join(IMG_EXTENSIONS)}) found for classes {empty[:10]}"
            f"{' ...' if len(empty) > 10 else ''} under {directory}"
        )
    if not paths:
        raise DatasetLayoutError(f"no image files ({', '.join(IMG_EXTENSIONS)}) found under {directory}")
    return ImageListDataset(paths, labels, classes)


class SyntheticImageDataset(Dataset):
    """Deterministic random images whose mean colour depends on the class (so a model can learn them).

    Sample ``i`` is generated from ``(seed, split_id, i)`` alone, so it is the same in every process and
    worker, and no file is ever read.

    Args:
        length: Number of samples.
        num_classes: Number of classes; label of sample ``i`` is ``i % num_classes``.
        image_size: Height and width in pixels.
        channels: 1 (grey) or 3 (RGB).
        seed: Base seed.
        split_id: Distinguishes the splits (0 train, 1 test).

    Raises:
        ValueError: If a size is not positive or ``channels`` is not 1 or 3.
    """

    def __init__(
        self,
        length: int,
        num_classes: int,
        image_size: int,
        channels: int = 3,
        seed: int = 0,
        split_id: int = 0,
    ) -> None:
        if length < 1 or num_classes < 1 or image_size < 1:
            raise ValueError(
                f"synthetic dataset sizes must be positive, got length={length}, "
                f"num_classes={num_classes}, image_size={image_size}"
            )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.length, self.num_classes, self.image_size = length, num_classes, image_size
        self.channels, self.seed, self.split_id = channels, seed, split_id
        palette_rng = np.random.default_rng([seed, 1_000_003])
        self.palette = palette_rng.integers(40, 216, size=(num_classes, channels))
        self.classes = tuple(f"class_{c}" for c in range(num_classes))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a synthetic split of length {self.length}")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, self.split_id, index])
        noise = rng.integers(-40, 41, size=(self.image_size, self.image_size, self.channels))
        pixels = np.clip(self.palette[label] + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels[..., 0] if self.channels == 1 else pixels), label


class SplitView(Dataset):
    """A split of a base dataset with its transform, yielding the batch dictionary.

    Items are ``{IMAGE_KEY: transform(image), LABEL_KEY: label, INDEX_KEY: position in this split}``;
    position ``i`` of a view with ``indices`` is base sample ``indices[i]``.

    Args:
        base: Dataset returning ``(PIL image, label)``.
        indices: Which base samples form the split (``None``: all of them, in order).
        transform: PIL image -> tensor.
        split: The split's name; if given, every item also holds ``SPLIT_KEY: split``.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | None,
        transform: Callable[[Image.Image], torch.Tensor],
        split: str | None = None,
    ) -> None:
        self.base = base
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = int(self.indices[index]) if self.indices is not None else index
        image, label = self.base[source]
        item = {IMAGE_KEY: self.transform(image), LABEL_KEY: label, INDEX_KEY: index}
        if self.split is not None:
            item[SPLIT_KEY] = self.split
        return item


class SplitTagged(Dataset):
    """Wrap a dataset of batch dictionaries so every item names its split (``SPLIT_KEY: split``).

    ``DMPOModule.test_step`` identifies the test and calibration loaders by this tag, so a custom data
    module's ``test_dataloader`` can return ``[DataLoader(SplitTagged(test, "test")),
    DataLoader(SplitTagged(cal, "calibration"))]`` in any order.

    Args:
        dataset: Items are dicts with at least ``IMAGE_KEY``, ``LABEL_KEY`` and ``INDEX_KEY``.
        split: ``"train"``, ``"calibration"`` or ``"test"``.

    Raises:
        ValueError: For another split name.
    """

    def __init__(self, dataset: Dataset, split: str) -> None:
        if split not in ("train", "calibration", "test"):
            raise ValueError(f"split must be 'train', 'calibration' or 'test', got {split!r}")
        self.dataset = dataset
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item[SPLIT_KEY] = self.split
        return item
