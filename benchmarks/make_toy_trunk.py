"""Pre-train the packaged toy trunk ``dmpo_toy_vit_fmnist`` (src/dmpo_lightning/models/assets/).

Usage:
    python benchmarks/make_toy_trunk.py [--labels families|fine] [--epochs 8] [--threads 2] [--out PATH]

Data: the full Fashion-MNIST of the Debian package ``dataset-fashion-mnist`` minus, exactly by index, the
images of the subset embedded in the package (``fashion_mnist.indices_outside_subset``): 50,000 training
images for pre-training and 8,000 test images to monitor it. The quickstart tunes and tests only on the
subset, so none of its images was seen in pre-training.

Objective: cross-entropy on five garment families (``--labels families``, default: tops, trousers, dresses,
footwear, bags; ``toy_backbone.TOY_TRUNK_COARSE_OF_FINE``) or on the ten classes (``--labels fine``). The
trunk then knows garments but not the fine distinctions the quickstart tunes for, which a frozen trunk
cannot learn without PEFT. Architecture and normalisation are those registered for
``dmpo_toy_vit_fmnist`` (``toy_backbone.TOY_TRUNK_ARCH``, ``TOY_TRUNK_MEAN``/``TOY_TRUNK_STD``); training
augmentation is a horizontal flip; AdamW with linear warm-up and cosine decay, seeded.

Output: the trunk's timm state dict (no classifier) as fp16 safetensors, with the settings, the command and
the measured accuracy in its metadata, and ``TOY_TRUNK_NOTICE.txt`` next to it. An existing file is kept
unless ``--overwrite`` is given. After writing, the file is loaded back through timm's registered
``pretrained=True`` path and compared with the trained trunk rounded to fp16 (the script fails if any
tensor differs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dmpo_lightning.data import fashion_mnist
from dmpo_lightning.models import toy_backbone

PACKAGE_ASSETS = Path(__file__).resolve().parents[1] / "src/dmpo_lightning/models"
DEFAULT_OUT = PACKAGE_ASSETS / toy_backbone.TOY_TRUNK_ASSET
NOTICE_NAME = "TOY_TRUNK_NOTICE.txt"
MAX_BYTES = 4 * 1024 * 1024


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` to the model input ``[N, 1, 28, 28]``: ToTensor + Normalize(mean, std)."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0).unsqueeze(1)
    return (x - toy_backbone.TOY_TRUNK_MEAN[0]) / toy_backbone.TOY_TRUNK_STD[0]


def targets(labels: np.ndarray, kind: str) -> np.ndarray:
    """Fine labels to the pre-training labels (``families`` or ``fine``)."""
    if kind == "fine":
        return labels.astype(np.int64)
    return np.asarray(toy_backbone.TOY_TRUNK_COARSE_OF_FINE, dtype=np.int64)[labels]


def trunk_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The timm state dict of the trunk without the classifier, in fp16, contiguous."""
    return {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("head.")
    }


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    hits = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
    )
    return hits / len(x)


def verify(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Load ``path`` through timm's pretrained loader and check every tensor equals ``expected``."""
    overlay = {"file": str(path.resolve())}
    loaded = timm.create_model(
        toy_backbone.TOY_TRUNK_NAME, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
    ).state_dict()
    if set(loaded) != set(expected):
        raise SystemExit(f"{path}: loaded keys differ: {sorted(set(loaded) ^ set(expected))}")
    for key, value in expected.items():
        if not torch.equal(loaded[key], value.float()):
            raise SystemExit(f"{path}: tensor {key} differs from the trained trunk after loading")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(fashion_mnist.DEBIAN_FASHION_MNIST_DIR))
    parser.add_argument("--labels", choices=("families", "fine"), default="families")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke test)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing weights file")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise SystemExit(f"--out must end in .safetensors, got {out}")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it (nothing was written)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    full = fashion_mnist.load_fashion_mnist(args.root)
    train_idx = fashion_mnist.indices_outside_subset("train", len(full.train_labels))
    test_idx = fashion_mnist.indices_outside_subset("test", len(full.test_labels))
    if args.limit:
        train_idx, test_idx = train_idx[: args.limit], test_idx[: args.limit]
    x_train = normalise(full.train_images[train_idx])
    y_train = torch.from_numpy(targets(full.train_labels[train_idx], args.labels))
    x_test = normalise(full.test_images[test_idx])
    y_test = torch.from_numpy(targets(full.test_labels[test_idx], args.labels))
    num_classes = 10 if args.labels == "fine" else len(toy_backbone.TOY_TRUNK_COARSE_CLASSES)
    print(
        f"pre-training on {len(x_train)} training images outside the subset, {args.labels} labels "
        f"({num_classes} classes); monitoring on {len(x_test)} test images outside the subset"
    )

    model = timm.create_model(
        toy_backbone.TOY_TRUNK_NAME, pretrained=False, num_classes=num_classes, drop_path_rate=args.drop_path
    )
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total, warmup = steps_per_epoch * args.epochs, max(1, steps_per_epoch // 2)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x_train)))
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            xb = x_train[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            xb[flip] = xb[flip].flip(-1)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        acc = accuracy(model, x_test, y_test)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": running / steps_per_epoch,
                "test_accuracy": acc,
                "seconds": time.perf_counter() - start,
            }
        )
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {running / steps_per_epoch:.4f}, "
            f"held-out {args.labels} top-1 {100 * acc:.2f} %, {time.perf_counter() - start:.0f} s",
            flush=True,
        )

    state = trunk_state(model)
    command = "python benchmarks/make_toy_trunk.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    indices_digest = hashlib.sha256(train_idx.tobytes() + test_idx.tobytes()).hexdigest()
    meta = {
        "architecture": toy_backbone.TOY_TRUNK_NAME,
        "arch": toy_backbone.TOY_TRUNK_ARCH,
        "labels": args.labels,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "drop_path": args.drop_path,
        "seed": args.seed,
        "num_train": len(x_train),
        "num_test": len(x_test),
        "indices_sha256": indices_digest,
        "held_out_accuracy": history[-1]["test_accuracy"] if history else None,
        "train_seconds": time.perf_counter() - start,
        "threads": args.threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"dmpo_toy_trunk": json.dumps(meta)})
    tmp.replace(out)
    verify(out, state)
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size} bytes, over the {MAX_BYTES}-byte limit")
    (out.parent / NOTICE_NAME).write_text(notice(meta, history, size))
    print(json.dumps({k: meta[k] for k in ("labels", "held_out_accuracy", "train_seconds", "command")}))
    print(f"wrote {out} ({size / 1e6:.2f} MB, fp16) and {out.parent / NOTICE_NAME}; reload verified")


def notice(meta: dict, history: list[dict], size: int) -> str:
    """The notice shipped next to the weights: what they are, how they were made, the data licence."""
    lines = "\n".join(
        f"  epoch {h['epoch']}: train loss {h['train_loss']:.4f}, "
        f"held-out top-1 {100 * h['test_accuracy']:.2f} %"
        for h in history
    )
    labels = (
        "five garment families (tops = T-shirt/top, Pullover, Coat, Shirt; trousers; dresses; footwear = "
        "Sandal, Sneaker, Ankle boot; bags)"
        if meta["labels"] == "families"
        else "the ten Fashion-MNIST classes"
    )
    return f"""Toy pre-trained trunk shipped with dmpo-lightning: {meta["architecture"]}
{"=" * (52 + len(meta["architecture"]))}

dmpo_toy_vit_fmnist.safetensors ({size / 1e6:.2f} MB) holds the fp16 timm state dict (no classifier) of a
small ViT: {meta["arch"]} (the vit_tiny_patch16_224 family scaled to 28x28 grey images).
Use it as backbone: dmpo_toy_vit_fmnist with pretrained: true (configs/quickstart.yaml).

How it was made (torch {meta["torch"]}, timm {meta["timm"]}, {meta["threads"]} CPU threads,
{meta["train_seconds"] / 60:.1f} min, {meta["created"]}):

  {meta["command"]}

Data: the Fashion-MNIST files of the Debian package dataset-fashion-mnist, minus, by index, every image of
the subset embedded in this package (data/assets/fashion_mnist_subset.npz, its train_source_indices and
test_source_indices): {meta["num_train"]} training images to train, {meta["num_test"]} test images to
monitor (sha256 of the int64 index arrays: {meta["indices_sha256"]}). Labels: {labels}.
Training: AdamW (lr {meta["lr"]}, weight decay {meta["weight_decay"]}), warm-up then cosine, batch
{meta["batch_size"]}, {meta["epochs"]} epochs, drop path {meta["drop_path"]}, horizontal flips, seed
{meta["seed"]}, inputs (x / 255 - 0.2860) / 0.3530.
{lines}

Licence of the data: Fashion-MNIST, Copyright (c) 2017 Zalando SE, MIT licence
(https://github.com/zalandoresearch/fashion-mnist; the full text is in
data/assets/FASHION_MNIST_NOTICE.txt). These weights are a model trained on it and are distributed
with dmpo-lightning under its licence (Apache-2.0).
"""


if __name__ == "__main__":
    main()
