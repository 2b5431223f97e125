"""GPU check of the real early-exit speed: full model, per-batch early exit and the batching engine.

Run through ``benchmarks/gpu_check.sh`` on a machine with one CUDA GPU and only ``torch`` and ``timm``
installed (``PYTHONPATH=src``, no install step, nothing downloaded: random weights). It imports only the
pure-torch parts of the package (``dmpo_lightning.models``, ``evaluation.flops`` / ``protocol`` /
``exit_rules``), never Lightning, jsonargparse, torchmetrics or wandb.

For ViT-B/16 at 224 (exits after blocks 3/6/9/12, AdaptFormer, bypass + moment heads at their default widths,
100 classes), in bf16 autocast, at batch 64 and 256 and budgets 0.33 and 0.5, it prints full-model images/s,
per-batch early-exit images/s (``MultiExitViT.forward_early_exit``), engine images/s (``EarlyExitEngine``:
pooled full batches per stage) and each speed-up divided by the FLOPs speed-up, with the exit histogram and
the number of predictions that differ from the simulated protocol. Thresholds are set on the timed images
so that the exit histogram is the protocol's target distribution ``pi(q)`` whose counted expected cost equals
the budget (what ``dmpo test`` calibrates for that budget). Timing is CUDA-synchronised, with warm-up passes
and the median of interleaved repeats. ``--quick`` runs a tiny model on a few images (the test suite runs it
on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from dmpo_lightning.evaluation.flops import count_exit_costs
from dmpo_lightning.evaluation.protocol import assign_exits, target_exit_distribution
from dmpo_lightning.models.adapters import PeftOptions
from dmpo_lightning.models.engine import EarlyExitEngine
from dmpo_lightning.models.multi_exit import ExitOptions, MultiExitViT

TARGET_ENGINE_RATIO = 0.85
"""Issue 13's GPU target: engine speed-up >= 0.85 x FLOPs speed-up at batch 256."""
TIME_LIMIT_S = 7.5 * 60
"""Stop starting new measurements after this long (the script must finish within 8 minutes)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, few images (smoke test, any device)"
    )
    parser.add_argument("--arch", default="vit_base_patch16_224", help="timm architecture (random weights)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.33, 0.5])
    parser.add_argument("--batches", type=int, default=8, help="input batches per timed pass (default 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per path (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per path first")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype")
    parser.add_argument("--out", default="gpu_check.json", help="JSON result (refused if it exists)")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.batches < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("batch sizes, --batches and --repeats must be >= 1, --warmup >= 0")
    if args.quick:
        args.batch_sizes = [min(b, 8) for b in args.batch_sizes]
        args.batches, args.repeats, args.warmup = min(args.batches, 3), min(args.repeats, 2), 1
    return args


def build_model(args: argparse.Namespace) -> tuple[MultiExitViT, tuple[int, int, int]]:
    torch.manual_seed(0)
    if args.quick:
        kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
        backbone = timm.create_model(args.arch, pretrained=False, num_classes=0, **kwargs)
        model = MultiExitViT(
            backbone, 100, ExitOptions(blocks=(1, 2, 3, 4), moment_dim=64), PeftOptions(adapter_dim=8)
        )
        return model, (3, 32, 32)
    backbone = timm.create_model(args.arch, pretrained=False, num_classes=0)
    exits = ExitOptions(blocks=(3, 6, 9, 12), early_head="moment")
    model = MultiExitViT(backbone, 100, exits, PeftOptions(method="adaptformer"))
    size = backbone.patch_embed.img_size
    return model, (3, int(size[0]), int(size[1]))


def histogram_for_budget(fractions: Sequence[float], budget: float) -> list[float]:
    """``pi(q)`` whose expected cost ``sum_k pi_k C_k / F`` equals ``budget`` (bisection on log q)."""
    costs = torch.tensor(fractions, dtype=torch.float64)
    if not costs[0] <= budget <= costs[-1]:
        raise ValueError(f"budget {budget} is outside [{float(costs[0]):.3f}, {float(costs[-1]):.3f}]")
    lo, hi = -30.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        cost = float((target_exit_distribution(math.exp(mid), len(fractions)) * costs).sum())
        lo, hi = (mid, hi) if cost < budget else (lo, mid)
    return target_exit_distribution(math.exp((lo + hi) / 2), len(fractions)).tolist()


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def scores_of(model: MultiExitViT, chunks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-softmax scores and predictions of every exit (the simulated protocol's inputs), on the CPU."""
    scores, preds = [], []
    for c in chunks:
        probs = torch.stack(model(c), dim=1).float().softmax(dim=-1)
        s, p = probs.max(dim=-1)
        scores.append(s.cpu())
        preds.append(p.cpu())
    return torch.cat(scores), torch.cat(preds)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose another --out or move the old file away")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    started = time.perf_counter()
    model, shape = build_model(args)
    model.eval()
    costs = count_exit_costs(model, shape)
    model.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=args.dtype != "fp32")
    gen = torch.Generator().manual_seed(0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"{args.arch}{' (quick: tiny)' if args.quick else ''}, random weights, exits {model.exit_blocks}, "
        f"{args.dtype} autocast on {device} ({device_name}); torch {torch.__version__}, "
        f"timm {timm.__version__}"
    )
    print(
        f"counted C_k / F_full = {[round(f, 3) for f in costs.fractions]}, "
        f"F_full = {costs.full_gflops:.2f} GFLOPs"
    )
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with torch.inference_mode(), autocast:
        for b in args.batch_sizes:
            x = torch.randn((b * args.batches, *shape), generator=gen).to(device)
            chunks = list(torch.split(x, b))
            all_scores, all_preds = scores_of(model, chunks)
            for budget in args.budgets:
                if time.perf_counter() - started > TIME_LIMIT_S:
                    skipped.append(f"batch {b}, budget {budget}")
                    continue
                shares = histogram_for_budget(costs.fractions, budget)
                thresholds = thresholds_for_histogram(all_scores, shares)
                sim_exit = assign_exits(all_scores, torch.tensor(thresholds, dtype=torch.float64))
                sim_pred = all_preds.gather(1, sim_exit[:, None]).squeeze(1)
                engine = EarlyExitEngine(model, thresholds, batch_size=b)
                paths: dict[str, Callable[[], Any]] = {
                    "full": lambda chunks=chunks: [model.forward_static(c) for c in chunks],
                    "per_batch": lambda chunks=chunks, t=thresholds: [
                        model.forward_early_exit(c, t) for c in chunks
                    ],
                    "engine": lambda chunks=chunks, e=engine: e.run(chunks),
                }
                per_batch = [model.forward_early_exit(c, thresholds) for c in chunks]
                eng = engine.run(chunks)
                exit_pb = torch.cat([o.exit_index for o in per_batch]).cpu()
                pred_pb = torch.cat([o.prediction for o in per_batch]).cpu()
                for _ in range(args.warmup):
                    for fn in paths.values():
                        timed(fn, device)
                times: dict[str, list[float]] = {name: [] for name in paths}
                for _ in range(args.repeats):  # interleaved
                    for name, fn in paths.items():
                        times[name].append(timed(fn, device))
                n = x.shape[0]
                hist = torch.bincount(exit_pb, minlength=model.num_exits)
                expected = float(
                    (hist.double() / n * torch.tensor(costs.fractions, dtype=torch.float64)).sum()
                )
                flops_x = 1.0 / expected
                med = {name: statistics.median(v) for name, v in times.items()}
                row = {
                    "batch_size": b,
                    "budget": budget,
                    "images": n,
                    "exit_histogram": hist.tolist(),
                    "target_shares": shares,
                    "thresholds": [t if math.isfinite(t) else str(t) for t in thresholds],
                    "flops_speedup": flops_x,
                    **{f"{name}_images_per_s": n / s for name, s in med.items()},
                    **{f"{name}_s_runs": v for name, v in times.items()},
                    "per_batch_speedup": med["full"] / med["per_batch"],
                    "engine_speedup": med["full"] / med["engine"],
                    "per_batch_ratio": med["full"] / med["per_batch"] / flops_x,
                    "engine_ratio": med["full"] / med["engine"] / flops_x,
                    "per_batch_mismatches": int((pred_pb != sim_pred).sum() + (exit_pb != sim_exit).sum()),
                    "engine_mismatches": int(
                        (eng.prediction.cpu() != sim_pred).sum() + (eng.exit_index.cpu() != sim_exit).sum()
                    ),
                }
                rows.append(row)
                parts = [
                    f"batch {b:4d} budget {budget:.2f} hist {'/'.join(map(str, row['exit_histogram']))}:",
                    f"full {row['full_images_per_s']:.0f} img/s |",
                    f"per-batch {row['per_batch_images_per_s']:.0f} img/s,",
                    f"{row['per_batch_speedup']:.2f} x = {row['per_batch_ratio']:.2f}",
                    f"of FLOPs {flops_x:.2f} x |",
                    f"engine {row['engine_images_per_s']:.0f} img/s,",
                    f"{row['engine_speedup']:.2f} x = {row['engine_ratio']:.2f} of FLOPs |",
                    f"mismatches {row['per_batch_mismatches']}/{row['engine_mismatches']}",
                ]
                print(" ".join(parts), flush=True)
    at_max = [r for r in rows if r["batch_size"] == 256]
    if at_max:
        worst = min(r["engine_ratio"] for r in at_max)
        verdict = "met" if worst >= TARGET_ENGINE_RATIO else "NOT met"
        print(
            f"target engine >= {TARGET_ENGINE_RATIO} x FLOPs speed-up at batch 256: {verdict} ({worst:.2f})"
        )
    if skipped:
        print(f"time limit reached: not measured {skipped}")
    result = {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "arch": args.arch,
        "quick": args.quick,
        "device": str(device),
        "device_name": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu_count": os.cpu_count(),
        "costs": costs.to_dict(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
        "skipped": skipped,
        "seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
