"""What holding 200 of 1,000 training images out for calibration costs, measured on an offline proxy.

VTAB-1k gives 1,000 training images per task; dmpo trains on ``train800`` and calibrates the exits on
``val200`` (docs/datasets.md), where the papers train on all 1,000. No VTAB-1k data or pre-trained ViT-B is
available offline, so this measures the same trade on the quickstart's setting: the package's pre-trained toy
trunk (``dmpo_toy_vit_fmnist``) tuned on 800 or on 1,000 images of the embedded Fashion-MNIST subset, the same
200 held-out calibration images for both (``train_subset`` takes the first images of one seeded permutation,
so the 800 are part of the 1,000), tested on the subset's 2,000 test images. It reports the test top-1 of the
full model (last exit) and at each budget, per seed, and the paired difference 1,000 - 800.

    python benchmarks/vtab1k_calibration_cost.py --seeds 0 1 2 --epochs 30 --output benchmarks/results/x

A proxy: a 1-M-parameter trunk on 28x28 garments, not ViT-B on VTAB. It tells how large the cost of 200 fewer
training images can be in a 1k-image regime, not what it is on a given VTAB task.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from dmpo_lightning.cli import main as dmpo_main

ROOT = Path(__file__).resolve().parents[1]


def run(train: int, seed: int, epochs: int, out: Path) -> dict:
    """One ``dmpo fit`` + test of the quickstart model on ``train`` images; the report's numbers."""
    folder = out / f"train{train}_seed{seed}"
    folder.mkdir(parents=True)
    previous = Path.cwd()
    started = time.perf_counter()
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(sys.stderr):
            cli = dmpo_main(
                [
                    "fit",
                    "-c",
                    str(ROOT / "configs" / "quickstart.yaml"),
                    f"--seed_everything={seed}",
                    f"--data.init_args.seed={seed}",
                    "--data.init_args.calibration_size=200",
                    f"--data.init_args.train_subset={train}",
                    f"--trainer.max_epochs={epochs}",
                    f"--model.init_args.schedule.switch_epoch={epochs // 2}",
                    "--trainer.enable_progress_bar=false",
                ]
            )
        report = json.loads((Path(cli.trainer.log_dir) / "dmpo_test" / "report.json").read_text())
    finally:
        os.chdir(previous)
    return {
        "train": train,
        "seed": seed,
        "full_model": report["full_model"]["top1"],
        "budgets": {str(b["budget"]): b["test_accuracy"] for b in report["budgets"]},
        "num_calibration": report["num_calibration"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--output", type=Path, required=True, help="a new folder")
    args = p.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        raise SystemExit(f"{args.output} exists and is not empty; results are never overwritten")
    out = args.output.resolve()
    results = [run(train, seed, args.epochs, out) for seed in args.seeds for train in (800, 1000)]
    by = {(r["train"], r["seed"]): r for r in results}
    keys = ["full_model", *results[0]["budgets"]]

    def value(r: dict, key: str) -> float:
        return r["full_model"] if key == "full_model" else r["budgets"][key]

    lines = [
        "| test top-1 % | 800 images | 1,000 images | 1,000 - 800 (paired, mean ± s.d.) |",
        "|---|---|---|---|",
    ]
    for key in keys:
        a = [100 * value(by[800, s], key) for s in args.seeds]
        b = [100 * value(by[1000, s], key) for s in args.seeds]
        d = [y - x for x, y in zip(a, b, strict=True)]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        name = "full model (last exit)" if key == "full_model" else f"budget {float(key):g}"
        lines.append(
            f"| {name} | {statistics.fmean(a):.2f} | {statistics.fmean(b):.2f} | "
            f"{statistics.fmean(d):+.2f} ± {sd:.2f} |"
        )
    table = "\n".join(lines)
    payload = {"seeds": args.seeds, "epochs": args.epochs, "results": results, "table": table}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    return payload


if __name__ == "__main__":
    main()
