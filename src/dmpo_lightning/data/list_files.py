"""List-file datasets: ``image_list`` (a folder plus ``relative/path label`` list files) and VTAB-1k.

A list file has one image per line, ``<path> <integer label>``: the label is the last whitespace-separated
field (so a path may contain spaces), the path is relative to the dataset folder (or absolute); blank lines
and lines starting with ``#`` are skipped. This is the layout of the VTAB-1k release most PEFT repositories
use (NOAH's ``get_vtab1k.py``, used by NOAH, Dynamic Tuning, RepAdapter, SSF, ...): one folder per task
holding ``images/`` and ``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``.

Every list is checked when it is read: text that is not UTF-8, a malformed line, a negative label and list
entries naming files that do not exist are refused with one sentence naming the file (and line).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dmpo_lightning.data.datasets import DatasetSplits, ImageListDataset
from dmpo_lightning.data.errors import DatasetLayoutError
from dmpo_lightning.errors import ConfigError

__all__ = [
    "VTAB1K_GROUPS",
    "VTAB1K_TASKS",
    "check_list_options",
    "image_list_num_classes",
    "load_image_list",
    "load_vtab1k",
    "read_class_names",
    "read_list_file",
    "read_text_file",
    "vtab1k_task_folder",
]

VTAB1K_TASKS: dict[str, tuple[str, int]] = {
    # natural
    "cifar": ("natural", 100),
    "caltech101": ("natural", 102),
    "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102),
    "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    # specialized
    "patch_camelyon": ("specialized", 2),
    "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45),
    "diabetic_retinopathy": ("specialized", 5),
    # structured
    "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6),
    "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}
"""The 19 VTAB-1k tasks, by the folder names of the common release, in the order papers report them:
task -> (group, number of classes). The class counts are those of VTAB's task definitions (the same in
NOAH's ``lib/datasets.py`` and Dynamic Tuning's ``datasets/vtab.py``); a task's 1,000 training images need
not contain every class, so the count is not read from the files."""

VTAB1K_GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(task for task, (g, _) in VTAB1K_TASKS.items() if g == group)
    for group in ("natural", "specialized", "structured")
}
"""The three VTAB-1k groups and their tasks (7 natural, 4 specialized, 8 structured)."""

VTAB1K_FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "cifar": ("cifar100",),
    "oxford_iiit_pet": ("oxford_pet",),
}
"""Other folder names under which some copies of the release hold a task (NOAH's launch scripts)."""

VTAB1K_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
"""The list files of one VTAB-1k task folder."""

VTAB1K_LAYOUT = (
    "root/<task>/{train800.txt, val200.txt, train800val200.txt, test.txt, images/} (the VTAB-1k release "
    "of NOAH's get_vtab1k.py, one folder per task)"
)


def read_text_file(path: Path, option: str, expected: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark is dropped).

    Args:
        path: The file.
        option: The option or file role named in messages (``data.init_args.train_list``).
        expected: What the file should be, for messages (``a list file of '<path> <label>' lines``).

    Raises:
        DatasetLayoutError: If it does not exist or is a folder.
        ConfigError: If it is not UTF-8 text.
    """
    if path.is_dir():
        raise DatasetLayoutError(f"{option}: {path} is a folder; expected {expected}")
    if not path.is_file():
        raise DatasetLayoutError(f"{option}: {path} does not exist; expected {expected}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save {expected} "
            "as UTF-8",
            option=option,
        ) from None


def read_list_file(path: Path, base: Path, option: str) -> tuple[list[str], list[int]]:
    """Parse a list file of ``<path> <integer label>`` lines into image paths (under ``base``) and labels.

    Raises:
        DatasetLayoutError: If the file is missing, a folder, empty, malformed, or names missing images.
        ConfigError: If it is not UTF-8.
    """
    expected = "a list file of '<relative/image/path> <integer label>' lines"
    text = read_text_file(path, option, expected)
    paths: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.rsplit(maxsplit=1)
        label = fields[1] if len(fields) == 2 else ""
        if not (label.isdigit() and label.isascii()):
            raise DatasetLayoutError(
                f"{path}, line {number}: expected '<relative/image/path> <integer label >= 0>', got {line!r}"
            )
        paths.append(os.path.join(base, fields[0]))
        labels.append(int(label))
    if not paths:
        raise DatasetLayoutError(f"{option}: {path} lists no images; expected {expected}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetLayoutError(
            f"{path} names {len(missing)} image file(s) that do not exist (paths are relative to {base}), "
            f"e.g. {missing[:3]}"
        )
    return paths, labels


def read_class_names(path: Path, option: str) -> list[str]:
    """Class names, one per line (line ``i`` = label ``i``); blank lines are not allowed between names.

    Raises:
        DatasetLayoutError: If the file is missing, a folder or empty.
        ConfigError: If it is not UTF-8 or repeats a name.
    """
    expected = "a text file with one class name per line (line i = label i)"
    names = [line.strip() for line in read_text_file(path, option, expected).splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DatasetLayoutError(f"{option}: {path} holds no class names; expected {expected}")
    if "" in names:
        raise ConfigError(
            f"{path}, line {names.index('') + 1} is blank; {expected}, so a blank line would shift "
            "the labels",
            option=option,
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"{path} repeats class name(s) {repeated[:5]}; each label needs its own name", option=option
        )
    return names


def _resolve(root: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else root / path


def load_image_list(
    root: Path,
    train_list: str,
    test_list: str,
    val_list: str | None = None,
    classes_file: str | None = None,
) -> DatasetSplits:
    """Read a dataset described by list files (``dataset: image_list``).

    Args:
        root: The folder the image paths are relative to (list and class files too, if relative).
        train_list: The training list file.
        test_list: The test list file.
        val_list: The dataset's own validation list (served with ``val_source: dataset``), if any.
        classes_file: Class names, one per line, if any.

    Returns:
        Train, test and (if given) validation splits.

    Raises:
        DatasetLayoutError: On a missing or malformed file (the message names it).
        ConfigError: On text that is not UTF-8, repeated class names, or labels beyond the class names.
    """
    classes = None
    if classes_file is not None:
        classes = read_class_names(_resolve(root, classes_file), "data.init_args.classes_file")
    parts: dict[str, ImageListDataset | None] = {"val": None}
    for split, name in (("train", train_list), ("test", test_list), ("val", val_list)):
        if name is None:
            continue
        path = _resolve(root, name)
        paths, labels = read_list_file(path, root, f"data.init_args.{split}_list")
        if classes is not None and max(labels) >= len(classes):
            raise ConfigError(
                f"{path} has label {max(labels)} but {classes_file} names {len(classes)} classes "
                f"(labels 0..{len(classes) - 1}); add the missing names or fix the labels",
                option="data.init_args.classes_file",
            )
        parts[split] = ImageListDataset(paths, labels, classes)
    return DatasetSplits(parts["train"], parts["test"], parts["val"])  # type: ignore[arg-type]


def image_list_num_classes(splits: DatasetSplits) -> int:
    """Classes of an ``image_list`` dataset: its class names, else the largest label of any split + 1."""
    classes = getattr(splits.train, "classes", None)
    if classes is not None:
        return len(classes)
    return 1 + max(_largest_label(part) for part in splits if part is not None)


def _largest_label(part: object) -> int:
    return int(getattr(part, "labels").max())  # noqa: B009 (ImageListDataset; typed as a plain Dataset)


def vtab1k_task_folder(root: Path, task: str) -> Path:
    """The folder of one VTAB-1k task: ``root/<task>`` (or an alias), or ``root`` itself if it is that folder.

    Raises:
        DatasetLayoutError: If neither holds the task's list files (the message names the expected files).
        ValueError: If ``task`` is not one of the 19.
    """
    if task not in VTAB1K_TASKS:
        raise ValueError(f"unknown VTAB-1k task {task!r}; choose one of: {', '.join(VTAB1K_TASKS)}")
    candidates = [root / name for name in (task, *VTAB1K_FOLDER_ALIASES.get(task, ()))]
    for folder in candidates:
        if (folder / "test.txt").is_file():
            return folder
    if (root / "test.txt").is_file() and root.name in (task, *VTAB1K_FOLDER_ALIASES.get(task, ())):
        return root
    present = sorted(p.name for p in root.iterdir() if p.is_dir())[:8] if root.is_dir() else []
    raise DatasetLayoutError(
        f"VTAB-1k task {task!r} not found under root={str(root)!r}: expected {candidates[0]}/ holding "
        f"{', '.join(VTAB1K_FILES)} and images/ (layout {VTAB1K_LAYOUT}); folders present: {present}"
    )


def load_vtab1k(root: Path, task: str, val_source: str) -> DatasetSplits:
    """Read one VTAB-1k task from the common release layout.

    With ``val_source="dataset"`` training uses ``train800.txt`` and ``val200.txt`` is the validation
    (calibration) split; with ``"holdout"`` training uses all 1,000 images of ``train800val200.txt`` and the
    data module holds its calibration images out of them. ``test.txt`` is the test split either way.

    Raises:
        DatasetLayoutError: If the task folder or one of its list files is missing or malformed.
    """
    folder = vtab1k_task_folder(root, task)
    missing = [name for name in VTAB1K_FILES if not (folder / name).exists()]
    if missing:
        raise DatasetLayoutError(
            f"VTAB-1k task folder {folder} lacks {', '.join(missing)}; expected {', '.join(VTAB1K_FILES)} "
            "and images/"
        )
    train = "train800.txt" if val_source == "dataset" else "train800val200.txt"
    val = "val200.txt" if val_source == "dataset" else None
    splits = load_image_list(folder, train, "test.txt", val)
    num_classes = VTAB1K_TASKS[task][1]
    for name, part in zip(("train", "test", "val"), splits, strict=True):
        if part is not None and _largest_label(part) >= num_classes:
            raise DatasetLayoutError(
                f"VTAB-1k task {task!r} has {num_classes} classes but {folder}'s {name} list has label "
                f"{_largest_label(part)}; is {folder} the folder of another task?"
            )
    return splits


def check_list_options(dataset: str, **options: str | Sequence[str] | None) -> None:
    """Refuse list-file options for a dataset that does not read them (they would be ignored)."""
    given = [name for name, value in options.items() if value is not None]
    if given and dataset != "image_list":
        raise ValueError(
            f"{', '.join(given)} apply to dataset 'image_list' only, but dataset is {dataset!r}; remove "
            f"{'them' if len(given) > 1 else 'it'}"
        )
