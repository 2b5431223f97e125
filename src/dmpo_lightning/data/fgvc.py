"""FGVC datasets beside CUB-200, Flowers-102 and Stanford Cars: NABirds and Stanford Dogs, and VPT's splits.

Each reader takes either layout:

- **VPT's splits** (the split files of Visual Prompt Tuning, ``fgvc_split.zip``, used by most PEFT papers on
  FGVC): ``train.json``, ``val.json`` and ``test.json`` placed in the dataset folder, each an object
  ``{"<image path>": <class id>}``, image paths relative to the dataset's image folder (``images/`` for
  CUB-200 and NABirds, ``Images/`` for Stanford Dogs, the folder itself for Stanford Cars). VPT holds a
  validation split out of the official training images where a dataset has none (NABirds 21,536 / 2,393 /
  24,633; Stanford Dogs 10,800 / 1,200 / 8,580; CUB 5,394 / 600 / 5,794; Cars 7,329 / 815 / 8,041), so
  ``val_source: dataset`` calibrates on VPT's validation split and trains on the rest.
- **The official release**: its train / test split; the calibration split is then held out of train.

Class ids are mapped to labels ``0..C-1`` in sorted order (numerically when every id is an integer) over the
ids of all three split files together; VPT's ``JSONDataset`` sorts each file's own ids, which gives the same
labels as long as every split holds every class (as in VPT's files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmpo_lightning.data.datasets import DatasetSplits, ImageListDataset
from dmpo_lightning.data.errors import DatasetLayoutError
from dmpo_lightning.data.list_files import read_text_file

__all__ = [
    "VPT_SPLIT_FILES",
    "find_vpt_splits",
    "load_nabirds",
    "load_stanford_dogs",
    "load_vpt_splits",
]

VPT_SPLIT_FILES = ("train.json", "val.json", "test.json")
"""VPT's split files, in the dataset folder."""

NABIRDS_LAYOUT = (
    "root/nabirds/{images/, images.txt, image_class_labels.txt, train_test_split.txt, classes.txt} (the "
    "official release) or root/nabirds/{images/, train.json, val.json, test.json} (VPT's splits)"
)
STANFORD_DOGS_LAYOUT = (
    "root/stanford_dogs/{Images/, train_list.mat, test_list.mat} (the official images.tar and lists.tar; the "
    "lists may sit in lists/) or root/stanford_dogs/{Images/, train.json, val.json, test.json} (VPT's splits)"
)


def find_vpt_splits(base: Path, what: str) -> bool:
    """Whether ``base`` holds VPT's three split files (all or none).

    Raises:
        DatasetLayoutError: If only some of them are there.
    """
    present = [name for name in VPT_SPLIT_FILES if (base / name).is_file()]
    if present and len(present) < len(VPT_SPLIT_FILES):
        missing = sorted(set(VPT_SPLIT_FILES) - set(present))
        raise DatasetLayoutError(
            f"{what} under {base} has VPT's split file(s) {present} but lacks {missing}; put all of "
            f"{', '.join(VPT_SPLIT_FILES)} there (VPT's fgvc_split.zip), or none to use the official split"
        )
    return bool(present)


def _sort_ids(ids: set[Any]) -> list[Any]:
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return sorted(ids)
    if all(isinstance(i, str) and i.strip().lstrip("-").isdigit() for i in ids):
        return sorted(ids, key=lambda i: int(i))
    return sorted(ids, key=str)


def _read_split_json(path: Path, what: str) -> dict[str, Any]:
    text = read_text_file(path, f"{what} split file", "a JSON object {image path: class id} (VPT's splits)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetLayoutError(
            f"{path} is not valid JSON ({err}); expected VPT's {{image: class id}}"
        ) from None
    if not isinstance(data, dict) or not data:
        raise DatasetLayoutError(f"{path}: expected a non-empty JSON object {{image path: class id}}")
    bad = [k for k, v in data.items() if isinstance(v, (bool, list, dict, float)) or v is None][:3]
    if bad:
        raise DatasetLayoutError(f"{path}: class ids must be integers or strings; entries {bad} are not")
    return data


def load_vpt_splits(base: Path, image_dir: Path, what: str) -> DatasetSplits:
    """Train, validation and test splits from VPT's ``{train,val,test}.json`` in ``base``.

    A class is named after the folder holding its images, when all of them share one (CUB's
    ``001.Black_footed_Albatross``, Stanford Dogs' ``n02085620-Chihuahua``, NABirds' class-id folders).

    Args:
        base: The folder holding the split files.
        image_dir: The folder the image paths are relative to.
        what: The dataset's name, for messages.

    Raises:
        DatasetLayoutError: On a missing, unreadable or malformed file, or images that do not exist.
    """
    annotations = {name: _read_split_json(base / name, what) for name in VPT_SPLIT_FILES}
    ids = _sort_ids({v for a in annotations.values() for v in a.values()})
    label_of = {class_id: label for label, class_id in enumerate(ids)}
    folders: dict[int, set[str]] = {}
    parts: dict[str, ImageListDataset] = {}
    for name, anno in annotations.items():
        paths = [os.path.join(image_dir, key) for key in anno]
        labels = [label_of[v] for v in anno.values()]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DatasetLayoutError(
                f"{base / name} names {len(missing)} image file(s) that do not exist under {image_dir}, e.g. "
                f"{missing[:3]}; the image paths of VPT's split files are relative to {image_dir.name}/"
            )
        for key, label in zip(anno, labels, strict=True):
            folders.setdefault(label, set()).add(os.path.dirname(key))
        parts[name.removesuffix(".json")] = ImageListDataset(paths, labels)
    names: list[str] | None = None
    if all(len(f) == 1 and next(iter(f)) for f in folders.values()):
        names = [os.path.basename(next(iter(folders[label]))) for label in range(len(ids))]
    if names is not None and len(set(names)) == len(names):
        for part in parts.values():
            part.classes = tuple(names)
    return DatasetSplits(parts["train"], parts["test"], parts["val"])


def _dataset_folder(root: Path, names: Sequence[str], marker: str) -> Path:
    """``root/<name>`` for the first of ``names`` holding ``marker``, else ``root`` itself."""
    for name in names:
        if (root / name / marker).exists():
            return root / name
    return root


def _id_table(path: Path, what: str) -> dict[str, str]:
    """``<id> <value>`` per line -> ``{id: value}`` (ids are any token: NABirds uses UUIDs)."""
    table: dict[str, str] = {}
    text = read_text_file(path, f"{what} file", "a text file of '<image id> <value>' lines")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not value.strip():
            raise DatasetLayoutError(f"{path}, line {number}: expected '<id> <value>', got {line!r}")
        table[key] = value.strip()
    return table


def load_nabirds(root: str | Path) -> DatasetSplits:
    """Read NABirds (555 classes): VPT's splits if their files are there, else the official train/test split.

    Layout: :data:`NABIRDS_LAYOUT`. Class names come from ``classes.txt`` when present.

    Raises:
        DatasetLayoutError: If a file is missing or the tables disagree (the message names them).
    """
    root = Path(root)
    base = _dataset_folder(root, ("nabirds", "NABirds"), "images")
    if not (base / "images").is_dir():
        raise DatasetLayoutError(f"NABirds not found under root={str(root)!r}: expected {NABIRDS_LAYOUT}")
    names = _id_table(base / "classes.txt", "NABirds classes") if (base / "classes.txt").is_file() else None
    if find_vpt_splits(base, "NABirds"):
        splits = load_vpt_splits(base, base / "images", "NABirds")
        folders = getattr(splits.train, "classes", None)  # NABirds' image folders are class ids ("0817")
        if names is not None and folders is not None:
            named = tuple(names.get(str(int(f)), f) if f.isdigit() else f for f in folders)
            if len(set(named)) == len(named):
                for part in splits:
                    part.classes = named  # type: ignore[union-attr]
        return splits
    needed = ["images.txt", "image_class_labels.txt", "train_test_split.txt"]
    missing = [n for n in needed if not (base / n).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"NABirds under {base} lacks {', '.join(missing)}; expected {NABIRDS_LAYOUT}"
        )
    images, labels, is_train = (_id_table(base / n, "NABirds") for n in needed)
    if not (images.keys() == labels.keys() == is_train.keys()):
        raise DatasetLayoutError(
            f"NABirds under {base}: images.txt, image_class_labels.txt and train_test_split.txt must list "
            f"the same image ids ({len(images)}, {len(labels)} and {len(is_train)} ids found)"
        )
    ids = _sort_ids(set(labels.values()))  # the 555 leaf classes that have images (classes.txt lists 1,011)
    label_of = {class_id: label for label, class_id in enumerate(ids)}
    parts: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
    for image_id in sorted(images):
        paths, targets = parts[is_train[image_id] == "1"]
        paths.append(os.path.join(base, "images", images[image_id]))
        targets.append(label_of[labels[image_id]])
    missing_files = [p for p in parts[True][0] + parts[False][0] if not os.path.isfile(p)]
    if missing_files:
        raise DatasetLayoutError(
            f"NABirds under {base}: images.txt names {len(missing_files)} image file(s) that do not exist, "
            f"e.g. {missing_files[:3]}"
        )
    classes = [names.get(i, i) for i in ids] if names is not None else None
    return DatasetSplits(ImageListDataset(*parts[True], classes), ImageListDataset(*parts[False], classes))


def _read_dogs_list(path: Path, images: Path) -> tuple[list[str], list[int], dict[int, str]]:
    """Paths, 0-based labels and label -> class folder of a Stanford Dogs ``*_list.mat`` file."""
    import scipy.io  # imported lazily: only Stanford Dogs' .mat lists need it (slow to import)

    try:
        mat = scipy.io.loadmat(str(path))
        files = [str(entry[0][0]) for entry in mat["file_list"]]
        labels = [int(v) - 1 for v in mat["labels"].ravel()]
    except Exception as err:  # a truncated or foreign .mat: scipy's MatReadError, KeyError, IndexError, ...
        raise DatasetLayoutError(
            f"{path} is not a Stanford Dogs list (a .mat file with 'file_list' and 'labels'): "
            f"{type(err).__name__}: {err}"
        ) from None
    if len(files) != len(labels) or min(labels, default=0) < 0:
        raise DatasetLayoutError(
            f"{path}: expected one 1-based label per file, got {len(labels)} for {len(files)}"
        )
    folders = {label: os.path.dirname(f) for f, label in zip(files, labels, strict=True)}
    return [os.path.join(images, f) for f in files], labels, folders


def load_stanford_dogs(root: str | Path) -> DatasetSplits:
    """Read Stanford Dogs (120 classes): VPT's splits if their files are there, else the official lists.

    Layout: :data:`STANFORD_DOGS_LAYOUT`; the official lists are MATLAB files (needs scipy). Classes are named
    after their image folders without the WordNet id (``n02085620-Chihuahua`` -> ``Chihuahua``).

    Raises:
        DatasetLayoutError: If a file is missing or unreadable (the message names it).
        ImportError: If the official lists are read and scipy is not installed.
    """
    root = Path(root)
    base = _dataset_folder(root, ("stanford_dogs", "StanfordDogs", "Stanford-dogs", "dogs"), "Images")
    images = base / "Images"
    if not images.is_dir():
        raise DatasetLayoutError(
            f"Stanford Dogs not found under root={str(root)!r}: expected {STANFORD_DOGS_LAYOUT}"
        )
    if find_vpt_splits(base, "Stanford Dogs"):
        splits = load_vpt_splits(base, images, "Stanford Dogs")
        _strip_wordnet_ids(splits)
        return splits
    lists = next(
        (d for d in (base, base / "lists", base / "splits") if (d / "train_list.mat").is_file()), None
    )
    if lists is None or not (lists / "test_list.mat").is_file():
        raise DatasetLayoutError(
            f"Stanford Dogs under {base} lacks train_list.mat / test_list.mat (in {base} or "
            f"{base / 'lists'}); expected {STANFORD_DOGS_LAYOUT}"
        )
    try:
        import scipy.io  # noqa: F401  (imported lazily: a check that the .mat reader is there)
    except ImportError as error:
        raise ImportError(
            "reading Stanford Dogs' official lists (MATLAB .mat files) needs scipy, which is not installed: "
            "pip install scipy (or use VPT's .json splits)"
        ) from error
    train_paths, train_labels, folders = _read_dogs_list(lists / "train_list.mat", images)
    test_paths, test_labels, test_folders = _read_dogs_list(lists / "test_list.mat", images)
    folders = {**test_folders, **folders}
    missing = [p for p in train_paths + test_paths if not os.path.isfile(p)]
    if missing:
        raise DatasetLayoutError(
            f"Stanford Dogs under {base}: the lists name {len(missing)} image file(s) that do not exist, "
            f"e.g. {missing[:3]}"
        )
    count = max(folders) + 1
    classes = [folders.get(label, str(label)).partition("-")[2] or str(label) for label in range(count)]
    classes_or_none = classes if len(set(classes)) == len(classes) else None
    return DatasetSplits(
        ImageListDataset(train_paths, train_labels, classes_or_none),
        ImageListDataset(test_paths, test_labels, classes_or_none),
    )


def _strip_wordnet_ids(splits: DatasetSplits) -> None:
    classes = getattr(splits.train, "classes", None)
    if classes is None:
        return
    stripped = tuple(name.partition("-")[2] or name for name in classes)
    if len(set(stripped)) == len(stripped):
        for part in splits:
            if part is not None:
                part.classes = stripped  # type: ignore[attr-defined]
