"""Offline pre-train-then-tune benchmark: DMPO against its baselines and ablations (EVALUATION.md section 5).

No pre-trained ViT can be downloaded here, so the benchmark makes its own "pre-trained backbone":

1. **Source** (cached): a ViT (timm ``vit_tiny_patch16_224`` architecture: 12 blocks, D = 192, 3 heads, 7x7
   patches on 28x28 grey images) is trained from scratch on a fixed, seeded, class-balanced half (half A)
   of the Fashion-MNIST training set. Its weights are saved as a timm state dict, the format
   ``DMPOModule(checkpoint_path=...)`` loads, in ``<cache>/pretrain_<key>/backbone.pth`` (key = hash of
   every setting, the proxy included), and reused by later runs.
2. **Target**: every method variant in ``configs/model/<variant>.yaml`` (the same files a GPU user trains
   with) is tuned from that checkpoint on the *other* half (half B): a seeded subset of training images, a
   calibration split held out from the same half, and tested on the test images. Runs go through
   the package's own code path: ``DMPOModule`` + ``BenchmarkDataModule`` + a Lightning ``Trainer``, then
   ``trainer.test`` (the ``dmpo test`` protocol: thresholds from the calibration split, ``report.json``).
   Only sizes are scaled to the small backbone (exit blocks, adapter / moment / covariance widths, switch
   epochs from the files' 100-epoch schedule to this one's); everything else is read from the file.

Two proxies (``--proxy``, both by default), differing only in the source's labels:

- ``same-labels``: the source learns half A's 10 labels, the target's own. Frozen features already fit
  the target, so methods end within about a point of each other (an easy proxy).
- ``coarse-to-fine``: the source learns 5 garment families of half A (:data:`COARSE_LABELS`: tops =
  T-shirt, pullover, coat, shirt; trousers; dresses; footwear = sandal, sneaker, ankle boot; bags), then is
  tuned on the 10 fine labels of half B. The families group exactly the classes Fashion-MNIST confuses
  (the upper-body garments, the shoes), so the source never needs the features that tell them apart and
  tuning must create them: the situation of a generic pre-trained trunk tuned to a fine-grained target.
  It pre-trains for ``--coarse-pretrain-epochs`` on ``--coarse-source-size`` images (default 6 on 20,000,
  the setting the issue measured).

Writes, per proxy, ONE main table (rows = variants; test top-1 at matched test cost 30/40/50/75/100 %,
read off each variant's test curve by linear interpolation; the first and the last exit with their costs;
the mean top-1 over the cost range every multi-exit variant reaches; trainable parameters; training time
relative to static PEFT), a paired table (per-seed differences dmpo - baseline, mean ± s.d.: the same seed
shares the target subset, the calibration split and the initialisation) and a per-exit table; costs are
fractions of one reference, static PEFT's full model. Also the curves (CSV), an accuracy-vs-cost plot per
proxy (PNG) and the raw results (JSON), in a new output folder.

    python benchmarks/pretrain_tune.py                 # full benchmark (see benchmarks/README.md)
    python benchmarks/pretrain_tune.py --quick         # smoke test: tiny model, a few hundred images
    python benchmarks/pretrain_tune.py --estimate      # time a few steps of each planned model; no training
    python benchmarks/pretrain_tune.py --proxy coarse-to-fine --variants dmpo,sdn_linear --seeds 5
    python benchmarks/pretrain_tune.py --summarise OUT1 OUT2 --output MERGED   # tables of several runs
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import functools
import hashlib
import io
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from dmpo_lightning import DMPOModule
from dmpo_lightning.constants import IMAGE_KEY, LABEL_KEY
from dmpo_lightning.data import BenchmarkDataModule
from dmpo_lightning.data.fashion_mnist import find_fashion_mnist_files, load_fashion_mnist
from dmpo_lightning.data.registry import DATASETS, resolve_root
from dmpo_lightning.models.backbone import resolve_exit_blocks
from dmpo_lightning.optim import param_groups
from dmpo_lightning.schedules import TwoPhaseSchedule

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = ROOT / "configs" / "model"
DEFAULT_CACHE = ROOT / "benchmarks" / "output" / "cache"
DEFAULT_OUTPUT_PARENT = ROOT / "benchmarks" / "output" / "pretrain_tune"

BACKBONE = "vit_tiny_patch16_224"
"""timm architecture of the source model (its pretrained config supplies mean/std = 0.5; no weights)."""
REFERENCE_EPOCHS = 100
"""Length of the schedule the variant files' ``schedule.switch_epoch``/``ramp_epochs`` are written for
(METHOD.md)."""
REFERENCE_DEPTH = 12
"""Depth of the backbone the variant files' ``exits.blocks`` are written for (ViT-B/16)."""
TABLE_BUDGETS = (0.25, 0.33, 0.5, 0.75, 1.0)
"""Budgets each run's ``dmpo test`` calibrates for (in results.json and curves.csv, not in the tables)."""
PREFERRED_ORDER = tuple(
    "static_peft static_peft_moment linear_probe full_finetune sdn_linear sdn_bypass sdn_moment "
    "sdn_isqrt_cov dmpo dmpo_final_moment dmpo_isqrt_cov phase1_only phase2_only switch_25 switch_50 "
    "switch_75 distill_last exit_entropy "
    "exit_patience".split()
)
"""Table order of the variants (others follow alphabetically)."""
STATIC_REFERENCE = "static_peft"
PROXIES = ("same-labels", "coarse-to-fine")
"""``same-labels``: the source is pre-trained on the 10 fine labels of half A (the target's labels).
``coarse-to-fine``: the source is pre-trained on 5 garment families of half A (:data:`COARSE_LABELS`)."""
COARSE_NAMES = ("tops", "trousers", "dresses", "footwear", "bags")
COARSE_LABELS = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)
"""Fashion-MNIST fine label -> garment family: T-shirt/top, pullover, coat, shirt -> tops; trouser ->
trousers; dress -> dresses; sandal, sneaker, ankle boot -> footwear; bag -> bags. The families are the
classes the fine-grained confusions of Fashion-MNIST happen inside (the four upper-body garments, the three
shoes): a source trained on them needs features that tell a shoe from a shirt but not a shirt from a
pullover or a sneaker from a sandal, so the target's fine labels need features the source never learned,
as when ImageNet features are tuned to a fine-grained target."""
GROUPS = ("peft", "exits", "schedule", "evaluation")
"""The option groups of a variant file: DMPOModule's (``model.init_args.<group>.<field>``) and the
top-level ``evaluation`` group (``evaluation.<field>``, the evaluator's options)."""
SCALED_KEYS = set(
    "backbone pretrained checkpoint_path img_size in_chans backbone_kwargs num_classes optimizer "
    "lr_scheduler warmup_fraction".split()
)
"""Module arguments the benchmark sets from the source model and its own options (not read from the files)."""
SCALED_FIELDS = {
    "peft": {"adapter_dim"},
    "exits": {"moment_dim", "cov_dim"},
    "evaluation": set(
        "budgets budget_unit report_dir thresholds_file predict_budget predictions_file".split()
    ),
}
"""Group fields the benchmark sets itself (sizes of the source model, the budgets and files of each test)."""


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the results (stored in results.json; cache keys hash subsets of it)."""

    # source model and pre-training
    depth: int = 12
    embed_dim: int = 192
    num_heads: int = 3
    patch_size: int = 7
    img_size: int = 28
    split_seed: int = 0
    source_size: int | None = None  # None: the whole source half (30,000)
    pretrain_epochs: int = 20
    pretrain_batch_size: int = 128
    pretrain_lr: float = 1e-3
    pretrain_label_smoothing: float = 0.1
    pretrain_drop_path: float = 0.1
    pretrain_monitor_size: int = 1000
    # coarse-to-fine proxy: pre-training sizes of its source (issue-measured: 6 epochs on 19k images)
    coarse_source_size: int | None = 20000
    coarse_pretrain_epochs: int = 6
    # target tuning
    train_size: int = 6000
    calibration_size: int = 2000
    test_size: int | None = None  # None: all 10,000 test images
    epochs: int = 4
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    adapter_dim: int = 16
    moment_dim: int = 256
    cov_dim: int = 32

    def for_proxy(self, proxy: str) -> Settings:
        """The settings a proxy pre-trains with (``coarse-to-fine`` has its own source size and epochs)."""
        if proxy == "coarse-to-fine":
            return dataclasses.replace(
                self, source_size=self.coarse_source_size, pretrain_epochs=self.coarse_pretrain_epochs
            )
        return self

    def arch_kwargs(self) -> dict[str, Any]:
        return {
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
        }


QUICK = dict(
    depth=4,
    embed_dim=64,
    num_heads=2,
    source_size=400,
    pretrain_epochs=1,
    coarse_source_size=400,
    coarse_pretrain_epochs=1,
    pretrain_batch_size=50,
    pretrain_drop_path=0.0,
    pretrain_monitor_size=50,
    train_size=200,
    calibration_size=100,
    test_size=200,
    epochs=2,
    batch_size=50,
    eval_batch_size=100,
    adapter_dim=8,
    moment_dim=64,
    cov_dim=16,
)
"""--quick: a depth-4, dim-64 model on a few hundred images (seconds; smoke tests, numbers meaningless)."""


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------- data halves
def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed idx file (uint8), the format of the Fashion-MNIST files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def _write_split(
    folder: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> None:
    folder.mkdir(parents=True)
    for split, (images, labels) in (("train", train), ("t10k", test)):
        _write_idx(folder / f"{split}-images-idx3-ubyte", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", labels)


def _files_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for key, path in sorted(find_fashion_mnist_files(root).items()):
        digest.update(key.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _subset(
    labels: np.ndarray, indices: np.ndarray, size: int | None, rng: np.random.Generator
) -> np.ndarray:
    """``size`` of ``indices``, class-balanced as far as possible (all of them for ``None``)."""
    if size is None or size >= len(indices):
        return np.sort(indices)
    classes = np.unique(labels[indices])
    per_class = math.ceil(size / len(classes))
    picked = [rng.permutation(indices[labels[indices] == c])[:per_class] for c in classes]
    return np.sort(rng.permutation(np.concatenate(picked))[:size])


def prepare_halves(settings: Settings, cache: Path, source_root: Path | None) -> tuple[Path, Path, dict]:
    """Split the Fashion-MNIST training set into a source and a target half (class-balanced, seeded).

    Writes ``source/`` (source half + the test images) and ``target/`` (target half + the test images) as
    idx files, so both are read by ``BenchmarkDataModule(dataset="fashion_mnist", root=...)``. Cached.
    """
    root = resolve_root(DATASETS["fashion_mnist"], source_root)
    payload = {
        "files": _files_digest(root),
        "split_seed": settings.split_seed,
        "source_size": settings.source_size,
        "test_size": settings.test_size,
        "version": 1,
    }
    folder = cache / f"fmnist_halves_{_hash(payload)}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        return folder / "source", folder / "target", json.loads(meta_path.read_text())
    arrays = load_fashion_mnist(root)
    labels = arrays.train_labels
    rng = np.random.default_rng(settings.split_seed)
    source, target = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        half = len(idx) // 2
        source.append(idx[:half])
        target.append(idx[half:])
    source_idx = _subset(labels, np.concatenate(source), settings.source_size, rng)
    target_idx = np.sort(np.concatenate(target))
    test_idx = _subset(arrays.test_labels, np.arange(len(arrays.test_labels)), settings.test_size, rng)
    assert not set(source_idx.tolist()) & set(target_idx.tolist())
    test = (arrays.test_images[test_idx], arrays.test_labels[test_idx])
    tmp = cache / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_split(tmp / "source", (arrays.train_images[source_idx], labels[source_idx]), test)
    _write_split(tmp / "target", (arrays.train_images[target_idx], labels[target_idx]), test)
    meta = {
        **payload,
        "root": str(root),
        "source_indices": source_idx.tolist(),
        "target_indices": target_idx.tolist(),
        "test_indices": test_idx.tolist(),
        "sizes": {"source": len(source_idx), "target": len(target_idx), "test": len(test_idx)},
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / "source", folder / "target", json.loads(meta_path.read_text())


def coarse_source(source: Path) -> Path:
    """The source half (and the test images) with garment-family labels (:data:`COARSE_LABELS`). Cached.

    Written next to ``source`` (``source_coarse/``, same images, labels mapped), so pre-training reads it
    with the same ``BenchmarkDataModule(dataset="fashion_mnist")`` path.
    """
    folder = source.parent / "source_coarse"
    if (folder / "labels.json").is_file():
        return folder
    arrays = load_fashion_mnist(source)
    mapping = np.array(COARSE_LABELS, dtype=np.uint8)
    tmp = source.parent / f".source_coarse.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_split(
        tmp,
        (arrays.train_images, mapping[arrays.train_labels]),
        (arrays.test_images, mapping[arrays.test_labels]),
    )
    (tmp / "labels.json").write_text(json.dumps({"names": COARSE_NAMES, "fine_to_coarse": COARSE_LABELS}))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------- helpers
class EpochTimer(pl.Callback):
    """Wall time of every training epoch (validation excluded), monitor accuracy, and a progress hook."""

    def __init__(self, bar: Any = None, label: str = "") -> None:
        self.times: list[float] = []
        self.val_acc: list[float] = []
        self.bar, self.label = bar, label
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.label} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        key = f"val/acc_exit{pl_module.num_exits - 1}"
        if not trainer.sanity_checking and key in trainer.callback_metrics:
            self.val_acc.append(float(trainer.callback_metrics[key]))


def _quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # timm notes that the 1-channel patch embedding it loads needs no adapting: expected, not a problem
    logging.getLogger("timm").setLevel(logging.ERROR)
    for message in (
        ".*does not have many workers.*",
        ".*The number of training batches.*",
        ".*You defined a `validation_step` but have no `val_dataloader`.*",
        ".*litlogger.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
    ):
        warnings.filterwarnings("ignore", message=message)


def _trainer(
    args: argparse.Namespace,
    max_epochs: int,
    log_dir: Path,
    callbacks: list,
    *,
    validate: bool,
    progress: bool,
) -> pl.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=max_epochs,
        precision="32-true",
        logger=CSVLogger(save_dir=str(log_dir), name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if validate else 0,
        log_every_n_steps=10,
        callbacks=callbacks,
    )


def _datamodule(
    settings: Settings,
    args: argparse.Namespace,
    root: Path,
    *,
    train_size: int | None,
    calibration_size: int,
    batch_size: int,
    seed: int,
) -> Any:
    return BenchmarkDataModule(
        dataset="fashion_mnist",
        root=str(root),
        image_size=settings.img_size,
        in_chans=1,
        batch_size=batch_size,
        eval_batch_size=settings.eval_batch_size,
        num_workers=args.num_workers,
        calibration_size=calibration_size,
        train_subset=train_size,
        seed=seed,
        timm_model=BACKBONE,
        train_augment=False,
    )


def _optimizer(lr: float, weight_decay: float) -> Any:
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


# -------------------------------------------------------------------------------------------- pre-training
def pretrain(
    settings: Settings,
    args: argparse.Namespace,
    source: Path,
    halves_meta: dict,
    cache: Path,
    proxy: str = "same-labels",
) -> dict:
    """Train the source model from scratch (or reuse the cached one); returns its meta (path, accuracy...).

    ``proxy="coarse-to-fine"`` trains it on the garment families of the source half (5 classes) instead of
    its 10 fine labels; the proxy and the label map are part of the cache key.
    """
    if proxy not in PROXIES:
        raise SystemExit(f"unknown proxy {proxy!r}; choose from {', '.join(PROXIES)}")
    coarse = proxy == "coarse-to-fine"
    if coarse:
        source = coarse_source(source)
    num_classes = len(COARSE_NAMES) if coarse else 10
    payload = {
        "proxy": proxy,
        "label_map": list(COARSE_LABELS) if coarse else None,
        "num_classes": num_classes,
        "halves": halves_meta["files"],
        "split_seed": settings.split_seed,
        "source_size": settings.source_size,
        "test_size": settings.test_size,
        "arch": settings.arch_kwargs(),
        "img_size": settings.img_size,
        "epochs": settings.pretrain_epochs,
        "batch_size": settings.pretrain_batch_size,
        "lr": settings.pretrain_lr,
        "weight_decay": settings.weight_decay,
        "label_smoothing": settings.pretrain_label_smoothing,
        "drop_path": settings.pretrain_drop_path,
        "monitor_size": settings.pretrain_monitor_size,
        "augment": False,
        "seed": 0,
        "version": 1,
    }
    folder = cache / f"pretrain_{_hash(payload)}"
    meta_path = folder / "meta.json"
    if meta_path.is_file() and not args.force_pretrain:
        meta = json.loads(meta_path.read_text())
        meta.update(reused=True, checkpoint=str(folder / "backbone.pth"))
        tqdm.write(
            f"pre-trained source model reused from {folder} (test top-1 {100 * meta['test_accuracy']:.2f} %, "
            f"trained in {meta['train_seconds'] / 60:.1f} min)"
        )
        return meta
    tmp = cache / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tqdm.write(
        f"pre-training the {proxy} source model ({num_classes} classes, {settings.pretrain_epochs} epochs on "
        f"{halves_meta['sizes']['source'] - settings.pretrain_monitor_size} images); cached in {folder}"
    )
    pl.seed_everything(0, workers=True, verbose=False)
    module = DMPOModule(
        num_classes=num_classes,
        backbone=BACKBONE,
        pretrained=False,
        img_size=settings.img_size,
        in_chans=1,
        backbone_kwargs={**settings.arch_kwargs(), "drop_path_rate": settings.pretrain_drop_path},
        peft={"method": "full"},
        exits={"blocks": 1, "bypass": False, "early_head": "linear", "final_head": "linear"},
        schedule={"weight_phase1": "uniform", "weight_phase2": "uniform"},
        label_smoothing=settings.pretrain_label_smoothing,
        optimizer=_optimizer(settings.pretrain_lr, settings.weight_decay),
    )
    dm = _datamodule(
        settings,
        args,
        source,
        train_size=None,
        calibration_size=settings.pretrain_monitor_size,
        batch_size=settings.pretrain_batch_size,
        seed=0,
    )
    timer = EpochTimer()
    trainer = _trainer(args, settings.pretrain_epochs, tmp / "logs", [timer], validate=True, progress=True)
    start = time.perf_counter()
    trainer.fit(module, dm)
    train_seconds = time.perf_counter() - start
    test_accuracy = _accuracy(module, dm.dataloader("test"))
    # timm state dict of the trunk: the trained final norm lives in the last exit's head (the module keeps
    # the backbone's own norm frozen and copies it into the head), so it is written back as `norm.*`.
    state = {k: v.detach().clone() for k, v in module.model.backbone.state_dict().items()}
    head = module.model.exits[-1].predictor
    state["norm.weight"] = head.norm.weight.detach().clone()
    state["norm.bias"] = head.norm.bias.detach().clone()
    torch.save(state, tmp / "backbone.pth")
    meta = {
        **payload,
        "test_accuracy": test_accuracy,
        "monitor_accuracy_per_epoch": timer.val_acc,
        "train_seconds": train_seconds,
        "epoch_seconds": timer.times,
        "num_train": halves_meta["sizes"]["source"] - settings.pretrain_monitor_size,
        "num_test": halves_meta["sizes"]["test"],
        "backbone": BACKBONE,
        "torch": torch.__version__,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)  # only reached with --force-pretrain or a broken cache entry
    os.replace(tmp, folder)
    meta.update(reused=False, checkpoint=str(folder / "backbone.pth"))
    tqdm.write(f"pre-training done in {train_seconds / 60:.1f} min: test top-1 {100 * test_accuracy:.2f} %")
    return meta


@torch.no_grad()
def _accuracy(module: Any, loader: Any) -> float:
    module.eval()
    correct = total = 0
    for batch in loader:
        logits = module(batch[IMAGE_KEY].to(module.device))[-1]
        correct += int((logits.argmax(-1).cpu() == batch[LABEL_KEY]).sum())
        total += len(batch[LABEL_KEY])
    return correct / max(total, 1)


def check_backbone_loaded(module: Any, checkpoint: Path) -> None:
    """Fail unless every trunk tensor of ``module`` equals the checkpoint's (timm loads non-strictly)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    current = {k.replace(".base_layer.", "."): v for k, v in module.model.backbone.state_dict().items()}
    missing = [k for k in saved if k not in current]
    different = [k for k in saved if k in current and not torch.equal(current[k].cpu(), saved[k])]
    if missing or different:
        raise RuntimeError(
            f"the pre-trained backbone {checkpoint} was not loaded: missing {missing[:3]}, "
            f"different {different[:3]}"
        )


# ----------------------------------------------------------------------------------------------- variants
def available_variants(configs: Path) -> list[str]:
    names = sorted(p.stem for p in configs.glob("*.yaml"))
    return [n for n in PREFERRED_ORDER if n in names] + [n for n in names if n not in PREFERRED_ORDER]


def load_variant(name: str, configs: Path) -> dict[str, Any]:
    path = configs / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(
            f"no variant {name!r}: {path} does not exist; choose from {available_variants(configs)}"
        )
    config = yaml.safe_load(path.read_text())
    model = config["model"]
    if model.get("class_path") not in ("dmpo_lightning.DMPOModule", "dmpo_lightning.module.DMPOModule"):
        raise SystemExit(
            f"{path}: the benchmark tunes dmpo_lightning.DMPOModule, got {model.get('class_path')}"
        )
    # the evaluation options sit beside model: in the file; the benchmark keeps them with the variant
    return {**dict(model.get("init_args") or {}), "evaluation": config.get("evaluation") or {}}


def _scale_epoch(value: int | None, epochs: int, *, at_least_one: bool = False) -> int | None:
    if value is None:
        return None
    scaled = math.floor(value * epochs / REFERENCE_EPOCHS + 0.5)
    return max(1 if at_least_one else 0, min(epochs - 1, scaled))


def _scale_exits(exits: Any, depth: int) -> Any:
    if exits is None or isinstance(exits, int):
        return exits  # None = 4 evenly spaced; n = the last n blocks: both fit any depth
    scaled = [
        max(1, min(depth, math.floor(b * depth / REFERENCE_DEPTH + 0.5))) if b > 0 else b for b in exits
    ]
    return sorted(set(scaled), key=scaled.index)


def module_kwargs(name: str, settings: Settings, configs: Path) -> dict[str, Any]:
    """The variant file's init_args with sizes scaled to the source model and this schedule.

    The option groups stay groups (``kwargs["exits"]["blocks"]``), each a dict of the fields the file sets
    plus the ones the benchmark scales or sets (exit blocks, switch and ramp epochs, widths).
    """
    init = load_variant(name, configs)
    kwargs = {k: v for k, v in init.items() if k not in SCALED_KEYS and k not in GROUPS}
    for group in GROUPS:
        given = init.get(group) or {}
        if not isinstance(given, dict):
            raise SystemExit(
                f"{configs / f'{name}.yaml'}: {group} must be a mapping of its options "
                f"(e.g. {group}: {{...}}), got {given!r}"
            )
        kwargs[group] = {k: v for k, v in given.items() if k not in SCALED_FIELDS.get(group, ())}
    exits, schedule = kwargs["exits"], kwargs["schedule"]
    exits["blocks"] = _scale_exits(exits.get("blocks"), settings.depth)
    if schedule.get("switch_epoch") is not None:
        schedule["switch_epoch"] = _scale_epoch(schedule["switch_epoch"], settings.epochs)
    if schedule.get("ramp_epochs"):
        schedule["ramp_epochs"] = _scale_epoch(schedule["ramp_epochs"], settings.epochs, at_least_one=True)
    kwargs["peft"]["adapter_dim"] = settings.adapter_dim
    exits.update(moment_dim=settings.moment_dim, cov_dim=settings.cov_dim)
    return kwargs


def training_key(kwargs: dict[str, Any], settings: Settings) -> str:
    """What determines the trained weights: no evaluation options, the loss schedule as weights per epoch.

    Variants with the same key (e.g. ``switch_50`` and ``dmpo``, ``phase2_only`` and ``sdn_moment``, the exit
    rules and ``dmpo``) share one training run per seed.
    """
    exits = kwargs.get("exits") or {}
    k = len(resolve_exit_blocks(exits.get("blocks"), settings.depth))
    schedule = TwoPhaseSchedule(k, kwargs.get("schedule"), max_epochs=settings.epochs)
    rest = {key: v for key, v in kwargs.items() if key not in ("evaluation", "schedule")}
    rest["weights_per_epoch"] = [schedule.weights(e) for e in range(settings.epochs)]
    return _hash(rest)


def without_rule(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without ``evaluation.rule`` (each job tests its trained model once per exit rule)."""
    evaluation = {k: v for k, v in (kwargs.get("evaluation") or {}).items() if k != "rule"}
    return {**kwargs, "evaluation": evaluation}


@dataclasses.dataclass
class Job:
    """One training run (a training key and a seed) and the evaluations (exit rules) made on it."""

    name: str
    seed: int
    kwargs: dict[str, Any]
    rules: dict[str, list[str]]  # exit rule -> variants evaluated with it


def plan(
    variants: Sequence[str], settings: Settings, configs: Path, seeds: dict[str, list[int]]
) -> list[Job]:
    jobs: dict[tuple[str, int], Job] = {}
    for name in variants:
        kwargs = module_kwargs(name, settings, configs)
        key = training_key(kwargs, settings)
        rule = kwargs["evaluation"].get("rule", "confidence")
        for seed in seeds[name]:
            job = jobs.setdefault((key, seed), Job(name, seed, kwargs, {}))
            job.rules.setdefault(rule, []).append(name)
    return list(jobs.values())


# ------------------------------------------------------------------------------------------------- tuning
def run_job(
    job: Job,
    settings: Settings,
    args: argparse.Namespace,
    target: Path,
    checkpoint: Path,
    out: Path,
    bar: Any,
    proxy: str = "same-labels",
) -> list[dict[str, Any]]:
    """Tune one model from the checkpoint, then run the dmpo test protocol once per exit rule."""

    run_dir = out / "runs" / proxy / job.name / f"seed{job.seed}"
    run_dir.mkdir(parents=True)
    pl.seed_everything(job.seed, workers=True, verbose=False)
    kwargs = without_rule(job.kwargs)
    evaluation = kwargs.pop("evaluation")
    module = DMPOModule(
        num_classes=10,
        backbone=BACKBONE,
        checkpoint_path=str(checkpoint),
        img_size=settings.img_size,
        in_chans=1,
        backbone_kwargs=settings.arch_kwargs(),
        optimizer=_optimizer(settings.lr, settings.weight_decay),
        **kwargs,
    )
    check_backbone_loaded(module, checkpoint)
    costs = module.exit_costs()
    lowest = costs.exit_gflops[0] / costs.full_gflops
    evaluation["budgets"] = [b for b in TABLE_BUDGETS if b >= lowest * (1 - 1e-9)]
    dm = _datamodule(
        settings,
        args,
        target,
        train_size=settings.train_size,
        calibration_size=settings.calibration_size,
        batch_size=settings.batch_size,
        seed=job.seed,
    )
    timer = EpochTimer(bar, f"{job.name} seed {job.seed}")
    fit_start = time.perf_counter()
    trainer = _trainer(args, settings.epochs, run_dir, [timer], validate=False, progress=args.progress)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        trainer.fit(module, dm)
    fit_seconds = time.perf_counter() - fit_start
    counts = module.model.count_parameters()
    results = []
    calibration = getattr(args, "calibration", "none")
    for rule, names in job.rules.items():
        if bar is not None:
            bar.set_postfix_str(f"{job.name} seed {job.seed} test ({rule})")
        with contextlib.redirect_stdout(log):
            report = run_test(
                trainer,
                module,
                dm,
                {**evaluation, "rule": rule, "report_dir": str(run_dir / f"test_{rule}")},
                calibration="temperature" if calibration == "temperature" else "none",
            )
        calibrated = None
        if calibration == "both":  # the same trained weights, tested again with per-exit temperatures
            folder = str(run_dir / f"test_{rule}_temperature")
            with contextlib.redirect_stdout(log):
                tested = run_test(
                    trainer,
                    module,
                    dm,
                    {**evaluation, "rule": rule, "report_dir": folder},
                    calibration="temperature",
                )
            calibrated = _calibration_result(tested, folder)
        for name in names:
            results.append(
                {
                    "proxy": proxy,
                    "variant": name,
                    "seed": job.seed,
                    "trained_as": job.name,
                    "exit_rule": rule,
                    "report_dir": str(run_dir / f"test_{rule}"),
                    "budgets": {f"{b['budget']:g}": b["test_accuracy"] for b in report["budgets"]},
                    "budget_cost_fraction": {
                        f"{b['budget']:g}": b["test_cost_fraction"] for b in report["budgets"]
                    },
                    "auc": None if report["auc"] is None else report["auc"]["value"],
                    "full_model_accuracy": report["full_model"]["top1"],
                    "exits": [
                        {"block": e["block"], "cost_fraction": e["cost_fraction"], "top1": e["top1"]}
                        for e in report["exits"]
                    ],
                    "curve": None
                    if report["curve"] is None
                    else {
                        "q": report["curve"]["qs"],
                        "test_cost_fraction": report["curve"]["test_cost_fraction"],
                        "test_accuracy": report["curve"]["test_accuracy"],
                    },
                    "first_exit_cost_fraction": lowest,
                    "full_cost": report["full_model"]["cost"],
                    "trainable_parameters": counts["trainable"],
                    "total_parameters": counts["total"],
                    "epoch_seconds": timer.times,
                    "fit_seconds": fit_seconds,
                    "module_kwargs": job.kwargs,
                }
            )
            if calibration != "none":  # today's results.json stays as it was without the option
                plain = _calibration_result(report, str(run_dir / f"test_{rule}"))
                results[-1]["calibration"] = (
                    plain if calibrated is None else {"none": plain, "temperature": calibrated}
                )
    (run_dir / "log.txt").write_text(log.getvalue())
    return results


def run_test(
    trainer: pl.Trainer, module: DMPOModule, dm: Any, options: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """``dmpo test`` of the trained module with these evaluation options; returns its report.

    The options (``rule``, ``calibration``, ``report_dir``...) go to a ``DMPOEvaluator`` attached for this
    one test; a misspelt field fails before the test runs.
    """
    from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions

    evaluator = DMPOEvaluator(EvaluationOptions.coerce({**options, **fields}, name="evaluation"))
    trainer.callbacks.append(evaluator)
    try:
        trainer.test(module, datamodule=dm, verbose=False)
    finally:
        trainer.callbacks.remove(evaluator)
    assert module.test_report is not None
    return module.test_report


def _calibration_result(report: dict[str, Any], report_dir: str) -> dict[str, Any]:
    """Budgets, test curve, per-exit top-1 and (with temperatures) ECE of one ``dmpo test`` report."""
    cal = report.get("calibration") or {"method": "none"}
    return {
        "method": cal.get("method", "none"),
        "report_dir": report_dir,
        "budgets": {f"{b['budget']:g}": b["test_accuracy"] for b in report["budgets"]},
        "budget_cost_fraction": {f"{b['budget']:g}": b["test_cost_fraction"] for b in report["budgets"]},
        "curve": None
        if report["curve"] is None
        else {
            "q": report["curve"]["qs"],
            "test_cost_fraction": report["curve"]["test_cost_fraction"],
            "test_accuracy": report["curve"]["test_accuracy"],
        },
        "exit_top1": [e["top1"] for e in report["exits"]],
        "temperatures": cal.get("temperatures"),
        "ece_before": cal.get("ece_before"),
        "ece_after": cal.get("ece_after"),
    }


def calibration_table(results: list[dict[str, Any]]) -> str:
    """Markdown: per run, top-1 at each budget and matched cost without and with temperatures, and ECE."""
    lines = []
    for r in results:
        cal = r.get("calibration")
        if not cal or "temperature" not in cal:
            continue
        none, temp = cal["none"], cal["temperature"]
        lines += [
            f"### {r['proxy']} {r['variant']} seed {r['seed']} ({r['exit_rule']})",
            "",
            "| | "
            + " | ".join(f"budget {b}" for b in none["budgets"])
            + " | "
            + " | ".join(f"cost {c:g}" for c in MATCHED_COSTS)
            + " |",
            "|---" * (1 + len(none["budgets"]) + len(MATCHED_COSTS)) + "|",
        ]
        for name, res in (("none", none), ("temperature", temp)):
            at = [accuracy_at_cost(res, c) for c in MATCHED_COSTS]
            cells = [
                f"{100 * res['budgets'][b]:.2f} ({100 * res['budget_cost_fraction'][b]:.1f} %)"
                for b in none["budgets"]
            ] + ["—" if a is None else f"{100 * a:.2f}" for a in at]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| exit | T | ECE before | ECE after |", "|---|---|---|---|"]
        rows = zip(temp["temperatures"], temp["ece_before"], temp["ece_after"], strict=True)
        for k, (t, b, a) in enumerate(rows):
            lines.append(f"| {k + 1} | {t:.3f} | {100 * b:.2f} % | {100 * a:.2f} % |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- output
def _mean_spread(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "—"
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


MATCHED_COSTS = (0.3, 0.4, 0.5, 0.75, 1.0)
"""Columns of the main table: test cost as a fraction of the full model's FLOPs."""
FAIR_BASELINES = ("static_peft", "static_peft_moment", "sdn_linear", "sdn_moment", "dmpo_final_moment")
"""Baselines the paired table compares ``dmpo`` with first (others present follow)."""
REFERENCE = "dmpo"


def _full_cost(run: dict[str, Any]) -> float:
    """GFLOPs of the run's own full path (all blocks and its last head), the denominator of its fractions."""
    if run.get("full_cost") is not None:
        return float(run["full_cost"])
    path = Path(run["report_dir"]) / "report.json"
    if not path.is_file():
        raise SystemExit(f"{run['variant']} seed {run['seed']}: {path} is missing; cannot read its full cost")
    return float(json.loads(path.read_text())["full_model"]["cost"])


def common_cost_reference(runs: list[dict[str, Any]]) -> tuple[float, str]:
    """GFLOPs every cost fraction of the tables is relative to, and what they are.

    Each ``dmpo test`` report measures cost as a fraction of its own model's full path, whose last head
    differs between variants (a moment head costs more than a linear one), so fractions of different
    variants are not comparable as they are. The tables use one reference: ``static_peft``'s full model
    (the frozen trunk, its adapters and a linear head), else the cheapest full path among the runs.
    """
    static = [_full_cost(r) for r in runs if r["variant"] == STATIC_REFERENCE]
    if static:
        return static[0], f"{STATIC_REFERENCE}'s full model"
    return min(_full_cost(r) for r in runs), "the cheapest full model among the runs"


def rescale_costs(runs: list[dict[str, Any]], reference: float) -> list[dict[str, Any]]:
    """Copies of ``runs`` with every cost fraction re-expressed relative to ``reference`` GFLOPs."""
    out = []
    for r in runs:
        factor = _full_cost(r) / reference
        r = dict(r)
        r["exits"] = [{**e, "cost_fraction": e["cost_fraction"] * factor} for e in r["exits"]]
        if r.get("curve"):
            c = dict(r["curve"])
            c["test_cost_fraction"] = [x * factor for x in c["test_cost_fraction"]]
            r["curve"] = c
        r["cost_scale"] = factor
        out.append(r)
    return out


def test_curve(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A run's test operating points ``(cost, top-1)``, sorted by cost, one accuracy per cost.

    The ``dmpo test`` threshold sweep (thresholds chosen on the calibration split for a grid of cost targets,
    then measured on the test split); a single-exit model's only point is its exit.
    """
    c = run.get("curve")
    if c:
        pts = list(zip(c["test_cost_fraction"], c["test_accuracy"], strict=True))
    else:
        pts = [(run["exits"][-1]["cost_fraction"], run["exits"][-1]["top1"])]
    xs, inverse = np.unique(np.array([float(p[0]) for p in pts]), return_inverse=True)
    ys = np.bincount(inverse, weights=[float(p[1]) for p in pts]) / np.bincount(inverse)
    return xs, ys


def accuracy_at_cost(run: dict[str, Any], cost: float) -> float | None:
    """Test top-1 at test cost ``cost`` read off the run's test curve; ``None`` below its cheapest point.

    Linear interpolation between the two neighbouring test operating points (reachable in expectation by
    picking one of their two threshold sets at random per image); above the dearest point, that point's
    accuracy (a larger budget may stay unused).
    """
    xs, ys = test_curve(run)
    if cost < xs[0] - 1e-9:
        return None
    return float(np.interp(cost, xs, ys))


def common_range(runs_by_variant: dict[str, list[dict[str, Any]]]) -> tuple[float, float] | None:
    """The cost range every multi-exit variant's every test curve covers: ``[max cheapest point, 1.0]``."""
    starts = [
        test_curve(r)[0][0] for runs in runs_by_variant.values() for r in runs if len(test_curve(r)[0]) > 1
    ]
    if not starts or max(starts) >= 1.0:
        return None
    return float(max(starts)), 1.0


def mean_accuracy(run: dict[str, Any], lo: float, hi: float, n: int = 201) -> float | None:
    """Mean test top-1 over the costs ``[lo, hi]`` (the normalised area under the test curve there)."""
    values = [accuracy_at_cost(run, c) for c in np.linspace(lo, hi, n)]
    return None if any(v is None for v in values) else float(np.mean(values))


def _stats(values: Sequence[float | None], scale: float = 100.0, signed: bool = False) -> str:
    if not values or any(v is None for v in values):
        return "—"
    mean = scale * statistics.fmean(values)
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if len(values) > 1:
        text += f" ± {scale * statistics.stdev(values):.2f}"
    return text


def _by_variant(results: list[dict[str, Any]], variants: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name in variants:
        runs = sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"])
        if runs:
            out[name] = runs
    return out


def _label(runs: list[dict[str, Any]]) -> str:
    r = runs[0]
    return r["variant"] if r["trained_as"] == r["variant"] else f"{r['variant']} (= {r['trained_as']} run)"


def summarise(results: list[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per variant: per-seed matched-cost accuracies, first/last exit, mean over the common range."""
    groups = _by_variant(results, variants)
    span = common_range(groups)
    rows = []
    for name, runs in groups.items():
        row: dict[str, Any] = {
            "variant": name,
            "label": _label(runs),
            "seeds": [r["seed"] for r in runs],
            "trained_as": runs[0]["trained_as"],
            "exit_rule": runs[0]["exit_rule"],
            "first_exit": [r["exits"][0]["top1"] for r in runs],
            "first_exit_cost": [r["exits"][0]["cost_fraction"] for r in runs],
            "last_exit": [r["exits"][-1]["top1"] for r in runs],
            "last_exit_cost": [r["exits"][-1]["cost_fraction"] for r in runs],
            "per_exit": [[e["top1"] for e in r["exits"]] for r in runs],
            "common_range": span,
            "mean_common": [
                None if span is None or len(test_curve(r)[0]) < 2 else mean_accuracy(r, *span) for r in runs
            ],
            "trainable_parameters": runs[0]["trainable_parameters"],
            "epoch_seconds": statistics.median(t for r in runs for t in r["epoch_seconds"]),
        }
        for c in MATCHED_COSTS:
            row[f"at_{c:g}"] = [accuracy_at_cost(r, c) for r in runs]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], notes: list[str]) -> str:
    """The main table: matched-cost test top-1, first and last exit, common-range mean, cost of training."""
    ref = next((r["epoch_seconds"] for r in rows if r["variant"] == STATIC_REFERENCE), None)
    span = next((r["common_range"] for r in rows if r["common_range"] is not None), None)
    mean_head = "mean over common range" if span is None else f"mean {100 * span[0]:.1f}-100%"
    head = [
        "variant",
        *(f"{100 * c:g}%" for c in MATCHED_COSTS),
        "first exit (cost)",
        "last exit (cost)",
        mean_head,
        "trainable params",
        "s / epoch",
        "time vs static PEFT",
        "seeds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [
            r["label"],
            *(_stats(r[f"at_{c:g}"]) for c in MATCHED_COSTS),
            f"{_stats(r['first_exit'])} ({100 * statistics.fmean(r['first_exit_cost']):.1f}%)",
            f"{_stats(r['last_exit'])} ({100 * statistics.fmean(r['last_exit_cost']):.1f}%)",
            _stats(r["mean_common"]),
            f"{r['trainable_parameters']:,}",
            f"{r['epoch_seconds']:.1f}",
            "—" if ref is None else f"{r['epoch_seconds'] / ref:.2f}x",
            str(len(r["seeds"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *notes]) + "\n"


def paired_table(results: list[dict[str, Any]], reference: str = REFERENCE) -> str:
    """Per-seed differences ``reference - baseline`` (mean ± s.d. over the seeds both ran), in points.

    Columns: the matched costs, the first and the last exit, and the reference at 30 / 50 % of the cost
    against the baseline's last exit (what early exit saves against running the baseline in full).
    """
    ref_runs = {r["seed"]: r for r in results if r["variant"] == reference}
    if not ref_runs:
        return ""
    present = sorted({r["variant"] for r in results} - {reference})
    order = [b for b in FAIR_BASELINES if b in present] + [b for b in PREFERRED_ORDER if b in present]
    order += [b for b in present if b not in order]
    head = [
        "baseline",
        *(f"{100 * c:g}%" for c in MATCHED_COSTS),
        "first exit",
        "last exit",
        f"{reference} at 30% - baseline's last exit",
        f"{reference} at 50% - baseline's last exit",
        "seed ids",
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for name in dict.fromkeys(order):
        base = {r["seed"]: r for r in results if r["variant"] == name}
        seeds = sorted(set(base) & set(ref_runs))
        if not seeds:
            continue

        def diff(get: Any, seeds: list[int] = seeds, base: dict = base) -> str:
            values = []
            for s in seeds:
                a, b = get(ref_runs[s], "ref"), get(base[s], "base")
                values.append(None if a is None or b is None else a - b)
            return _stats(values, signed=True)

        cells = [
            _label([next(iter(base.values()))]),
            *(diff(lambda r, _w, c=c: accuracy_at_cost(r, c)) for c in MATCHED_COSTS),
            diff(lambda r, _w: r["exits"][0]["top1"]),
            diff(lambda r, _w: r["exits"][-1]["top1"]),
            *(
                diff(lambda r, w, c=c: accuracy_at_cost(r, c) if w == "ref" else r["exits"][-1]["top1"])
                for c in (0.3, 0.5)
            ),
            ",".join(str(s) for s in seeds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_exit_table(rows: list[dict[str, Any]]) -> str:
    """Test top-1 of every exit (every image through every exit), mean ± s.d. over seeds."""
    width = max(len(r["per_exit"][0]) for r in rows)
    lines = [
        "| variant | " + " | ".join(f"exit {i + 1}" for i in range(width)) + " | seeds |",
        "|---|" + "---:|" * (width + 1),
    ]
    for r in rows:
        if r["trained_as"] != r["variant"] and r["exit_rule"] != "confidence":
            continue  # another exit rule on the same weights: the same per-exit accuracies
        cols = list(zip(*r["per_exit"], strict=True))
        cells = [_stats(list(c)) for c in cols] + ["—"] * (width - len(cols))
        if len(cols) == 1 and width > 1:  # single exit: it is the last one
            cells = ["—"] * (width - 1) + [_stats(list(cols[0]))]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {len(r['seeds'])} |")
    return "\n".join(lines) + "\n"


def write_summary(payload: dict[str, Any], out: Path, *, quick: bool) -> dict[str, Any]:
    """Write ``table.md`` (per proxy: main, paired, per-exit tables), ``curves.csv``, a plot per proxy."""
    results = payload["results"]
    variants = payload["variants"]
    settings = payload["settings"]
    sections, all_rows, rescaled = [], {}, []
    for proxy in payload["proxies"]:
        runs = [r for r in results if r.get("proxy", "same-labels") == proxy]
        if not runs:
            continue
        reference, reference_name = common_cost_reference(runs)
        runs = rescale_costs(runs, reference)
        rescaled.extend(runs)
        rows = summarise(runs, variants)
        all_rows[proxy] = rows
        pre = payload["pretrain"][proxy]
        sizes = payload["data"][proxy]["sizes"]
        span = next((r["common_range"] for r in rows if r["common_range"] is not None), None)
        shared = sorted(
            {f"{r['variant']} = {r['trained_as']}" for r in rows if r["variant"] != r["trained_as"]}
        )
        what = "the 5 garment families" if proxy == "coarse-to-fine" else "the 10 labels"
        notes = [
            f"Proxy {proxy}. Source: {BACKBONE} architecture (depth {settings['depth']}, D "
            f"{settings['embed_dim']}, patch {settings['patch_size']}) trained from scratch on {what} of "
            f"{pre['num_train']:,} images of half A for {pre['epochs']} epochs: test top-1 "
            f"{100 * pre['test_accuracy']:.2f} % on {what} "
            f"({'cached' if pre.get('reused') else 'trained in this run'}, "
            f"{pre['train_seconds'] / 60:.1f} min).",
            f"Target: tuned for {settings['epochs']} epochs on {settings['train_size']:,} images of half B "
            f"(10 labels), thresholds from {settings['calibration_size']:,} calibration images of half B, "
            f"tested on {sizes['test']:,} test images.",
            f"Costs are fractions of {reference:.4g} GFLOPs per image, {reference_name} (a moment head at "
            "the last exit makes a model's own full path dearer than that).",
            "Columns 30-100%: test top-1 (%) at that test cost, read off "
            "the variant's test curve (threshold sweep chosen on the calibration split, measured on the test "
            "split) by linear interpolation between neighbouring points; — = below its cheapest point. First "
            "/ last exit: every test image through that exit, with its cost. "
            + (
                f"Mean {100 * span[0]:.1f}-100%: mean test top-1 over the cost range every multi-exit "
                "variant's test curve reaches."
                if span
                else "No common cost range."
            )
            + " mean ± s.d. over seeds where seeds > 1.",
            "Time: median training seconds per epoch, relative to static_peft.",
        ]
        if shared:
            notes.append("Same training run (identical settings after scaling): " + "; ".join(shared) + ".")
        if quick:
            notes.append("QUICK MODE: a tiny model on a few hundred images; the numbers are meaningless.")
        if proxy in payload.get("tune_seconds", {}):
            notes.append(f"Tuning and testing took {payload['tune_seconds'][proxy] / 60:.1f} min.")
        notes = [f"- {n}" for n in notes]
        parts = [f"## {proxy}", "", markdown_table(rows, notes)]
        paired = paired_table(runs)
        if paired:
            parts += [
                f"Paired differences {REFERENCE} - baseline (points; per seed, same target subset, "
                "calibration split and initialisation; mean ± s.d. over the seeds both ran):",
                "",
                paired,
            ]
        parts += ["Per-exit test top-1 (%):", "", per_exit_table(rows)]
        sections.append("\n".join(parts))
        title = f"DMPO vs baselines: Fashion-MNIST {proxy} ({'quick' if quick else 'full'})"
        plot(out / f"accuracy_vs_cost_{proxy}.png", runs, variants, title)
    table = "\n".join(sections)
    (out / "table.md").write_text(table)
    write_curves(out / "curves.csv", rescaled)  # costs relative to each proxy's common reference
    payload["rows"] = all_rows
    _write_json(out / "results.json", payload)
    print()
    print(table)
    print(f"tables, curves (CSV), plots (PNG) and results (JSON) written to {out}")
    return payload


def summarise_folders(folders: Sequence[Path], args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    """Tables of the runs of several output folders together (written to a new --output folder).

    Refuses folders whose settings differ (their numbers would not be comparable); a (proxy, variant, seed)
    found twice is refused too.
    """
    payloads = []
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise SystemExit(f"--summarise {folder}: no results.json there")
        payloads.append(json.loads(path.read_text()))
    settings = payloads[0]["settings"]
    for folder, p in zip(folders, payloads, strict=True):
        keys = set(settings) | set(p["settings"])
        diff = sorted(k for k in keys if settings.get(k) != p["settings"].get(k))
        if diff:
            raise SystemExit(f"--summarise: {folder} was run with other settings ({', '.join(diff)})")
    merged: dict[str, Any] = {
        "settings": settings,
        "proxies": [],
        "variants": [],
        "pretrain": {},
        "data": {},
        "tune_seconds": {},
        "results": [],
        "summarised_from": [str(f) for f in folders],
        "environment": {"command": " ".join(["pretrain_tune.py", *(argv or [])])},
    }
    seen = set()
    for folder, p in zip(folders, payloads, strict=True):
        proxies = p.get("proxies", ["same-labels"])
        for proxy in proxies:
            pre = p["pretrain"].get(proxy, p["pretrain"]) if "proxies" in p else p["pretrain"]
            known = merged["pretrain"].get(proxy)
            if known is not None and known.get("checkpoint") != pre.get("checkpoint"):
                raise SystemExit(f"--summarise: {folder} tuned from another {proxy} source model")
            merged["pretrain"].setdefault(proxy, pre)
            merged["data"].setdefault(proxy, p["data"].get(proxy, p["data"]) if "proxies" in p else p["data"])
            if proxy not in merged["proxies"]:
                merged["proxies"].append(proxy)
            t = p.get("tune_seconds")
            if isinstance(t, dict) and proxy in t:
                merged["tune_seconds"][proxy] = merged["tune_seconds"].get(proxy, 0.0) + t[proxy]
        for v in p["variants"]:
            if v not in merged["variants"]:
                merged["variants"].append(v)
        for r in p["results"]:
            key = (r.get("proxy", "same-labels"), r["variant"], r["seed"])
            if key in seen:
                raise SystemExit(f"--summarise: {key} appears in more than one folder")
            seen.add(key)
            merged["results"].append(r)
    available = available_variants(args.configs)
    merged["variants"] = sorted(
        merged["variants"], key=lambda v: available.index(v) if v in available else len(available)
    )
    out = _output_dir(args)
    return write_summary(merged, out, quick=bool(payloads[0].get("environment", {}).get("quick")))


def write_curves(path: Path, results: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["proxy", "variant", "seed", "kind", "point", "test_cost_fraction", "test_accuracy"])
        for r in results:
            proxy = r.get("proxy", "same-labels")
            for i, e in enumerate(r["exits"]):
                writer.writerow(
                    [
                        proxy,
                        r["variant"],
                        r["seed"],
                        "anytime",
                        f"exit{i + 1}",
                        repr(e["cost_fraction"]),
                        repr(e["top1"]),
                    ]
                )
            for b, acc in r["budgets"].items():
                writer.writerow(
                    [
                        proxy,
                        r["variant"],
                        r["seed"],
                        "budget",
                        b,
                        repr(r["budget_cost_fraction"][b]),
                        repr(acc),
                    ]
                )
            if r["curve"] is not None:
                c = r["curve"]
                for q, x, y in zip(c["q"], c["test_cost_fraction"], c["test_accuracy"], strict=True):
                    writer.writerow([proxy, r["variant"], r["seed"], "dynamic", q, repr(x), repr(y)])


def _mean_curve(runs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    curves = []
    for r in runs:
        c = r["curve"]
        pts = (
            sorted(zip(c["test_cost_fraction"], c["test_accuracy"], strict=True))
            if c
            else [(r["exits"][-1]["cost_fraction"], r["exits"][-1]["top1"])]
        )
        xs, inverse = np.unique(np.array([p[0] for p in pts]), return_inverse=True)
        ys = np.bincount(inverse, weights=[p[1] for p in pts]) / np.bincount(inverse)  # mean per cost
        curves.append((xs, ys))
    lo, hi = max(c[0].min() for c in curves), min(c[0].max() for c in curves)
    if hi - lo < 1e-6:
        return np.array([lo]), np.array([statistics.fmean(float(np.interp(lo, *c)) for c in curves)])
    grid = np.linspace(lo, hi, 60)
    return grid, np.mean([np.interp(grid, *c) for c in curves], axis=0)


def plot(path: Path, results: list[dict[str, Any]], variants: Sequence[str], title: str) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = colormaps["tab20"]
    for i, name in enumerate(variants):
        runs = [r for r in results if r["variant"] == name]
        if not runs:
            continue
        xs, ys = _mean_curve(runs)
        seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
        # ten distinct hues first (dark shades of tab20), then their light shades
        style = dict(color=colours((2 * i) % 20 + (2 * i) // 20 % 2), label=f"{name} ({seeds})")
        if name == "dmpo":
            style.update(color="black", lw=2.6, zorder=5)
        if len(xs) == 1:
            ax.plot(100 * xs, 100 * ys, "D", ms=7, **style)
        else:
            ax.plot(100 * xs, 100 * ys, "-" if i < 10 else "--", **style)
    for b in MATCHED_COSTS:
        ax.axvline(100 * b, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("test cost, % of static_peft's full model FLOPs (thresholds from the calibration split)")
    ax.set_ylabel("test top-1 accuracy, %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- estimation
def estimate(
    jobs: list[Job],
    settings: Settings,
    args: argparse.Namespace,
    steps: int = 3,
    proxies: Sequence[str] = ("same-labels",),
) -> None:
    """Time a few optimizer steps and evaluation batches of each planned model (random weights, same cost)."""

    def per_image_train(module: Any, batch: int) -> float:
        module.train()
        opt = torch.optim.AdamW(param_groups(module.model), lr=1e-4)
        x, y = torch.randn(batch, 1, settings.img_size, settings.img_size), torch.randint(0, 10, (batch,))
        times = []
        for i in range(steps + 1):
            start = time.perf_counter()
            loss, _ = module.compute_loss(module(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - start)
        return min(times) / batch

    @torch.no_grad()
    def per_image_eval(module: Any, batch: int) -> float:
        module.eval()
        x = torch.randn(batch, 1, settings.img_size, settings.img_size)
        module(x)
        start = time.perf_counter()
        module(x)
        return (time.perf_counter() - start) / batch

    test_n = settings.test_size or 10000
    total = 0.0
    print(
        f"timing {steps} steps of batch {settings.batch_size} per planned model "
        f"({torch.get_num_threads()} threads):"
    )
    for job in jobs:
        kwargs = without_rule(job.kwargs)
        kwargs.pop("evaluation")
        module = DMPOModule(
            num_classes=10,
            backbone=BACKBONE,
            img_size=settings.img_size,
            in_chans=1,
            backbone_kwargs=settings.arch_kwargs(),
            **kwargs,
        )
        train_s = per_image_train(module, settings.batch_size)
        eval_s = per_image_eval(module, settings.eval_batch_size)
        seconds = (
            settings.epochs * settings.train_size * train_s
            + len(job.rules) * (test_n + settings.calibration_size) * eval_s
            + 10.0
        )
        total += seconds
        print(
            f"  {job.name:>16} seed {job.seed}: {1 / train_s:6.0f} train img/s, {1 / eval_s:6.0f} eval img/s "
            f"-> {seconds / 60:5.1f} min"
        )
    module = DMPOModule(
        num_classes=10,
        backbone=BACKBONE,
        img_size=settings.img_size,
        in_chans=1,
        backbone_kwargs=settings.arch_kwargs(),
        peft={"method": "full"},
        exits={"blocks": 1, "bypass": False, "early_head": "linear"},
        schedule={"weight_phase1": "uniform"},
    )
    pre_s = per_image_train(module, settings.pretrain_batch_size)
    for proxy in proxies:
        s = settings.for_proxy(proxy)
        source_n = (s.source_size or 30000) - s.pretrain_monitor_size
        pre = s.pretrain_epochs * source_n * pre_s
        print(
            f"{proxy}: estimated tuning + testing {total / 60:.1f} min for {len(jobs)} runs "
            f"(+ pre-training, once, cached: {pre / 60:.1f} min at {1 / pre_s:.0f} img/s; the real epochs "
            "have been about 1.4x slower: data loading, drop-path, monitor evaluation)"
        )


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Same-labels proxy at default sizes, measured on an idle 2-core machine with --threads 2: 42 "
        "min of pre-training (once, cached), then 29 min of tuning and testing (1 thread: about 95 and 48 "
        "min). The coarse-to-fine proxy adds its own source model and the same tuning runs; its default "
        "sizes were not timed on an idle machine. See benchmarks/README.md.",
    )
    p.add_argument(
        "--variants", default="all", help="comma-separated names of configs/model/*.yaml, or 'all'"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds of the --multi-seed variants (default 3)")
    p.add_argument("--multi-seed", default="dmpo,sdn_linear", help="variants run with --seeds seeds")
    p.add_argument("--other-seeds", type=int, default=1, help="seeds of every other variant (default 1)")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: tiny model, a few hundred images, seconds"
    )
    p.add_argument("--estimate", action="store_true", help="time a few steps per planned model and stop")
    p.add_argument(
        "--proxy",
        default=",".join(PROXIES),
        help="comma list of proxies to run: same-labels (source pre-trained on the target's 10 labels), "
        "coarse-to-fine (source pre-trained on 5 garment families); default both",
    )
    p.add_argument(
        "--seed-start", type=int, default=0, help="first seed (seeds are seed-start, seed-start + 1, ...)"
    )
    p.add_argument(
        "--summarise",
        type=Path,
        nargs="+",
        default=None,
        help="train nothing: read the results.json of these output folders (runs of the same settings), "
        "and write the tables of all their runs together to a new --output folder",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="new output folder (default benchmarks/output/pretrain_tune/<date-time>); never overwritten",
    )
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="pre-trained model and data halves")
    p.add_argument(
        "--fashion-mnist-root",
        type=Path,
        default=None,
        help="folder of the Fashion-MNIST idx files (default: the Debian package's)",
    )
    p.add_argument("--configs", type=Path, default=MODEL_CONFIGS, help="folder of the variant files")
    p.add_argument("--force-pretrain", action="store_true", help="pre-train again even if cached")
    for field in dataclasses.fields(Settings):
        if field.name in ("depth", "embed_dim", "num_heads", "patch_size", "img_size"):
            continue  # the source architecture is fixed (and --quick's)
        flag = "--" + field.name.replace("_", "-")
        kind = float if isinstance(field.default, float) else int
        p.add_argument(
            flag,
            type=kind,
            default=None,
            help=f"default {getattr(d, field.name)} (quick: {QUICK.get(field.name, getattr(d, field.name))})",
        )
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: robust when other processes share the cores, where 2 threads can be "
        "several times slower; try 2 on an idle 2-core machine; 0 = torch's default)",
    )
    p.add_argument("--progress", action="store_true", help="show Lightning's per-run progress bars")
    p.add_argument(
        "--calibration",
        choices=("none", "temperature", "both"),
        default="none",
        help="test-time calibration of every run (default none); both: test each trained model twice, "
        "without and with per-exit temperatures, and write calibration.md",
    )
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    base = dataclasses.replace(Settings(), **QUICK) if args.quick else Settings()
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if getattr(args, f.name, None) is not None
    }
    settings = dataclasses.replace(base, **given)
    if settings.epochs < 1 or settings.pretrain_epochs < 1:
        raise SystemExit("--epochs and --pretrain-epochs must be >= 1")
    return settings


def _output_dir(args: argparse.Namespace) -> Path:
    out = args.output or DEFAULT_OUTPUT_PARENT / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(
            f"output folder {out} exists and is not empty; results are never overwritten: "
            "choose another --output"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what results.json holds. Restores torch threads, logging and seed env."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    loggers = ("lightning", "lightning.pytorch", "lightning.fabric", "timm")
    levels = {n: logging.getLogger(n).level for n in loggers}
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "HF_HUB_OFFLINE")}
    try:
        with warnings.catch_warnings():
            if args.threads > 0:
                torch.set_num_threads(args.threads)
            _quiet()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            return _run(args, argv)
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _parse_proxies(text: str) -> list[str]:
    proxies = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in proxies if p not in PROXIES]
    if bad or not proxies:
        raise SystemExit(f"--proxy {text!r}: expected a comma list of {', '.join(PROXIES)}")
    return list(dict.fromkeys(proxies))


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    settings = build_settings(args)
    proxies = _parse_proxies(args.proxy)
    if args.summarise:
        return summarise_folders(args.summarise, args, argv)
    available = available_variants(args.configs)
    variants = (
        available if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    )
    unknown = [v for v in variants if v not in available]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; available: {', '.join(available)}")
    if STATIC_REFERENCE in variants:  # run the time reference first
        variants = [STATIC_REFERENCE] + [v for v in variants if v != STATIC_REFERENCE]
    if args.seed_start < 0:
        raise SystemExit("--seed-start must be >= 0")
    multi = {v.strip() for v in args.multi_seed.split(",") if v.strip()}
    seeds = {
        v: list(range(args.seed_start, args.seed_start + (args.seeds if v in multi else args.other_seeds)))
        for v in variants
    }
    jobs = plan(variants, settings, args.configs, seeds)
    if args.estimate:
        estimate(jobs, settings, args, proxies=proxies)
        return {}
    out = _output_dir(args)
    cache = args.cache_dir
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "proxies": proxies,
        "variants": variants,
        "seeds": seeds,
        "pretrain": {},
        "checkpoint": {},
        "data": {},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "quick": args.quick,
            "load_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "tune_seconds": {},
        "results": results,
    }
    for proxy in proxies:
        proxy_settings = settings.for_proxy(proxy)
        source, target, halves = prepare_halves(proxy_settings, cache, args.fashion_mnist_root)
        pre = pretrain(proxy_settings, args, source, halves, cache, proxy)
        checkpoint = Path(pre["checkpoint"])
        payload["pretrain"][proxy] = dict(pre)
        payload["checkpoint"][proxy] = str(checkpoint)
        payload["data"][proxy] = {"source": str(source), "target": str(target), "sizes": halves["sizes"]}
        tune_start = time.perf_counter()
        bar = tqdm(jobs, desc=f"tuning ({proxy})", unit="run", dynamic_ncols=True)
        for job in bar:
            results.extend(run_job(job, settings, args, target, checkpoint, out, bar, proxy=proxy))
            payload["tune_seconds"][proxy] = time.perf_counter() - tune_start
            _write_json(out / "results.json", payload)  # partial results survive an interruption
        bar.close()
        payload["tune_seconds"][proxy] = time.perf_counter() - tune_start
    payload["total_seconds"] = time.perf_counter() - started
    payload["environment"]["load_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    _write_json(out / "results.json", payload)
    if args.calibration == "both":
        text = calibration_table(results)
        (out / "calibration.md").write_text(text)
        print(text)
    return write_summary(payload, out, quick=args.quick)


if __name__ == "__main__":
    main()
