"""How many replicas each exit stage needs: its share of the traffic times its cost (pure, no Ray).

Stage ``k`` runs the blocks from exit ``k - 1`` to exit ``k`` plus head ``k``; its counted cost is
``C_k - C_{k-1}`` (the artefact's cumulative exit costs). A fraction ``r_k`` of the samples reaches it: all
of them for stage 1, then everyone who did not leave earlier, from the exit histogram of the budget's
calibration (or test) split. Stage ``k``'s work per input sample is ``r_k (C_k - C_{k-1})``; replicas are
shared out in proportion to it, at least one per stage.

Example:
    >>> plan = plan_replicas([1.0, 2.0, 3.0, 4.0], [50, 25, 15, 10], total=8)
    >>> plan.replicas, [round(r, 2) for r in plan.reach]
    ([3, 2, 2, 1], [1.0, 0.5, 0.25, 0.1])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ReplicaPlan", "exit_histogram", "plan_replicas", "stage_costs"]


@dataclass(frozen=True)
class ReplicaPlan:
    """Replicas per stage and why.

    Attributes:
        replicas: Replicas of each stage (stage 1 first).
        reach: Share of the samples that reach each stage.
        cost: Counted GFLOPs of each stage (its blocks and its exit head).
        load: ``reach * cost``, the stage's GFLOPs per input sample.
        source: Where the exit histogram came from.
    """

    replicas: list[int]
    reach: list[float]
    cost: list[float]
    load: list[float]
    source: str


def stage_costs(exit_gflops: Sequence[float]) -> list[float]:
    """Per-stage GFLOPs from the cumulative cost of leaving at each exit."""
    out, previous = [], 0.0
    for c in exit_gflops:
        out.append(float(c) - previous)
        previous = float(c)
    return out


def exit_histogram(manifest: Mapping[str, Any], budget: float | str) -> tuple[list[float] | None, str]:
    """The exit histogram of ``budget`` in an artefact (calibration split, else test split).

    ``full`` (the whole network) sends every sample to the last exit. ``(None, reason)`` if the artefact
    holds no histogram for the budget.

    Raises:
        ValueError: If the artefact has no such budget.
    """
    k = len(manifest["costs"]["exit_gflops"])
    if budget == "full":
        return [0.0] * (k - 1) + [1.0], "full: every sample runs every stage"
    for point in manifest["operating_points"]:
        if abs(float(point["budget"]) - float(budget)) <= 1e-9 * max(1.0, abs(float(budget))):
            for split in ("calibration", "test"):
                hist = (point.get(split) or {}).get("exit_histogram")
                if hist and len(hist) == k and sum(hist) > 0:
                    return [float(h) for h in hist], f"exit histogram of the {split} split at budget {budget}"
            return None, f"the artefact holds no exit histogram for budget {budget}"
    raise ValueError(f"the artefact has no budget {budget}")


def plan_replicas(
    exit_gflops: Sequence[float], histogram: Sequence[float], total: int, source: str = ""
) -> ReplicaPlan:
    """Share ``total`` replicas between the stages in proportion to ``reach * cost`` (at least 1 each).

    Args:
        exit_gflops: Cumulative counted GFLOPs of leaving at each exit.
        histogram: Samples (or shares) leaving at each exit.
        total: Replicas to share out (raised to the number of stages if smaller).
        source: Where ``histogram`` came from (kept in the plan).

    Raises:
        ValueError: For mismatched lengths, negative counts or ``total < 1``.
    """
    k = len(exit_gflops)
    if len(histogram) != k or any(h < 0 for h in histogram) or not sum(histogram) > 0:
        raise ValueError(f"need one exit count >= 0 per exit ({k}), not all zero; got {list(histogram)}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"the total number of replicas must be a positive integer, got {total!r}")
    n = float(sum(histogram))
    reach = [1.0 - sum(histogram[:j]) / n for j in range(k)]
    cost = stage_costs(exit_gflops)
    load = [r * c for r, c in zip(reach, cost, strict=True)]
    total = max(total, k)
    weights = [max(w, 0.0) for w in load]
    if sum(weights) <= 0:
        weights = [1.0] * k
    spare = total - k  # one replica each first, the rest by largest remainder of the proportional share
    share = [spare * w / sum(weights) for w in weights]
    extra = [math.floor(s) for s in share]
    order = sorted(range(k), key=lambda j: share[j] - extra[j], reverse=True)
    for j in order[: spare - sum(extra)]:
        extra[j] += 1
    return ReplicaPlan([1 + e for e in extra], reach, cost, load, source)
