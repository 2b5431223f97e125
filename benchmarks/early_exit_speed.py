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
TARGET_RATIO = 0.8
"""Issue 4's target: measured speed-up >= 0.8 x FLOPs speed-up (CPU, batch 64)."""


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
    run.add_argument("--out", help="write OUT.json and OUT.csv (refused if either exists)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    if args.quick and args.ckpt:
        parser.error("--quick measures an untrained model; do not combine it with --ckpt")
    if not args.quick and not args.ckpt:
        parser.error("give --ckpt (a trained DMPOModule checkpoint) or --quick (untrained model)")
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
    rule = module.hparams.exit_rule
    if args.thresholds:
        from dmpo_lightning.evaluation.runner import load_thresholds

        thresholds = load_thresholds(
            args.thresholds, args.budget, module.model_fingerprint(), unit=module.hparams.budget_unit
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
        thresholds, cal = calibrate(module, dm, args.budget, device, rule)
        info.update(thresholds_source="calibration pass of this model", calibration=cal)
    info.update(exit_rule=rule, budget=args.budget, budget_unit=module.hparams.budget_unit)
    return module, dm, thresholds, info


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@torch.inference_mode()
def calibrate(
    module: Any, dm: Any, budget: float, device: torch.device, rule: str
) -> tuple[list[float], dict[str, Any]]:
    """Thresholds for ``budget`` fitted on the calibration split (``protocol.select_budgets``)."""
    from dmpo_lightning.constants import IMAGE_KEY, LABEL_KEY
    from dmpo_lightning.evaluation.exit_rules import exit_scores
    from dmpo_lightning.evaluation.protocol import select_budgets

    scores, correct = [], []
    for batch in dm.dataloader("calibration"):
        x, y = batch[IMAGE_KEY].to(device), batch[LABEL_KEY].to(device)
        s, p = exit_scores(module.model(x), rule)
        scores.append(s.cpu())
        correct.append((p == y[:, None]).cpu())
    costs = module.exit_costs()
    unit = "fraction" if module.hparams.budget_unit == "fraction" else "absolute"
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


@torch.inference_mode()
def simulated_protocol(model: Any, chunks: Sequence[torch.Tensor], thresholds: Sequence[float], rule: str):
    """Exit and prediction per sample from the all-exits forward, as ``dmpo test`` simulates them."""
    from dmpo_lightning.evaluation.exit_rules import exit_scores
    from dmpo_lightning.evaluation.protocol import assign_exits

    exits, preds = [], []
    t = torch.tensor(thresholds, dtype=torch.float64)
    for c in chunks:
        scores, p = exit_scores(model(c), rule)
        e = assign_exits(scores, t.to(scores.device))
        exits.append(e)
        preds.append(p.gather(1, e[:, None]).squeeze(1))
    return torch.cat(exits).cpu(), torch.cat(preds).cpu()


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
) -> list[dict[str, Any]]:
    """One row per batch size: times, speed-ups, exit histogram, accuracy and mismatches."""
    model = module.model
    rule = module.hparams.exit_rule
    costs = module.exit_costs()
    c_k = torch.tensor(costs.exit_macs, dtype=torch.float64)
    n = x.shape[0]
    x = x.to(device)

    def early(c: torch.Tensor) -> Any:
        return model.forward_early_exit(c, thresholds, rule)

    rows = []
    bar = tqdm(
        total=len(batch_sizes) * (warmup + repeats),
        desc="timing",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    for b in batch_sizes:
        chunks = list(torch.split(x, b))
        # predictions of the real early-exit forward, and the simulated protocol's at the same batch size
        outs = [early(c) for c in chunks]
        exit_index = torch.cat([o.exit_index for o in outs]).cpu()
        prediction = torch.cat([o.prediction for o in outs]).cpu()
        sim_exit, sim_pred = simulated_protocol(model, chunks, thresholds, rule)
        full_pred = torch.cat([model.forward_static(c).argmax(-1) for c in chunks]).cpu()
        for _ in range(warmup):
            time_pass(model.forward_static, chunks, device)
            time_pass(early, chunks, device)
            bar.update()
        t_full, t_early = [], []
        t_upto: list[list[float]] = [[] for _ in range(model.num_exits)]
        for _ in range(repeats):  # interleaved, so a change of background load hits both
            t_full.append(time_pass(model.forward_static, chunks, device))
            t_early.append(time_pass(early, chunks, device))
            if diagnose:
                for k in range(model.num_exits):
                    t_upto[k].append(time_pass(lambda c, k=k: model(c, upto=k), chunks, device))
            bar.update()
        hist = torch.bincount(exit_index, minlength=model.num_exits)
        expected = float((hist.double() / n * c_k).sum())
        full_s, early_s = statistics.median(t_full), statistics.median(t_early)
        measured = full_s / early_s
        flops_speedup = costs.full_macs / expected
        row: dict[str, Any] = {}
        if diagnose:
            # the cost model of the FLOPs speed-up, with measured instead of counted C_k: what early exit
            # would gain if compaction were free; the rest of the gap is compaction (small batches, indexing)
            timed_c = torch.tensor([statistics.median(t) for t in t_upto], dtype=torch.float64)
            timed_expected = float((hist.double() / n * timed_c).sum())
            row = {
                "timed_exit_ms_per_image": (1e3 * timed_c / n).tolist(),
                "timed_cost_speedup": full_s / timed_expected,
                "timed_exit_fractions": (timed_c / full_s).tolist(),
            }
        rows.append(
            {
                "batch_size": b,
                "samples": n,
                "full_ms_per_image": 1e3 * full_s / n,
                "early_ms_per_image": 1e3 * early_s / n,
                "full_s_runs": t_full,
                "early_s_runs": t_early,
                "measured_speedup": measured,
                "flops_speedup": flops_speedup,
                "ratio": measured / flops_speedup,
                "expected_cost_fraction": expected / costs.full_macs,
                "exit_histogram": hist.tolist(),
                "early_accuracy": float((prediction == y).double().mean()),
                "full_accuracy": float((full_pred == y).double().mean()),
                "prediction_mismatches": int((prediction != sim_pred).sum()),
                "exit_mismatches": int((exit_index != sim_exit).sum()),
                **row,
            }
        )
    bar.close()
    return rows


# ------------------------------------------------------------------------------------------------ reporting
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
    diagnose = all("timed_cost_speedup" in r for r in rows) and rows
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


def load_str(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else ", ".join(f"{v:.2f}" for v in load)


def getloadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def write_outputs(paths: tuple[Path, Path], result: dict[str, Any]) -> None:
    json_path, csv_path = paths
    check_outputs_free(paths)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "x") as f:
        json.dump(result, f, indent=2, allow_nan=True)
        f.write("\n")
    columns = [
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
    if all("timed_cost_speedup" in r for r in result["rows"]):
        columns += ["timed_cost_speedup", "timed_exit_fractions"]
    with open(csv_path, "x", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in result["rows"]:
            writer.writerow(
                ["/".join(f"{v:g}" for v in r[c]) if isinstance(r[c], list) else r[c] for c in columns]
            )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the table and returns everything written to ``--out``."""
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


def run_benchmark(
    args: argparse.Namespace, paths: tuple[Path, Path] | None, argv: Sequence[str] | None
) -> dict[str, Any]:
    device = resolve_device(args.device)
    load_before = getloadavg()
    module, dm, thresholds, info = build(args, device)
    x, y = load_test_split(dm, args.num_samples)
    costs = module.exit_costs()
    rows = measure(
        module,
        x,
        y,
        thresholds,
        args.batch_sizes,
        args.repeats,
        args.warmup,
        device,
        progress=not args.no_progress,
        diagnose=args.diagnose,
    )
    load_after = getloadavg()

    threads = torch.get_num_threads()
    what = (
        "TRAINED checkpoint " + str(info["checkpoint"])
        if info["trained"]
        else ("UNTRAINED model (random weights, --quick): timings are real, accuracies are meaningless")
    )
    print(f"\nEarly-exit speed: {what}")
    print(
        f"thresholds ({info['exit_rule']} rule, budget {args.budget} {info['budget_unit']}): "
        f"{[round(t, 4) if math.isfinite(t) else t for t in thresholds]} from {info['thresholds_source']}"
    )
    print(
        f"counted cost per image: exits C_k = {[round(g, 5) for g in costs.exit_gflops]} GFLOPs, "
        f"full F = {costs.full_gflops:.5f} GFLOPs (C_k / F = {[round(f, 3) for f in costs.fractions]})"
    )
    print(
        f"device {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{threads} torch threads), torch {torch.__version__}; {x.shape[0]} test images of shape "
        f"{tuple(x.shape[1:])}; median of {args.repeats} passes after {args.warmup} warm-up pass(es)"
    )
    print(f"load average (1/5/15 min) before: {load_str(load_before)}, after: {load_str(load_after)}")
    print(format_table(rows))
    bad = [r["batch_size"] for r in rows if r["prediction_mismatches"] or r["exit_mismatches"]]
    if bad:
        print(f"MISMATCH: early-exit predictions differ from the simulated protocol at batch sizes {bad}")
    else:
        print(
            "predictions and exits of the early-exit forward equal the simulated protocol's "
            "at every batch size"
        )
    for r in rows:
        if r["batch_size"] == 64:
            verdict = "met" if r["ratio"] >= TARGET_RATIO else "NOT met"
            print(
                f"target measured >= {TARGET_RATIO} x FLOPs speed-up at batch 64: {verdict} "
                f"({r['ratio']:.2f} x)"
            )

    result = {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "model": info,
        "thresholds": [t if math.isfinite(t) else str(t) for t in thresholds],
        "costs": costs.to_dict(),
        "device": str(device),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
    }
    if paths:
        write_outputs(paths, result)
        print(f"wrote {paths[0]} and {paths[1]}")
    return result


if __name__ == "__main__":
    main()
