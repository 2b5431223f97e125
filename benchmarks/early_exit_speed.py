"""Real early-exit speed next to the FLOPs speed-up, with a check against the simulated protocol.

Times, on the test split of the config's data module, the full model (``MultiExitViT.forward_static``: all
blocks and the final head) against the true early-exit forward (``forward_early_exit``: batch compaction,
later blocks run only on samples that have not left) at several batch sizes, with warm-up and repeats
(median; CUDA-synchronised on a GPU; full and early-exit passes interleaved so background load hits both).

For every batch size it reports

- the wall time per image of both forwards and the measured speed-up ``time_full / time_early``,
- the FLOPs speed-up at the same thresholds, ``F_full / expected cost``, where the expected cost is
  ``sum_k (n_k / N) C_k`` with the exit histogram ``n_k`` of this very run and the counted ``C_k`` of
  :func:`dmpo_lightning.evaluation.flops.count_exit_costs`,
- how many early-exit predictions / exits differ from the simulated protocol (all-exits forward +
  ``exit_rules.exit_scores`` + ``protocol.assign_exits`` with the same thresholds); 0 is expected.

Trained model (thresholds from ``dmpo test``)::

    python benchmarks/early_exit_speed.py --config configs/quickstart.yaml \\
        --ckpt runs/quickstart/version_0/checkpoints/last.ckpt \\
        --thresholds runs/quickstart/version_0/dmpo_test/thresholds.json --budget 0.5 --out speed

Smoke run without a checkpoint (random weights, thresholds fitted on a calibration pass of the untrained
model itself; the timings are real, the accuracies meaningless)::

    python benchmarks/early_exit_speed.py --quick

Realistic sizes without a checkpoint (ViT-S/16 and ViT-Ti/16 at 224, random weights, exits after blocks
3/6/9/12, AdaptFormer, bypass + moment heads at their default widths; thresholds chosen on the timed images
so that the exit histogram is ``--histogram``, default 50/25/15/10 %), plus the training-step ratio of DMPO
to static PEFT::

    python benchmarks/early_exit_speed.py --synthetic vit_small_patch16_224 vit_tiny_patch16_224 \
        --batch-sizes 1 16 64 256 --train-step --threads 1

Every run also times the batching engine (``dmpo_lightning.models.engine.EarlyExitEngine``: the samples that
continue are pooled across input batches so every stage runs full batches) and prints the issue-13 targets
as met / NOT met.

``--out PATH`` writes ``PATH.json`` and ``PATH.csv`` (an existing file is never overwritten). ``--diagnose``
adds the speed-up predicted by timed instead of counted ``C_k`` (exit heads vs compaction overhead). On a CPU
shared with other jobs use ``--threads 1``. Results and analysis: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"
TARGET_RATIO = 0.85
"""Issue 13's target for the trained quickstart model: measured >= 0.85 x FLOPs speed-up at batch 64."""
TARGET_RATIO_224 = 0.95
"""Issue 13's target for ViT-S/16 and ViT-Ti/16 at 224: measured >= 0.95 x FLOPs speed-up at every batch."""
TARGET_TRAIN_RATIO = 1.25
"""Issue 13's target: a DMPO training step takes at most 1.25 x a static-PEFT step."""
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_classes": 100,
    "pretrained": False,
    "img_size": 224,
    "peft": {"method": "adaptformer"},
    "exits": {"blocks": [3, 6, 9, 12], "bypass": True, "early_head": "moment", "final_head": "linear"},
}
"""The 224 models of ``--synthetic``: defaults of ``DMPOModule`` otherwise (moment heads 512 wide, r = 64)."""
TRAIN_DEFAULTS: dict[str, Any] = {
    "num_classes": 10,
    "backbone": "vit_tiny_patch16_224",
    "pretrained": False,
    "img_size": 28,
    "in_chans": 1,
    "backbone_kwargs": {"patch_size": 7, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "peft": {"adapter_dim": 16},
    "exits": {"moment_dim": 256, "cov_dim": 32},
}
"""``--train-step``: the pre-train-then-tune benchmark's scale (``benchmarks/pretrain_tune.py``)."""


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_argument_group("model and thresholds")
    src.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="dmpo config whose data module supplies the test (and calibration) split "
        "(default: configs/quickstart.yaml)",
    )
    src.add_argument("--ckpt", help="DMPOModule Lightning checkpoint (the architecture comes from it)")
    src.add_argument(
        "--thresholds",
        help="thresholds.json written by `dmpo test` (with --ckpt); without it "
        "thresholds are fitted on the calibration split",
    )
    src.add_argument(
        "--budget",
        type=float,
        default=0.5,
        help="budget whose thresholds to use, in the model's budget_unit (default 0.5)",
    )
    src.add_argument(
        "--quick",
        action="store_true",
        help="no checkpoint: the config's architecture with random weights (UNTRAINED), "
        "thresholds from a calibration pass of that model",
    )
    src.add_argument(
        "--synthetic",
        nargs="+",
        default=[],
        metavar="ARCH",
        help="also (or only) time these timm architectures with random weights at 224 "
        "(e.g. vit_small_patch16_224 vit_tiny_patch16_224), thresholds set to reproduce --histogram",
    )
    src.add_argument(
        "--synthetic-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="DMPOModule argument of the --synthetic models, an option group's field as GROUP.FIELD, e.g. "
        "exits.moment_dim=256 (repeatable)",
    )
    src.add_argument(
        "--histogram",
        type=float,
        nargs="+",
        default=[50, 25, 15, 10],
        help="exit histogram (percent per exit) the --synthetic thresholds reproduce (default 50 25 15 10)",
    )
    src.add_argument(
        "--min-samples",
        type=int,
        default=64,
        help="--synthetic: images timed per batch size, at least one batch (default 64)",
    )
    src.add_argument(
        "--train-step",
        action="store_true",
        help="also time a DMPO training step against static PEFT's (the pre-train-then-tune scale)",
    )
    src.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="DMPOModule argument of the --train-step models, e.g. exits.blocks=[1,2,3,4] (repeatable)",
    )
    src.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config value passed to the dmpo CLI, e.g. "
        "data.init_args.calibration_size=500 (repeatable)",
    )
    run = parser.add_argument_group("measurement")
    run.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    run.add_argument(
        "--num-samples",
        type=int,
        default=1024,
        help="first N test images timed and checked (0 = the whole test split; default 1024)",
    )
    run.add_argument("--repeats", type=int, default=5, help="timed passes per model and batch size (median)")
    run.add_argument("--warmup", type=int, default=1, help="untimed passes per model and batch size first")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (default cpu)")
    run.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    run.add_argument(
        "--diagnose",
        action="store_true",
        help="also time the truncated forwards model(x, upto=k) and report the speed-up a cost "
        "model with these timed C_k predicts (separates slow exit heads from compaction "
        "overhead)",
    )
    run.add_argument(
        "--no-engine", action="store_true", help="do not time the batching engine (EarlyExitEngine)"
    )
    run.add_argument(
        "--compile",
        action="store_true",
        help="also time the per-batch early exit with every stage under torch.compile(dynamic=True)",
    )
    run.add_argument("--out", help="write OUT.json and OUT.csv (refused if either exists)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    if args.quick and args.ckpt:
        parser.error("--quick measures an untrained model; do not combine it with --ckpt")
    if not args.quick and not args.ckpt and not args.synthetic and not args.train_step:
        parser.error(
            "give --ckpt (a trained DMPOModule checkpoint), --quick (untrained model), --synthetic ARCH "
            "(224 models with random weights) or --train-step"
        )
    if len(args.histogram) < 2 or any(h < 0 for h in args.histogram) or not sum(args.histogram) > 0:
        parser.error(f"--histogram needs one share >= 0 per exit (at least 2), got {args.histogram}")
    if args.min_samples < 1:
        parser.error("--min-samples must be >= 1")
    for item in args.synthetic_set + args.train_set:
        try:
            _key_value(item)
        except ValueError as err:
            parser.error(str(err))
    if args.thresholds and not args.ckpt:
        parser.error("--thresholds belongs to a trained checkpoint: give --ckpt too")
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"batch sizes must be >= 1, got {args.batch_sizes}")
    if args.repeats < 1 or args.warmup < 0 or args.num_samples < 0:
        parser.error("--repeats must be >= 1, --warmup and --num-samples >= 0")
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
    return args


def _key_value(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=JSON, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as exits.early_head=linear


GROUPS = ("peft", "exits", "schedule", "evaluation")
"""DMPOModule's option groups: ``--synthetic-set exits.moment_dim=256`` sets one field of one."""


def with_options(base: dict[str, Any], items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``base`` DMPOModule kwargs with ``KEY=value`` items applied; ``GROUP.FIELD`` sets a group's field."""
    kwargs = {k: dict(v) if k in GROUPS else v for k, v in base.items()}
    for key, value in items:
        group, dot, field = key.partition(".")
        if not dot:
            kwargs[key] = value
            continue
        if group not in GROUPS:
            raise ValueError(f"{key!r}: {group!r} is not an option group ({', '.join(GROUPS)})")
        kwargs[group] = {**kwargs.get(group, {}), field: value}
    return kwargs


def output_paths(out: str | None) -> tuple[Path, Path] | None:
    """``OUT.json`` and ``OUT.csv`` (a ``.json``/``.csv`` suffix on OUT is dropped)."""
    if not out:
        return None
    base = Path(out)
    if base.suffix in (".json", ".csv"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".csv")


def check_outputs_free(paths: tuple[Path, Path] | None) -> None:
    for p in paths or ():
        if p.exists():
            raise FileExistsError(f"{p} exists; choose another --out or move the old file away")


# ------------------------------------------------------------------------------------------------ building
def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, list[float], dict[str, Any]]:
    """The Lightning module (eval mode, on ``device``), the data module and the thresholds."""
    from dmpo_lightning.cli import main as cli_main
    from dmpo_lightning.module import DMPOModule

    cli_args = ["--config", args.config, *(f"--{item}" for item in args.overrides)]
    with warnings.catch_warnings():  # this script's own argv is not the CLI's: that is intended here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = cli_main(cli_args, run=False)
    dm = cli.datamodule
    dm.num_workers = 0  # the splits are small and read once into memory
    info: dict[str, Any] = {"config": args.config, "overrides": list(args.overrides)}
    if args.ckpt:
        module = DMPOModule.load_from_checkpoint(args.ckpt, map_location="cpu")
        dm.check_num_classes(module.hparams.num_classes)
        state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        dm_state = state.get(type(dm).__qualname__)
        if dm_state is not None:  # the run's calibration split (only used when thresholds are fitted here)
            dm.load_state_dict(dm_state)
        info.update(checkpoint=os.path.abspath(args.ckpt), trained=True)
    else:
        module = cli.model
        info.update(checkpoint=None, trained=False)
    module.eval().to(device)
    dm.setup("test")
    evaluation = cli.config_init["evaluation"]  # the config's top-level evaluation group
    rule = module.exit_rule = evaluation.test_rule
    budget_unit = evaluation.budget_unit
    if args.thresholds:
        from dmpo_lightning.evaluation.thresholds import load_thresholds

        thresholds = load_thresholds(
            args.thresholds,
            args.budget,
            module.model_fingerprint(),
            unit=budget_unit,
        )
        info.update(thresholds_source=os.path.abspath(args.thresholds))
        calibrated_for = json.loads(Path(args.thresholds).read_text()).get("checkpoint_hash")
        mine = f"file:{sha256(args.ckpt)}"
        info.update(checkpoint_hash=mine, thresholds_checkpoint_hash=calibrated_for)
        if calibrated_for != mine:
            print(
                f"WARNING: {args.thresholds} was calibrated on checkpoint {calibrated_for}, not on "
                f"{args.ckpt} ({mine}); the architecture matches, the weights may not"
            )
    else:
        thresholds, cal = calibrate(module, dm, args.budget, device, rule, budget_unit)
        info.update(thresholds_source="calibration pass of this model", calibration=cal)
    info.update(exit_rule=rule, budget=args.budget, budget_unit=budget_unit)
    return module, dm, thresholds, info


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@torch.inference_mode()
def calibrate(
    module: Any, dm: Any, budget: float, device: torch.device, rule: str, budget_unit: str = "fraction"
) -> tuple[list[float], dict[str, Any]]:
    """Thresholds for ``budget`` fitted on the calibration split (``protocol.select_budgets``)."""
    from dmpo_lightning.constants import IMAGE_KEY, LABEL_KEY
    from dmpo_lightning.evaluation.protocol import select_budgets
    from dmpo_lightning.models.exit_rules import exit_scores

    scores, correct = [], []
    for batch in dm.dataloader("calibration"):
        x, y = batch[IMAGE_KEY].to(device), batch[LABEL_KEY].to(device)
        s, p = exit_scores(module.model(x), rule)
        scores.append(s.cpu())
        correct.append((p == y[:, None]).cpu())
    costs = module.exit_costs()
    unit = "fraction" if budget_unit == "fraction" else "absolute"
    choice = select_budgets(
        torch.cat(scores).double(), torch.cat(correct), costs.exit_gflops, costs.full_gflops, [budget], unit
    )[0]
    cal = {
        "samples": int(sum(s.shape[0] for s in scores)),
        "accuracy": choice.cal_accuracy,
        "cost_fraction": choice.cal_cost / costs.full_gflops,
        "histogram": choice.cal_histogram.tolist(),
    }
    return [float(t) for t in choice.thresholds.tolist()], cal


def load_test_split(dm: Any, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_samples`` test images and labels (0 = all) as two tensors."""
    from dmpo_lightning.constants import IMAGE_KEY, LABEL_KEY

    images, labels, have = [], [], 0
    for batch in dm.dataloader("test"):
        images.append(batch[IMAGE_KEY])
        labels.append(batch[LABEL_KEY])
        have += batch[LABEL_KEY].shape[0]
        if num_samples and have >= num_samples:
            break
    x, y = torch.cat(images), torch.cat(labels)
    if num_samples:
        x, y = x[:num_samples], y[:num_samples]
    return x.contiguous(), y


# ------------------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pass(
    fn: Callable[[torch.Tensor], Any], chunks: Sequence[torch.Tensor], device: torch.device
) -> float:
    """Seconds for ``fn`` over every chunk (one pass over the timed samples)."""
    synchronize(device)
    start = time.perf_counter()
    for c in chunks:
        fn(c)
    synchronize(device)
    return time.perf_counter() - start


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call of ``fn`` (a whole pass)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def simulated_protocol(module: Any, chunks: Sequence[torch.Tensor], thresholds: Sequence[float]):
    """Exit and prediction per sample from the all-exits forward, as ``dmpo test`` simulates them.

    Scored with the module's exit rule, through ``exit_scores`` as ``dmpo test`` scores.
    """
    from dmpo_lightning.evaluation.protocol import assign_exits
    from dmpo_lightning.models.exit_rules import exit_scores

    exits, preds = [], []
    t = torch.tensor(thresholds, dtype=torch.float64)
    for c in chunks:
        scores, p = exit_scores(module.model(c), module.exit_rule)
        e = assign_exits(scores, t.to(scores.device))
        exits.append(e)
        preds.append(p.gather(1, e[:, None]).squeeze(1))
    return torch.cat(exits).cpu(), torch.cat(preds).cpu()


# ------------------------------------------------------------------------------------------ 224 models
def build_synthetic(arch: str, overrides: Sequence[str], device: torch.device) -> Any:
    """A ``DMPOModule`` of ``arch`` with random weights (eval mode, on ``device``)."""
    from dmpo_lightning.evaluation.evaluator import EvaluationOptions
    from dmpo_lightning.module import DMPOModule

    kwargs = with_options({**SYNTHETIC_DEFAULTS, "backbone": arch}, [_key_value(o) for o in overrides])
    evaluation = EvaluationOptions.coerce(kwargs.pop("evaluation", None), name="evaluation")
    torch.manual_seed(0)
    module = DMPOModule(**kwargs).eval().to(device)
    module.exit_rule = evaluation.test_rule  # evaluation.rule=... picks the rule to time
    return module


def thresholds_for_histogram(scores: torch.Tensor, shares: Sequence[float]) -> list[float]:
    """Thresholds under which ``round(share_k * N)`` samples leave at exit k (exits in order).

    Each threshold lies strictly between two observed scores of the samples still active, in the scores'
    own dtype (a real early exit compares a float32 score with the threshold in float32), so no sample sits
    on a threshold and a last-bit difference between two forwards rarely flips an exit.
    """
    n, k_exits = scores.shape
    if len(shares) != k_exits:
        raise ValueError(f"got {len(shares)} histogram shares for a model with {k_exits} exits")
    total = float(sum(shares))
    wanted = [round(n * float(s) / total) for s in shares]
    active = torch.ones(n, dtype=torch.bool)
    thresholds: list[float] = []
    for k in range(k_exits - 1):
        column = scores[active, k].sort(descending=True).values
        m = min(wanted[k], column.numel())
        if m == 0:
            t = math.inf
        elif m == column.numel():
            t = -math.inf
        else:
            above, below = column[m - 1], column[m]
            mid = (above + below) / 2
            if not mid > below:  # adjacent floating-point values: the next one up from `below`
                mid = torch.nextafter(below, above)
            t = float(mid)
        thresholds.append(t)
        active &= ~(scores[:, k] >= t)
    return [*thresholds, -math.inf]


@torch.inference_mode()
def synthetic_case(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Module, images and thresholds of one --synthetic model; thresholds reproduce ``--histogram``."""
    module = build_synthetic(arch, args.synthetic_set, device)
    shape = module.exit_costs().input_shape
    n = max(max(args.batch_sizes), args.min_samples)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((n, *shape), generator=generator)
    from dmpo_lightning.models.exit_rules import exit_scores

    scores = torch.cat(
        [exit_scores(module.model(c.to(device)), module.exit_rule)[0].cpu() for c in torch.split(x, 64)]
    )
    thresholds = thresholds_for_histogram(scores, args.histogram)
    info = {
        "name": arch,
        "checkpoint": None,
        "trained": False,
        "thresholds_source": f"chosen on the {n} timed images to reproduce the histogram {args.histogram} %",
        "exit_rule": module.exit_rule,
        "budget": None,
        "budget_unit": "fraction",
        "synthetic_set": list(args.synthetic_set),
    }
    y = torch.zeros(n, dtype=torch.long)  # random images: no labels, accuracies are meaningless
    return {"module": module, "x": x, "y": y, "thresholds": thresholds, "info": info, "target": "224"}


# ------------------------------------------------------------------------------------------ measuring
def _engine_fn(module: Any, thresholds: Sequence[float], batch_size: int) -> Callable[[Sequence], Any]:
    from dmpo_lightning.models.engine import EarlyExitEngine

    engine = EarlyExitEngine(module, thresholds, batch_size=batch_size)
    return engine.run


def _compiled_early(module: Any, thresholds: Sequence[float]) -> Callable[[torch.Tensor], Any]:
    """Per-batch early exit with each stage compiled (dynamic shapes: the active batch shrinks)."""
    model = module.model
    stages = [torch.compile(model.exits[k], dynamic=True) for k in range(model.num_exits)]
    blocks = torch.compile(model._trunk, dynamic=True)

    def run_stage(k: int, inputs: torch.Tensor, *, head: bool = True):
        from dmpo_lightning.models.backbone import embed_tokens

        tokens = embed_tokens(model.backbone, inputs) if k == 0 else inputs
        start = 0 if k == 0 else model.exit_blocks[k - 1]
        tokens = blocks(tokens, start, model.exit_blocks[k])
        return tokens, (stages[k](tokens) if head else None)

    policy = model.early_exit_policy(thresholds, module.exit_rule)

    def early(c: torch.Tensor) -> Any:
        original = model.run_stage
        model.run_stage = run_stage  # type: ignore[method-assign]
        try:
            return model._early_exit(c, policy)
        finally:
            model.run_stage = original  # type: ignore[method-assign]

    return early


@torch.inference_mode()
def measure(
    module: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    thresholds: Sequence[float],
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int,
    device: torch.device,
    progress: bool = True,
    diagnose: bool = False,
    engine: bool = True,
    compiled: bool = False,
    min_samples: int | None = None,
) -> list[dict[str, Any]]:
    """One row per batch size: times, speed-ups, exit histogram, accuracy and mismatches.

    ``min_samples``: time ``max(batch, min_samples)`` images per batch size instead of all of ``x``.
    """
    model = module.model
    costs = module.exit_costs()
    c_k = torch.tensor(costs.exit_macs, dtype=torch.float64)
    rule = module.exit_rule

    def early(c: torch.Tensor) -> Any:
        return model.forward_early_exit(c, thresholds, rule)

    compiled_early = _compiled_early(module, thresholds) if compiled else None
    rows = []
    bar = tqdm(
        total=len(batch_sizes) * (warmup + repeats),
        desc="timing",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    for b in batch_sizes:
        n = x.shape[0] if min_samples is None else min(x.shape[0], max(b, min_samples))
        xb, yb = x[:n].to(device), y[:n]
        chunks = list(torch.split(xb, b))
        run_engine = _engine_fn(module, thresholds, b) if engine else None
        # predictions of the real early-exit forward, and the simulated protocol's at the same batch size
        outs = [early(c) for c in chunks]
        exit_index = torch.cat([o.exit_index for o in outs]).cpu()
        prediction = torch.cat([o.prediction for o in outs]).cpu()
        sim_exit, sim_pred = simulated_protocol(module, chunks, thresholds)
        full_pred = torch.cat([model.forward_static(c).argmax(-1) for c in chunks]).cpu()
        passes: dict[str, Callable[[], Any]] = {
            "full": lambda chunks=chunks: [model.forward_static(c) for c in chunks],
            "early": lambda chunks=chunks: [early(c) for c in chunks],
        }
        checks = {"early": (prediction, exit_index)}
        if run_engine is not None:
            out = run_engine(chunks)
            checks["engine"] = (out.prediction.cpu(), out.exit_index.cpu())
            passes["engine"] = lambda run_engine=run_engine, chunks=chunks: run_engine(chunks)
        if compiled_early is not None:
            outs = [compiled_early(c) for c in chunks]
            checks["compiled"] = (
                torch.cat([o.prediction for o in outs]).cpu(),
                torch.cat([o.exit_index for o in outs]).cpu(),
            )
            passes["compiled"] = lambda chunks=chunks: [compiled_early(c) for c in chunks]
        for _ in range(warmup):
            for fn in passes.values():
                time_call(fn, device)
            bar.update()
        times: dict[str, list[float]] = {name: [] for name in passes}
        t_upto: list[list[float]] = [[] for _ in range(model.num_exits)]
        for _ in range(repeats):  # interleaved, so a change of background load hits every path
            for name, fn in passes.items():
                times[name].append(time_call(fn, device))
            if diagnose:
                for k in range(model.num_exits):
                    t_upto[k].append(time_pass(lambda c, k=k: model(c, upto=k), chunks, device))
            bar.update()
        hist = torch.bincount(exit_index, minlength=model.num_exits)
        expected = float((hist.double() / n * c_k).sum())
        med = {name: statistics.median(v) for name, v in times.items()}
        full_s, early_s = med["full"], med["early"]
        measured = full_s / early_s
        flops_speedup = costs.full_macs / expected
        row: dict[str, Any] = {
            "batch_size": b,
            "samples": n,
            "full_ms_per_image": 1e3 * full_s / n,
            "early_ms_per_image": 1e3 * early_s / n,
            "full_s_runs": times["full"],
            "early_s_runs": times["early"],
            "measured_speedup": measured,
            "flops_speedup": flops_speedup,
            "ratio": measured / flops_speedup,
            "expected_cost_fraction": expected / costs.full_macs,
            "exit_histogram": hist.tolist(),
            "early_accuracy": float((prediction == yb).double().mean()),
            "full_accuracy": float((full_pred == yb).double().mean()),
            "prediction_mismatches": int((prediction != sim_pred).sum()),
            "exit_mismatches": int((exit_index != sim_exit).sum()),
        }
        for name in ("engine", "compiled"):
            if name in med:
                pred_n, exit_n = checks[name]
                row.update(
                    {
                        f"{name}_ms_per_image": 1e3 * med[name] / n,
                        f"{name}_s_runs": times[name],
                        f"{name}_speedup": full_s / med[name],
                        f"{name}_ratio": full_s / med[name] / flops_speedup,
                        f"{name}_prediction_mismatches": int((pred_n != sim_pred).sum()),
                        f"{name}_exit_mismatches": int((exit_n != sim_exit).sum()),
                    }
                )
        if diagnose:
            # the cost model of the FLOPs speed-up, with measured instead of counted C_k: what early exit
            # would gain if compaction were free; the rest of the gap is compaction (small batches, indexing)
            timed_c = torch.tensor([statistics.median(t) for t in t_upto], dtype=torch.float64)
            timed_expected = float((hist.double() / n * timed_c).sum())
            row.update(
                {
                    "timed_exit_ms_per_image": (1e3 * timed_c / n).tolist(),
                    "timed_cost_speedup": full_s / timed_expected,
                    "timed_exit_fractions": (timed_c / full_s).tolist(),
                }
            )
        rows.append(row)
    bar.close()
    return rows


# ------------------------------------------------------------------------------------------ training
def train_step_ratio(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median seconds of one training step (forward, loss, backward, AdamW) of DMPO and of static PEFT.

    Both at the pre-train-then-tune benchmark's scale, batch 64, random data, the model's own
    ``compute_loss``; the two are timed in alternation so background load hits both.
    """
    from dmpo_lightning.module import DMPOModule

    items = [_key_value(o) for o in args.train_set]
    batch = int(dict(items).get("batch_size", 64))
    base = with_options(TRAIN_DEFAULTS, [(k, v) for k, v in items if k != "batch_size"])
    exits = base.get("exits", {})
    variants = {
        "dmpo": {**base, "exits": {**exits, "blocks": exits.get("blocks", [3, 6, 9, 12])}},
        "static_peft": {
            **base,
            "exits": {**exits, "blocks": 1, "bypass": False, "early_head": "linear"},
        },
    }
    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, Any] = {}
    for name, kwargs in variants.items():
        torch.manual_seed(0)
        module = DMPOModule(**kwargs).to(device).train()
        shape = module.exit_costs().input_shape
        x = torch.randn((batch, *shape), device=device)
        y = torch.randint(0, module.hparams.num_classes, (batch,), device=device)
        params = [p for p in module.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step(module: Any = module, x: torch.Tensor = x, y: torch.Tensor = y, opt: Any = opt) -> None:
            loss, _ = module.compute_loss(module.model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
        trainable = sum(p.numel() for p in params)
        info[name] = {"exit_blocks": list(module.model.exit_blocks), "trainable": trainable}
    rounds = max(3, args.repeats)
    per_round = 5
    for fn in steps.values():  # warm-up
        for _ in range(2):
            time_call(fn, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(statistics.median(time_call(fn, device) for _ in range(per_round)))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "batch_size": batch,
        "settings": base,
        "variants": info,
        "step_s": med,
        "step_s_runs": times,
        "ratio": med["dmpo"] / med["static_peft"],
    }


# ------------------------------------------------------------------------------------------ reporting
def format_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = [
        "batch",
        "full ms/img",
        "early ms/img",
        "measured x",
        "FLOPs x",
        "measured/FLOPs",
        "exit histogram",
        "acc early",
        "acc full",
        "mismatch pred/exit",
    ]
    engine = bool(rows) and all("engine_speedup" in r for r in rows)
    compiled = bool(rows) and all("compiled_speedup" in r for r in rows)
    diagnose = bool(rows) and all("timed_cost_speedup" in r for r in rows)
    body = [
        [
            str(r["batch_size"]),
            f"{r['full_ms_per_image']:.3f}",
            f"{r['early_ms_per_image']:.3f}",
            f"{r['measured_speedup']:.2f}",
            f"{r['flops_speedup']:.2f}",
            f"{r['ratio']:.2f}",
            "/".join(str(h) for h in r["exit_histogram"]),
            f"{100 * r['early_accuracy']:.2f}%",
            f"{100 * r['full_accuracy']:.2f}%",
            f"{r['prediction_mismatches']}/{r['exit_mismatches']}",
        ]
        for r in rows
    ]
    for flag, name, label in ((engine, "engine", "engine"), (compiled, "compiled", "compiled")):
        if not flag:
            continue
        headers += [f"{label} ms/img", f"{label} x", f"{label}/FLOPs", f"{label} mismatch"]
        for cells, r in zip(body, rows, strict=True):
            cells += [
                f"{r[f'{name}_ms_per_image']:.3f}",
                f"{r[f'{name}_speedup']:.2f}",
                f"{r[f'{name}_ratio']:.2f}",
                f"{r[f'{name}_prediction_mismatches']}/{r[f'{name}_exit_mismatches']}",
            ]
    if diagnose:
        headers += ["timed-C_k x", "timed C_k / F_full"]
        for cells, r in zip(body, rows, strict=True):
            fractions = "/".join(f"{f:.2f}" for f in r["timed_exit_fractions"])
            cells += [f"{r['timed_cost_speedup']:.2f}", fractions]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in body)])


def targets(case: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Issue 13's targets for one case: (what, met, numbers)."""
    rows, out = case["rows"], []
    paths = [("per-batch", "ratio", "measured_speedup")]
    if rows and all("engine_ratio" in r for r in rows):
        paths.append(("engine", "engine_ratio", "engine_speedup"))
    for label, ratio, speedup in paths:
        if case["target"] == "224":
            worst = min(rows, key=lambda r: r[ratio])
            values = ", ".join(f"{r['batch_size']}: {r[ratio]:.2f}" for r in rows)
            out.append(
                (
                    f"{case['info']['name']} {label}: measured >= {TARGET_RATIO_224} x FLOPs at every batch",
                    worst[ratio] >= TARGET_RATIO_224,
                    values,
                )
            )
        else:
            at64 = [r for r in rows if r["batch_size"] == 64]
            if at64:
                out.append(
                    (
                        f"{case['info']['name']} {label}: measured >= {TARGET_RATIO} x FLOPs at batch 64",
                        at64[0][ratio] >= TARGET_RATIO,
                        f"{at64[0][ratio]:.2f}",
                    )
                )
            slowest = min(rows, key=lambda r: r[speedup])
            out.append(
                (
                    f"{case['info']['name']} {label}: never slower than the full model",
                    slowest[speedup] >= 1.0,
                    ", ".join(f"{r['batch_size']}: {r[speedup]:.2f} x" for r in rows),
                )
            )
    return out


def load_str(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else ", ".join(f"{v:.2f}" for v in load)


def getloadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


CSV_COLUMNS = [
    "batch_size",
    "samples",
    "full_ms_per_image",
    "early_ms_per_image",
    "measured_speedup",
    "flops_speedup",
    "ratio",
    "expected_cost_fraction",
    "exit_histogram",
    "early_accuracy",
    "full_accuracy",
    "prediction_mismatches",
    "exit_mismatches",
]


def _csv_cell(value: Any) -> Any:
    return "/".join(f"{v:g}" for v in value) if isinstance(value, list) else value


def write_outputs(paths: tuple[Path, Path], result: dict[str, Any]) -> None:
    json_path, csv_path = paths
    check_outputs_free(paths)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "x") as f:
        json.dump(result, f, indent=2, allow_nan=True)
        f.write("\n")
    all_rows = [r for case in result["cases"] for r in case["rows"]]
    columns = list(CSV_COLUMNS)
    for extra in ("engine", "compiled"):
        if all_rows and all(f"{extra}_speedup" in r for r in all_rows):
            columns += [f"{extra}_ms_per_image", f"{extra}_speedup", f"{extra}_ratio"]
    if all_rows and all("timed_cost_speedup" in r for r in all_rows):
        columns += ["timed_cost_speedup", "timed_exit_fractions"]
    with open(csv_path, "x", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *columns])
        for case in result["cases"]:
            for r in case["rows"]:
                cells = [_csv_cell(r[c]) for c in columns]
                writer.writerow([case["model"]["name"], *cells])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the tables and targets and returns everything written to ``--out``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    paths = output_paths(args.out)
    check_outputs_free(paths)  # fail before minutes of timing, not after
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_benchmark(args, paths, argv)
    finally:  # main() is also called in-process (tests): leave torch as it was
        torch.set_num_threads(previous_threads)


def _config_case(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    module, dm, thresholds, info = build(args, device)
    x, y = load_test_split(dm, args.num_samples)
    info["name"] = "trained " + Path(args.config).stem if info["trained"] else Path(args.config).stem
    return {"module": module, "x": x, "y": y, "thresholds": thresholds, "info": info, "target": "trained"}


def _print_case(case: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    info, module, thresholds, x = case["info"], case["module"], case["thresholds"], case["x"]
    costs = module.exit_costs()
    if info["trained"]:
        what = "TRAINED checkpoint " + str(info["checkpoint"])
    elif case["target"] == "224":
        what = f"{info['name']} at 224, RANDOM weights: timings are real, accuracies are meaningless"
    else:
        what = "UNTRAINED model (random weights, --quick): timings are real, accuracies are meaningless"
    print(f"\nEarly-exit speed: {what}")
    budget = f", budget {info['budget']} {info['budget_unit']}" if info.get("budget") is not None else ""
    print(
        f"thresholds ({info['exit_rule']} rule{budget}): "
        f"{[round(t, 4) if math.isfinite(t) else t for t in thresholds]} from {info['thresholds_source']}"
    )
    print(
        f"counted cost per image: exits C_k = {[round(g, 5) for g in costs.exit_gflops]} GFLOPs, "
        f"full F = {costs.full_gflops:.5f} GFLOPs (C_k / F = {[round(f, 3) for f in costs.fractions]})"
    )
    print(
        f"device {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}; up to {x.shape[0]} images of "
        f"shape {tuple(x.shape[1:])}; median of {args.repeats} passes after {args.warmup} warm-up pass(es)"
    )
    print(
        f"load average (1/5/15 min) before: {load_str(case['load_before'])}, "
        f"after: {load_str(case['load_after'])}"
    )
    print(format_table(case["rows"]))
    keys = ["prediction_mismatches", "exit_mismatches"]
    keys += [f"{p}_{k}" for p in ("engine", "compiled") for k in keys]
    bad = [r["batch_size"] for r in case["rows"] if any(r.get(k) for k in keys)]
    if bad:
        print(f"MISMATCH: early-exit predictions differ from the simulated protocol at batch sizes {bad}")
    else:
        print(
            "predictions and exits of the early-exit forward(s) equal the simulated protocol's "
            "at every batch size"
        )


def run_benchmark(
    args: argparse.Namespace, paths: tuple[Path, Path] | None, argv: Sequence[str] | None
) -> dict[str, Any]:
    device = resolve_device(args.device)
    builders: list[Callable[[], dict[str, Any]]] = []
    if args.ckpt or args.quick:
        builders.append(lambda: _config_case(args, device))
    for arch in args.synthetic:
        builders.append(lambda arch=arch: synthetic_case(arch, args, device))
    cases = []
    verdicts: list[tuple[str, bool, str]] = []
    for make in builders:
        load_before = getloadavg()
        case = make()
        case["rows"] = measure(
            case["module"],
            case["x"],
            case["y"],
            case["thresholds"],
            args.batch_sizes,
            args.repeats,
            args.warmup,
            device,
            progress=not args.no_progress,
            diagnose=args.diagnose,
            engine=not args.no_engine,
            compiled=args.compile,
            min_samples=args.min_samples if case["target"] == "224" else None,
        )
        case["load_before"], case["load_after"] = load_before, getloadavg()
        _print_case(case, args, device)
        verdicts += targets(case)
        cases.append(case)
    training = None
    if args.train_step:
        load_before = getloadavg()
        training = train_step_ratio(args, device)
        training.update(load_average_before=load_before, load_average_after=getloadavg())
        print(
            f"\ntraining step, batch {training['batch_size']} (pre-train-then-tune scale, random data): "
            f"DMPO {1e3 * training['step_s']['dmpo']:.1f} ms, static PEFT "
            f"{1e3 * training['step_s']['static_peft']:.1f} ms, ratio {training['ratio']:.3f}; load "
            f"{load_str(load_before)} -> {load_str(training['load_average_after'])}"
        )
        verdicts.append(
            (
                f"training step DMPO / static PEFT <= {TARGET_TRAIN_RATIO}",
                training["ratio"] <= TARGET_TRAIN_RATIO,
                f"{training['ratio']:.3f}",
            )
        )
    if not args.ckpt:
        print("\n(no trained checkpoint: the trained-model targets need --ckpt; this script trains nothing)")
    print("\nTargets (issue 13):")
    for what, met, numbers in verdicts:
        print(f"  {'met    ' if met else 'NOT met'}  {what} ({numbers})")

    case_results = [
        {
            "model": c["info"],
            "thresholds": [t if math.isfinite(t) else str(t) for t in c["thresholds"]],
            "costs": c["module"].exit_costs().to_dict(),
            "load_average_before": c["load_before"],
            "load_average_after": c["load_after"],
            "rows": c["rows"],
        }
        for c in cases
    ]
    result: dict[str, Any] = {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cases": case_results,
        "training_step": training,
        "targets": [{"target": w, "met": m, "values": v} for w, m, v in verdicts],
    }
    if case_results:  # the first case at the top level as well (the layout of earlier versions)
        first = case_results[0]
        result.update(
            model=first["model"],
            thresholds=first["thresholds"],
            costs=first["costs"],
            load_average_before=first["load_average_before"],
            load_average_after=first["load_average_after"],
            rows=first["rows"],
        )
    if paths:
        write_outputs(paths, result)
        print(f"wrote {paths[0]} and {paths[1]}")
    return result


if __name__ == "__main__":
    main()
