"""Regenerate src/dmpo_lightning/data/assets/fashion_mnist_subset.npz from the full Fashion-MNIST idx files.

Usage:
    python benchmarks/make_fashion_mnist_subset.py [--root /usr/share/datasets/fashion-mnist] [--out PATH]

The source defaults to the files of the Debian package ``dataset-fashion-mnist``. The draw is
class-balanced (1,000 train / 200 test images per class) with numpy's default_rng(seed) for the
training split and default_rng(seed + 1) for the test split, seed 0; indices are sorted, so the subset
keeps the original order. The script fails if the file exceeds 8 MB, and prints the SHA-256 of the
arrays so a regenerated file can be compared with the shipped one.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from dmpo_lightning.data import fashion_mnist

MAX_BYTES = 8 * 1024 * 1024
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/dmpo_lightning/data" / fashion_mnist.SUBSET_ASSET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=str(fashion_mnist.DEBIAN_FASHION_MNIST_DIR), help="full dataset folder"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output .npz file")
    parser.add_argument("--seed", type=int, default=fashion_mnist.SUBSET_SEED)
    args = parser.parse_args()

    arrays = fashion_mnist.load_fashion_mnist(args.root)
    subset = fashion_mnist.make_subset(arrays, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **subset)
    size = out.stat().st_size
    digest = hashlib.sha256()
    for key in sorted(subset):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(subset[key]).tobytes())
    for key, value in subset.items():
        extra = f", per-class counts {np.bincount(value).tolist()}" if key.endswith("labels") else ""
        print(f"{key}: {value.shape} {value.dtype}{extra}")
    print(f"wrote {out} ({size / 1e6:.2f} MB), arrays sha256 {digest.hexdigest()}")
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size} bytes, over the {MAX_BYTES}-byte limit")


if __name__ == "__main__":
    main()
