"""VTAB-1k: train and test DMPO on each of the 19 tasks and write one table, the way papers report it.

Each task runs ``dmpo fit`` (with ``test_after_fit``) on ``configs/experiments/vtab1k_<group>.yaml``, the
config of its group, with ``--data.init_args.task <task>``; the table gives the test top-1 at every budget of
the ``dmpo test`` report (chosen on the calibration split, val200), the full model (last exit) and the AUC,
per task, the mean of each group (natural, specialized, structured), the mean of the three group means and
the mean of the 19 tasks. Files written into a new output folder (never into an existing one):
``table.md``, ``table.csv``, ``results.json`` (every task's numbers, report path, wall time and error, if
any) and ``runs/<task>/version_0/`` (each run's checkpoints and report).

    python benchmarks/vtab1k.py --root data/vtab-1k                    # all 19 tasks (one GPU: ~hours)
    python benchmarks/vtab1k.py --root data/vtab-1k --tasks cifar,dtd  # some of them
    python benchmarks/vtab1k.py --root data/vtab-1k -- --trainer.max_epochs 50   # extra `dmpo fit` options
    python benchmarks/vtab1k.py --quick          # smoke test: fake images, tiny random ViT, 1 epoch, CPU
    python benchmarks/vtab1k.py --summarise OUT  # rebuild the table of an earlier run from its reports

``--quick`` writes a fake VTAB-1k layout (12 tiny images per task) into the output folder unless ``--root``
names one, and trains a depth-4, width-32 random ViT for one epoch on the CPU: seconds per task, and its
numbers mean nothing. It checks that every task's folder, config and report fit together.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dmpo_lightning.cli import main as dmpo_main
from dmpo_lightning.data.list_files import VTAB1K_GROUPS, VTAB1K_TASKS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
DEFAULT_OUTPUT_PARENT = ROOT / "benchmarks" / "results"

QUICK_OPTIONS = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.backbone=vit_tiny_patch16_224",
    "--model.init_args.pretrained=false",
    "--model.init_args.img_size=32",
    "--model.init_args.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, mlp_ratio: 2}",
    "--model.init_args.exits.blocks=[1, 2, 3, 4]",
    "--model.init_args.exits.moment_dim=32",
    "--model.init_args.peft.adapter_dim=8",
    "--evaluation.budgets=[0.5, 0.75, 1.0]",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=16",
    "--data.init_args.num_workers=0",
]
"""``dmpo fit`` options of ``--quick`` (CPU, tiny random ViT, one epoch)."""

QUICK_SIZES = {"train800": 6, "val200": 3, "test": 3}


def write_fake_vtab1k(root: Path, tasks: Sequence[str]) -> Path:
    """A fake VTAB-1k release (``root/<task>/{images/, train800.txt, val200.txt, train800val200.txt,
    test.txt}``) with a few 24x18 images per list; image colours depend on the label."""
    rng = np.random.default_rng(0)
    for task in tasks:
        folder = root / task
        labels = min(3, VTAB1K_TASKS[task][1])
        lists: dict[str, list[str]] = {}
        for split, n in QUICK_SIZES.items():
            lists[split] = []
            for i in range(n):
                rel = f"images/{split}/{i:06d}.jpg"
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                pixels = np.clip(60 * (i % labels) + rng.integers(0, 40, (18, 24, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / rel)
                lists[split].append(f"{rel} {i % labels}")
        lists["train800val200"] = []
        for i, line in enumerate(lists["train800"] + lists["val200"]):
            rel, label = line.split()
            target = f"images/train800val200/{i:06d}.jpg"
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            (folder / target).write_bytes((folder / rel).read_bytes())
            lists["train800val200"].append(f"{target} {label}")
        for split, lines in lists.items():
            (folder / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return root


def run_task(task: str, root: Path, out: Path, extra: Sequence[str]) -> dict[str, Any]:
    """``dmpo fit`` (then test) of one task, run in ``out`` (its runs/ folder); the report's numbers."""
    group = VTAB1K_TASKS[task][0]
    args = [
        "fit",
        "-c",
        str(CONFIGS / f"vtab1k_{group}.yaml"),
        f"--data.init_args.root={root}",
        f"--data.init_args.task={task}",
        "--test_after_fit=true",
        *extra,
    ]
    started = time.perf_counter()
    result: dict[str, Any] = {"task": task, "group": group, "args": args[1:]}
    previous = Path.cwd()
    run_dir = out / "runs" / task
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.chdir(
            run_dir
        )  # the config's logger writes runs/<name>/version_N relative to the working directory
        cli = dmpo_main(args)
        log_dir = Path(cli.trainer.log_dir or ".").resolve()
        report_path = log_dir / "dmpo_test" / "report.json"
        result.update(read_report(report_path))
    except (Exception, SystemExit) as err:  # one failing task must not lose the others' results
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc(limit=8)
    finally:
        os.chdir(previous)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def read_report(path: Path) -> dict[str, Any]:
    """Test top-1 per budget, of the full model and the AUC, from a ``dmpo test`` report.json."""
    report = json.loads(path.read_text(encoding="utf-8"))
    budgets = {
        _budget_key(b["budget"], b.get("budget_unit", report.get("unit", "fraction"))): b["test_accuracy"]
        for b in report["budgets"]
    }
    return {
        "report": str(path),
        "budgets": budgets,
        "full_model": report["full_model"]["top1"],
        "auc": report["auc"]["value"] if isinstance(report.get("auc"), dict) else report.get("auc"),
        "num_test": report.get("num_test"),
        "num_calibration": report.get("num_calibration"),
    }


def _budget_key(budget: float, unit: str) -> str:
    return f"{100 * budget:g} %" if unit == "fraction" else f"{budget:g} GFLOPs"


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept and len(kept) == len(values) else None


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows per task, group means, mean of group means and mean of all tasks (None where a task failed)."""
    columns = sorted(
        {key for r in results for key in r.get("budgets", {})},
        key=lambda k: (k.endswith("GFLOPs"), float(k.split()[0])),
    )
    columns += ["full model", "AUC"]

    def values(r: dict[str, Any]) -> dict[str, float | None]:
        if "error" in r:
            return dict.fromkeys(columns)
        row: dict[str, float | None] = {c: r["budgets"].get(c) for c in columns[:-2]}
        row["full model"], row["AUC"] = r["full_model"], r["auc"]
        return row

    by_task = {r["task"]: values(r) for r in results}
    rows: list[tuple[str, dict[str, float | None]]] = []
    group_means: dict[str, dict[str, float | None]] = {}
    for group, tasks in VTAB1K_GROUPS.items():
        present = [t for t in tasks if t in by_task]
        if not present:
            continue
        rows += [(t, by_task[t]) for t in present]
        group_means[group] = {c: _mean([by_task[t][c] for t in present]) for c in columns}
        label = f"mean {group}" + (
            "" if len(present) == len(tasks) else f" ({len(present)}/{len(tasks)} tasks)"
        )
        rows.append((label, group_means[group]))
    if len(group_means) > 1:
        rows.append(
            ("mean of group means", {c: _mean([m[c] for m in group_means.values()]) for c in columns})
        )
    rows.append(
        (f"mean of {len(by_task)} tasks", {c: _mean([v[c] for v in by_task.values()]) for c in columns})
    )
    return {"columns": columns, "rows": rows}


def _cell(value: float | None) -> str:
    return "failed" if value is None else f"{100 * value:.2f}"


def write_tables(summary: dict[str, Any], out: Path, title: str) -> None:
    """``table.md`` (test top-1 %, rows = tasks and means) and ``table.csv`` (fractions)."""
    columns = summary["columns"]
    header = ["task", *(f"budget {c}" if c.endswith("%") or c.endswith("GFLOPs") else c for c in columns)]
    lines = [
        f"# {title}",
        "",
        "Test top-1 (%) per task: at each budget (thresholds chosen on the calibration split, val200),",
        "of the full model (last exit) and the AUC (mean test top-1 over cost fractions 0.25..1).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, row in summary["rows"]:
        bold = name.startswith("mean")
        cells = [_cell(row[c]) for c in columns]
        lines.append("| " + " | ".join([f"**{name}**" if bold else name, *cells]) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for name, row in summary["rows"]:
            writer.writerow([name, *("" if row[c] is None else f"{row[c]:.6f}" for c in columns)])


def _output_dir(path: Path | None) -> Path:
    out = path or DEFAULT_OUTPUT_PARENT / f"vtab1k_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(
            f"output folder {out} exists and is not empty; results are never overwritten: "
            "choose another --output"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", type=Path, help="the VTAB-1k release folder (one folder per task)")
    p.add_argument("--tasks", help=f"comma-separated tasks (default: all 19: {','.join(VTAB1K_TASKS)})")
    p.add_argument(
        "--output", type=Path, help="a new folder for the results (default: benchmarks/results/...)"
    )
    p.add_argument("--quick", action="store_true", help="fake images, tiny random ViT, 1 epoch, CPU")
    p.add_argument("--summarise", type=Path, metavar="OUT", help="rebuild OUT's tables from its results.json")
    args = p.parse_args(argv)
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in VTAB1K_TASKS]
        if unknown:
            p.error(f"unknown task(s) {unknown}; the 19 VTAB-1k tasks are {', '.join(VTAB1K_TASKS)}")
        args.tasks = tasks
    else:
        args.tasks = list(VTAB1K_TASKS)
    if args.root is None and not args.quick and args.summarise is None:
        p.error("--root (the VTAB-1k release folder) is required, except with --quick or --summarise")
    if args.root is not None and not args.root.is_dir():
        p.error(f"--root {args.root} is not a folder; give the VTAB-1k release folder (one folder per task)")
    return args, extra


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or rebuild a table); returns what ``results.json`` holds."""
    args, extra = parse_args(argv)
    if args.summarise is not None:
        payload = json.loads((args.summarise / "results.json").read_text(encoding="utf-8"))
        write_tables(summarise(payload["results"]), args.summarise, payload["title"])
        return payload
    out = _output_dir(args.output)
    root = (
        args.root.resolve() if args.root is not None else write_fake_vtab1k(out / "fake_vtab1k", args.tasks)
    )
    options = [*(QUICK_OPTIONS if args.quick else []), *extra]
    title = f"VTAB-1k{' (quick: fake data, tiny random ViT; numbers meaningless)' if args.quick else ''}"
    results = []
    for task in args.tasks:
        print(f"[vtab1k] {task} ({VTAB1K_TASKS[task][0]})", flush=True)
        with contextlib.redirect_stdout(sys.stderr):
            results.append(run_task(task, root, out, options))
        if "error" in results[-1]:
            print(f"[vtab1k] {task} failed: {results[-1]['error']}", flush=True)
    payload = {
        "title": title,
        "root": str(root),
        "quick": args.quick,
        "options": options,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    write_tables(summarise(results), out, title)
    print((out / "table.md").read_text(encoding="utf-8"))
    print(f"[vtab1k] tables and runs in {out}")
    return payload


if __name__ == "__main__":
    payload = main()
    raise SystemExit(1 if any("error" in r for r in payload.get("results", [])) else 0)
