"""What skipping the heads of disabled exits buys: per-batch early exit with and without the skip.

With a local exit rule (``confidence``, ``entropy``) an exit whose threshold is ``+inf`` cannot change any
answer, so ``forward_early_exit`` does not run its head (``ExitPolicy.needs_head``). This times the same
early exit with the skip switched off (every head runs), interleaved, median of repeats, and checks that
both give the same predictions and exits. The model is a trained checkpoint (the architecture comes from
it); the thresholds are those of ``--budget`` in ``--thresholds`` with the exits of ``--disable`` set to
``+inf``::

    python benchmarks/skip_heads_speed.py --ckpt runs/quickstart/version_0/checkpoints/last.ckpt \\
        --thresholds runs/quickstart/version_0/dmpo_test/thresholds.json --disable 1 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from dmpo_lightning.files import decode_float
from dmpo_lightning.models.exit_policy import ExitPolicy
from dmpo_lightning.module import DMPOModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--thresholds", required=True, help="thresholds.json of dmpo test")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--disable", type=int, nargs="+", default=[1, 3], help="1-based exits set to +inf")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="random-image batches per timed pass")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = DMPOModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
    model = module.model
    with open(args.thresholds) as f:
        entries = json.load(f)["budgets"]
    (entry,) = [e for e in entries if math.isclose(float(e["budget"]), args.budget)]
    thresholds = [decode_float(t) for t in entry["thresholds"]]
    for k in args.disable:
        if not 1 <= k < model.num_exits:
            parser.error(f"--disable takes early exits 1..{model.num_exits - 1}, got {k}")
        thresholds[k - 1] = math.inf
    torch.manual_seed(0)
    shape = module.exit_costs().input_shape
    chunks = [torch.randn(args.batch, *shape) for _ in range(args.batches)]
    original = ExitPolicy.needs_head

    def run(skip: bool) -> list:
        ExitPolicy.needs_head = original if skip else (lambda self, k: True)  # type: ignore[method-assign]
        try:
            return [model.forward_early_exit(c, thresholds, module.exit_rule) for c in chunks]
        finally:
            ExitPolicy.needs_head = original  # type: ignore[method-assign]

    with torch.inference_mode():
        a, b = run(True), run(False)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.prediction, y.prediction) and torch.equal(x.exit_index, y.exit_index)
        hist = torch.bincount(torch.cat([o.exit_index for o in a]), minlength=model.num_exits).tolist()
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for skip in (True, False):
                start = time.perf_counter()
                run(skip)
                times[skip].append(time.perf_counter() - start)
    n = args.batch * args.batches
    skip_ms = 1e3 * statistics.median(times[True]) / n
    all_ms = 1e3 * statistics.median(times[False]) / n
    print(f"load average {os.getloadavg()}; {args.threads} thread(s); batch {args.batch}; {n} random images")
    print(f"thresholds {thresholds} (exits {args.disable} disabled); exit histogram {hist}")
    print(f"every head runs: {all_ms:.4f} ms/image; disabled heads skipped: {skip_ms:.4f} ms/image")
    print(f"skipping bought {all_ms / skip_ms:.3f}x (identical predictions and exits)")


if __name__ == "__main__":
    main()
