"""Benchmark datasets behind one LightningDataModule: registry, on-disk readers, transforms, splits."""

from dmpo_lightning.data.datamodule import BenchmarkDataModule
from dmpo_lightning.data.datasets import (
    ArrayImageDataset,
    DatasetSplits,
    ImageListDataset,
    SplitTagged,
    SplitView,
    SyntheticImageDataset,
)
from dmpo_lightning.data.errors import DatasetLayoutError, UnreadableImageError
from dmpo_lightning.data.fashion_mnist import load_fashion_mnist, load_fashion_mnist_subset, read_idx
from dmpo_lightning.data.registry import DATASETS, DatasetName, DatasetSpec, get_spec
from dmpo_lightning.data.transforms import DataConfig, build_transform, resolve_data_config, timm_data_config

__all__ = [
    "DATASETS",
    "ArrayImageDataset",
    "BenchmarkDataModule",
    "DataConfig",
    "DatasetLayoutError",
    "DatasetName",
    "DatasetSpec",
    "DatasetSplits",
    "ImageListDataset",
    "SplitTagged",
    "SplitView",
    "SyntheticImageDataset",
    "UnreadableImageError",
    "build_transform",
    "get_spec",
    "load_fashion_mnist",
    "load_fashion_mnist_subset",
    "read_idx",
    "resolve_data_config",
    "timm_data_config",
]
