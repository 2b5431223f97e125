"""Fashion-MNIST: idx-file reader, on-disk layout lookup and the subset embedded in the package."""

from __future__ import annotations

import functools
import gzip
import io
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dmpo_lightning.data.errors import DatasetLayoutError

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four idx files."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Class names in label order."""

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Base names of the four idx files (each may also carry a ``.gz`` suffix)."""

SUBSET_ASSET = "assets/fashion_mnist_subset.npz"
"""The embedded subset, relative to the ``dmpo_lightning.data`` package."""

SUBSET_SEED = 0
"""Seed of the class-balanced draw that made the embedded subset."""

SUBSET_TRAIN_PER_CLASS = 1000
SUBSET_TEST_PER_CLASS = 200

# idx type codes (http://yann.lecun.com/exdb/mnist/): only big-endian types are defined by the format.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class FashionMNISTArrays(NamedTuple):
    """Fashion-MNIST images ``[N, 28, 28]`` and labels ``[N]``, both uint8, for both splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (gzip-compressed or not; detected from its first bytes, not its name).

    Args:
        path: The file.

    Returns:
        The array in native byte order, with the shape the file's header declares.

    Raises:
        ValueError: If the header is not an idx header or the payload does not match it.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an idx file: expected a header of two zero bytes, a type code in "
            f"{sorted(hex(c) for c in _IDX_DTYPES)} and the number of dimensions, got {raw[:4]!r}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: the header declares shape {shape} ({expected} bytes of {dtype}) "
            f"but the file holds {len(raw) - header} bytes after the header"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_fashion_mnist_files(root: str | Path) -> dict[str, Path]:
    """Locate the four idx files under ``root``.

    Two layouts are recognised: the plain one (``root/train-images-idx3-ubyte.gz`` ..., as the Debian
    package installs them) and torchvision's (``root/FashionMNIST/raw/...``). Each file may be gzipped
    (``.gz``) or not.

    Args:
        root: The dataset folder.

    Returns:
        The path of each file, keyed as :data:`FASHION_MNIST_FILES`.

    Raises:
        DatasetLayoutError: If some file is missing in both layouts (the message lists what was looked for).
    """
    root = Path(root)
    for folder in (root, root / "FashionMNIST" / "raw"):
        found: dict[str, Path] = {}
        for key, base in FASHION_MNIST_FILES.items():
            for candidate in (folder / f"{base}.gz", folder / base):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    names = ", ".join(f"{base}[.gz]" for base in FASHION_MNIST_FILES.values())
    raise DatasetLayoutError(
        f"Fashion-MNIST not found under root={str(root)!r}: expected the idx files {names} either "
        f"directly in {root} (the layout of the Debian package dataset-fashion-mnist) or in "
        f"{root / 'FashionMNIST' / 'raw'} (torchvision's layout; download=True creates it)"
    )


def load_fashion_mnist(root: str | Path) -> FashionMNISTArrays:
    """Read the full Fashion-MNIST (60,000 train / 10,000 test images) from idx files under ``root``.

    Args:
        root: The dataset folder (see :func:`find_fashion_mnist_files` for the layouts).

    Returns:
        The images and labels of both splits.

    Raises:
        DatasetLayoutError: If files are missing.
        ValueError: If a file is malformed or images and labels disagree in number.
    """
    files = find_fashion_mnist_files(root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split} split under {root}: expected images [N, H, W] and labels [N], "
                f"got {images.shape} ({files[f'{split}_images']}) and {labels.shape} "
                f"({files[f'{split}_labels']})"
            )
    return FashionMNISTArrays(
        **{key: arrays[key].astype(np.uint8, copy=False) for key in FASHION_MNIST_FILES}
    )


def class_balanced_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Draw ``per_class`` indices of every class without replacement, reproducibly.

    Args:
        labels: Integer labels ``[N]``.
        per_class: How many indices to draw from each class.
        seed: Seed of the numpy generator; classes are visited in increasing label order.

    Returns:
        The drawn indices, sorted increasingly.

    Raises:
        ValueError: If a class has fewer than ``per_class`` samples.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ValueError(f"class {cls} has {len(members)} samples, fewer than per_class={per_class}")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def make_subset(
    arrays: FashionMNISTArrays,
    train_per_class: int = SUBSET_TRAIN_PER_CLASS,
    test_per_class: int = SUBSET_TEST_PER_CLASS,
    seed: int = SUBSET_SEED,
) -> dict[str, np.ndarray]:
    """Select the class-balanced subset that is embedded in the package.

    Args:
        arrays: The full dataset.
        train_per_class: Training images per class.
        test_per_class: Test images per class.
        seed: Seed of the draw (the test draw uses ``seed + 1``).

    Returns:
        Arrays to save with :func:`numpy.savez_compressed`: ``train_images``, ``train_labels``,
        ``test_images``, ``test_labels`` (uint8) and ``train_source_indices``, ``test_source_indices``
        (int32 positions in the full splits, for provenance).
    """
    train_idx = class_balanced_indices(arrays.train_labels, train_per_class, seed)
    test_idx = class_balanced_indices(arrays.test_labels, test_per_class, seed + 1)
    return {
        "train_images": arrays.train_images[train_idx],
        "train_labels": arrays.train_labels[train_idx],
        "test_images": arrays.test_images[test_idx],
        "test_labels": arrays.test_labels[test_idx],
        "train_source_indices": train_idx.astype(np.int32),
        "test_source_indices": test_idx.astype(np.int32),
    }


@functools.lru_cache(maxsize=1)
def load_fashion_mnist_subset() -> FashionMNISTArrays:
    """Load the embedded subset (10,000 train / 2,000 test images, class-balanced).

    The arrays are cached and read-only; copy them before modifying.

    Returns:
        The images and labels of both splits.
    """
    blob = resources.files("dmpo_lightning.data").joinpath(SUBSET_ASSET).read_bytes()
    with np.load(io.BytesIO(blob)) as npz:
        arrays = FashionMNISTArrays(*(npz[key] for key in FASHION_MNIST_FILES))
    for array in arrays:
        array.flags.writeable = False
    return arrays


def default_root() -> Path | None:
    """The Debian package's folder if it holds the files, else ``None``."""
    try:
        find_fashion_mnist_files(DEBIAN_FASHION_MNIST_DIR)
    except DatasetLayoutError:
        return None
    return DEBIAN_FASHION_MNIST_DIR


def indices_outside_subset(split: str, total: int) -> np.ndarray:
    """Positions in a full Fashion-MNIST split of the images that are *not* in the embedded subset.

    Read from the subset's own provenance arrays (``train_source_indices``/``test_source_indices``), so the
    exclusion is exact, by index. Used to pre-train the packaged toy trunk on images the quickstart never
    tunes or tests on.

    Args:
        split: ``train`` or ``test``.
        total: Number of images of that split in the full dataset (60,000 / 10,000).

    Returns:
        The sorted int64 indices in ``range(total)`` that the subset does not hold.

    Raises:
        ValueError: If ``split`` is unknown or the subset holds an index outside ``range(total)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    blob = resources.files("dmpo_lightning.data").joinpath(SUBSET_ASSET).read_bytes()
    with np.load(io.BytesIO(blob)) as npz:
        taken = npz[f"{split}_source_indices"].astype(np.int64)
    if taken.size and (taken.min() < 0 or taken.max() >= total):
        raise ValueError(
            f"the embedded subset's {split} indices reach {int(taken.max())}, outside a {split} split of "
            f"{total} images: pass the size of the full split (60000 train / 10000 test)"
        )
    return np.setdiff1d(np.arange(total, dtype=np.int64), taken)
