"""Compare accuracy-vs-cost curves of `pretrain_tune.py` at matched costs.

`pretrain_tune.py`'s AUC counts 0 below a model's first exit, so a variant whose first exit costs 26.6 % of
the full model loses about 1.5/75 of its accuracy against one whose first exit costs 25.1 %, whatever the
accuracies. This script reads the run's `curves.csv` (the `dynamic` rows: test cost and test top-1 of the
thresholds chosen on the calibration split for a sweep of cost targets) and prints, per variant (mean ± s.d.
over seeds):

- test top-1 at the given costs, interpolated linearly along the curve; "—" below the curve's cheapest point,
  the last point's accuracy above its dearest one (more budget is allowed to stay unused);
- the mean top-1 over a common cost range that starts where every variant's curve has begun
  (``--auc-from``, default: the largest first cost among the compared variants) and ends at 100 %.

Example::

    python benchmarks/compare_curves.py benchmarks/output/pretrain_tune/full/curves.csv \
        --variants sdn_linear,sdn_bypass,sdn_moment,dmpo --costs 0.3,0.35,0.4,0.5
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def read_curves(path: Path, proxy: str | None = None) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``{variant: {seed: (cost, accuracy)}}`` from the ``dynamic`` rows, sorted by cost.

    A CSV with a ``proxy`` column (several pre-train-then-tune proxies) needs ``proxy`` when it holds more
    than one; the curves of different proxies are never mixed.
    """
    rows: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    proxies = sorted({r["proxy"] for r in records if r.get("proxy")})
    if proxy is None and len(proxies) > 1:
        raise SystemExit(f"{path} holds the proxies {proxies}; choose one with --proxy")
    if proxy is not None and proxy not in proxies:
        raise SystemExit(f"--proxy {proxy!r}: {path} holds {proxies or 'no proxy column'}")
    for row in records:
        if proxy is not None and row.get("proxy") != proxy:
            continue
        if row["kind"] == "dynamic":
            rows[row["variant"]][int(row["seed"])].append(
                (float(row["test_cost_fraction"]), float(row["test_accuracy"]))
            )
    out = {}
    for variant, seeds in rows.items():
        out[variant] = {}
        for seed, points in seeds.items():
            points.sort()
            cost = np.array([c for c, _ in points])
            acc = np.array([a for _, a in points])
            out[variant][seed] = (cost, acc)
    return out


def accuracy_at(cost: np.ndarray, acc: np.ndarray, c: float) -> float:
    """Top-1 at cost ``c``: NaN below the cheapest point, the last accuracy above the dearest."""
    if c < cost[0] - 1e-9:
        return math.nan
    if c >= cost[-1]:
        return float(acc[-1])
    return float(np.interp(c, cost, acc))


def mean_accuracy(cost: np.ndarray, acc: np.ndarray, lo: float, hi: float = 1.0, n: int = 501) -> float:
    """Mean top-1 over the costs ``[lo, hi]`` (uniform grid of ``n`` points)."""
    return float(np.mean([accuracy_at(cost, acc, c) for c in np.linspace(lo, hi, n)]))


def _fmt(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"


def table(
    curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]],
    variants: Sequence[str],
    costs: Sequence[float],
    auc_from: float | None = None,
) -> str:
    """Markdown table: accuracy at ``costs`` and the mean over ``[auc_from, 1]`` for each variant."""
    missing = [v for v in variants if v not in curves]
    if missing:
        raise SystemExit(f"no dynamic curve for {missing} in the CSV; it has {sorted(curves)}")
    if auc_from is None:
        auc_from = max(float(c[0]) for v in variants for c, _ in curves[v].values())
    head = [f"{100 * c:g}%" for c in costs] + [f"mean {100 * auc_from:.1f}-100%"]
    lines = [
        "| variant | " + " | ".join(head) + " | seeds |",
        "|---|" + "---:|" * (len(head) + 1),
    ]
    for v in variants:
        seeds = curves[v]
        cells = [_fmt([accuracy_at(*seeds[s], c) for s in seeds]) for c in costs]
        cells.append(_fmt([mean_accuracy(*seeds[s], auc_from) for s in seeds]))
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="curves.csv written by pretrain_tune.py")
    p.add_argument("--variants", default=None, help="comma-separated (default: every variant in the CSV)")
    p.add_argument("--costs", default="0.3,0.35,0.4,0.5", help="cost fractions (default 0.3,0.35,0.4,0.5)")
    p.add_argument("--auc-from", type=float, default=None, help="start of the common cost range")
    p.add_argument("--proxy", default=None, help="proxy to compare when the CSV holds several")
    args = p.parse_args(argv)
    if not args.csv.is_file():
        raise SystemExit(
            f"{args.csv} does not exist; give the curves.csv of a pretrain_tune.py output folder"
        )
    curves = read_curves(args.csv, args.proxy)
    variants = args.variants.split(",") if args.variants else list(curves)
    costs = [float(c) for c in args.costs.split(",")]
    bad = [c for c in costs if not 0 < c <= 1]
    if bad:
        raise SystemExit(f"--costs must be fractions in (0, 1], got {bad}")
    out = table(curves, variants, costs, args.auc_from)
    print(out)
    return out


if __name__ == "__main__":
    main()
