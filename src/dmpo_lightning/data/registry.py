"""Dataset registry: name -> builder, number of classes, channels, default image size, validation split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torchvision.datasets as tvd

from dmpo_lightning.data import fashion_mnist, fgvc, formats, list_files
from dmpo_lightning.data.datasets import ArrayImageDataset, DatasetSplits, SyntheticImageDataset
from dmpo_lightning.data.errors import DatasetLayoutError
from dmpo_lightning.data.transforms import ResizeMode

ValSource = Literal["holdout", "dataset"]
"""Where the calibration split comes from: held out of the training split, or the dataset's own validation
split."""


@dataclass(frozen=True)
class BuildOptions:
    """What a builder may need besides the dataset name.

    Attributes:
        root: The dataset folder (already resolved; ``None`` only for datasets without files).
        image_size: Requested image size, used by ``synthetic`` to draw images at that size.
        seed: Seed of the synthetic images.
        synthetic_sizes: Train and test lengths of ``synthetic``.
        synthetic_num_classes: Number of classes of ``synthetic``.
        val_source: Where the calibration split will come from (``vtab1k`` trains on ``train800`` with
            ``"dataset"``, on all of ``train800val200`` with ``"holdout"``).
        task: The VTAB-1k task.
        train_list: ``image_list``: the training list file.
        val_list: ``image_list``: the validation list file, if any.
        test_list: ``image_list``: the test list file.
        classes_file: ``image_list``: class names, one per line, if any.
    """

    root: Path | None = None
    image_size: int | None = None
    seed: int = 0
    synthetic_sizes: tuple[int, int] = (256, 64)
    synthetic_num_classes: int = 10
    val_source: ValSource = "holdout"
    task: str | None = None
    train_list: str = "train.txt"
    val_list: str | None = None
    test_list: str = "test.txt"
    classes_file: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """How to build one dataset and what is known about it without reading files.

    Attributes:
        name: Registry name.
        builder: ``BuildOptions -> DatasetSplits`` (images as PIL, labels as int, no transforms).
        num_classes: Number of classes; ``None`` when it depends on the files or options.
        channels: Channels of the stored images (1 grey, 3 RGB).
        default_image_size: Image size used when neither the DataModule nor a timm model sets one.
        native_size: Pixel size shared by every image, if there is one (28 / 32 px datasets).
        has_val_split: Whether the dataset has its own validation split (``None``: depends on the files).
        needs_root: Whether files must be read from a ``root`` folder.
        layout: The expected on-disk layout, quoted in error messages.
        downloader: ``root -> None`` fetching the files with torchvision, if downloading is possible.
        default_calibration_size: Held-out calibration size when the DataModule leaves it to the dataset.
        default_val_source: The calibration split's source when the DataModule leaves it to the dataset.
        default_train_augment: Whether training images are augmented when the DataModule leaves it to the
            dataset (the VTAB-1k protocol trains without augmentation).
        default_resize_mode: The evaluation resize when the DataModule leaves it to the dataset
            (``center_crop``: timm's resize + centre crop; ``squash``: straight to the input size).
    """

    name: str
    builder: Callable[[BuildOptions], DatasetSplits]
    num_classes: int | None
    channels: int
    default_image_size: int
    native_size: int | None
    has_val_split: bool | None
    needs_root: bool
    layout: str
    downloader: Callable[[Path], None] | None = None
    default_calibration_size: int | float = 0.1
    default_val_source: ValSource = "holdout"
    default_train_augment: bool = True
    default_resize_mode: ResizeMode = "center_crop"


def _download_torchvision(class_name: str) -> Callable[[Path], None]:
    """A downloader calling ``torchvision.datasets.<class_name>(root, ..., download=True)`` per split."""

    def download(root: Path) -> None:

        cls = getattr(tvd, class_name)
        if class_name in ("CIFAR10", "CIFAR100", "FashionMNIST"):
            for train in (True, False):
                cls(str(root), train=train, download=True)
        else:
            for split in ("train", "test"):
                cls(str(root), split=split, download=True)

    return download


def _build_cifar(name: str) -> Callable[[BuildOptions], DatasetSplits]:
    return lambda options: formats.load_cifar(_root(options), name)


def _root(options: BuildOptions) -> Path:
    if options.root is None:  # resolve_root() prevents this; kept for direct builder calls
        raise ValueError("this dataset needs a root folder")
    return options.root


def _build_fashion_mnist(options: BuildOptions) -> DatasetSplits:
    arrays = fashion_mnist.load_fashion_mnist(_root(options))
    return _fashion_splits(arrays)


def _build_fashion_mnist_subset(options: BuildOptions) -> DatasetSplits:
    return _fashion_splits(fashion_mnist.load_fashion_mnist_subset())


def _fashion_splits(arrays: fashion_mnist.FashionMNISTArrays) -> DatasetSplits:
    classes = fashion_mnist.FASHION_MNIST_CLASSES
    return DatasetSplits(
        ArrayImageDataset(arrays.train_images, arrays.train_labels, classes),
        ArrayImageDataset(arrays.test_images, arrays.test_labels, classes),
    )


def _build_imagenet(options: BuildOptions) -> DatasetSplits:
    root = _root(options)
    val = root / "val"
    if val.is_dir() and not any(p.is_dir() for p in val.iterdir()):
        raise DatasetLayoutError(
            f"{val} holds no class folders: the ImageNet validation images must be sorted into "
            "val/<wnid>/*.JPEG (e.g. with the widely used valprep.sh script) before use"
        )
    return formats.load_image_folder(root, expected_num_classes=1000)


def _build_image_list(options: BuildOptions) -> DatasetSplits:
    return list_files.load_image_list(
        _root(options), options.train_list, options.test_list, options.val_list, options.classes_file
    )


def _build_vtab1k(options: BuildOptions) -> DatasetSplits:
    if options.task is None:  # the DataModule refuses this earlier; kept for direct builder calls
        raise ValueError(f"dataset 'vtab1k' needs a task: one of {', '.join(list_files.VTAB1K_TASKS)}")
    return list_files.load_vtab1k(_root(options), options.task, options.val_source)


def _build_synthetic(options: BuildOptions) -> DatasetSplits:
    size = options.image_size or 32
    train_len, test_len = options.synthetic_sizes
    n = options.synthetic_num_classes
    return DatasetSplits(
        SyntheticImageDataset(train_len, n, size, seed=options.seed, split_id=0),
        SyntheticImageDataset(test_len, n, size, seed=options.seed, split_id=1),
    )


_IMAGE_SETS: dict[str, Any] = {
    "channels": 3,
    "default_image_size": 224,
    "native_size": None,
    "needs_root": True,
}

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "cifar10",
            _build_cifar("cifar10"),
            num_classes=10,
            channels=3,
            default_image_size=32,
            native_size=32,
            has_val_split=False,
            needs_root=True,
            downloader=_download_torchvision("CIFAR10"),
            layout="root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
            default_calibration_size=5000,  # MSDNet convention
        ),
        DatasetSpec(
            "cifar100",
            _build_cifar("cifar100"),
            num_classes=100,
            channels=3,
            default_image_size=32,
            native_size=32,
            has_val_split=False,
            needs_root=True,
            downloader=_download_torchvision("CIFAR100"),
            layout="root/cifar-100-python/{train, test, meta}",
            default_calibration_size=5000,
        ),
        DatasetSpec(
            "fashion_mnist",
            _build_fashion_mnist,
            num_classes=10,
            channels=1,
            default_image_size=28,
            native_size=28,
            has_val_split=False,
            needs_root=True,
            downloader=_download_torchvision("FashionMNIST"),
            layout="root/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] or root/FashionMNIST/raw/<same>",
            default_calibration_size=5000,
        ),
        DatasetSpec(
            "fashion_mnist_subset",
            _build_fashion_mnist_subset,
            num_classes=10,
            channels=1,
            default_image_size=28,
            native_size=28,
            has_val_split=False,
            needs_root=False,
            layout="embedded in the package",
            default_calibration_size=1000,
        ),
        DatasetSpec(
            "food101",
            lambda o: formats.load_food101(_root(o)),
            num_classes=101,
            has_val_split=False,
            layout="root/food-101/{meta/train.json, meta/test.json, images/<class>/<id>.jpg}",
            downloader=_download_torchvision("Food101"),
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "flowers102",
            lambda o: formats.load_flowers102(_root(o)),
            num_classes=102,
            has_val_split=True,
            layout="root/flowers-102/{jpg/image_00001.jpg ..., imagelabels.mat, setid.mat}",
            downloader=_download_torchvision("Flowers102"),
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "cub200",
            lambda o: formats.load_cub200(_root(o)),
            num_classes=200,
            has_val_split=None,  # VPT's split files add one
            layout="root/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, images/} "
            "(+ VPT's train.json, val.json, test.json for its splits)",
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "nabirds",
            lambda o: fgvc.load_nabirds(_root(o)),
            num_classes=555,
            has_val_split=None,
            layout=fgvc.NABIRDS_LAYOUT,
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "stanford_dogs",
            lambda o: fgvc.load_stanford_dogs(_root(o)),
            num_classes=120,
            has_val_split=None,
            layout=fgvc.STANFORD_DOGS_LAYOUT,
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "stanford_cars",
            lambda o: formats.load_stanford_cars(_root(o)),
            num_classes=196,
            has_val_split=None,
            layout="root/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
            "cars_test_annos_withlabels.mat, cars_test/} (or VPT's train.json, val.json, test.json there)",
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "imagenet",
            _build_imagenet,
            num_classes=1000,
            has_val_split=False,
            layout="root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (1000 class folders each)",
            default_calibration_size=50000,  # MSDNet convention
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "image_folder",
            lambda o: formats.load_image_folder(_root(o)),
            num_classes=None,
            has_val_split=None,
            layout="root/train/<class>/<image> plus root/val/<class>/... and/or root/test/<class>/...",
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "image_list",
            _build_image_list,
            num_classes=None,
            has_val_split=None,
            layout="root/ plus list files of '<relative/path> <label>' lines (data.init_args.train_list, "
            "test_list, optional val_list; relative to root), class names optional (classes_file)",
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "vtab1k",
            _build_vtab1k,
            num_classes=None,
            has_val_split=True,
            layout=list_files.VTAB1K_LAYOUT,
            default_calibration_size=200,
            default_val_source="dataset",
            default_train_augment=False,
            default_resize_mode="squash",
            **_IMAGE_SETS,
        ),
        DatasetSpec(
            "synthetic",
            _build_synthetic,
            num_classes=None,
            channels=3,
            default_image_size=32,
            native_size=None,
            has_val_split=False,
            needs_root=False,
            layout="no files (generated)",
        ),
    ]
}
"""Every dataset the DataModule can load, by name."""

if TYPE_CHECKING:
    DatasetName = str
else:
    DatasetName = Literal[tuple(DATASETS)]
"""Names accepted by :class:`~dmpo_lightning.data.BenchmarkDataModule`'s ``dataset`` argument: ``Literal`` of
the :data:`DATASETS` above (add a dataset there)."""


def get_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``.

    Raises:
        ValueError: If the name is unknown (the message lists the known names).
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


def resolve_root(spec: DatasetSpec, root: str | Path | None, download: bool = False) -> Path | None:
    """The folder to read ``spec`` from, checking that it exists.

    ``fashion_mnist`` falls back to the Debian package's folder when ``root`` is ``None``.

    Args:
        spec: The dataset.
        root: The folder given by the user.
        download: Whether the files will be downloaded into ``root`` (then it need not exist yet).

    Returns:
        The folder, or ``None`` for datasets without files.

    Raises:
        DatasetLayoutError: If a needed folder is missing.
        ValueError: If ``download`` is requested without a root or for a dataset that cannot be downloaded.
    """
    if not spec.needs_root:
        return None
    if download and spec.downloader is None:
        raise ValueError(
            f"download=True is not supported for {spec.name!r}; place the files as {spec.layout} "
            f"and pass root. Datasets that can be downloaded: "
            f"{', '.join(n for n, s in DATASETS.items() if s.downloader is not None)}"
        )
    if root is None:
        if spec.name == "fashion_mnist" and not download and fashion_mnist.default_root() is not None:
            return fashion_mnist.DEBIAN_FASHION_MNIST_DIR
        hint = (
            f" (the default {fashion_mnist.DEBIAN_FASHION_MNIST_DIR} of the Debian package "
            "dataset-fashion-mnist was not found)"
            if spec.name == "fashion_mnist"
            else ""
        )
        raise DatasetLayoutError(
            f"dataset {spec.name!r} needs root=<folder> laid out as {spec.layout}; root is None{hint}"
        )
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise DatasetLayoutError(
            f"root={str(root)!r} for dataset {spec.name!r} is a file; give the folder laid out as "
            f"{spec.layout}"
        )
    if not download and not path.is_dir():
        raise DatasetLayoutError(
            f"root={str(root)!r} for dataset {spec.name!r} does not exist; expected {spec.layout}"
        )
    return path


def dataset_num_classes(
    spec: DatasetSpec,
    root: str | Path | None = None,
    synthetic_num_classes: int = 10,
    *,
    task: str | None = None,
    splits: DatasetSplits | None = None,
) -> int:
    """Number of classes of a dataset; reads the class folders only for ``image_folder``.

    Args:
        spec: The dataset.
        root: Its folder (needed for ``image_folder``).
        synthetic_num_classes: The class count of ``synthetic``.
        task: The VTAB-1k task (needed for ``vtab1k``).
        splits: The built dataset (needed for ``image_list``: its class names, else its largest label + 1).

    Returns:
        The number of classes.

    Raises:
        DatasetLayoutError: If ``image_folder``'s root or ``root/train`` is missing.
        ValueError: If ``vtab1k`` has no task or ``image_list`` no splits.
    """
    if spec.num_classes is not None:
        return spec.num_classes
    if spec.name == "synthetic":
        return synthetic_num_classes
    if spec.name == "vtab1k":
        if task not in list_files.VTAB1K_TASKS:
            raise ValueError(f"dataset 'vtab1k' needs a task: one of {', '.join(list_files.VTAB1K_TASKS)}")
        return list_files.VTAB1K_TASKS[task][1]
    if spec.name == "image_list":
        if splits is None:
            raise ValueError(
                "the number of classes of 'image_list' is read from its list files: build it first"
            )
        return list_files.image_list_num_classes(splits)
    if root is None:
        raise DatasetLayoutError(f"dataset {spec.name!r} needs root=<folder> laid out as {spec.layout}")
    return len(formats.image_folder_classes(root))
