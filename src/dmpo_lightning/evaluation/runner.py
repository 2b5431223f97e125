"""Glue between the LightningModule's test/predict loops and the protocol: report files and thresholds."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from dmpo_lightning.constants import THRESHOLDS_FORMAT
from dmpo_lightning.errors import ConfigError, ConfigFileExistsError, ConfigFileNotFoundError
from dmpo_lightning.evaluation.calibration import TemperatureCalibration, plot_reliability
from dmpo_lightning.evaluation.flops import ExitCosts
from dmpo_lightning.evaluation.protocol import (
    BudgetUnitOption,
    budgeted_curve,
    check_budget_range,
    operating_points,
    protocol_budget_unit,
)
from dmpo_lightning.evaluation.report import build_report, format_report_table, plot_curve, write_curve_csv
from dmpo_lightning.files import (
    atomic_write,
    decode_float,
    to_jsonable,
    write_json,
)
from dmpo_lightning.options import option_name

__all__ = [
    "REPORT_FILES",
    "check_budgets",
    "check_output_file",
    "check_report_dir",
    "format_speed_table",
    "load_temperatures",
    "load_thresholds",
    "run_test_protocol",
    "time_early_exit",
]

REPORT_FILES = (
    "report.json",
    "curve.csv",
    "accuracy_vs_flops.png",
    "thresholds.json",
    "exit_outputs.pt",
    "reliability.png",
)


def check_report_dir(path: str) -> None:
    """Refuse a report folder that holds a report, is a file, or cannot be written, before any work.

    Results are never overwritten by surprise, and an unwritable target fails now, not after the evaluation.

    Raises:
        ConfigFileExistsError: If ``path`` already holds report files.
        ConfigError: If ``path`` (or a parent) is a file, or the folder cannot be created or written.
    """
    existing = [f for f in REPORT_FILES if os.path.exists(os.path.join(path, f))]
    if existing:
        raise ConfigFileExistsError(
            f"{path} already holds a dmpo test report ({', '.join(existing)}); set "
            "model.init_args.evaluation.report_dir to a new folder, or move the old report away",
            option="model.init_args.evaluation.report_dir",
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(
            f"report_dir {path} is a file; model.init_args.evaluation.report_dir must be a folder (new or "
            "empty)",
            option="model.init_args.evaluation.report_dir",
        )
    # the report is first written to a temporary folder next to ``path``, so its parent must be writable
    _check_writable(
        os.path.dirname(os.path.abspath(path)), f"report_dir {path}", "model.init_args.evaluation.report_dir"
    )
    if os.path.isdir(path):
        _check_writable(path, f"report_dir {path}", "model.init_args.evaluation.report_dir")


def check_output_file(path: str, option: str = "model.init_args.evaluation.predictions_file") -> None:
    """Refuse an output file that exists, is a folder, or whose folder cannot be created or written.

    Raises:
        ConfigFileExistsError: If ``path`` exists (it is never overwritten).
        ConfigError: If ``path`` is a folder or cannot be written.
    """
    if os.path.isdir(path):
        raise ConfigError(
            f"{path} is a folder; {option} must name a new file (e.g. {path}/predictions.csv)", option
        )
    if os.path.exists(path):
        raise ConfigFileExistsError(
            f"{path} exists; set {option} to a new path or move the old file away", option=option
        )
    _check_writable(os.path.dirname(os.path.abspath(path)), f"{option} {path}", option)


def _check_writable(folder: str, what: str, option: str) -> None:
    """``folder`` exists and takes a new entry, or can be created (probed, then removed: nothing is left)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(
            f"{what} cannot be created: {probe} is a file, not a folder; {option} must be a path "
            "under a folder",
            option,
        )
    try:
        created = tempfile.mkdtemp(prefix=".dmpo-write-check-", dir=probe)
    except OSError as err:
        raise ConfigError(
            f"{what} cannot be written ({probe} is not writable: {err.strerror}); {option} must be a "
            "writable location",
            option,
        ) from None
    os.rmdir(created)


def check_budgets(budgets: Sequence[float], unit: str, costs: ExitCosts) -> None:
    """Fail before any work on budgets no early-exit policy can meet (below exit 1's cost or above 1.0)."""
    try:
        check_budget_range(
            budgets, costs.exit_gflops[0], costs.full_gflops, protocol_budget_unit(unit), "GFLOPs"
        )
    except ValueError as err:
        raise ConfigError(
            f"{err}; fix model.init_args.evaluation.budgets", option="model.init_args.evaluation.budgets"
        ) from None


def _correct(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return outputs["preds"] == outputs["target"][:, None]


def run_test_protocol(
    *,
    test: Mapping[str, torch.Tensor],
    calibration: Mapping[str, torch.Tensor] | None,
    costs: ExitCosts,
    exit_blocks: Sequence[int],
    budgets: Sequence[float],
    budget_unit: BudgetUnitOption,
    exit_rule: str,
    hparams: Mapping[str, Any],
    checkpoint_hash: str,
    report_dir: str,
    is_global_zero: bool,
    split_file: str | None,
    anytime_metrics: Sequence[Mapping[str, float]],
    fingerprint: Mapping[str, Any],
    weights_hash: str | None = None,
    temperature: TemperatureCalibration | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Budgeted-batch evaluation of cached exit outputs; prints the table and writes the report on rank 0.

    Args:
        test: Collected test outputs (``index``, ``scores``, ``preds``, ``target``).
        calibration: Collected calibration outputs, or ``None`` (then only anytime results are reported).
        costs: Counted per-exit costs.
        exit_blocks: Block number of every exit.
        budgets: Cost budgets in ``budget_unit``.
        budget_unit: ``fraction`` of the full cost or ``gflops``.
        exit_rule: The rule that produced the scores.
        hparams: Model configuration, stored in the report.
        checkpoint_hash: Identifies the weights the outputs came from.
        report_dir: Output folder (must not hold a report yet).
        is_global_zero: Only rank 0 prints and writes.
        split_file: The calibration-indices file of the run, if any.
        anytime_metrics: Per exit, ``{"acc": ..., "acc_top5": ...}`` on the test split.
        fingerprint: What a reused thresholds file must match.
        weights_hash: Hash of the evaluated weights themselves (``weights:...``), stored in
            ``thresholds.json`` next to ``checkpoint_hash`` so ``dmpo predict`` can recognise the same weights
            whether they come from a checkpoint file or from memory.
        temperature: Per-exit temperatures the scores were computed with (``calibration: temperature``),
            with the ECE before/after; ``None`` = raw scores.

    Returns:
        The report dict and a flat dict of summary metrics for the logger.
    """
    costs_g = torch.tensor(costs.exit_gflops, dtype=torch.float64)
    full_g = costs.full_gflops
    top1 = [m["acc"] for m in anytime_metrics]
    top5 = [m["acc_top5"] for m in anytime_metrics] if all("acc_top5" in m for m in anytime_metrics) else None
    unit = protocol_budget_unit(budget_unit)
    curve, points = None, []
    if calibration is None or calibration["scores"].shape[0] == 0:
        rank_zero_warn(
            "no calibration split was evaluated, so no early-exit thresholds can be fitted; only anytime "
            "(per-exit) results are reported. Use a data module whose test_dataloader returns "
            "[test, calibration] (BenchmarkDataModule does)."
        )
    else:
        cal_scores, cal_correct = calibration["scores"].double(), _correct(calibration)
        test_scores, test_correct = test["scores"].double(), _correct(test)
        curve = budgeted_curve(cal_scores, cal_correct, test_scores, test_correct, costs_g, full_g)
        points = operating_points(
            cal_scores, cal_correct, test_scores, test_correct, costs_g, full_g, budgets, unit
        )
    report = build_report(
        costs=costs_g,
        full_cost=full_g,
        anytime_top1=top1,
        anytime_top5=top5,
        exit_blocks=exit_blocks,
        curve=curve,
        operating_points=points,
        full_accuracy=top1[-1],
        extra={
            "exit_rule": exit_rule,
            "calibration": {"method": "none"} if temperature is None else temperature.to_report(),
            "checkpoint_hash": checkpoint_hash,
            "split_indices_file": split_file,
            "num_test": int(test["scores"].shape[0]),
            "num_calibration": 0 if calibration is None else int(calibration["scores"].shape[0]),
            "cost_counting": costs.to_dict(),
            "config": to_jsonable(hparams, default=repr),
        },
    )
    summary: dict[str, float] = {f"test/gflops_exit{k}": float(c) for k, c in enumerate(costs.exit_gflops)}
    summary["test/gflops_full"] = float(full_g)
    for p in points:
        tag = f"budget_{p.budget:g}"
        summary[f"test/{tag}/acc"] = float(p.test_accuracy)
        summary[f"test/{tag}/cost_fraction"] = float(p.test_cost_fraction)
    if report.get("auc"):
        summary["test/auc"] = float(report["auc"]["value"])
    if temperature is not None:
        for k in range(len(costs.exit_gflops)):
            summary[f"test/ece_exit{k}"] = float(temperature.ece_before[k])
            summary[f"test/ece_calibrated_exit{k}"] = float(temperature.ece_after[k])
    if is_global_zero:
        print(format_report_table(report))  # first: a failing write must not cost the user the results
        _write_all(
            report_dir, report, curve, points, test, calibration, checkpoint_hash, fingerprint, weights_hash
        )
        print(f"\nreport, curve, plot and thresholds written to {report_dir}")
    return report, summary


def _write_all(
    report_dir: str,
    report: dict[str, Any],
    curve: Any,
    points: Sequence[Any],
    test: Mapping[str, torch.Tensor],
    calibration: Mapping[str, torch.Tensor] | None,
    checkpoint_hash: str,
    fingerprint: Mapping[str, Any],
    weights_hash: str | None = None,
) -> None:
    """Write every report file into a temporary folder next to ``report_dir``, then move it into place.

    A report folder is complete or absent: a failure (full disk, a crash) leaves no partial report that
    would block a rerun, only the temporary folder is removed.
    """
    check_report_dir(report_dir)
    target = os.path.abspath(report_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the report folder gets the usual mode
    try:
        _write_report_files(
            tmp, report, curve, points, test, calibration, checkpoint_hash, fingerprint, weights_hash
        )
        if not os.path.isdir(target) or not os.listdir(target):
            os.replace(tmp, target)  # atomic; an existing empty folder is replaced
        else:  # a folder the user made holds other files: move the report files in one by one
            _move_files_into(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_files_into(src: str, dst: str) -> None:
    """Move every file of ``src`` into ``dst``; on a failure the files already moved are taken out again."""
    moved: list[str] = []
    try:
        for name in sorted(os.listdir(src)):
            os.replace(os.path.join(src, name), os.path.join(dst, name))
            moved.append(name)
    except OSError:
        for name in moved:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(dst, name))
        raise


def _write_report_files(
    report_dir: str,
    report: dict[str, Any],
    curve: Any,
    points: Sequence[Any],
    test: Mapping[str, torch.Tensor],
    calibration: Mapping[str, torch.Tensor] | None,
    checkpoint_hash: str,
    fingerprint: Mapping[str, Any],
    weights_hash: str | None = None,
) -> None:
    write_json(os.path.join(report_dir, "report.json"), report)
    if curve is not None:
        write_curve_csv(os.path.join(report_dir, "curve.csv"), curve)
        thresholds = {
            "format": THRESHOLDS_FORMAT,
            "fingerprint": dict(fingerprint),
            "checkpoint_hash": checkpoint_hash,
            **({"weights_hash": weights_hash} if weights_hash is not None else {}),
            "budgets": [
                {
                    "budget": p.budget,
                    "unit": p.budget_unit,
                    "thresholds": p.thresholds,
                    "cal_cost_fraction": p.cal_cost / curve.full_cost,
                    "test_accuracy": p.test_accuracy,
                }
                for p in points
            ],
            "temperatures": report["calibration"].get("temperatures"),
            "qs": curve.qs,
            "thresholds_per_q": curve.thresholds,
        }
        write_json(os.path.join(report_dir, "thresholds.json"), thresholds)
    plot_curve(os.path.join(report_dir, "accuracy_vs_flops.png"), report)
    if report["calibration"]["method"] != "none":
        plot_reliability(os.path.join(report_dir, "reliability.png"), report["calibration"])
    cache = {
        "checkpoint_hash": checkpoint_hash,
        "test": dict(test),
        "calibration": calibration,
        "temperatures": report["calibration"].get("temperatures"),  # the scores are of logits / T_k
    }
    atomic_write(os.path.join(report_dir, "exit_outputs.pt"), lambda f: torch.save(cache, f))


THRESHOLDS_OPTION = "model.init_args.evaluation.thresholds_file"


def load_thresholds(
    path: str,
    budget: float | None,
    fingerprint: Mapping[str, Any],
    unit: str = "fraction",
    *,
    num_exits: int | None = None,
    model_hashes: Sequence[str] = (),
    allow_other_checkpoint: bool = False,
) -> list[float]:
    """Thresholds for ``budget`` from a ``thresholds.json`` of ``dmpo test`` (as :func:`_read_thresholds`).

    Raises:
        ConfigFileNotFoundError: If the file is missing.
        ConfigError: If the file cannot be used (a :class:`ValueError`; ``dmpo`` prints it as one line).
    """
    try:
        return _read_thresholds(
            path,
            budget,
            fingerprint,
            unit,
            num_exits=num_exits,
            model_hashes=model_hashes,
            allow_other_checkpoint=allow_other_checkpoint,
        )
    except ConfigError:
        raise
    except FileNotFoundError as err:
        raise ConfigFileNotFoundError(str(err), option=THRESHOLDS_OPTION) from None
    except ValueError as err:
        raise ConfigError(str(err), option=THRESHOLDS_OPTION) from None


def _read_thresholds(
    path: str,
    budget: float | None,
    fingerprint: Mapping[str, Any],
    unit: str = "fraction",
    *,
    num_exits: int | None = None,
    model_hashes: Sequence[str] = (),
    allow_other_checkpoint: bool = False,
) -> list[float]:
    """Thresholds for ``budget`` from a ``thresholds.json`` written by ``dmpo test``.

    Args:
        path: The thresholds file.
        budget: The budget whose thresholds to return.
        fingerprint: What the file's ``fingerprint`` must match (architecture, exits, heads, exit rule).
        unit: ``fraction`` or ``gflops`` (the unit of ``budget``).
        num_exits: Exits of the model; the thresholds list must have exactly one entry per exit.
        model_hashes: Every hash that identifies the model's current weights (``weights:...`` and, when it was
            loaded from a checkpoint file, ``file:...``); the file's ``weights_hash`` or ``checkpoint_hash``
            must be one of them. Empty: not checked.
        allow_other_checkpoint: Accept thresholds fitted on other weights of the same architecture, with a
            warning naming both hashes, instead of refusing them.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a thresholds file, was made for another model (different backbone, exits,
            classes, heads or exit rule) or other weights, holds no entry for ``budget`` (the available ones
            are listed), or the entry is not one number (or ``"inf"``) per exit.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"thresholds file {path} does not exist; `dmpo test` writes thresholds.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"thresholds file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"{path} is not a dmpo thresholds file (format {THRESHOLDS_FORMAT})")
    theirs = data.get("fingerprint", {})
    diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
    if diff:
        details = "; ".join(f"{option_name(k)}: file {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"thresholds file {path} was calibrated for another model ({details})")
    if model_hashes:
        _check_weights(path, data, list(model_hashes), allow_other_checkpoint)
    entries = data.get("budgets", [])
    if budget is None:
        raise ValueError(
            f"choose one of the budgets in {path} with model.init_args.evaluation.predict_budget: "
            f"{[e['budget'] for e in entries]}"
        )
    want = protocol_budget_unit(unit)
    for e in entries:
        if abs(float(e["budget"]) - float(budget)) < 1e-9 and e.get("unit", want) == want:
            return _check_threshold_list(path, budget, e.get("thresholds"), num_exits)
    raise ValueError(
        f"budget {budget} ({unit}) is not in {path}; available: {[e['budget'] for e in entries]} "
        "(run `dmpo test` with it in model.init_args.evaluation.budgets)"
    )


def load_temperatures(path: str, num_exits: int) -> list[float]:
    """Per-exit temperatures stored in a ``thresholds.json`` (all 1.0 when it was made without calibration).

    The thresholds in the file were chosen on scores of ``logits / T_k``, so they are only valid with these
    temperatures; ``dmpo predict`` applies them whatever the model's own ``calibration`` option says.

    Raises:
        ValueError: If the file holds temperatures for another number of exits or non-positive ones.
    """
    with open(path) as f:
        data = json.load(f)
    temps = data.get("temperatures")
    if temps is None:
        return [1.0] * num_exits
    values = [float(t) for t in temps]
    if len(values) != num_exits or not all(t > 0 and t != float("inf") for t in values):
        raise ValueError(
            f"thresholds file {path} holds temperatures {temps}; need {num_exits} finite values > 0"
        )
    return values


def _check_weights(path: str, data: Mapping[str, Any], mine: list[str], allow: bool) -> None:
    """Refuse (or, if ``allow``, warn about) thresholds fitted on weights other than the model's."""
    stored = [h for h in (data.get("weights_hash"), data.get("checkpoint_hash")) if isinstance(h, str)]
    if any(h in mine for h in stored):
        return
    file_says = " / ".join(stored) if stored else "no checkpoint_hash"
    what = (
        f"thresholds file {path} was calibrated on other weights ({file_says}) than this model holds "
        f"({' / '.join(mine)})"
    )
    if allow:
        rank_zero_warn(
            f"{what}; using them anyway because "
            "model.init_args.evaluation.allow_other_checkpoint_thresholds=true: the budgets and accuracies "
            "in that file do not hold for these weights"
        )
        return
    raise ValueError(
        f"{what}: early-exit thresholds only fit the weights they were fitted on. Run `dmpo test` with this "
        "checkpoint and use its thresholds.json, or set "
        "model.init_args.evaluation.allow_other_checkpoint_thresholds=true to use them anyway"
    )


def _check_threshold_list(path: str, budget: float, raw: Any, num_exits: int | None) -> list[float]:
    """One number (or ``"inf"``/``"-inf"``) per exit, no NaN: the thresholds of one budget entry."""
    where = f"thresholds file {path}, budget {budget}"
    allowed = "allowed: one number per exit, 'inf' to disable an exit; NaN/null is not allowed"
    if not isinstance(raw, list):
        raise ValueError(f"{where}: 'thresholds' must be a list, got {type(raw).__name__}; {allowed}")
    if num_exits is not None and len(raw) != num_exits:
        raise ValueError(
            f"{where}: holds {len(raw)} thresholds but the model has {num_exits} exits; {allowed} "
            "(re-run `dmpo test` for this model)"
        )
    values = []
    for k, t in enumerate(raw):
        ok = (isinstance(t, (int, float)) and not isinstance(t, bool)) or t in ("inf", "-inf")
        value = decode_float(t) if ok else float("nan")
        if not ok or value != value:
            raise ValueError(f"{where}: threshold {t!r} of exit {k} is not a number; {allowed}")
        values.append(value)
    return values


def _early_exit_all(module: Any, images: Sequence[torch.Tensor], thresholds: list[float]) -> list[Any]:
    return [module.forward_early_exit(x, thresholds) for x in images]


def time_early_exit(
    module: Any,
    images: Sequence[torch.Tensor],
    budgets: Sequence[Mapping[str, Any]],
    *,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Measured ms/image of the full model and of the real early exit at each budget's thresholds.

    The full model (``forward_static``), the per-batch early exit (``module.forward_early_exit``) and the
    batching engine (:class:`~dmpo_lightning.models.engine.EarlyExitEngine`, at the batches' size) run over
    the same test batches, interleaved, ``warmup`` untimed and ``repeats`` timed passes each (median;
    CUDA-synchronised). Next to each measured speed-up is the FLOPs speed-up at the same thresholds, from the
    exit histogram of this very run and the counted per-exit costs.

    Args:
        module: A ``DMPOModule`` (its model, scoring and counted costs are used).
        images: Test batches ``[B, C, H, W]`` on the module's device.
        budgets: The report's ``budgets`` entries (``budget``, ``budget_unit``, ``thresholds``).
        repeats: Timed passes per path.
        warmup: Untimed passes per path first.

    Returns:
        A JSON-ready dict: device, threads, images, batch size and one row per budget.
    """
    import platform
    import statistics
    import time

    from dmpo_lightning.models.engine import EarlyExitEngine

    model = module.model
    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Any) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    costs = module.exit_costs()
    c_k = torch.tensor(costs.exit_macs, dtype=torch.float64)
    n = sum(int(x.shape[0]) for x in images)
    batch = int(images[0].shape[0]) if images else 0
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for entry in budgets:
                thresholds = [decode_float(t) for t in entry["thresholds"]]
                engine = EarlyExitEngine(module, thresholds, batch_size=max(batch, 1))
                paths: dict[str, Callable[[], object]] = {
                    "full": lambda: [model.forward_static(x) for x in images],
                    "early": functools.partial(_early_exit_all, module, images, thresholds),
                    "engine": functools.partial(engine.run, images),
                }
                exits = torch.cat([module.forward_early_exit(x, thresholds).exit_index for x in images])
                for _ in range(warmup):
                    for fn in paths.values():
                        timed(fn)
                times: dict[str, list[float]] = {name: [] for name in paths}
                for _ in range(repeats):
                    for name, fn in paths.items():
                        times[name].append(timed(fn))
                med = {name: statistics.median(v) for name, v in times.items()}
                hist = torch.bincount(exits.cpu(), minlength=model.num_exits)
                flops_x = costs.full_macs / float((hist.double() / n * c_k).sum())
                rows.append(
                    {
                        "budget": entry["budget"],
                        "budget_unit": entry.get("budget_unit"),
                        "full_ms_per_image": 1e3 * med["full"] / n,
                        "early_ms_per_image": 1e3 * med["early"] / n,
                        "engine_ms_per_image": 1e3 * med["engine"] / n,
                        "measured_speedup": med["full"] / med["early"],
                        "engine_speedup": med["full"] / med["engine"],
                        "flops_speedup": flops_x,
                        "exit_histogram": hist.tolist(),
                    }
                )
    finally:
        model.train(was_training)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": f"{device} ({name or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "images": n,
        "batch_size": batch,
        "repeats": repeats,
        "timing": "median of interleaved passes over the same test images (per-batch early exit and engine)",
        "budgets": rows,
    }


def format_speed_table(speed: Mapping[str, Any]) -> str:
    """Plain-text table of :func:`time_early_exit`'s result."""
    lines = [
        f"measured early-exit speed on {speed['device']}, {speed['images']} test images, batch "
        f"{speed['batch_size']}, {speed['torch_threads']} threads:",
        "  budget  full ms/img  early ms/img  engine ms/img  measured x  engine x  FLOPs x",
    ]
    for r in speed["budgets"]:
        lines.append(
            f"  {r['budget']:>6g}  {r['full_ms_per_image']:>11.3f}  {r['early_ms_per_image']:>12.3f}  "
            f"{r['engine_ms_per_image']:>13.3f}  {r['measured_speedup']:>10.2f}  "
            f"{r['engine_speedup']:>8.2f}  {r['flops_speedup']:>7.2f}"
        )
    return "\n".join(lines)
