"""Measured speed of the real early exit: ``dmpo test --evaluation.time_early_exit N``.

:func:`time_early_exit` times the full model, the per-batch early exit and the batching engine on the same
test images at each budget's thresholds; :func:`format_speed_table` prints the result.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from dmpo_lightning.files import decode_float
from dmpo_lightning.models.engine import EarlyExitEngine

__all__ = ["format_speed_table", "time_early_exit"]


def _early_exit_all(
    module: Any, images: Sequence[torch.Tensor], thresholds: list[float], rule: str | None
) -> list[Any]:
    return [module.forward_early_exit(x, thresholds, rule) for x in images]


def time_early_exit(
    module: Any,
    images: Sequence[torch.Tensor],
    budgets: Sequence[Mapping[str, Any]],
    *,
    repeats: int = 3,
    warmup: int = 1,
    rule: str | None = None,
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
        rule: The exit rule the thresholds were fitted for (``None``: the module's ``exit_rule``).

    Returns:
        A JSON-ready dict: device, threads, images, batch size and one row per budget.
    """
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
                engine = EarlyExitEngine(module, thresholds, batch_size=max(batch, 1), rule=rule)
                paths: dict[str, Callable[[], object]] = {
                    "full": lambda: [model.forward_static(x) for x in images],
                    "early": functools.partial(_early_exit_all, module, images, thresholds, rule),
                    "engine": functools.partial(engine.run, images),
                }
                exits = torch.cat([module.forward_early_exit(x, thresholds, rule).exit_index for x in images])
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
