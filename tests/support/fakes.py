"""Writers of tiny fake datasets in their real on-disk formats (torchvision's layouts where it has one).

Every image encodes its label in its colour (``label_value``), so tests can check that images and labels
stay aligned through the loaders.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmpo_lightning.constants import IMAGE_KEY, LABEL_KEY
from dmpo_lightning.data import BenchmarkDataModule


def label_value(label: int) -> int:
    """Grey level that encodes a label (distinct, far apart, JPEG-safe)."""
    return 20 + 20 * (label % 12)


def decode_label(value: float) -> int:
    return round((value - 20) / 20)


def labels_of(dm: BenchmarkDataModule, split: str) -> list[int]:
    """The labels of a data module's split, checking each image's colour encodes its label."""
    dataset = dm.split_dataset(split)  # type: ignore[arg-type]
    out = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        assert decode_label(float(item[IMAGE_KEY].mean()) * 255) == item[LABEL_KEY]
        out.append(item[LABEL_KEY])
    return out


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)


def fashion_arrays(n: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n, dtype=np.uint8) % num_classes
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:] = np.array([label_value(int(c)) for c in labels], dtype=np.uint8)[:, None, None]
    images[:, 0, :] = np.arange(28, dtype=np.uint8) * 9  # a gradient on the first row: checks orientation
    return images, labels


def write_fashion_mnist(
    root: Path, n_train: int = 20, n_test: int = 10, torchvision_layout: bool = False, gz: bool = True
) -> Path:
    folder = root / "FashionMNIST" / "raw" if torchvision_layout else root
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images, labels = fashion_arrays(n)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


def cifar_rows(labels: list[int]) -> np.ndarray:
    """``[N, 3072]`` rows: R = label colour, G = x gradient, B = y gradient (checks the HWC reshape)."""
    data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    data[:, 0] = np.array([label_value(c) for c in labels], dtype=np.uint8)[:, None, None]
    data[:, 1] = (np.arange(32, dtype=np.uint8) * 8)[None, None, :]
    data[:, 2] = (np.arange(32, dtype=np.uint8) * 8)[None, :, None]
    return data.reshape(len(labels), 3072)


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 4) -> Path:
    if name == "cifar10":
        folder, files, test, key = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "labels",
        )
        meta = (
            "batches.meta",
            {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch},
        )
        num_classes = 10
    else:
        folder, files, test, key = root / "cifar-100-python", ["train"], "test", "fine_labels"
        meta = ("meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []})
        num_classes = 100
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for file in [*files, test]:
        n = per_batch * (5 if name == "cifar100" and file == "train" else 1)
        labels = [(start + i) % num_classes for i in range(n)]
        start += n
        batch = {
            "batch_label": file,
            key: labels,
            "data": cifar_rows(labels),
            "filenames": [f"{i}.png" for i in range(n)],
        }
        if name == "cifar100":
            batch["coarse_labels"] = [c // 5 for c in labels]
        with open(folder / file, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    return root


def jpeg_bytes(label: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> bytes:
    value = label_value(label)
    color = value if mode == "L" else (value, value, value)
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_jpeg(path: Path, label: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(label, size, mode))
    return path


def write_image_folder(root: Path, classes: list[str], per_class: dict[str, int]) -> Path:
    """``root/<split>/<class>/<i>.jpg`` for each split in ``per_class`` (value = images per class)."""
    for split, n in per_class.items():
        for label, name in enumerate(classes):
            for i in range(n):
                write_jpeg(root / split / name / f"{name}_{i}.jpg", label, mode="L" if i % 2 else "RGB")
    return root


def write_imagenet(root: Path) -> Path:
    """1000 wnid folders with one image each in train and val (labels = sorted wnid order)."""
    for split in ("train", "val"):
        for label in range(1000):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            (folder / f"n{label:08d}_{split}.JPEG").write_bytes(jpeg_bytes(label, (8, 8)))
    return root


def write_cub(root: Path, num_classes: int = 3, per_class: int = 4) -> Path:
    base = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    image_id = 0
    for label in range(num_classes):
        name = f"{label + 1:03d}.Bird_{label}"
        classes.append(f"{label + 1} {name}")
        for i in range(per_class):
            image_id += 1
            rel = f"{name}/Bird_{label}_{i}.jpg"
            write_jpeg(base / "images" / rel, label)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {label + 1}")
            split.append(f"{image_id} {1 if i < per_class - 1 else 0}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def write_food101(root: Path, num_classes: int = 3, per_class: int = 3) -> Path:
    base = root / "food-101"
    names = [f"dish_{c}" for c in range(num_classes)]
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for label, name in enumerate(names):
        for i in range(per_class):
            split = "test" if i == 0 else "train"
            rel = f"{name}/{1000 + i}"
            write_jpeg(base / "images" / f"{rel}.jpg", label)
            meta[split].setdefault(name, []).append(rel)
    (base / "meta").mkdir(parents=True)
    for split, content in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(content))
    (base / "meta" / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def isolate_torchvision_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give this test its own copy of the MD5 table torchvision checks Flowers-102's ``.mat`` files against.

    Fake files are not the official ones; :func:`write_flowers102` enters their MD5 sums in the copy, so
    torchvision's check still runs (a fake edited after writing fails it) and nothing leaks into other tests.
    Called for every test by ``conftest._isolate``.
    """
    from torchvision.datasets.flowers102 import Flowers102

    monkeypatch.setattr(Flowers102, "_file_dict", dict(Flowers102._file_dict))


def accept_as_official_flowers102(base: Path) -> None:
    """Enter the MD5 sums of ``base/{imagelabels.mat, setid.mat}`` as the official ones (this test only)."""
    from torchvision.datasets.flowers102 import Flowers102

    for key, name in (("label", "imagelabels.mat"), ("setid", "setid.mat")):
        Flowers102._file_dict[key] = (name, hashlib.md5((base / name).read_bytes()).hexdigest())


def write_flowers102(root: Path, n_images: int = 12) -> Path:
    """Flowers-102 in torchvision's layout, its ``.mat`` checksums accepted for this test.

    Image ``i`` has label ``(i - 1) % 3`` (0-based); ``trnid`` = images 1, 4, 7, ...,
    ``valid`` = 2, 5, 8, ..., ``tstid`` = 3, 6, 9, ...
    """
    savemat = pytest.importorskip("scipy.io").savemat
    base = root / "flowers-102"
    labels = np.array([i % 3 + 1 for i in range(n_images)], dtype=np.uint8)  # 1-based, as the real file
    for i in range(1, n_images + 1):
        write_jpeg(base / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1]) - 1)
    ids = np.arange(1, n_images + 1)
    savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(
        base / "setid.mat",
        {"trnid": ids[0::3][None, :], "valid": ids[1::3][None, :], "tstid": ids[2::3][None, :]},
    )
    accept_as_official_flowers102(base)
    return root


def write_stanford_cars(root: Path, per_split: int = 6) -> Path:
    savemat = pytest.importorskip("scipy.io").savemat
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    class_names = np.array([f"Car {c}" for c in range(196)], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": class_names[None, :]})
    dtype = [
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("fname", "O"),
    ]
    for annotation_file, folder in (
        ("devkit/cars_train_annos.mat", "cars_train"),
        ("cars_test_annos_withlabels.mat", "cars_test"),
    ):
        records = np.zeros((1, per_split), dtype=dtype)
        for i in range(per_split):
            label = (i * 37) % 196
            fname = f"{i + 1:05d}.jpg"
            write_jpeg(base / folder / fname, label % 12)
            records[0, i] = (1, 1, 10, 10, label + 1, fname)
        savemat(base / annotation_file, {"annotations": records})
    return root


def write_list(path: Path, entries: list[tuple[str, int]]) -> Path:
    """A list file of ``<relative path> <label>`` lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries), encoding="utf-8")
    return path


def write_image_list(
    root: Path, num_classes: int = 3, sizes: dict[str, int] | None = None, classes: bool = True
) -> Path:
    """``root/images/<split>/<i>.jpg`` and ``root/<split>.txt`` for each split (default train 9, val 3,
    test 6 images; image ``i`` of a split has label ``i % num_classes``), plus ``classes.txt``."""
    sizes = sizes or {"train": 9, "val": 3, "test": 6}
    for split, n in sizes.items():
        entries = []
        for i in range(n):
            rel = f"images/{split}/{i:04d} img.jpg"  # a space in the name: the label is the last field
            write_jpeg(root / rel, i % num_classes, size=(20 + i % 3, 16))
            entries.append((rel, i % num_classes))
        write_list(root / f"{split}.txt", entries)
    if classes:
        (root / "classes.txt").write_text("".join(f"class {c}\n" for c in range(num_classes)))
    return root


VTAB_FAKE_SIZES = {"train800": 8, "val200": 4, "test": 6}
"""Images per list of a fake VTAB-1k task (``train800val200`` is train800 + val200)."""


def write_vtab1k(root: Path, tasks: list[str] | None = None, sizes: dict[str, int] | None = None) -> Path:
    """The VTAB-1k release layout (NOAH's ``get_vtab1k.py``): ``root/<task>/images/<split>/<i>.jpg`` and
    ``root/<task>/{train800,val200,train800val200,test}.txt``; labels cycle over the first 3 classes (2 for
    patch_camelyon), images are 20x16 (not square: the squash resize is visible)."""
    from dmpo_lightning.data.list_files import VTAB1K_TASKS

    sizes = sizes or VTAB_FAKE_SIZES
    for task in tasks or list(VTAB1K_TASKS):
        folder = root / task
        n_labels = min(3, VTAB1K_TASKS[task][1])
        lists: dict[str, list[tuple[str, int]]] = {}
        for split in ("train800", "val200", "test"):
            lists[split] = []
            for i in range(sizes[split]):
                rel = f"images/{split}/{i:06d}.jpg"
                write_jpeg(folder / rel, i % n_labels)
                lists[split].append((rel, i % n_labels))
        lists["train800val200"] = []
        for i, (_rel, label) in enumerate(lists["train800"] + lists["val200"]):
            rel = f"images/train800val200/{i:06d}.jpg"
            write_jpeg(folder / rel, label)
            lists["train800val200"].append((rel, label))
        for split, entries in lists.items():
            write_list(folder / f"{split}.txt", entries)
    return root


def write_vpt_splits(base: Path, entries: dict[str, list[tuple[str, object]]]) -> None:
    """VPT's ``train.json`` / ``val.json`` / ``test.json``: ``{image path: class id}`` per split."""
    for split, items in entries.items():
        (base / f"{split}.json").write_text(json.dumps(dict(items)), encoding="utf-8")


NABIRDS_FAKE_IDS = (295, 296, 817)
"""Class ids of the fake NABirds (not contiguous, as the real ones; labels follow their numeric order)."""


def write_nabirds(root: Path, per_class: int = 4, vpt: bool = False) -> Path:
    """NABirds in its official layout (UUID image ids, zero-padded class-id folders, classes.txt with parent
    classes too); the last image of each class is a test image. ``vpt``: VPT's split files instead of the
    split table (image 0 of each class is the validation image, the last the test image)."""
    base = root / "nabirds"
    images, labels, split, vpt_entries = [], [], [], {"train": [], "val": [], "test": []}
    for label, class_id in enumerate(NABIRDS_FAKE_IDS):
        for i in range(per_class):
            image_id = f"{class_id:04d}a{i:03d}-0000-4000-8000-{label:012d}"
            rel = f"{class_id:04d}/{image_id.replace('-', '')}.jpg"
            write_jpeg(base / "images" / rel, label)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {0 if i == per_class - 1 else 1}")
            part = "test" if i == per_class - 1 else "val" if i == 0 else "train"
            vpt_entries[part].append((rel, class_id))
    classes = ["0 Birds", "1 Perching Birds", *(f"{c} Bird species {c}" for c in NABIRDS_FAKE_IDS)]
    (base / "classes.txt").write_text("\n".join(classes) + "\n")
    if vpt:
        write_vpt_splits(base, vpt_entries)
    else:
        (base / "images.txt").write_text("\n".join(images) + "\n")
        (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
        (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


DOGS_FAKE_BREEDS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu")


def write_stanford_dogs(root: Path, per_class: int = 4, vpt: bool = False) -> Path:
    """Stanford Dogs: ``Images/<wnid>-<breed>/<wnid>_<i>.jpg`` plus the official ``train_list.mat`` /
    ``test_list.mat`` (1-based labels; the last image of each breed is a test image), or VPT's split files
    (image 0 of each breed in val, the last in test)."""
    base = root / "stanford_dogs"
    files: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    vpt_entries: dict[str, list[tuple[str, object]]] = {"train": [], "val": [], "test": []}
    for label, breed in enumerate(DOGS_FAKE_BREEDS):
        for i in range(per_class):
            rel = f"{breed}/{breed.split('-')[0]}_{1000 + i}.jpg"
            write_jpeg(base / "Images" / rel, label)
            files["test" if i == per_class - 1 else "train"].append((rel, label + 1))
            part = "test" if i == per_class - 1 else "val" if i == 0 else "train"
            vpt_entries[part].append((rel, label + 1))
    if vpt:
        write_vpt_splits(base, vpt_entries)
        return root
    savemat = pytest.importorskip("scipy.io").savemat
    (base / "lists").mkdir(parents=True)
    for split, items in files.items():
        file_list = np.empty((len(items), 1), dtype=object)
        for k, (rel, _label) in enumerate(items):
            file_list[k, 0] = np.array([rel])
        labels = np.array([[lab] for _rel, lab in items], dtype=np.uint8)
        savemat(base / "lists" / f"{split}_list.mat", {"file_list": file_list, "labels": labels})
    return root


def write_random_pngs(folder: Path, n: int, size: int = 32) -> list[str]:
    """``n`` RGB PNGs of random pixels (``img_00.png`` ...) in a new ``folder``; their paths, sorted."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths
