"""BenchmarkDataModule: every benchmark dataset behind one LightningDataModule, with a calibration split."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from dmpo_lightning.data import splits as split_utils
from dmpo_lightning.data.datasets import DatasetSplits, ImageListDataset, SplitView
from dmpo_lightning.data.list_files import VTAB1K_TASKS, check_list_options
from dmpo_lightning.data.predict_images import ImagePathDataset, list_image_paths
from dmpo_lightning.data.registry import (
    BuildOptions,
    DatasetName,
    ValSource,
    dataset_num_classes,
    get_spec,
    resolve_root,
)
from dmpo_lightning.data.transforms import (
    DataConfig,
    Interpolation,
    ResizeMode,
    build_transform,
    is_native_small,
    resolve_data_config,
)
from dmpo_lightning.errors import ConfigError
from dmpo_lightning.images import DEFAULT_MAX_PIXELS, check_max_pixels

Split = Literal["train", "calibration", "test"]

if TYPE_CHECKING:
    VtabTask = str
else:
    VtabTask = Literal[tuple(VTAB1K_TASKS)]
"""The 19 VTAB-1k task names accepted by ``task`` (folder names of the common release)."""


class BenchmarkDataModule(LightningDataModule):
    """Train, calibration and test loaders for one benchmark dataset; batches are dicts.

    Each batch is ``{IMAGE_KEY: float [B, C, H, W], LABEL_KEY: int64 [B], INDEX_KEY: int64 [B],
    SPLIT_KEY: list[str]}`` (keys in :mod:`dmpo_lightning.constants`); the index is the sample's position in
    its split and the split tag (``"train"``, ``"calibration"``, ``"test"``) tells ``DMPOModule.test_step``
    which test loader is which.

    The calibration split is held out from the training split (never trained on), read with the
    evaluation transforms and drawn deterministically from ``seed``; it serves as the validation set
    during ``fit`` and, with the test split, in ``test`` (``test_dataloader()`` returns
    ``[test, calibration]``, named in :attr:`test_split_names`). Its indices are written to
    ``<log_dir>/calibration_indices.json`` and stored in checkpoints through :meth:`state_dict`.

    The dataset's files are indexed when the data module is built (list files, annotation tables, class
    folders; images are decoded only when loaded), so a wrong layout or a calibration size the data cannot
    hold is refused before a run folder is made. With ``download=True`` and files not there yet, this
    waits for ``prepare_data``.

    Args:
        dataset: Registry name (see :data:`~dmpo_lightning.data.registry.DATASETS`).
        root: Dataset folder; ``fashion_mnist`` defaults to the Debian package's folder, the embedded
            ``fashion_mnist_subset`` and ``synthetic`` need none.
        image_size: Model input size; default: the timm model's, else the dataset's.
        in_chans: Model input channels: grey images are replicated to 3, RGB converted to grey for 1.
        batch_size: Training batch size.
        eval_batch_size: Calibration/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        calibration_size: Held-out images: an int count or a float fraction in (0, 1) of the training split.
            ``None`` uses the dataset's default (5,000 for CIFAR and Fashion-MNIST, MSDNet's convention;
            50,000 for ImageNet; 1,000 for the embedded subset; 200 for VTAB-1k; 10% otherwise). Only with
            ``val_source="holdout"``.
        val_source: ``"holdout"`` (calibration split carved from train) or ``"dataset"`` (the dataset's own
            validation split, which then serves as calibration split; the whole train split is used).
            ``None``: the dataset's default (``"dataset"`` for VTAB-1k: train on ``train800``, calibrate on
            ``val200``; ``"holdout"`` otherwise).
        train_subset: Cap on training images (seeded, drawn after the calibration split is removed).
        seed: Seed of the calibration draw, the training cap and synthetic images.
        timm_model: timm model name whose pretrained config supplies image size, mean, std, interpolation
            and crop_pct (read without building the model or downloading anything).
        mean: Per-channel mean override.
        std: Per-channel standard deviation override.
        interpolation: Resize interpolation override.
        crop_pct: Evaluation centre-crop fraction override.
        train_augment: Augment training images; if false, train uses the evaluation transform. ``None``: the
            dataset's default (off for VTAB-1k, whose protocol trains without augmentation; on otherwise).
        resize_mode: ``"center_crop"`` (timm's resize to ``image_size / crop_pct`` + centre crop) or
            ``"squash"`` (resize straight to ``image_size`` x ``image_size``, as the VTAB-1k protocol does).
            ``None``: the dataset's default (``squash`` for VTAB-1k, ``center_crop`` otherwise).
        download: Download the files into ``root`` in ``prepare_data`` (datasets torchvision can fetch).
        pin_memory: Pin batches in page-locked memory (default: when CUDA is available).
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        calibration_indices_file: A ``calibration_indices.json`` from an earlier run whose split to reuse.
        synthetic_sizes: Train and test lengths of ``synthetic``.
        synthetic_num_classes: Number of classes of ``synthetic``.
        predict_paths: Unlabelled images for ``dmpo predict``: a folder (recursive; jpg, jpeg, png, bmp,
            gif, tif, tiff, webp in any case), one image or a text file with one path per line. Then the
            data module serves ``predict`` only and reads no dataset (``root`` may be absent):
            :attr:`num_classes` and :attr:`classes` are ``None`` and come from the checkpoint. Images get
            the evaluation transform (same size, crop, mean/std and channels as the test split).
        skip_unreadable_images: Leave out image files that cannot be decoded (truncated or corrupt), with a
            warning giving their count and the first paths. Building the data module then decodes every
            file of the file-based splits once (one extra pass over the data). Off by default: the first
            unreadable file stops the run with an error naming it.
        predict_max_pixels: ``predict_paths`` images whose header gives more pixels are not decoded: their
            row in the predictions CSV says so (default 8192 x 8192).
        task: ``vtab1k`` only: which of the 19 tasks (the folder ``root/<task>`` of the common release).
        train_list: ``image_list`` only: the training list file (lines ``<relative/path> <label>``),
            relative to ``root``; default ``train.txt``.
        val_list: ``image_list`` only: the dataset's own validation list, served with
            ``val_source="dataset"``; default none.
        test_list: ``image_list`` only: the test list file; default ``test.txt``.
        classes_file: ``image_list`` only: class names, one per line (line ``i`` = label ``i``); without it
            the number of classes is the largest label in the lists + 1.

    Raises:
        ValueError: On an unknown dataset or out-of-range argument (the message says what is allowed).
        DatasetLayoutError: If ``root`` is needed and missing.
    """

    test_split_names: tuple[str, str] = ("test", "calibration")
    """Names of the loaders returned by :meth:`test_dataloader`, by ``dataloader_idx``."""

    def __init__(
        self,
        dataset: DatasetName = "fashion_mnist_subset",
        root: str | None = None,
        image_size: int | None = None,
        in_chans: Literal[1, 3] = 3,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        calibration_size: int | float | None = None,
        val_source: ValSource | None = None,
        train_subset: int | None = None,
        seed: int = 0,
        timm_model: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        interpolation: Interpolation | None = None,
        crop_pct: float | None = None,
        train_augment: bool | None = None,
        download: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        calibration_indices_file: str | None = None,
        synthetic_sizes: tuple[int, int] = (256, 64),
        synthetic_num_classes: int = 10,
        predict_paths: str | None = None,
        skip_unreadable_images: bool = False,
        predict_max_pixels: int = DEFAULT_MAX_PIXELS,
        task: VtabTask | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        test_list: str | None = None,
        classes_file: str | None = None,
        resize_mode: ResizeMode | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = get_spec(dataset)
        self.dataset = dataset
        _check_positive(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            train_subset=train_subset,
            synthetic_num_classes=synthetic_num_classes,
        )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if val_source is not None and val_source not in ("holdout", "dataset"):
            raise ValueError(f"val_source must be 'holdout' or 'dataset', got {val_source!r}")
        if task is not None and dataset != "vtab1k":
            raise ValueError(f"task applies to dataset 'vtab1k' only, but dataset is {dataset!r}; remove it")
        if dataset == "vtab1k" and task not in VTAB1K_TASKS:
            raise ValueError(
                f"dataset 'vtab1k' needs task: one of the 19 VTAB-1k tasks ({', '.join(VTAB1K_TASKS)}), "
                f"got {task!r}"
            )
        check_list_options(
            dataset,
            train_list=train_list,
            val_list=val_list,
            test_list=test_list,
            classes_file=classes_file,
        )
        resolved_source = val_source if val_source is not None else self.spec.default_val_source
        if resolved_source == "dataset" and self.spec.has_val_split is False:
            with_val = (
                "flowers102, vtab1k, image_folder (with both val/ and test/), image_list (with val_list), "
                "cub200, nabirds, stanford_dogs, stanford_cars (with VPT's split files)"
            )
            raise ValueError(
                f"val_source='dataset' but {dataset!r} has no validation split of its own; use "
                f"val_source='holdout' (datasets with one: {with_val})"
            )
        if resolved_source == "dataset" and calibration_indices_file is not None:
            raise ValueError("calibration_indices_file applies to val_source='holdout' only")
        if resolved_source == "dataset" and calibration_size is not None:
            raise ConfigError(
                f"calibration_size={calibration_size!r} applies to val_source='holdout' only; with "
                f"val_source='dataset' the calibration split is {dataset!r}'s own validation split"
                f"{' (val200.txt)' if dataset == 'vtab1k' else ''}: remove calibration_size, or set "
                "val_source='holdout' to hold calibration images out of the training split",
                option="data.init_args.calibration_size",
            )
        # With predict_paths no dataset is read, so its root may be gone (a trained model on a new machine).
        self.predict_files = list_image_paths(predict_paths) if predict_paths is not None else None
        self.root = resolve_root(self.spec, root, download) if predict_paths is None else None
        self.in_chans = in_chans
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        if isinstance(calibration_size, float) and calibration_size > 1 and calibration_size.is_integer():
            # "5000" may reach us as 5000.0 through int | float parsing
            calibration_size = int(calibration_size)
        self.calibration_size = (
            calibration_size if calibration_size is not None else self.spec.default_calibration_size
        )
        if resolved_source == "holdout":
            split_utils.check_calibration_size(self.calibration_size)
        self.val_source: ValSource = resolved_source
        self.train_subset = train_subset
        self.seed = seed
        self.train_augment = train_augment if train_augment is not None else self.spec.default_train_augment
        self.resize_mode: ResizeMode = (
            resize_mode if resize_mode is not None else self.spec.default_resize_mode
        )
        if self.resize_mode not in ("center_crop", "squash"):
            raise ValueError(f"resize_mode must be 'center_crop' or 'squash', got {self.resize_mode!r}")
        self.task = task
        self.download = download
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.synthetic_sizes = (int(synthetic_sizes[0]), int(synthetic_sizes[1]))
        self.synthetic_num_classes = synthetic_num_classes
        self.data_config: DataConfig = resolve_data_config(
            in_chans=in_chans,
            default_image_size=self.spec.default_image_size,
            timm_model=timm_model,
            image_size=image_size,
            mean=mean,
            std=std,
            interpolation=interpolation,
            crop_pct=crop_pct,
        )
        self._build_options = BuildOptions(
            root=self.root,
            image_size=self.data_config.image_size,
            seed=seed,
            synthetic_sizes=self.synthetic_sizes,
            synthetic_num_classes=synthetic_num_classes,
            val_source=resolved_source,
            task=task,
            train_list=train_list if train_list is not None else "train.txt",
            val_list=val_list,
            test_list=test_list if test_list is not None else "test.txt",
            classes_file=classes_file,
        )
        self.skip_unreadable_images = skip_unreadable_images
        self.predict_max_pixels = check_max_pixels(predict_max_pixels, "data.init_args.predict_max_pixels")
        self._file_payload = (
            split_utils.load_indices(calibration_indices_file, dataset, task)
            if calibration_indices_file and predict_paths is None
            else None
        )
        self._base: DatasetSplits | None = None
        self._train_size: int | None = None
        self._calibration_indices: list[int] | None = None
        self._pending_indices: tuple[list[int], str] | None = None
        self._views: dict[str, SplitView] = {}
        self.calibration_indices_path: Path | None = None
        self._num_classes: int | None = None
        if predict_paths is None:
            if self.spec.name == "image_list" or not download:
                # Index the files now: a wrong layout or calibration size is refused before a run folder
                # exists. With download=True the files may only arrive in prepare_data: setup builds them.
                self._build()
            else:
                self._num_classes = self._count_classes(None)

    def _count_classes(self, splits: DatasetSplits | None) -> int:
        """The dataset's class count (from the registry, the folders, or the built lists); at least 2."""
        count = dataset_num_classes(
            self.spec, self.root, self.synthetic_num_classes, task=self.task, splits=splits
        )
        if count < 2:
            where = f" under {self.root}" if self.root is not None else ""
            option = {"synthetic": "synthetic_num_classes", "image_list": "the labels in the list files"}.get(
                self.dataset, "the dataset's class folders"
            )
            raise ValueError(
                f"dataset {self.dataset!r}{where} has {count} class; classification needs at least 2 "
                f"(check {option})"
            )
        return count

    def _build(self) -> None:
        """Index the dataset's files, check its labels, and draw (and check) the calibration split."""
        if self._base is not None:
            return
        if self.spec.name != "image_list":  # known without reading (or from the class folders' names)
            self._num_classes = self._count_classes(None)
        base = self.spec.builder(self._build_options)
        if self._num_classes is None:
            self._num_classes = self._count_classes(base)
        if self.skip_unreadable_images:
            base = self._drop_unreadable(base)
        for name, part in (("train", base.train), ("test", base.test), ("val", base.val)):
            self._check_labels(name, part)
        if self.val_source == "dataset" and base.val is None:
            vpt = "VPT's split files train.json, val.json and test.json"
            need = {
                "image_list": "a val_list",
                "image_folder": "both val/ and test/ folders",
                "cub200": vpt,
                "nabirds": vpt,
                "stanford_dogs": vpt,
                "stanford_cars": vpt,
            }.get(self.dataset, "a validation split")
            raise ValueError(
                f"val_source='dataset' but {self.dataset!r} under {self.root} has no validation split "
                f"({self.dataset} needs {need}); use val_source='holdout'"
            )
        self._train_size = len(base.train)  # type: ignore[arg-type]
        # draw (and validate) the split before keeping the datasets, so a bad size leaves no half state
        self._calibration_indices = self._initial_indices() if self.val_source == "holdout" else None
        self._base = base

    @property
    def num_classes(self) -> int | None:
        """Number of classes (known right after ``__init__``, for linking into the model).

        ``None`` with ``predict_paths``: no dataset is read, the model's comes from its checkpoint.
        """
        return self._num_classes

    @property
    def calibration_indices(self) -> tuple[int, ...] | None:
        """Held-out indices into the training split.

        ``None`` before ``setup`` and with ``val_source="dataset"``.
        """
        return None if self._calibration_indices is None else tuple(self._calibration_indices)

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names in label order, when the dataset provides them (after ``setup``)."""
        return getattr(self._base.train, "classes", None) if self._base is not None else None

    def check_num_classes(self, model_num_classes: int) -> None:
        """Raise if a model's number of outputs differs from the dataset's number of classes.

        Raises:
            ValueError: On a mismatch.
        """
        if self.num_classes is None:
            return  # predict_paths: unlabelled images, any number of classes
        if model_num_classes != self.num_classes:
            raise ValueError(
                f"the model predicts {model_num_classes} classes but dataset {self.dataset!r} has "
                f"{self.num_classes}; set the model's num_classes to {self.num_classes}"
            )

    def prepare_data(self) -> None:
        """Download the dataset into ``root`` if ``download=True`` (nothing else)."""
        if self.download and self.spec.downloader is not None and self.root is not None:
            self.spec.downloader(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Read the dataset and build the splits (idempotent; every stage builds all of them).

        With ``predict_paths`` only ``predict`` is served and no dataset is read.

        Raises:
            ValueError: If ``predict_paths`` is set and ``stage`` is not ``predict``.
        """
        if self.predict_files is not None:
            if stage != "predict":
                raise ValueError(
                    f"data.predict_paths is set, so this data module serves `dmpo predict` only (stage "
                    f"{stage!r} needs the dataset); remove predict_paths to fit, validate or test"
                )
            return
        self._build()
        if self._pending_indices is not None:
            self._apply_indices(*self._pending_indices)
            self._pending_indices = None
        self._write_indices_file()

    def train_dataloader(self) -> DataLoader:
        """Training loader (shuffled, augmented)."""
        return self._dataloader("train")

    def val_dataloader(self) -> DataLoader:
        """The calibration split, used for validation during ``fit``."""
        return self._dataloader("calibration")

    def test_dataloader(self) -> list[DataLoader]:
        """``[test, calibration]`` loaders (``dataloader_idx`` 0 and 1; see :attr:`test_split_names`).

        Every batch also names its split (``SPLIT_KEY``), which is what ``DMPOModule.test_step`` goes by.
        """
        return [self._dataloader("test"), self._dataloader("calibration")]

    def predict_dataloader(self) -> DataLoader:
        """The images of ``predict_paths`` if given, else the test split (both with evaluation transforms)."""
        if self.predict_files is None:
            return self._dataloader("test")
        pin = self.pin_memory if self.pin_memory is not None else _cuda_available()
        return DataLoader(
            self.predict_dataset(),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def predict_dataset(self) -> ImagePathDataset:
        """The ``predict_paths`` images with the evaluation transform (size, crop, mean/std, channels).

        Raises:
            ValueError: If ``predict_paths`` was not given.
        """
        if self.predict_files is None:
            raise ValueError("predict_dataset() needs data.predict_paths (a folder or a text file of paths)")
        native = self.data_config.image_size if self.dataset == "synthetic" else self.spec.native_size
        transform = build_transform(
            self.data_config,
            in_chans=self.in_chans,
            train=False,
            native_size=native,
            resize_mode=self.resize_mode,
        )
        return ImagePathDataset(
            self.predict_files,
            transform,
            in_chans=self.in_chans,
            image_size=self.data_config.image_size,
            exact_size=is_native_small(self.data_config, native),
            max_pixels=self.predict_max_pixels,
            max_pixels_option="data.init_args.predict_max_pixels",
        )

    def calibration_dataloader(self) -> DataLoader:
        """The calibration split with evaluation transforms."""
        return self._dataloader("calibration")

    def dataloader(self, split: Split) -> DataLoader:
        """The loader of ``split`` (``"train"``, ``"calibration"`` or ``"test"``)."""
        if split not in ("train", "calibration", "test"):
            raise ValueError(f"split must be 'train', 'calibration' or 'test', got {split!r}")
        return self._dataloader(split)

    def split_dataset(self, split: Split) -> Dataset:
        """The dataset behind ``split``'s loader (runs ``setup`` if needed)."""
        if self._base is None:
            self.setup()
        if split not in self._views:
            self._views[split] = self._build_view(split)
        return self._views[split]

    def state_dict(self) -> dict[str, Any]:
        """The calibration split, stored in Lightning checkpoints."""
        state = {
            "dataset": self.dataset,
            "seed": self.seed,
            "val_source": self.val_source,
            "train_size": self._train_size,
            "calibration_indices": self._calibration_indices,
        }
        if self.task is not None:
            state["task"] = self.task
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the calibration split from a checkpoint (warns if it differs from the fresh one)."""
        predicting = self.trainer is not None and self.trainer.state.fn == "predict"
        if self.predict_files is not None or predicting:
            return  # predict reads the test split or new images: the calibration split is not used
        if state_dict.get("dataset") != self.dataset or state_dict.get("task") != self.task:
            theirs = _describe(state_dict.get("dataset"), state_dict.get("task"))
            rank_zero_warn(
                f"the checkpoint's calibration split is for {theirs}, not "
                f"{_describe(self.dataset, self.task)}; keeping this DataModule's own split"
            )
            return
        if state_dict.get("train_size") not in (None, self._train_size) and self._train_size is not None:
            rank_zero_warn(
                f"the checkpoint's calibration split was drawn from a training split of "
                f"{state_dict.get('train_size')} images, this one has {self._train_size}; keeping this "
                "DataModule's own split"
            )
            return
        indices = state_dict.get("calibration_indices")
        if indices is None or self.val_source != "holdout":
            return
        self._pending_indices = (list(indices), "the checkpoint's datamodule state")
        if self._base is not None:  # Lightning restores after setup: apply now, rebuild the views lazily
            self.setup()

    def _initial_indices(self) -> list[int]:
        assert self._train_size is not None
        if self._file_payload is not None:
            source = f"calibration_indices_file (dataset {self.dataset!r})"
            drawn_from = self._file_payload.get("train_size")
            if isinstance(drawn_from, int) and drawn_from != self._train_size:
                raise ConfigError(
                    f"{source} was drawn from a training split of {drawn_from} images, but this one has "
                    f"{self._train_size} (other files, list, task or val_source); its indices would pick "
                    "other images",
                    option="data.init_args.calibration_indices_file",
                )
            return split_utils.check_indices(self._file_payload["indices"], self._train_size, source)
        count = split_utils.calibration_count(self.calibration_size, self._train_size, self.dataset)
        return split_utils.draw_split(self._train_size, count, self.seed)

    def _apply_indices(self, indices: list[int], source: str) -> None:
        assert self._train_size is not None
        checked = split_utils.check_indices(indices, self._train_size, source)
        if checked != self._calibration_indices:
            rank_zero_warn(
                f"using the calibration split from {source} ({len(checked)} images), which differs from the "
                f"one this DataModule computed (dataset={self.dataset!r}, seed={self.seed})"
            )
            self._calibration_indices = checked
            self._views.clear()

    def _drop_unreadable(self, base: DatasetSplits) -> DatasetSplits:
        """Leave out files that cannot be decoded (``skip_unreadable_images``); warn with count and paths."""
        parts: dict[str, Dataset | None] = {}
        dropped: list[str] = []
        for name in ("train", "test", "val"):
            part = getattr(base, name)
            if isinstance(part, ImageListDataset):
                part, bad = part.without_unreadable(workers=max(1, self.num_workers))
                if len(part) == 0:
                    raise ValueError(f"every image of the {name} split of {self.dataset!r} is unreadable")
                dropped.extend(bad)
            parts[name] = part
        if dropped:
            rank_zero_warn(
                f"skip_unreadable_images: left out {len(dropped)} unreadable image file(s) of "
                f"{self.dataset!r}: {dropped[:5]}{' ...' if len(dropped) > 5 else ''}"
            )
        return DatasetSplits(**parts)  # type: ignore[arg-type]

    def _check_labels(self, name: str, part: Dataset | None) -> None:
        labels = getattr(part, "labels", None)
        num_classes = self.num_classes
        if num_classes is None:  # unlabelled predict images: the classes come from the checkpoint
            return
        if (
            labels is not None
            and len(labels)
            and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes
        ):
            raise ValueError(
                f"{self.dataset!r} {name} split has labels in [{int(labels.min())}, {int(labels.max())}] but "
                f"the dataset has {num_classes} classes (allowed 0..{num_classes - 1}); "
                f"check the files under {self.root}"
            )

    def _write_indices_file(self) -> None:
        trainer = self.trainer
        if trainer is None or self._train_size is None:
            return
        log_dir = trainer.log_dir  # every rank must call it: it broadcasts
        if log_dir is None or not trainer.is_global_zero:
            return
        payload = split_utils.indices_payload(
            self.dataset, self.seed, self._train_size, self._calibration_indices or [], self.task
        )
        payload["val_source"] = self.val_source
        if self._calibration_indices is None:
            payload["indices"] = None
        self.calibration_indices_path = split_utils.save_indices(
            Path(log_dir) / split_utils.INDICES_FILENAME, payload
        )
        rank_zero_info(
            f"calibration split ({payload['size']} images) saved to {self.calibration_indices_path}"
        )

    def _build_view(self, split: str) -> SplitView:
        assert self._base is not None and self._train_size is not None
        native = self.data_config.image_size if self.dataset == "synthetic" else self.spec.native_size
        train = split == "train"
        transform = build_transform(
            self.data_config,
            in_chans=self.in_chans,
            train=train and self.train_augment,
            native_size=native,
            resize_mode=self.resize_mode,
        )
        if split == "test":
            return SplitView(self._base.test, None, transform, split)
        if self.val_source == "dataset":
            if train:
                indices = split_utils.remaining_indices(self._train_size, [], self.seed, self.train_subset)
                return SplitView(self._base.train, indices, transform, split)
            return SplitView(self._base.val, None, transform, split)  # type: ignore[arg-type]
        assert self._calibration_indices is not None
        if train:
            indices = split_utils.remaining_indices(
                self._train_size, self._calibration_indices, self.seed, self.train_subset
            )
            return SplitView(self._base.train, indices, transform, split)
        return SplitView(self._base.train, self._calibration_indices, transform, split)

    def _dataloader(self, split: Split) -> DataLoader:
        train = split == "train"
        workers = self.num_workers
        pin = self.pin_memory if self.pin_memory is not None else _cuda_available()
        return DataLoader(
            self.split_dataset(split),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=self.persistent_workers and workers > 0,
        )


def _describe(dataset: object, task: object) -> str:
    return f"dataset {dataset!r}" + (f" task {task!r}" if task is not None else "")


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer (or None where allowed), got {value!r}")


def _cuda_available() -> bool:
    return torch.cuda.is_available()
