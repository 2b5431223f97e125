"""Time each exit head of a trained checkpoint on its real tokens, next to one transformer block.

The tokens each head reads are computed once from random images (the heads' cost does not depend on the
values; this is checked with ``torch.set_flush_denormal`` on and off), then every head (bypass + predictor)
and one block are timed, interleaved, median of rounds, 1 thread by default::

    python benchmarks/exit_head_times.py --ckpt runs/quickstart/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from dmpo_lightning.models.backbone import embed_tokens
from dmpo_lightning.module import DMPOModule


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = DMPOModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
    model = module.model
    x = torch.randn(args.batch, *module.exit_costs().input_shape)
    results: dict[str, list[float]] = {}
    with torch.inference_mode():
        tokens, tok, start = [], embed_tokens(model.backbone, x), 0
        for stop in model.exit_blocks:
            for block in model.backbone.blocks[start:stop]:
                tok = block(tok)
            tokens.append(tok)
            start = stop
        block = model.backbone.blocks[0]
        for _ in range(args.rounds):
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                tag = " (flush denormals)" if flush else ""
                results.setdefault(f"block{tag}", []).append(median_ms(lambda: block(tokens[0]), args.reps))
                for k, head in enumerate(model.exits):
                    fn = lambda head=head, t=tokens[k]: head(t)  # noqa: E731
                    results.setdefault(f"exit {k + 1} head{tag}", []).append(median_ms(fn, args.reps))
        torch.set_flush_denormal(False)
    print(f"load average {os.getloadavg()}; {args.threads} thread(s); batch {args.batch}; {args.ckpt}")
    block_ms = statistics.median(results["block"])
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"{name:32s} {ms:8.3f} ms  {ms / block_ms:5.2f} of a block")


if __name__ == "__main__":
    main()
