"""Markdown tables of ``early_exit_speed.py --out`` results, with the paired speed-up next to the median one.

``early_exit_speed.py`` reports ``median(full times) / median(early times)``. On a machine whose load changes
during a run that ratio mixes passes timed under different loads; the full and early-exit passes of one round
run back to back, so the **paired** speed-up ``median_i(full_i / early_i)`` over the rounds ``i`` is the more
robust estimate there. This prints both, for the per-batch early exit and, when timed, the engine and the
compiled forward::

    python benchmarks/speed_tables.py speed_quickstart.json speed_vit_tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

PATHS = (("early", "per-batch"), ("engine", "engine"), ("compiled", "compiled"))


def paired(full: list[float], other: list[float]) -> float:
    """Median over interleaved rounds of ``full_i / other_i``."""
    return statistics.median(f / o for f, o in zip(full, other, strict=True))


def table(case: dict[str, Any]) -> str:
    rows = case["rows"]
    present = [(key, label) for key, label in PATHS if all(f"{key}_s_runs" in r for r in rows)]
    headers = ["batch", "images", "exit histogram", "FLOPs x", "full ms/img"]
    for _, label in present:
        headers += [
            f"{label} ms/img",
            f"{label} x (paired)",
            f"{label} / FLOPs (paired)",
            f"{label} x (medians)",
        ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    for r in rows:
        flops = r["flops_speedup"]
        cells = [
            str(r["batch_size"]),
            str(r["samples"]),
            "/".join(str(h) for h in r["exit_histogram"]),
            f"{flops:.2f}",
            f"{r['full_ms_per_image']:.3f}",
        ]
        for key, _ in present:
            x = paired(r["full_s_runs"], r[f"{key}_s_runs"])
            medians = statistics.median(r["full_s_runs"]) / statistics.median(r[f"{key}_s_runs"])
            ms = 1e3 * statistics.median(r[f"{key}_s_runs"]) / r["samples"]
            cells += [f"{ms:.3f}", f"{x:.2f}", f"**{x / flops:.2f}**", f"{medians:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by early_exit_speed.py --out")
    args = parser.parse_args()
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        for case in result.get("cases", []):
            model = case.get("model", {})
            name = model.get("name") if isinstance(model, dict) else model
            before, after = case.get("load_average_before"), case.get("load_average_after")
            print(f"\n{path}: {name} (load average {before} -> {after})")
            print(table(case))
        training = result.get("training_step")
        if training:
            runs = training["step_s_runs"]
            print(
                f"\n{path}: training step DMPO {training['step_s']['dmpo']:.3f} s, static PEFT "
                f"{training['step_s']['static_peft']:.3f} s, ratio of medians {training['ratio']:.3f}, "
                f"paired {paired(runs['dmpo'], runs['static_peft']):.3f} (DMPO / static)"
            )


if __name__ == "__main__":
    main()
