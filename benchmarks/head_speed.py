"""Counted FLOPs and measured time of each exit head, the current implementation against the previous one.

Times one bypass, one moment head and one iSQRT-COV head (and a transformer block for scale) at the token
shapes of the trained quickstart model (17 tokens of width 96, moment width 128) and of ViT-S/16 at 224
(197 tokens of width 384, moment width 512), batch 64, random weights, eval mode, 1 thread by default, median
of interleaved repeats. "previous" is the implementation before the lean heads, kept as the plain reference
forward passes of ``tests/support/reference_heads.py`` (imported from there, so it is the code the equality
tests of ``tests/test_heads.py`` compare with)::

    python benchmarks/head_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from dmpo_lightning.evaluation.flops import count_macs
from dmpo_lightning.models.heads import Bypass, ISqrtCovHead, MomentHead

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "quickstart": dict(dim=96, tokens=17, moment_dim=128, heads=3),
    "ViT-S/16 224": dict(dim=384, tokens=197, moment_dim=512, heads=6),
}


def _reference():
    spec = importlib.util.spec_from_file_location(
        "reference", ROOT / "tests" / "support" / "reference_heads.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_shape(label: str, s: dict[str, int], args: argparse.Namespace, ref: object) -> None:
    """Print one table row per module at one token shape."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, s["tokens"], s["dim"])
    block = timm.models.vision_transformer.Block(s["dim"], s["heads"]).eval()
    moment = MomentHead(s["dim"], 10, 1, moment_dim=s["moment_dim"]).eval()
    isqrt = ISqrtCovHead(s["dim"], 10, 1).eval()
    bypass = Bypass(s["dim"]).eval()
    fns = {
        "transformer block": (block, lambda: block(x)),
        "bypass": (bypass, lambda: bypass(x)),
        "moment head": (moment, lambda: moment(x)),
        "moment head (previous)": (None, lambda: ref.reference_moment_forward(moment, x)),
        "iSQRT-COV head": (isqrt, lambda: isqrt(x)),
        "iSQRT-COV head (previous)": (None, lambda: ref.reference_isqrt_forward(isqrt, x)),
    }
    with torch.inference_mode():
        for _, fn in fns.values():
            fn()
        rounds: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, (_, fn) in fns.items():
                rounds[name].append(median_ms(fn, args.reps))
        macs = {}
        for name, (module, _) in fns.items():
            if module is not None:
                macs[name] = count_macs(module, x[:1]) / 1e6
    if "iSQRT-COV head" in macs:  # the previous Newton-Schulz ran 3 more d x d products
        d = isqrt.reduce.out_features
        macs["iSQRT-COV head (previous)"] = macs["iSQRT-COV head"] + 3 * d**3 / 1e6
    macs["moment head (previous)"] = macs["moment head"]
    block_ms = statistics.median(rounds["transformer block"])
    for name in fns:
        ms = statistics.median(rounds[name])
        print(
            f"| {label} | {name} | {macs[name]:.3f} | {ms:.3f} | {ms / block_ms:.2f} | "
            f"{macs[name] / macs['transformer block']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median of medians)")
    parser.add_argument("--reps", type=int, default=5, help="calls per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = _reference()
    print(f"load average before: {os.getloadavg()}; {args.threads} thread(s), batch {args.batch}")
    print("| shape | module | counted MMAC/img | ms/batch | ms / block ms | MMAC / block MMAC |")
    print("|---|---|---:|---:|---:|---:|")
    for label, shape in SHAPES.items():
        measure_shape(label, shape, args, ref)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
