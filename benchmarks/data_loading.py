"""Training-loader throughput of BenchmarkDataModule on fake CIFAR pickles and a fake JPEG class-folder tree.

Usage:
    python benchmarks/data_loading.py [--images 512] [--batch-size 64] [--sizes 32 224] [--workers 0 2]

Writes the data to a temporary folder (nothing is downloaded), then for each format, image size and
worker count iterates the training loader once: the first batches (worker start-up included) are a
warm-up, the rest are timed. Prints images/s per configuration. The JPEGs are smooth 400x300 images,
about the decode cost of a natural photo of that size.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dmpo_lightning.data import BenchmarkDataModule

WARMUP_BATCHES = 2


def write_fake_cifar(root: Path, images: int, rng: np.random.Generator) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per_batch = max(1, images // 5)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)


def write_fake_folder(root: Path, images: int, rng: np.random.Generator, classes: int = 10) -> None:
    y, x = np.mgrid[0:300, 0:400]
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class_{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            phase = rng.uniform(0, 6.28, size=3)
            freq = rng.uniform(0.005, 0.05, size=3)
            pixels = np.stack(
                [127 + 120 * np.sin(freq[c] * (x + 1.3 * y) + phase[c]) for c in range(3)], axis=-1
            )
            pixels += rng.normal(0, 8, size=pixels.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                folder / f"{i:05d}.jpg", quality=90
            )


def measure(dm: BenchmarkDataModule, label: str) -> float:
    dm.setup("fit")
    loader = dm.train_dataloader()
    iterator = iter(loader)
    for _ in range(WARMUP_BATCHES):
        next(iterator)
    count, start = 0, time.perf_counter()
    for batch in tqdm(iterator, total=len(loader) - WARMUP_BATCHES, desc=label, leave=False):
        count += len(batch["label"])
    elapsed = time.perf_counter() - start
    del iterator
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="training images per format")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)  # loader cost, not intra-op parallelism of ToTensor/Normalize

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"cifar10": Path(tmp) / "cifar", "image_folder": Path(tmp) / "folder"}
        start = time.perf_counter()
        write_fake_cifar(roots["cifar10"], args.images, rng)
        write_fake_folder(roots["image_folder"], args.images, rng)
        elapsed = time.perf_counter() - start
        print(f"wrote fake data ({args.images} training images per format) in {elapsed:.1f} s")
        print(f"{'format':<14}{'size':>6}{'workers':>9}{'images/s':>11}")
        for dataset, root in roots.items():
            for size in args.sizes:
                for workers in args.workers:
                    dm = BenchmarkDataModule(
                        dataset,  # type: ignore[arg-type]
                        root=str(root),
                        image_size=size,
                        batch_size=args.batch_size,
                        num_workers=workers,
                        calibration_size=1,
                        pin_memory=False,
                        persistent_workers=False,
                    )
                    rate = measure(dm, f"{dataset} {size}px {workers}w")
                    print(f"{dataset:<14}{size:>6}{workers:>9}{rate:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
