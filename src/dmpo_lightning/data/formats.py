"""Readers of the on-disk formats users have.

Food-101, Flowers-102 and Stanford Cars are indexed by ``torchvision.datasets`` (its errors become ours);
the images are then read by :class:`ImageListDataset` like every other file-based split. The readers kept
here cover what torchvision does not read the way we need:

- CIFAR-10/100 python batches: torchvision unpickles them with plain ``pickle.load`` once their MD5 sums
  match the official release; ours uses a restricted unpickler instead (see :func:`load_cifar`).
- CUB-200-2011 (not in torchvision).
- The ImageNet train/val class-folder layout and generic class-folder trees: every split is labelled by
  the training split's class folders (torchvision's ``ImageNet`` needs the devkit archive, and
  ``ImageFolder`` labels each split by its own folders).

Each reader checks the layout first and raises :class:`DatasetLayoutError` naming the files or folders
it expected, and where. None of them downloads anything; the DataModule's ``prepare_data`` does.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.datasets as tvd
from torchvision.datasets.cifar import CIFAR10, CIFAR100
from torchvision.datasets.flowers102 import Flowers102
from torchvision.datasets.utils import check_integrity

from dmpo_lightning.data.datasets import (
    ArrayImageDataset,
    DatasetSplits,
    ImageListDataset,
    list_class_folders,
    scan_class_folders,
)
from dmpo_lightning.data.errors import DatasetLayoutError
from dmpo_lightning.data.fgvc import find_vpt_splits, load_vpt_splits
from dmpo_lightning.data.list_files import read_text_file


def cifar_layout(name: str) -> dict[str, Any]:
    """The files of ``name`` (``"cifar10"`` or ``"cifar100"``) as torchvision downloads them.

    The names come from ``torchvision.datasets.CIFAR10/100`` (``base_folder``, ``train_list``,
    ``test_list``, ``meta``), so what ``download=True`` fetches is what is read; only the reading is ours
    (see :func:`load_cifar`).
    """
    tv = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    return {
        "folder": tv.base_folder,
        "train": [file for file, _md5 in tv.train_list],
        "test": [file for file, _md5 in tv.test_list],
        "meta": (tv.meta["filename"], tv.meta["key"]),
        "label_key": "labels" if name == "cifar10" else "fine_labels",
    }


def _find_base(root: Path, folder: str, marker: str) -> Path:
    """``root/folder`` if it holds ``marker``; else ``root`` itself if it does (root given one level deep)."""
    if (root / folder / marker).exists() or not (root / marker).exists():
        return root / folder
    return root


def _require(base: Path, names: Sequence[str], what: str, root: Path) -> None:
    missing = [name for name in names if not (base / name).exists()]
    if missing:
        raise DatasetLayoutError(
            f"{what} not found under root={str(root)!r}: expected {', '.join(names)} in {base}; "
            f"missing: {', '.join(missing)}"
        )


def load_cifar(root: str | Path, name: str) -> DatasetSplits:
    """Read CIFAR-10 or CIFAR-100 from torchvision's python-pickle files (no checksum is verified).

    The batch files are Python pickles; they are read with a restricted unpickler that rebuilds only plain
    values and numpy arrays, so a crafted file is refused instead of running code.

    Why not ``torchvision.datasets.CIFAR10/100``: torchvision checks every batch file against the MD5 sum
    of the official release and then reads it with plain ``pickle.load``, which runs whatever code the
    file names. The check refuses a crafted file, but only because of the order of two steps inside
    torchvision's ``__init__`` (check, then re-open and unpickle), and the unpickling cannot be replaced
    without copying that ``__init__`` (it calls ``pickle.load`` inline, for the batches and for the meta
    file). Reading the batches ourselves keeps the protection in the unpickler itself, accepts
    re-packaged but well-formed batches, and checks their shapes with a clear message.
    (``download=True`` still uses torchvision, which verifies the archive's MD5.)

    Args:
        root: Folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (or that folder itself).
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).

    Returns:
        Train and test splits of 32x32 RGB images.

    Raises:
        DatasetLayoutError: If a batch file is missing.
        ValueError: If a batch does not hold ``[N, 3072]`` uint8 data with ``N`` labels, or names any Python
            object other than plain values and numpy arrays.
    """
    layout = cifar_layout(name)
    root = Path(root)
    base = _find_base(root, layout["folder"], layout["test"][0])
    _require(base, layout["train"] + layout["test"], name, root)
    meta_file, meta_key = layout["meta"]
    classes = None
    if (base / meta_file).is_file():
        classes = _unpickle(base / meta_file).get(meta_key)

    def read(files: list[str]) -> ArrayImageDataset:
        images, labels = [], []
        for file in files:
            batch = _unpickle(base / file)
            data = np.asarray(batch.get("data"))
            label = np.asarray(batch.get(layout["label_key"], []), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(label) != len(data):
                raise ValueError(
                    f"{base / file}: expected 'data' uint8 [N, 3072] and '{layout['label_key']}' (N), "
                    f"got data {data.dtype} {data.shape} and {len(label)} labels"
                )
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(label)
        return ArrayImageDataset(
            np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes
        )

    return DatasetSplits(read(layout["train"]), read(layout["test"]))


# What CIFAR's python batch files need beyond plain values: numpy arrays (rebuilt from bytes, nothing called
# that the file chooses). Under numpy 2, ``numpy.core`` names resolve to ``numpy._core``.
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain values and numpy arrays only; any other global the file names is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


def _unpickle(path: Path) -> dict[str, Any]:
    # CIFAR's python version *is* a set of pickles. They are read with a restricted unpickler (plain values
    # and numpy arrays), so a crafted file cannot run code (docs/security.md).
    try:
        with open(path, "rb") as f:
            data = _CifarUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} was not loaded: {err}; a CIFAR python batch holds only plain values and numpy arrays, "
            "so this file is corrupt or crafted (nothing in it was executed)"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a CIFAR batch (a dict), got {type(data).__name__}")
    return data


def load_cub200(root: str | Path) -> DatasetSplits:
    """Read CUB-200-2011: the official train/test split, or VPT's splits if their files are there.

    Layout: ``root/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, images/...}``;
    ``classes.txt`` is optional (class names). With VPT's ``train.json``, ``val.json`` and ``test.json`` in
    that folder (:mod:`dmpo_lightning.data.fgvc`), train / validation / test follow them (5,394 / 600 /
    5,794).

    Args:
        root: Folder holding ``CUB_200_2011`` (or that folder itself).

    Returns:
        The official train and test splits (or VPT's train, test and validation splits); labels are 0-based.

    Raises:
        DatasetLayoutError: If a file is missing or the three lists disagree on the image ids.
    """
    root = Path(root)
    base = _find_base(root, "CUB_200_2011", "images")
    if find_vpt_splits(base, "CUB-200-2011") and (base / "images").is_dir():
        return load_vpt_splits(base, base / "images", "CUB-200-2011")
    names = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "images"]
    _require(base, names, "CUB-200-2011", root)
    images = _read_id_table(base / "images.txt")
    labels = _read_id_table(base / "image_class_labels.txt")
    is_train = _read_id_table(base / "train_test_split.txt")
    if not (images.keys() == labels.keys() == is_train.keys()):
        raise DatasetLayoutError(
            f"CUB-200-2011 under {base}: images.txt, image_class_labels.txt and train_test_split.txt "
            f"must list the same image ids ({len(images)}, {len(labels)} and {len(is_train)} ids found)"
        )
    classes = None
    if (base / "classes.txt").is_file():
        table = _read_id_table(base / "classes.txt")
        classes = [table[k] for k in sorted(table)]
    splits: dict[bool, tuple[list[Path], list[int]]] = {True: ([], []), False: ([], [])}
    for image_id in sorted(images):
        paths, targets = splits[is_train[image_id] == "1"]
        paths.append(base / "images" / images[image_id])
        targets.append(int(labels[image_id]) - 1)
    return DatasetSplits(ImageListDataset(*splits[True], classes), ImageListDataset(*splits[False], classes))


def _read_id_table(path: Path) -> dict[int, str]:
    """``<id> <value>`` per line -> ``{id: value}``."""
    table: dict[int, str] = {}
    text = read_text_file(path, "CUB-200-2011 file", "a text file of '<integer id> <value>' lines")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise DatasetLayoutError(f"{path}, line {number}: expected '<integer id> <value>', got {line!r}")
        table[int(key)] = value.strip()
    return table


def _require_scipy(what: str) -> None:
    """Raise our ImportError if scipy (which torchvision needs for the .mat label files) is missing."""
    try:
        import scipy.io  # noqa: F401  (imported lazily: a check that the .mat reader is there)
    except ImportError as error:
        raise ImportError(
            f"reading {what} (MATLAB .mat labels) needs scipy, which is not installed: pip install scipy"
        ) from error


FLOWERS102_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"


def load_flowers102(root: str | Path) -> DatasetSplits:
    """Read Oxford Flowers-102 with ``torchvision.datasets.Flowers102`` (needs scipy).

    Layout: ``root/flowers-102/{jpg/image_00001.jpg ..., imagelabels.mat, setid.mat}``. Train, validation
    and test follow ``setid.mat`` (``trnid``, ``valid``, ``tstid``) in its order. torchvision checks the
    two ``.mat`` files against the MD5 sums of the official release, so a corrupt or edited one is refused.

    Args:
        root: Folder holding ``flowers-102`` (or that folder itself).

    Returns:
        Train, test and validation splits; labels are 0-based, class names are torchvision's.

    Raises:
        DatasetLayoutError: If a file is missing, or a ``.mat`` file is not the official one.
        ImportError: If scipy is not installed.
    """
    root = Path(root)
    parent = _torchvision_base(root, "flowers-102", "imagelabels.mat", "Flowers102")
    base = parent / "flowers-102"
    _require(base, ["jpg", "imagelabels.mat", "setid.mat"], "Flowers102", root)
    _require_scipy("Flowers102")
    layout = "root/flowers-102/{jpg/image_00001.jpg ..., imagelabels.mat, setid.mat}"

    def split(name: str) -> ImageListDataset:
        # every file is there (checked above), so torchvision's "not found or corrupted" means its MD5 check
        tv = _torchvision_split(
            "Flowers102", parent, name, "Flowers102", layout, lambda: _flowers102_checksum_message(base)
        )
        return ImageListDataset(list(tv._image_files), list(tv._labels), getattr(tv, "classes", None))

    return DatasetSplits(split("train"), split("test"), split("val"))


def _flowers102_checksum_message(base: Path) -> str:
    """Which of Flowers-102's ``.mat`` files fails torchvision's MD5 check, and what to do."""
    md5 = dict(getattr(Flowers102, "_file_dict", {}).values())  # file name -> MD5 of the official file
    bad = [
        n for n in ("imagelabels.mat", "setid.mat") if n in md5 and not check_integrity(str(base / n), md5[n])
    ]
    files = " and ".join(bad) or "imagelabels.mat or setid.mat"
    verb, pronoun, them = ("do", "they are", "them") if len(bad) > 1 else ("does", "it is", "it")
    return (
        f"Flowers102 under {base}: {files} {verb} not match the official release (torchvision checks the "
        f"MD5 sums of imagelabels.mat and setid.mat), so {pronoun} corrupt or edited; download {them} again "
        f"from {FLOWERS102_URL} (download=true makes torchvision replace {them} there)"
    )


def _torchvision_base(root: Path, folder: str, marker: str, what: str) -> Path:
    """The parent torchvision expects (``<parent>/<folder>/...``), accepting ``root`` one level deep."""
    base = _find_base(root, folder, marker)
    if base.name != folder:
        raise DatasetLayoutError(
            f"{what}: torchvision reads <root>/{folder}/...; root={str(root)!r} holds {marker} itself but is "
            f"named {base.name!r}; pass its parent as root with the folder named {folder!r}"
        )
    return base.parent


def _torchvision_split(
    cls_name: str,
    parent: Path,
    split: str,
    what: str,
    layout: str,
    corrupted: Callable[[], str] | None = None,
) -> Any:
    """``torchvision.datasets.<cls_name>(parent, split=split)``, its errors turned into ours.

    torchvision raises ``RuntimeError`` for files it does not find or whose checksum differs; with every file
    already checked present, ``corrupted()`` (if given) words the checksum case.
    """
    try:
        return getattr(tvd, cls_name)(str(parent), split=split, download=False)
    except RuntimeError as err:
        if corrupted is not None:
            raise DatasetLayoutError(corrupted()) from err
        raise DatasetLayoutError(
            f"{what} not found under root={str(parent)!r}: expected {layout} (torchvision: {err})"
        ) from err
    except Exception as err:  # unreadable index files: bad JSON, a truncated .mat (scipy's MatReadError), ...
        if isinstance(err, (DatasetLayoutError, ImportError)):
            raise
        raise DatasetLayoutError(
            f"{what} under root={str(parent)!r} could not be read as {layout}: {type(err).__name__}: {err}"
        ) from err


def load_food101(root: str | Path) -> DatasetSplits:
    """Read Food-101 with ``torchvision.datasets.Food101`` (``root/food-101/{meta/*.json, images/}``).

    Args:
        root: Folder holding ``food-101`` (or that folder itself).

    Returns:
        Train and test splits; labels follow the sorted class names (the same in both splits).

    Raises:
        DatasetLayoutError: If a file is missing or the two splits list different classes.
    """
    root = Path(root)
    parent = _torchvision_base(root, "food-101", "meta", "Food-101")
    base = parent / "food-101"
    _require(base, ["meta/train.json", "meta/test.json", "images"], "Food-101", root)
    layout = "root/food-101/{meta/train.json, meta/test.json, images/<class>/<id>.jpg}"
    train, test = (_torchvision_split("Food101", parent, s, "Food-101", layout) for s in ("train", "test"))
    if train.classes != test.classes:
        unknown = sorted(set(test.classes) ^ set(train.classes))
        raise DatasetLayoutError(
            f"{base}/meta/train.json and test.json must list the same classes (labels follow their sorted "
            f"names); they differ in {unknown[:10]}"
        )
    return DatasetSplits(
        ImageListDataset(list(train._image_files), list(train._labels), train.classes),
        ImageListDataset(list(test._image_files), list(test._labels), test.classes),
    )


def load_stanford_cars(root: str | Path) -> DatasetSplits:
    """Read Stanford Cars with ``torchvision.datasets.StanfordCars`` (needs scipy).

    ``root/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/,
    cars_test_annos_withlabels.mat, cars_test/}``. The original download URL is gone, so the files must
    be obtained by hand (torchvision's docs point to mirrors). With VPT's ``train.json``, ``val.json`` and
    ``test.json`` in that folder (:mod:`dmpo_lightning.data.fgvc`; image paths relative to it), train /
    validation / test follow them (7,329 / 815 / 8,041).

    Args:
        root: Folder holding ``stanford_cars`` (or that folder itself).

    Returns:
        Train and test splits; labels are 0-based.

    Raises:
        DatasetLayoutError: If a file is missing.
        ImportError: If scipy is not installed.
    """
    root = Path(root)
    vpt = _find_base(root, "stanford_cars", "train.json")
    if find_vpt_splits(vpt, "Stanford Cars"):
        return load_vpt_splits(vpt, vpt, "Stanford Cars")
    parent = _torchvision_base(root, "stanford_cars", "devkit", "Stanford Cars")
    names = [
        "devkit/cars_meta.mat",
        "devkit/cars_train_annos.mat",
        "cars_train",
        "cars_test_annos_withlabels.mat",
        "cars_test",
    ]
    _require(parent / "stanford_cars", names, "Stanford Cars", root)
    _require_scipy("Stanford Cars")
    layout = "root/stanford_cars/{devkit/, cars_train/, cars_test_annos_withlabels.mat, cars_test/}"

    def split(name: str) -> ImageListDataset:
        tv = _torchvision_split("StanfordCars", parent, name, "Stanford Cars", layout)
        paths = [Path(p) for p, _ in tv._samples]
        return ImageListDataset(paths, [int(c) for _, c in tv._samples], tv.classes)

    return DatasetSplits(split("train"), split("test"))


def image_folder_classes(root: str | Path) -> list[str]:
    """Class names of a class-folder tree: the sub-folders of ``root/train``, sorted.

    Raises:
        DatasetLayoutError: If ``root/train`` is missing or empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(
            f"root={str(root)!r} does not exist; expected a folder with train/<class>/ inside"
        )
    return list_class_folders(root / "train")


def load_image_folder(root: str | Path, expected_num_classes: int | None = None) -> DatasetSplits:
    """Read a class-folder tree: ``root/train/<class>/...`` and ``root/test/<class>/...`` or ``root/val/...``.

    With both ``test`` and ``val`` present, ``test`` is the test split and ``val`` the dataset's own
    validation split; with only one of them, it is the test split. Labels follow the sorted class
    folders of ``train`` in every split, so a class missing from an evaluation split shifts nothing.

    Args:
        root: The tree's root.
        expected_num_classes: If given, the number of class folders ``train`` must have (1000 for ImageNet).

    Returns:
        Train, test and (possibly) validation splits.

    Raises:
        DatasetLayoutError: If folders are missing, empty or the class count is wrong.
    """
    root = Path(root)
    classes = image_folder_classes(root)
    if expected_num_classes is not None and len(classes) != expected_num_classes:
        raise DatasetLayoutError(
            f"{root / 'train'} has {len(classes)} class folders, expected {expected_num_classes}"
        )
    present = [name for name in ("test", "val") if (root / name).is_dir()]
    if not present:
        raise DatasetLayoutError(
            f"no evaluation split under root={str(root)!r}: expected {root / 'val'}/<class>/... "
            f"or {root / 'test'}/<class>/... next to {root / 'train'}"
        )
    train = scan_class_folders(root / "train", classes)
    test = scan_class_folders(root / present[0], classes, allow_missing=True)
    val = scan_class_folders(root / "val", classes, allow_missing=True) if len(present) == 2 else None
    return DatasetSplits(train, test, val)
