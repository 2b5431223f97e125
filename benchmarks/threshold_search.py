"""Time the budgeted-batch protocol on cached outputs: 50,000 samples x 4 exits, 39 values of q.

Run: ``python benchmarks/threshold_search.py [--n 50000] [--exits 4] [--repeats 5] [--fine 2000]``.
Prints the best-of-repeats wall time (after a warm-up) of
1. ``calibrate_thresholds`` alone (39 q),
2. ``calibrate_thresholds`` + ``evaluate_thresholds`` on calibration and test (= ``budgeted_curve``),
3. the fine budget search (``operating_points`` for 5 budgets over ``search_qs(fine)``).
EVALUATION.md asks for (2) to take well under a second on a CPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dmpo_lightning.evaluation.protocol import (
    budgeted_curve,
    calibrate_thresholds,
    default_qs,
    operating_points,
    search_qs,
)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def fake_outputs(n: int, num_exits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-softmax-like scores in (0, 1] and correctness that grows with depth and confidence."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, num_exits, generator=g)
    skill = torch.linspace(0.5, 0.85, num_exits)
    correct = torch.rand(n, num_exits, generator=g) < (skill + 0.3 * (scores - 0.5)).clamp(0, 1)
    return scores, correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="samples per split")
    parser.add_argument("--exits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fine", type=int, default=1000, help="log-spaced q values of the budget search")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cal_s, cal_c = fake_outputs(args.n, args.exits, seed=0)
    test_s, test_c = fake_outputs(args.n, args.exits, seed=1)
    costs = torch.linspace(1.0, 4.0, args.exits).tolist()
    full = costs[-1]
    qs = default_qs()
    fine = search_qs(args.fine)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; n = {args.n} per split, "
        f"K = {args.exits}, {qs.numel()} q (curve), {fine.numel()} q (budget search)"
    )
    t_cal = best_of(lambda: calibrate_thresholds(cal_s, qs), args.repeats)
    print(f"calibrate_thresholds, 39 q:                       {t_cal:.4f} s")
    t_curve = best_of(lambda: budgeted_curve(cal_s, cal_c, test_s, test_c, costs, full, qs), args.repeats)
    print(f"budgeted_curve (calibrate + evaluate cal & test):  {t_curve:.4f} s")
    budgets = [0.3, 0.33, 0.5, 0.75, 1.0]
    t_fine = best_of(
        lambda: operating_points(cal_s, cal_c, test_s, test_c, costs, full, budgets, qs=fine),
        max(1, args.repeats // 2),
    )
    print(f"operating_points, 5 budgets, {fine.numel()} q:          {t_fine:.4f} s")


if __name__ == "__main__":
    main()
