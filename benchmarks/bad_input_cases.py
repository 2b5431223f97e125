"""Run every bad-input case (issues 16, 28) as a user meets it; write the output to docs/bad_input_cases.md.

Usage (from the repository root, a few minutes on one CPU core)::

    PYTHONPATH=src python benchmarks/bad_input_cases.py               # writes docs/bad_input_cases.md
    PYTHONPATH=src python benchmarks/bad_input_cases.py --out /tmp/x.md --only thresholds

Each CLI case calls :func:`dmpo_lightning.console.console_main` (the ``dmpo`` console script) in this process
with ``sys.argv`` set, in a fresh working folder, capturing file descriptors 1 and 2 (everything dmpo,
Lightning and Python's warnings print). The table records the exit status and the first printed line matching
the case's pattern, verbatim (temporary paths shortened to ``<tmp>``). A case whose status or line differs
from what it expects is marked ``UNEXPECTED`` and the script exits 1, so the table cannot silently go stale.
Python-API cases (issue bullets about library behaviour, not the CLI) run their check in-process and print
what they observed. The regression tests named in the table are the source of truth; this script documents
them."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
TINY_KW = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@dataclass
class Case:
    name: str
    bullet: str
    tests: str
    argv: Callable[[dict], list[str]] | None = None  # a dmpo command line
    check: Callable[[dict], str] | None = None  # or a Python-API check returning what it observed
    status: int = 2
    line: str = r"error:"  # the printed line to record (first match)
    after: Callable[[dict], str] | None = None  # an observation after the command (files kept, ...)
    repeat: int = 1  # run the command this many times (the second run is the case)
    cwd: str | None = None  # a fixture folder to run in (default: a fresh one)
    program: str = "dmpo"  # or "python -m dmpo_lightning.deploy"
    out: dict = field(default_factory=dict)


@contextlib.contextmanager
def captured_fds():
    """Capture everything written to fd 1 and 2 (Python, C, logging handlers bound at import)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 1)
        os.dup2(buf.fileno(), 2)
        result = {"text": ""}
        try:
            yield result
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            buf.seek(0)
            result["text"] = buf.read().decode(errors="replace")


def run_dmpo(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``dmpo <argv>`` in-process: (exit status, everything printed)."""
    from dmpo_lightning.console import console_main

    old_argv, old_cwd = sys.argv, os.getcwd()
    os.chdir(cwd)
    sys.argv = ["dmpo", *argv]
    status = 0
    try:
        with captured_fds() as out, warnings.catch_warnings():
            warnings.simplefilter("default")  # each case shows its warnings again
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            try:
                console_main()
            except SystemExit as err:
                status = err.code if isinstance(err.code, int) else 1
            except BaseException:  # what the console script would print: a traceback, status 1
                sys.stderr.write(traceback.format_exc())
                status = 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return status, out["text"]


def run_deploy(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``python -m dmpo_lightning.deploy <argv>`` in-process: (exit status, everything printed)."""
    from dmpo_lightning.deploy.predict_cli import main as deploy_main

    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        with captured_fds() as out, warnings.catch_warnings():
            warnings.simplefilter("default")
            try:
                status = deploy_main(argv)
            except SystemExit as err:
                status = err.code if isinstance(err.code, int) else 1
            except BaseException:
                sys.stderr.write(traceback.format_exc())
                status = 1
    finally:
        os.chdir(old_cwd)
    return status, out["text"]


# ------------------------------------------------------------------------------------------------ fixtures
def fit(cwd: Path, *options: str) -> Path:
    """A tiny one-epoch fit; returns its checkpoint."""
    cwd.mkdir(parents=True, exist_ok=True)
    status, text = run_dmpo(
        ["fit", "-c", TINY, "--trainer.max_epochs=1", "--model.init_args.schedule.switch_epoch=0", *options],
        cwd,
    )
    if status != 0:
        raise RuntimeError(f"fixture fit {options} failed:\n{text[-3000:]}")
    found = sorted(cwd.rglob("*.ckpt"), key=os.path.getmtime)
    return found[-1]


def make_fixtures(base: Path) -> dict:
    import timm
    import torch
    from PIL import Image

    from dmpo_lightning import DMPOModule

    ctx: dict = {"base": base, "tiny": TINY}
    ctx["ckpt"] = fit(base / "a", "--test_after_fit=true", f"--evaluation.report_dir={base / 'report_a'}")
    ctx["thresholds"] = base / "report_a" / "thresholds.json"
    ctx["report"] = base / "report_a"
    ctx["ckpt_b"] = fit(base / "b", "--seed_everything=1")
    ctx["ckpt_dir"] = ctx["ckpt"].parent
    (base / "corrupt.ckpt").write_bytes(os.urandom(4096))
    ctx["corrupt"] = base / "corrupt.ckpt"
    ctx["afile"] = base / "a_file.txt"
    ctx["afile"].write_text("a file\n")
    (base / "empty").mkdir()
    ctx["empty"] = base / "empty"
    torch.save(DMPOModule.load_from_checkpoint(ctx["ckpt"]).state_dict(), base / "state_dict.pt")
    ctx["state_dict"] = base / "state_dict.pt"
    data = json.loads(ctx["thresholds"].read_text())
    for name, edit in {
        "short": lambda t: t[:1],
        "string": lambda t: ["high", *t[1:]],
        "null": lambda t: [t[0], None, *t[2:]],
    }.items():
        bad = json.loads(json.dumps(data))
        for entry in bad["budgets"]:
            entry["thresholds"] = edit(entry["thresholds"])
        (base / f"thresholds_{name}.json").write_text(json.dumps(bad))
        ctx[f"thresholds_{name}"] = base / f"thresholds_{name}.json"
    for name, kw in {"depth6": {"depth": 6}, "width64": {"embed_dim": 64}}.items():
        model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **{**TINY_KW, **kw})
        torch.save(model.state_dict(), base / f"{name}.pth")
        ctx[name] = base / f"{name}.pth"
    images = base / "images"
    for split in ("train", "test"):
        for label, cls in enumerate(("a", "b")):
            folder = images / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (20, 20), (40 * i, 200 * label, 90)).save(folder / f"{cls}_{i}.jpg")
    broken = images / "train" / "a" / "a_1.jpg"
    broken.write_bytes(broken.read_bytes()[:120])
    ctx["images"], ctx["broken"] = images, broken
    one_class = base / "one_class"
    (one_class / "train" / "only").mkdir(parents=True)
    (one_class / "test" / "only").mkdir(parents=True)
    for split in ("train", "test"):
        Image.new("RGB", (20, 20)).save(one_class / split / "only" / "x.jpg")
    ctx["one_class"] = one_class
    # the run a later command must not damage: a named logger version
    named = base / "named"
    ctx["named_ckpt"] = fit(named, "--trainer.logger.init_args.version=exp1")
    ctx["named"] = named
    ctx["named_dir"] = named / "runs" / "dmpo" / "exp1"
    ctx["named_before"] = (ctx["named_dir"] / "metrics.csv").read_text()
    # a model trained from a backbone weights file that is then moved away
    weights = base / "weights.pth"
    torch.save(
        timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **TINY_KW).state_dict(), weights
    )
    ctx["from_file_ckpt"] = fit(
        base / "from_file",
        f"--model.init_args.checkpoint_path={weights}",
        "--model.init_args.pretrained=true",
    )
    weights.rename(base / "weights_moved.pth")
    make_deploy_fixtures(ctx)
    make_data_fixtures(ctx)
    make_integrity_fixtures(ctx)
    return ctx


def make_integrity_fixtures(ctx: dict) -> None:
    """Files for the issue-28 cases of patterns 1, 7, 9 and 11 (resume, disks, options, files)."""
    base = ctx["base"]
    data = json.loads(ctx["thresholds"].read_text())
    data["format_version"] = 99
    (base / "thresholds_newer.json").write_text(json.dumps(data))
    ctx["thresholds_newer"] = base / "thresholds_newer.json"
    flipped = bytearray(ctx["ckpt"].read_bytes())  # 64 bytes of tensor data flipped, as a bad disk does
    start = len(flipped) // 3
    flipped[start : start + 64] = bytes(b ^ 0xFF for b in flipped[start : start + 64])
    (base / "flipped.ckpt").write_bytes(bytes(flipped))
    ctx["ckpt_flipped"] = base / "flipped.ckpt"
    (base / "exits_value.yaml").write_text("model:\n  init_args:\n    exits: 4\n")
    ctx["exits_value"] = base / "exits_value.yaml"


def make_data_fixtures(ctx: dict) -> None:
    """Files for the issue-28 data and backbone-weights cases (pattern 3 and the data parts of pattern 9)."""
    import torch
    from PIL import Image

    base = ctx["base"]
    # a Hugging Face transformers ViTModel state dict (the key names issue 28 found accepted)
    hf = {
        "vit.embeddings.cls_token": torch.zeros(1, 1, 32),
        "vit.embeddings.patch_embeddings.projection.weight": torch.zeros(32, 3, 8, 8),
        "vit.encoder.layer.0.attention.attention.query.weight": torch.zeros(32, 32),
    }
    torch.save(hf, base / "hf_vit.bin")
    ctx["hf_vit"] = base / "hf_vit.bin"
    # an image_list dataset whose training list is Latin-1, not UTF-8
    listed = base / "listed"
    (listed / "img").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (40, 80, 120)).save(listed / "img" / name)
    (listed / "train.txt").write_bytes("img/a.png 0\n# r\xe9sum\xe9\nimg/b.png 1\n".encode("latin-1"))
    (listed / "test.txt").write_text("img/a.png 0\nimg/b.png 1\n", encoding="utf-8")
    ctx["listed"] = listed
    (base / "vtab-1k" / "cifar").mkdir(parents=True)  # the release folder without the task's lists
    ctx["vtab"] = base / "vtab-1k"


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says ``width`` x ``height`` grey pixels and that holds no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + end)


def make_deploy_fixtures(ctx: dict) -> None:
    """Issue 28's inputs for the predict and deploy surfaces: hostile images, artefacts that lie."""
    import numpy as np
    import torch
    from PIL import Image

    from dmpo_lightning.deploy.export import export_artefact
    from dmpo_lightning.files import file_sha256

    base = ctx["base"]
    rng = np.random.default_rng(0)
    unit = rng.random((32, 32), dtype=np.float32)
    for name, files in {
        "hostile_nan": {"ok.png": None, "nan.tiff": "nan"},
        "hostile_huge": {"ok.png": None, "huge.png": "huge"},
    }.items():
        folder = base / name
        folder.mkdir()
        for file, kind in files.items():
            if kind is None:
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / file)
            elif kind == "nan":
                broken = unit.copy()
                broken[3, 4], broken[5, 6] = np.nan, np.inf
                Image.fromarray(broken).save(folder / file)
            else:
                _png_header_only(folder / file, 10_000, 10_000)
        ctx[name] = folder
    ctx["run_a"] = ctx["ckpt"].parent.parent
    exported = export_artefact(
        str(base / "art"), ckpt_path=str(ctx["ckpt"]), thresholds=str(ctx["thresholds"])
    )
    art = Path(exported)
    ctx["art"] = art
    for name, edit in {
        "art_classes": lambda m: m.update(class_names=m["class_names"][:3]),
        "art_size": lambda m: m["preprocessing"].update(input_size=[3, 48, 48]),
        "art_escape": lambda m: m["weights"].update(file="../secret.safetensors"),
    }.items():
        shutil.copytree(art, base / name)
        manifest = json.loads((base / name / "manifest.json").read_text())
        edit(manifest)
        (base / name / "manifest.json").write_text(json.dumps(manifest))
        ctx[name] = base / name
    (base / "names_dup.txt").write_text("shirt\ncoat\nshirt\nbag\n")
    ctx["names_dup"] = base / "names_dup.txt"
    payload = torch.load(ctx["ckpt"], map_location="cpu", weights_only=True)
    payload["global_step"] = 0
    torch.save(payload, base / "untrained.ckpt")
    ctx["untrained"] = base / "untrained.ckpt"
    th = json.loads(ctx["thresholds"].read_text())
    th["checkpoint_hash"] = f"file:{file_sha256(str(ctx['untrained']))}"
    (base / "thresholds_untrained.json").write_text(json.dumps(th))
    ctx["thresholds_untrained"] = base / "thresholds_untrained.json"
    # a run tested once after fit and once more with `dmpo test --ckpt_path` of its checkpoint
    ctx["ckpt_c"] = fit(base / "c", "--test_after_fit=true")
    ctx["run_c"] = ctx["ckpt_c"].parent.parent
    status, text = run_dmpo(["test", "-c", TINY, f"--ckpt_path={ctx['ckpt_c']}"], base / "c")
    if status != 0:
        raise RuntimeError(f"fixture dmpo test failed:\n{text[-3000:]}")


def fmt(*options: str) -> Callable[[dict], list[str]]:
    return lambda ctx: [o.format(**ctx) for o in options]


def predict_with(ckpt: str, thresholds: str, *extra: str) -> Callable[[dict], list[str]]:
    """``dmpo predict`` on tiny.yaml with a checkpoint and thresholds at budget 0.5, into <work>/p.csv."""
    return fmt(
        "predict",
        *T,
        f"--ckpt_path={ckpt}",
        f"--evaluation.thresholds_file={thresholds}",
        "--evaluation.predict_budget=0.5",
        "--evaluation.predictions_file={work}/p.csv",
        *extra,
    )


def named_run_kept(ctx: dict) -> str:
    run = ctx["named_dir"]
    kept = (run / "metrics.csv").read_text() == ctx["named_before"]
    configs = sorted(p.name for p in run.glob("config*.yaml"))
    return f"training run's metrics.csv unchanged: {kept}; its folder holds {configs}"


def wandb_folders(ctx: dict) -> str:
    runs = sorted(p.name for p in (ctx["work"] / "runs").glob("*/*") if p.is_dir())
    # W&B names its folder after the time and a random id: a pattern keeps the doc the same between runs
    runs = [re.sub(r"^offline-run-\d{8}_\d{6}-\w+$", "offline-run-<date>_<time>-<id>", r) for r in runs]
    return f"run folders after two W&B runs: {runs}"


def no_fit_only_warning(ctx: dict) -> str:
    text = ctx["last_output"]
    return (
        f"'Please add the following callbacks' printed: {'Please add the following callbacks' in text}; "
        f"'DataLoader 1' column printed: {'DataLoader 1' in text}"
    )


# ---------------------------------------------------------------------------------------- Python checks
def check_deep_images(ctx: dict) -> str:
    import numpy as np
    from PIL import Image

    from dmpo_lightning.images import ImageError, decode_image

    work = ctx["work"]
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(work / "deep.png")
    Image.fromarray(ramp.astype(np.float32)).save(work / "unit.tiff")
    Image.fromarray((ramp * 1000).astype(np.float32)).save(work / "kilo.tiff")
    parts = []
    for name in ("deep.png", "unit.tiff"):
        pil = np.asarray(Image.open(work / name).convert("L"))
        ours = np.asarray(decode_image(work / name).image)
        parts.append(
            f"{name} (a 0..max ramp): PIL's convert('L') white {100 * (pil == 255).mean():.1f} %, mean "
            f"{pil.mean():.1f}; decoded white {100 * (ours == 255).mean():.1f} %, mean {ours.mean():.1f}"
        )
    try:
        decode_image(work / "kilo.tiff")
        parts.append("kilo.tiff accepted (UNEXPECTED)")
    except ImageError as err:
        parts.append(f"a float TIFF of 0..1000: {err}")
    return "; ".join(parts)


def check_nan_tensor(ctx: dict) -> str:
    import torch

    from dmpo_lightning.deploy.predictor import EarlyExitPredictor

    predictor = EarlyExitPredictor.load(ctx["art"], budget=0.5)
    x = torch.zeros(4, *predictor.input_size)
    x[2, 0, 1, 1] = float("nan")
    try:
        predictor(x)
    except ValueError as err:
        return f"ValueError: {err}"
    return "accepted (UNEXPECTED)"


def check_custom_rule(ctx: dict) -> str:
    import torch

    from dmpo_lightning import DMPOModule
    from dmpo_lightning.evaluation.protocol import assign_exits
    from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY, exit_scores, register_exit_rule

    if "bad_input_margin" not in EXIT_RULE_REGISTRY:

        @register_exit_rule("bad_input_margin")
        def margin(probs: torch.Tensor, run: torch.Tensor) -> torch.Tensor:  # top-1 minus top-2 probability
            top2 = probs.topk(2, dim=-1).values
            return top2[:, 0] - top2[:, 1]

    class Margin(DMPOModule):
        exit_rule = "bad_input_margin"

    module = Margin(
        num_classes=5,
        backbone="vit_tiny_patch16_224",
        img_size=32,
        backbone_kwargs=TINY_KW,
        peft={"method": "full"},
        exits={"blocks": [2, 4], "moment_dim": 16},
    ).eval()
    with torch.no_grad():
        for p in module.model.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(32, 3, 32, 32)
        scores, _ = exit_scores(module(x), module.exit_rule)
        thresholds = [float(scores[:, 0].median()), float("-inf")]
        protocol = assign_exits(scores.double(), torch.tensor(thresholds, dtype=torch.float64))
        real = module.forward_early_exit(x, thresholds)
        confidence = module.forward_early_exit(x, thresholds, rule="confidence")
    same = torch.equal(real.exit_index, protocol)
    return ("" if same else "UNEXPECTED ") + (
        f"registered margin rule, threshold = median margin at exit 1: the `dmpo test` protocol sends "
        f"{int((protocol == 0).sum())}/32 to exit 1, DMPOModule.forward_early_exit (dmpo predict) "
        f"{int((real.exit_index == 0).sum())}/32, same exits: {same}; "
        f"the confidence rule with the same thresholds {int((confidence.exit_index == 0).sum())}/32"
    )


def check_eval_mode(ctx: dict) -> str:
    import torch

    from dmpo_lightning import DMPOModule

    module = DMPOModule(
        num_classes=4,
        backbone="vit_tiny_patch16_224",
        img_size=32,
        backbone_kwargs=TINY_KW,
        peft={"method": "full"},
        exits={"blocks": [2, 4], "early_head": "isqrt_cov", "cov_dim": 8},
    ).train()
    bn = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.clone() for m in bn]
    module.model.forward_early_exit(torch.randn(8, 3, 32, 32), thresholds=[0.5, 0.0])
    same = all(torch.equal(a, m.running_mean) for a, m in zip(before, bn, strict=True))
    return (
        f"BatchNorm statistics unchanged: {same} ({len(bn)} BatchNorm layers); training mode restored: "
        f"{module.training}"
    )


def check_splits(ctx: dict) -> str:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from dmpo_lightning import BenchmarkDataModule, DMPOModule
    from dmpo_lightning.constants import SPLIT_KEY
    from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions

    dm = BenchmarkDataModule(
        dataset="synthetic",
        synthetic_sizes=(40, 12),
        synthetic_num_classes=4,
        calibration_size=8,
        batch_size=8,
        num_workers=0,
        image_size=32,
    )
    dm.setup()

    class Untagged(list):
        pass

    untagged = Untagged(
        {k: v for k, v in dm.split_dataset("test")[i].items() if k != SPLIT_KEY} for i in range(12)
    )
    model = DMPOModule(
        num_classes=4,
        backbone="vit_tiny_patch16_224",
        img_size=32,
        backbone_kwargs=TINY_KW,
        peft={"method": "full"},
        exits={"blocks": [2, 4], "moment_dim": 16},
    )
    options = EvaluationOptions(budgets=[0.75], report_dir=str(ctx["work"] / "report"), allow_untrained=True)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=ctx["work"],
        callbacks=[DMPOEvaluator(options)],
    )
    try:
        trainer.test(model, dataloaders=[DataLoader(untagged, batch_size=8), dm.dataloader("calibration")])
    except ValueError as err:
        return f"ValueError: {str(err).splitlines()[0]}"
    return "accepted (UNEXPECTED)"


def check_reg_gap(ctx: dict) -> str:
    from dmpo_lightning import DMPOModule

    try:
        DMPOModule(
            num_classes=4,
            backbone="vit_betwixt_patch16_reg4_gap_256",
            img_size=32,
            backbone_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            peft={"method": "vpt"},
            exits={"blocks": [1, 2], "moment_dim": 16, "head_pool": "token"},
        )
    except ValueError as err:
        return f"ValueError: {str(err).splitlines()[0]}"
    return "accepted (UNEXPECTED)"


def check_load_from_checkpoint(ctx: dict) -> str:
    from dmpo_lightning import DMPOModule

    module = DMPOModule.load_from_checkpoint(ctx["from_file_ckpt"], checkpoint_path=None)
    return f"loaded after the weights file moved; hparams.checkpoint_path = {module.hparams.checkpoint_path}"


def check_monitor(ctx: dict) -> str:
    import yaml

    conf = yaml.safe_load((ROOT / "configs" / "trainer" / "default.yaml").read_text())
    (ckpt,) = [c for c in conf["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    return f"ModelCheckpoint monitor={ckpt['init_args']['monitor']!r} mode={ckpt['init_args']['mode']!r}"


def check_readme_focal(ctx: dict) -> str:
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "FocalDMPO" in b]
    exec(block, {})
    return "the README's focal-loss block runs as printed (imports torch, F, DMPOModule, weighted_sum)"


def check_timm_bound(ctx: dict) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    pins = re.findall(r'"((?:timm|lightning|torchmetrics|jsonargparse)(?:\[\w+\])?>=[\d.]+)"', text)
    return f"pyproject bounds {pins}; tested by .ci/lowest_versions (docs/dependency_bounds.md)"


def check_sigterm(ctx: dict) -> str:
    return (
        "not re-run here (needs a subprocess and a signal): tests/test_cli_process.py asserts status 143 "
        "and 'dmpo: stopped by SIGTERM; resume with --ckpt_path .../interrupted.ckpt'"
    )


def check_full_disk(ctx: dict) -> str:
    return (
        "not re-run here (needs a failing write): the test makes the 4th report file fail with ENOSPC and "
        "asserts the results table was printed, no report folder is left and a rerun succeeds"
    )


def check_full_disk_checkpoint(ctx: dict) -> str:
    import errno
    import io

    import torch

    real_save = torch.save

    def disk_fills(obj, f, *args, **kwargs):  # the file takes 4,096 bytes, then the disk is full
        if isinstance(f, (str, os.PathLike)):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:4096])
        raise OSError(errno.ENOSPC, "No space left on device")

    torch.save = disk_fills
    try:
        status, text = run_dmpo(["fit", "-c", TINY, "--trainer.max_epochs=2"], ctx["work"])
    finally:
        torch.save = real_save
    line = next((x for x in text.splitlines() if "error:" in x), "UNEXPECTED: no error line")
    folder = ctx["work"] / "runs" / "dmpo" / "version_0" / "checkpoints"
    left = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else ["(no checkpoints folder)"]
    ok = status == 1 and "the disk is full" in line and not left
    return ("" if ok else "UNEXPECTED ") + f"status {status}: {line}; files left in checkpoints/: {left}"


def check_predict_sigterm(ctx: dict) -> str:
    return (
        "not re-run here (needs a subprocess and a signal): tests/test_cli_process.py asserts status 143, "
        "'dmpo predict: stopped by SIGTERM' and no predictions file"
    )


def check_report_describes_itself(ctx: dict) -> str:
    report = json.loads((ctx["report"] / "report.json").read_text())
    data, env = report.get("data") or {}, report.get("environment") or {}
    keys = ("dataset", "root", "image_size", "split_seed", "calibration_size", "num_classes")
    versions = ("dmpo_lightning", "torch", "timm", "lightning")
    ok = all(k in data for k in keys) and all(env.get(k) for k in (*versions, "device", "date"))
    return ("" if ok else "UNEXPECTED ") + (
        f"report.json format_version {report['format_version']}: data "
        + ", ".join(f"{k}={data.get(k)!r}" for k in keys)
        + "; environment "
        + ", ".join(f"{k} {env.get(k)}" for k in versions)
        + f", device {env.get('device')!r}, date present: {bool(env.get('date'))}"
    )


def check_nonfinite_module(ctx: dict) -> str:
    import torch

    from dmpo_lightning import DMPOModule

    module = DMPOModule.load_from_checkpoint(ctx["ckpt"])
    x = torch.randn(4, 3, 32, 32)
    x[2, 0, 1, 1] = float("nan")
    try:
        out = module.forward_early_exit(x)
    except ValueError as err:
        return f"ValueError: {err}"
    return f"UNEXPECTED: predicted {out.prediction.tolist()} with scores {out.score.tolist()}"


def check_registered_rule_travels(ctx: dict) -> str:
    import torch
    from lightning.pytorch import Trainer

    from dmpo_lightning import BenchmarkDataModule, DMPOModule
    from dmpo_lightning.deploy.export import export_artefact
    from dmpo_lightning.deploy.format import ArtefactError
    from dmpo_lightning.deploy.predictor import EarlyExitPredictor
    from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions
    from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY, register_exit_rule

    name = "bad_input_margin2"

    def margin(probs: torch.Tensor, run: torch.Tensor) -> torch.Tensor:  # top-1 minus top-2 probability
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]

    register_exit_rule(name)(margin)
    work = ctx["work"]
    try:
        options = EvaluationOptions(rule=name, budgets=(0.75,), report_dir=str(work / "report"))
        dm = BenchmarkDataModule(
            dataset="synthetic", synthetic_sizes=(48, 24), synthetic_num_classes=4, calibration_size=16,
            batch_size=8, num_workers=0, image_size=32,
        )  # fmt: skip
        trainer = Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=work, callbacks=[DMPOEvaluator(options)],
        )  # fmt: skip
        module = DMPOModule.load_from_checkpoint(ctx["ckpt"])
        trainer.test(module, datamodule=dm, ckpt_path=str(ctx["ckpt"]), weights_only=True, verbose=False)
        th = json.loads((work / "report" / "thresholds.json").read_text())
        art = export_artefact(
            str(work / "art"), ckpt_path=str(ctx["ckpt"]), thresholds=str(work / "report" / "thresholds.json")
        )
        manifest = json.loads((work / "art" / "manifest.json").read_text())
        predictor = EarlyExitPredictor.load(art, budget=0.75)
        x = torch.randn(32, 3, 32, 32)
        ours = predictor(x)
        theirs = module.forward_early_exit(x, thresholds=predictor.thresholds, rule=name)
        same = torch.equal(ours.exit, theirs.exit_index.cpu() + 1)
    finally:
        EXIT_RULE_REGISTRY._entries.pop(name, None)  # as in a serving process without the plugin
    try:
        EarlyExitPredictor.load(art, budget=0.75)
        refused = "UNEXPECTED: loaded without the rule"
    except ArtefactError as err:
        refused = str(err)
    ok = th["rule"] == manifest["exit_rule"] == predictor.exit_rule == name and same
    return ("" if ok else "UNEXPECTED ") + (
        f"thresholds.json rule {th['rule']!r}, manifest exit_rule {manifest['exit_rule']!r}, predictor "
        f"{predictor.exit_rule!r}; predictor and DMPOModule.forward_early_exit send the 32 images to the "
        f"same exits: {same}; without the rule registered: {refused}"
    )


def check_truncated_predictions(ctx: dict) -> str:
    from dmpo_lightning.predictions import PredictionRow, read_predictions, write_predictions

    path = ctx["work"] / "p.csv"
    rows = [PredictionRow(1, "dog", 2, 0.75, 0.75, 0.125, path=f"/images/{i}.png") for i in range(4)]
    write_predictions(str(path), rows, num_exits=4)
    path.write_bytes(path.read_bytes()[:-30])
    try:
        read_predictions(str(path))
    except ValueError as err:
        return f"ValueError: {err}"
    return "UNEXPECTED: read"


# ------------------------------------------------------------------------------------------------- cases
T = "-c", "{tiny}"
CASES = [
    # --- data lost
    Case(
        "named_version_second_fit",
        "A second `dmpo fit` into a named logger version",
        "test_cli::test_a_named_logger_version_never_loses_the_training_run",
        fmt("fit", *T, "--trainer.logger.init_args.version=exp1"),
        line=r"error: log folder",
        after=named_run_kept,
        cwd="named",
    ),
    Case(
        "named_version_readme_test",
        "README's `dmpo test -c <run>/config.yaml --ckpt_path` into that run",
        "test_cli::test_a_named_logger_version_never_loses_the_training_run",
        fmt(
            "test",
            "-c",
            "{named_dir}/config.yaml",
            "--ckpt_path={named_ckpt}",
            "--evaluation.report_dir={work}/report",
        ),
        status=0,
        line=r"dmpo test of .* checkpoint writes into",
        after=named_run_kept,
        cwd="named",
    ),
    Case(
        "wandb_two_runs",
        "configs/trainer/wandb.yaml: a second run (FileExistsError before)",
        "test_cli::test_every_logger_gives_each_run_its_own_folder[wandb]",
        fmt(
            "fit",
            *T,
            "-c",
            str(ROOT / "configs" / "trainer" / "wandb.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.max_epochs=1",
            "--model.init_args.schedule.switch_epoch=0",
        ),
        status=0,
        line=r"calibration split \(\d+ images\) saved to",
        after=wandb_folders,
        repeat=2,
    ),
    # --- silently wrong results
    Case(
        "thresholds_of_another_checkpoint",
        "thresholds.json of another checkpoint (same architecture)",
        "test_thresholds::test_predict_refuses_thresholds_of_another_checkpoint",
        predict_with("{ckpt_b}", "{thresholds}"),
    ),
    Case(
        "thresholds_override",
        "... with the explicit override (warns naming both hashes)",
        "test_thresholds::test_predict_with_override_warns_naming_both_hashes",
        predict_with("{ckpt_b}", "{thresholds}", "--evaluation.allow_other_checkpoint_thresholds=true"),
        status=0,
        line=r"using them anyway",
    ),
    Case(
        "thresholds_wrong_length",
        "thresholds list of the wrong length (was broadcast)",
        "test_thresholds::test_predict_accepts_its_own_thresholds_and_refuses_a_wrong_length",
        predict_with("{ckpt}", "{thresholds_short}"),
    ),
    Case(
        "thresholds_string",
        "a string threshold (was a conversion traceback)",
        "test_thresholds::test_threshold_lists_are_validated",
        predict_with("{ckpt}", "{thresholds_string}"),
    ),
    Case(
        "thresholds_null",
        "a null/NaN threshold",
        "test_thresholds::test_threshold_lists_are_validated",
        predict_with("{ckpt}", "{thresholds_null}"),
    ),
    Case(
        "custom_exit_rule",
        "a custom exit rule (registered; was a subclass's `score_exits`) drives the real early exit too",
        "test_exit_policy::test_a_registered_rule_drives_the_real_early_exit",
        check=check_custom_rule,
    ),
    Case(
        "test_without_checkpoint",
        "`dmpo test` without --ckpt_path (untrained weights)",
        "test_cli_bad_input::...[test_without_checkpoint]; "
        "test_evaluator::test_untrained_evaluation_only_on_request",
        fmt("test", *T, "--evaluation.report_dir={work}/report"),
    ),
    Case(
        "splits_by_position",
        "test loaders told apart by position (custom / untagged loaders)",
        "test_evaluator::test_ambiguous_test_loaders_are_refused, "
        "::test_test_splits_are_identified_by_name_not_position",
        check=check_splits,
    ),
    Case(
        "checkpoint_path_depth",
        "depth-6 timm checkpoint into a depth-4 model (trained truncated)",
        "test_backbone_loading::test_checkpoint_path_mismatch_through_the_cli",
        fmt("fit", *T, "--model.init_args.checkpoint_path={depth6}"),
    ),
    Case(
        "checkpoint_path_width",
        "width mismatch of checkpoint_path (was 108 size-mismatch lines)",
        "test_backbone_loading::test_checkpoint_path_of_another_architecture_is_refused",
        fmt("fit", *T, "--model.init_args.checkpoint_path={width64}"),
    ),
    Case(
        "register_tokens_token_pool",
        "`exits.head_pool: token` on a `*_gap_*` register model (CLI; the default now pools as the backbone)",
        "test_multi_exit::test_token_pooling_without_a_class_token_is_refused",
        fmt(
            "fit",
            *T,
            "--model.init_args.backbone=vit_betwixt_patch16_reg4_gap_256",
            "--model.init_args.backbone_kwargs={{patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2}}",
            "--model.init_args.exits.head_pool=token",
        ),
    ),
    Case(
        "register_tokens_vpt",
        "... VPT on a model without class token (API)",
        "test_multi_exit::test_heads_of_a_model_without_class_token_pool_patch_tokens",
        check=check_reg_gap,
    ),
    Case(
        "early_exit_eval_mode",
        "`forward_early_exit` on a training-mode module",
        "test_exit_policy::test_early_exit_runs_in_eval_mode_and_restores_the_mode",
        check=check_eval_mode,
    ),
    Case(
        "frozen_random_trunk",
        "`pretrained: false` with a frozen-trunk PEFT (warning)",
        "test_backbone_loading::test_frozen_random_trunk_warns, "
        "::test_frozen_random_trunk_warns_through_the_cli",
        fmt("validate", *T),
        status=0,
        line=r"frozen trunk keeps its random initial weights",
    ),
    Case(
        "num_classes_explicit_default",
        "`num_classes: 10` (the default) written explicitly, data has 4",
        "test_cli::test_explicit_num_classes_that_disagrees_with_the_data_is_refused[10]",
        fmt("fit", *T, "--model.init_args.num_classes=10"),
    ),
    Case(
        "num_classes_explicit",
        "`--model.init_args.num_classes=7`, data has 4",
        "test_cli_bad_input::...[num_classes_disagrees_with_data]",
        fmt("fit", *T, "--model.init_args.num_classes=7"),
    ),
    Case(
        "num_classes_equal",
        "`num_classes` equal to the data's (accepted)",
        "test_cli::test_explicit_num_classes_equal_to_the_data_is_accepted",
        fmt("validate", *T, "--model.init_args.num_classes=4"),
        status=0,
        line=r"val/acc_last|Validate metric",
    ),
    Case(
        "num_classes_vs_checkpoint",
        "`num_classes` vs the checkpoint when the data reads no dataset",
        "test_cli::test_explicit_num_classes_must_match_the_checkpoint_when_no_dataset_is_read",
        fmt(
            "predict",
            *T,
            "--ckpt_path={ckpt}",
            "--data.init_args.predict_paths={images}/test",
            "--evaluation.predictions_file={work}/p.csv",
            "--model.init_args.num_classes=10",
        ),
    ),
    Case(
        "ramp_beyond_training",
        "`ramp_epochs` longer than training (never reached phase 2)",
        "test_cli_bad_input::...[ramp_beyond_max_epochs]",
        fmt(
            "fit",
            *T,
            "--trainer.max_epochs=3",
            "--model.init_args.schedule.switch_epoch=1",
            "--model.init_args.schedule.ramp_epochs=2",
        ),
    ),
    # --- late or wrong-signal failures
    Case(
        "budget_zero_after_fit",
        "`budgets=[0]` with test_after_fit (was after training)",
        "test_cli_bad_input::...[budget_zero_with_test_after_fit]",
        fmt("fit", *T, "--evaluation.budgets=[0]", "--test_after_fit=true"),
    ),
    Case(
        "budget_above_one",
        "a budget above the full model's cost in `dmpo test`",
        "test_cli_bad_input::...[budget_above_full_model]",
        fmt(
            "test",
            *T,
            "--ckpt_path={ckpt}",
            "--evaluation.budgets=[0.5, 1.5]",
            "--evaluation.report_dir={work}/report",
        ),
    ),
    Case(
        "report_dir_is_a_file",
        "a file-typed report_dir (was a raw OSError after the evaluation)",
        "test_cli_bad_input::...[report_dir_is_a_file_with_test_after_fit]",
        fmt("test", *T, "--ckpt_path={ckpt}", "--evaluation.report_dir={afile}"),
    ),
    Case(
        "report_dir_exists",
        "a report folder that already holds a report",
        "test_cli_bad_input::...[existing_report]",
        fmt("test", *T, "--ckpt_path={ckpt}", "--evaluation.report_dir={report}"),
    ),
    Case(
        "predictions_file_is_a_folder",
        "a folder as predictions_file",
        "test_cli_bad_input::...[predictions_file_is_a_folder]",
        fmt("predict", *T, "--ckpt_path={ckpt}", "--evaluation.predictions_file={empty}"),
    ),
    Case(
        "predictions_file_exists",
        "an existing predictions_file (never overwritten)",
        "test_cli_bad_input::...[predictions_file_exists]",
        fmt("predict", *T, "--ckpt_path={ckpt}", "--evaluation.predictions_file={afile}"),
    ),
    Case(
        "read_only_report_dir",
        "read-only report_dir (fails before the evaluation)",
        "test_evaluator::test_a_read_only_report_dir_fails_before_the_evaluation, "
        "::test_an_unwritable_report_dir_fails_before_the_evaluation",
        fmt("test", *T, "--ckpt_path={ckpt}", "--evaluation.report_dir=/proc/dmpo_report"),
    ),
    Case(
        "full_disk",
        "full disk during `dmpo test` (partial report folder)",
        "test_evaluator::test_a_failed_report_write_leaves_no_partial_folder_and_the_table_is_printed",
        check=check_full_disk,
    ),
    Case(
        "sigterm",
        "SIGTERM during fit (exited 0, no checkpoint)",
        "test_cli_process::test_sigterm_during_fit_exits_non_zero_with_a_resumable_checkpoint",
        check=check_sigterm,
    ),
    Case(
        "truncated_jpeg",
        "a truncated JPEG in the training data (no file name)",
        "test_data_datamodule::test_unreadable_image_through_the_cli; "
        "test_console::test_an_unreadable_image_ends_the_run_with_one_line_naming_the_file",
        fmt(
            "fit",
            *T,
            "--data.init_args.dataset=image_folder",
            "--data.init_args.root={images}",
            "--data.init_args.calibration_size=2",
            "--trainer.limit_train_batches=null",
            "--trainer.max_epochs=1",
            "--model.init_args.schedule.switch_epoch=0",
        ),
        status=1,
        line=r"error: cannot read image file",
    ),
    Case(
        "skip_unreadable",
        "... the documented opt-in to skip unreadable images (counted, reported)",
        "test_data_datamodule::test_skip_unreadable_images_leaves_them_out_and_reports_them",
        fmt(
            "validate",
            *T,
            "--data.init_args.dataset=image_folder",
            "--data.init_args.root={images}",
            "--data.init_args.calibration_size=2",
            "--data.init_args.skip_unreadable_images=true",
        ),
        status=0,
        line=r"left out \d+ unreadable image",
    ),
    Case(
        "offline_rebuild",
        "test a checkpoint trained from a weights file after the file moved",
        "test_checkpointing::test_a_checkpoint_trained_from_a_weights_file_is_tested_offline_after_the_file_moved",
        fmt(
            "test",
            *T,
            "--ckpt_path={from_file_ckpt}",
            "--evaluation.report_dir={work}/report",
        ),
        status=0,
        line=r"report, curve, plot and thresholds written to",
    ),
    Case(
        "load_from_checkpoint_none",
        "`DMPOModule.load_from_checkpoint(p, checkpoint_path=None)`",
        "test_checkpointing::test_a_checkpoint_trained_from_a_weights_file_is_tested_offline_after_the_file_moved",
        check=check_load_from_checkpoint,
    ),
    Case(
        "negative_lr",
        "a negative learning rate",
        "test_cli_bad_input::...[negative_learning_rate]",
        fmt("fit", *T, "--model.init_args.optimizer=AdamW", "--model.init_args.optimizer.lr=-0.1"),
    ),
    Case(
        "nan_lr",
        "a NaN learning rate",
        "test_cli_bad_input::...[nan_learning_rate]",
        fmt("fit", *T, "--model.init_args.optimizer=AdamW", "--model.init_args.optimizer.lr=.nan"),
    ),
    Case(
        "ckpt_path_folder",
        "a directory as --ckpt_path",
        "test_cli_bad_input::...[checkpoint_is_a_folder]",
        fmt("test", *T, "--ckpt_path={ckpt_dir}"),
    ),
    Case(
        "ckpt_path_state_dict",
        "a bare state_dict as --ckpt_path",
        "test_cli_bad_input::...[checkpoint_is_a_bare_state_dict]",
        fmt("test", *T, "--ckpt_path={state_dict}"),
    ),
    Case(
        "one_class_synthetic",
        "a one-class dataset (synthetic)",
        "test_data_datamodule::test_one_class_data_through_the_cli",
        fmt("fit", *T, "--data.init_args.synthetic_num_classes=1"),
    ),
    Case(
        "one_class_folder",
        "a one-class dataset (image folder)",
        "test_data_datamodule::test_one_class_data_and_model_are_refused",
        fmt("fit", *T, "--data.init_args.dataset=image_folder", "--data.init_args.root={one_class}"),
    ),
    Case(
        "rope_lora",
        "EVA02/RoPE ViT with lora (was refused; RoPE families are supported now, docs/backbones.md)",
        "test_backbone_families::test_every_peft_method_trains_on_every_family, "
        "::test_fit_and_test_through_the_cli",
        fmt(
            "fit",
            *T,
            "--model.init_args.backbone=eva02_tiny_patch14_224",
            "--model.init_args.peft.method=lora",
        ),
        status=0,
        line=r"`Trainer.fit` stopped",
    ),
    Case(
        "rope_full",
        "EVA02/RoPE ViT with full (supported now, as above)",
        "test_backbone_families::test_every_peft_method_trains_on_every_family",
        fmt(
            "fit",
            *T,
            "--model.init_args.backbone=eva02_tiny_patch14_224",
            "--model.init_args.peft.method=full",
        ),
        status=0,
        line=r"`Trainer.fit` stopped",
    ),
    Case(
        "resnet_img_size",
        "ResNet with img_size",
        "test_console::test_constructor_errors_print_one_sentence_without_the_option_dump",
        fmt("fit", *T, "--model.init_args.backbone=resnet18"),
    ),
    Case(
        "parse_error_no_dump",
        "a parse error: no ~1 KB Namespace(...) dump",
        "test_cli_process::test_a_parse_error_has_no_dump_of_the_parsed_values",
        fmt("fit", *T, "--data.init_args.dataset=imagenet22k"),
        line=r"Got value: imagenet22k",
    ),
    # --- also
    Case(
        "lowest_dependencies",
        "real lower bound of every dependency, lowest tested in CI",
        ".ci/lowest_versions (run by .ci/run)",
        check=check_timm_bound,
    ),
    Case(
        "fit_only_callbacks_warning",
        "`dmpo test --ckpt_path`: no warning asking for LossWeightScheduler/EpochSeed, "
        "no 'DataLoader 1' column",
        "test_checkpointing::test_a_checkpoint_trained_from_a_weights_file_is_tested_"
        "offline_after_the_file_moved",
        fmt("test", *T, "--ckpt_path={ckpt}", "--evaluation.report_dir={work}/report"),
        status=0,
        line=r"Anytime prediction",
        after=no_fit_only_warning,
    ),
    Case(
        "default_monitor",
        "configs/trainer/default.yaml keeps the best checkpoint by calibration accuracy",
        "test_configs::test_the_best_checkpoint_is_chosen_by_calibration_accuracy_of_the_last_exit",
        check=check_monitor,
    ),
    Case(
        "readme_focal_loss",
        "README focal-loss example lacks `import torch`",
        "test_module::test_readme_focal_loss_example_runs_as_printed",
        check=check_readme_focal,
    ),
    # --- issue 28 on the predict and deploy surfaces (patterns 2, 5, 6, 8, 9, 10)
    Case(
        "deep_images",
        "issue 28/5: a 16-bit PNG and a 32-bit float TIFF (were clipped to white)",
        "test_images::test_16_bit_images_are_scaled_not_clipped, "
        "::test_every_surface_scales_16_bit_and_float_images_like_their_8_bit_equivalents",
        check=check_deep_images,
    ),
    Case(
        "predict_nan_image",
        "issue 28/5: an image with NaN/inf pixels in `dmpo predict` (was class 0, confidence NaN)",
        "test_images::test_every_surface_refuses_non_finite_and_out_of_range_pixels_per_image",
        predict_with("{ckpt}", "{thresholds}", "--data.init_args.predict_paths={hostile_nan}"),
        status=0,
        line=r"not predicted",
    ),
    Case(
        "deploy_nan_image",
        "issue 28/5: ... with the artefact's command",
        "test_images::test_every_surface_refuses_non_finite_and_out_of_range_pixels_per_image",
        fmt("{art}", "{hostile_nan}", "--output={work}/p.csv"),
        status=0,
        line=r"not predicted",
        program="python -m dmpo_lightning.deploy",
    ),
    Case(
        "predictor_nan_tensor",
        "issue 28/5: `EarlyExitPredictor(batch)` with a NaN pixel",
        "test_images::test_the_python_api_raises_for_non_finite_inputs",
        check=check_nan_tensor,
    ),
    Case(
        "predict_huge_image",
        "issue 28/8: a 100-megapixel image (was decoded in full, 881 MB, before the size check)",
        "test_images::test_every_surface_refuses_a_huge_image_from_its_header, "
        "::test_every_surface_takes_a_pixel_limit_and_names_it",
        predict_with("{ckpt}", "{thresholds}", "--data.init_args.predict_paths={hostile_huge}"),
        status=0,
        line=r"not predicted",
    ),
    Case(
        "deploy_huge_image",
        "issue 28/8: ... with the artefact's command",
        "test_images::test_every_surface_refuses_a_huge_image_from_its_header",
        fmt("{art}", "{hostile_huge}", "--output={work}/p.csv"),
        status=0,
        line=r"not predicted",
        program="python -m dmpo_lightning.deploy",
    ),
    Case(
        "manifest_class_names",
        "issue 28/6: a manifest with 3 class names for 4 classes (loaded and predicted)",
        "test_deploy_format::test_a_manifest_that_contradicts_itself_is_refused_naming_the_field",
        fmt("{art_classes}", "{hostile_nan}", "--output={work}/p.csv"),
        program="python -m dmpo_lightning.deploy",
    ),
    Case(
        "manifest_input_size",
        "issue 28/6: a manifest whose input size disagrees with the model (failed per image, exit 0)",
        "test_deploy_format::test_a_manifest_that_contradicts_itself_is_refused_naming_the_field",
        fmt("{art_size}", "{hostile_nan}", "--output={work}/p.csv"),
        program="python -m dmpo_lightning.deploy",
    ),
    Case(
        "manifest_path_escape",
        "issue 28/8: a manifest whose weights file leaves the artefact folder",
        "test_deploy_format::test_a_manifest_that_contradicts_itself_is_refused_naming_the_field, "
        "::test_a_symbolic_link_out_of_the_artefact_is_refused",
        fmt("{art_escape}", "{hostile_nan}", "--output={work}/p.csv"),
        program="python -m dmpo_lightning.deploy",
    ),
    Case(
        "export_duplicate_class_names",
        "issue 28/8: duplicate class names in `dmpo export --class-names`",
        "test_deploy_export::test_duplicate_class_names_are_refused",
        fmt(
            "export",
            "--ckpt_path={ckpt}",
            "--thresholds={thresholds}",
            "--output={work}/art",
            "--class-names={names_dup}",
        ),
    ),
    Case(
        "export_untrained",
        "issue 28/2: `dmpo export` of a checkpoint saved before any training step",
        "test_deploy_export::test_a_checkpoint_that_never_trained_is_exported_only_on_request",
        fmt(
            "export", "--ckpt_path={untrained}", "--thresholds={thresholds_untrained}", "--output={work}/art"
        ),
    ),
    Case(
        "deploy_device_banana",
        "issue 28/9: `--device banana` in the deploy command (traceback)",
        "test_deploy_predict_cli::test_a_device_that_does_not_exist_is_refused_in_one_sentence",
        fmt("{art}", "{hostile_nan}", "--output={work}/p.csv", "--device=banana"),
        program="python -m dmpo_lightning.deploy",
    ),
    Case(
        "deploy_device_cuda7",
        "issue 28/9: `--device cuda:7` on a machine without it (traceback)",
        "test_deploy_predict_cli::test_a_device_that_does_not_exist_is_refused_in_one_sentence",
        fmt("{art}", "{hostile_nan}", "--output={work}/p.csv", "--device=cuda:7"),
        program="python -m dmpo_lightning.deploy",
    ),
    Case(
        "calibration_size_too_large",
        "issue 28/9: `calibration_size` larger than the training data (traceback, empty version_N)",
        "test_data_list_files::test_calibration_size_the_data_cannot_hold_is_one_sentence_before_any_run_folder",
        fmt("fit", *T, "--data.init_args.calibration_size=100"),
        line=r"error: .*leaves no training data",
        after=lambda ctx: f"runs/ created: {(ctx['work'] / 'runs').exists()}",
    ),
    Case(
        "calibration_size_zero",
        "issue 28/9: `calibration_size` 0 (traceback, empty version_N)",
        "test_data_list_files::test_calibration_size_the_data_cannot_hold_is_one_sentence_before_any_run_folder",
        fmt("fit", *T, "--data.init_args.calibration_size=0"),
        line=r"error: .*must be positive",
        after=lambda ctx: f"runs/ created: {(ctx['work'] / 'runs').exists()}",
    ),
    Case(
        "calibration_indices_folder",
        "issue 28/9: a folder given as `calibration_indices_file`",
        "test_data_errors::test_indices_file_for_another_dataset_or_out_of_range",
        fmt("fit", *T, "--data.init_args.calibration_indices_file={base}"),
        line=r"error: .*is a folder",
    ),
    Case(
        "list_file_not_utf8",
        "issue 28/9: an `image_list` list file that is not UTF-8",
        "test_data_list_files::test_image_list_errors_name_the_file",
        fmt(
            "fit",
            *T,
            "--data.init_args.dataset=image_list",
            "--data.init_args.root={listed}",
            "--data.init_args.calibration_size=null",
        ),
        line=r"error: .*not UTF-8",
    ),
    Case(
        "vtab_task_lists_missing",
        "VTAB-1k: the task folder without its list files",
        "test_data_list_files::test_vtab1k_errors",
        fmt(
            "fit",
            *T,
            "--data.init_args.dataset=vtab1k",
            "--data.init_args.task=cifar",
            "--data.init_args.root={vtab}",
            "--data.init_args.calibration_size=null",
        ),
        line=r"error: .*VTAB-1k task 'cifar' not found",
    ),
    Case(
        "hf_transformers_checkpoint",
        "issue 28/3: a Hugging Face transformers ViT state dict as `checkpoint_path` (trunk stayed random)",
        "test_backbone_loading::test_a_transformers_vit_state_dict_is_refused_naming_keys_and_the_timm_name",
        fmt("fit", *T, "--model.init_args.checkpoint_path={hf_vit}"),
        line=r"error: .*filled only 0 of",
    ),
    Case(
        "hub_repo_offline_uncached",
        "issue 30: an `hf-hub:` backbone of another owner, offline and not in the cache",
        "test_backbone_hub::test_bad_hub_names_are_one_sentence",
        fmt("fit", *T, "--model.init_args.backbone=hf-hub:someone/my-vit"),
        line=r"error: .*not in the local Hugging Face cache",
    ),
    Case(
        "export_run_after_test",
        "issue 28/10: `dmpo export --run` after `dmpo test --ckpt_path` of that run's checkpoint",
        "test_deploy_export::test_run_export_takes_the_newest_test_report_of_one_of_its_checkpoints",
        fmt("export", "--run={run_c}", "--output={work}/art"),
        status=0,
        line=r"wrote artefact",
    ),
    # --- issue 28, the rest of patterns 1, 7, 9 and 11 and the file formats (helper "integrity")
    Case(
        "resume_longer",
        "issue 28/1: resuming with a larger max_epochs (KeyError '_schedulers', or the LR climbed back up)",
        "test_resume::test_resuming_to_train_longer_replans_the_learning_rate_schedule",
        fmt(
            "fit",
            *T,
            "--ckpt_path={ckpt}",
            "--trainer.max_epochs=3",
            "--model.init_args.schedule.switch_epoch=0",
        ),
        status=0,
        line=r"resuming: the learning-rate schedule is re-planned",
    ),
    Case(
        "full_disk_checkpoint",
        "issue 28/7: a disk that fills up while a checkpoint is written (left epoch=0-step=2.ckpt truncated)",
        "test_atomic_checkpoints::test_a_full_disk_during_fit_is_one_sentence_and_leaves_no_truncated_checkpoint",
        check=check_full_disk_checkpoint,
    ),
    Case(
        "read_only_log_folder",
        "issue 28/7: a log folder that cannot be written (a traceback from makedirs)",
        "test_atomic_checkpoints::test_a_read_only_output_folder_is_refused_before_any_work",
        fmt("fit", *T, "--trainer.logger.init_args.save_dir=/proc/dmpo_runs"),
        line=r"error: the run's log folder cannot be written",
        after=lambda ctx: f"runs/ created: {(ctx['work'] / 'runs').exists()}",
    ),
    Case(
        "read_only_export_output",
        "issue 28/7: `dmpo export --output` where nothing can be written (a traceback from mkdtemp)",
        "test_atomic_checkpoints::test_a_read_only_output_folder_is_refused_before_any_work",
        fmt("export", "--ckpt_path={ckpt}", "--thresholds={thresholds}", "--output=/proc/dmpo_art"),
        line=r"error: --output .* cannot be written",
    ),
    Case(
        "predict_sigterm",
        "issue 28/7: SIGTERM during `dmpo predict` (exited 0)",
        "test_cli_process::test_sigterm_during_predict_exits_143_and_writes_no_predictions",
        check=check_predict_sigterm,
    ),
    Case(
        "num_classes_data_vs_checkpoint",
        "issue 28/9: data of other classes than the checkpoint in `dmpo test` (a loader traceback)",
        "test_bad_input_options::test_a_checkpoint_of_other_classes_than_the_data_is_one_sentence_before_"
        "any_work; test_cli_bad_input::...[class_count_mismatch_data_vs_checkpoint]",
        fmt(
            "test",
            *T,
            "--ckpt_path={ckpt}",
            "--data.init_args.synthetic_num_classes=10",
            "--evaluation.report_dir={work}/report",
        ),
        line=r"error: the data has 10 classes",
    ),
    Case(
        "switch_epoch_null_command_line",
        "issue 28/9: `--model.init_args.schedule.switch_epoch null` on the command line (YAML worked)",
        "test_bad_input_options::test_a_null_written_on_the_command_line_is_a_null_as_in_yaml",
        fmt("fit", *T, "--model.init_args.schedule.switch_epoch", "null", "--print_config"),
        status=0,
        line=r"switch_epoch: null",
    ),
    Case(
        "peft_as_a_string",
        "issue 28/9: `peft: lora` written as a value (\"Unable to load config 'lora'\")",
        "test_bad_input_options::test_an_option_group_written_as_a_value_shows_the_mapping_to_write",
        fmt("fit", *T, "--model.init_args.peft=lora"),
        line=r"error: model.init_args.peft is a group of options",
    ),
    Case(
        "exits_as_a_number",
        "issue 28/9: `exits: 4` in a config (a TypeError about `**`)",
        "test_bad_input_options::test_an_option_group_written_as_a_value_shows_the_mapping_to_write",
        fmt("fit", *T, "-c", "{exits_value}"),
        line=r"error: model.init_args.exits is a group of options",
    ),
    Case(
        "thresholds_newer_format",
        "issue 28/9: a thresholds file of a newer format version",
        "test_file_formats::test_every_file_format_refuses_a_damaged_file_in_one_sentence_naming_it",
        predict_with("{ckpt}", "{thresholds_newer}"),
        line=r"error: .*newer than this dmpo-lightning",
    ),
    Case(
        "thresholds_file_is_a_folder",
        "issue 28/9: a folder given as `evaluation.thresholds_file` (said 'does not exist')",
        "test_file_formats::test_every_file_format_refuses_a_damaged_file_in_one_sentence_naming_it",
        predict_with("{ckpt}", "{empty}"),
        line=r"error: .*is a folder",
    ),
    Case(
        "checkpoint_bytes_flipped",
        "validated whole: a checkpoint with 64 flipped bytes of tensor data (loaded as wrong weights)",
        "test_file_formats::test_every_file_format_refuses_a_damaged_file_in_one_sentence_naming_it",
        fmt("test", *T, "--ckpt_path={ckpt_flipped}", "--evaluation.report_dir={work}/report"),
        line=r"error: .*is corrupt: its entry",
    ),
    Case(
        "predictions_csv_truncated",
        "validated whole: a predictions CSV cut short (read without a word)",
        "test_file_formats::test_every_file_format_refuses_a_damaged_file_in_one_sentence_naming_it",
        check=check_truncated_predictions,
    ),
    Case(
        "nonfinite_tensor_module",
        "issue 28/5: `DMPOModule.forward_early_exit` on a batch with a NaN pixel (class 0, score NaN)",
        "test_surfaces::test_every_surface_refuses_non_finite_inputs_with_the_reason",
        check=check_nonfinite_module,
    ),
    Case(
        "registered_rule_travels",
        "issue 28/4: a registered rule travels to thresholds.json, export and predictor; unknown: refused",
        "test_surfaces::test_a_registered_rule_travels_to_thresholds_export_and_predictor_and_is_refused_"
        "where_unknown",
        check=check_registered_rule_travels,
    ),
    Case(
        "report_describes_itself",
        "issue 28/11: report.json names its data, software versions, device and date",
        "test_report::test_the_report_says_what_data_software_device_and_date_it_was_made_with",
        check=check_report_describes_itself,
    ),
]


def shorten(text: str, ctx: dict) -> str:
    text = text.replace(str(ctx["base"]), "<tmp>").replace(str(ROOT) + "/", "")
    return re.sub(r"/tmp/[\w./-]*?(?=[/'\"\s]|$)", "<tmp>", text) if "/tmp/" in text else text


def run_case(case: Case, ctx: dict) -> None:
    work = ctx["base"] / "work" / case.name
    work.mkdir(parents=True)
    ctx["work"] = work
    if case.check is not None:
        with captured_fds(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                observed = case.check(ctx)
            except Exception as err:
                observed = f"UNEXPECTED {type(err).__name__}: {err}"
        case.out = {"status": "—", "line": observed, "ok": "UNEXPECTED" not in observed}
        return
    argv = case.argv(ctx)
    runner = run_dmpo if case.program == "dmpo" else run_deploy
    for _ in range(case.repeat):
        status, text = runner(argv, ctx[case.cwd] if case.cwd else work)
    ctx["last_output"] = text
    match = next((line for line in text.splitlines() if re.search(case.line, line)), None)
    ok = status == case.status and match is not None
    if match is None:
        lines = [x for x in text.splitlines() if x.strip()]
        match = "UNEXPECTED, last line: " + (lines[-1] if lines else "(nothing printed)")
    note = case.after(ctx) if case.after is not None else ""
    case.out = {"status": status, "line": match.strip(), "ok": ok, "note": note, "argv": argv}


def write_table(path: Path, ctx: dict) -> None:
    rows = []
    for i, case in enumerate(CASES, 1):
        out = case.out
        line = shorten(out["line"], ctx).replace("|", "\\|")
        if out.get("note"):
            line += f" *(after: {shorten(out['note'], ctx)})*"
        mark = "" if out["ok"] else " **UNEXPECTED**"
        command = (
            "Python check"
            if case.argv is None
            else f"`{case.program} "
            + " ".join(shorten(a, ctx) for a in out["argv"]).replace(TINY, "tiny.yaml").replace("|", "\\|")
            + "`"
        )
        rows.append(f"| {i} | {case.bullet} | {case.tests} | {command} | {out['status']}{mark} | {line} |")
    header = (
        "# Issues 16 and 28: every bad-input case, its regression test and what dmpo prints now\n\n"
        "Generated by `PYTHONPATH=src python benchmarks/bad_input_cases.py` (do not edit by hand): "
        "each CLI case runs the `dmpo` console entry point (`dmpo_lightning.console.console_main`) in a "
        "fresh folder; *status* is its exit status, the last column the first printed line matching the case "
        "(verbatim, temporary paths "
        "as `<tmp>`, `tiny.yaml` = `tests/configs/tiny.yaml`). Python checks run the library call the issue "
        "names and print what they observed; `python -m dmpo_lightning.deploy` cases run that command's "
        "`main` in-process the same way. Test names are `tests/<file>.py::<test>`; "
        "`test_cli_bad_input::...[x]` is `test_bad_input_fails_clearly_and_writes_nothing[x]`, which also "
        "checks that no file was written or changed. Configuration errors exit with status 2 and print one "
        "line `dmpo <subcommand>: error: ...` (plus a hint that `--debug` shows the traceback), "
        "no traceback.\n\n"
        f"{len(CASES)} cases, {sum(c.out['ok'] for c in CASES)} as expected.\n\n"
        "| # | case (issue 16, or issue 28/pattern) | regression test | command | status "
        "| what dmpo prints (first line) |\n"
        "|---|---|---|---|---|---|\n"
    )
    path.write_text(header + "\n".join(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "bad_input_cases.md"))
    parser.add_argument("--only", nargs="*", help="run the cases whose name contains one of these words")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dmpo_cases_"))
    try:
        ctx = make_fixtures(base)
        cases = [c for c in CASES if not args.only or any(w in c.name for w in args.only)]
        for case in cases:
            run_case(case, ctx)
            print(
                f"{case.name}: {case.out['status']} {'ok' if case.out['ok'] else 'UNEXPECTED'}: "
                f"{shorten(case.out['line'], ctx)[:150]}",
                flush=True,
            )
        if not args.only:
            write_table(Path(args.out), ctx)
        return 0 if all(c.out["ok"] for c in cases) else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
