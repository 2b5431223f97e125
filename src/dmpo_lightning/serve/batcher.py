"""Pool the images of many requests through the batch-filling early-exit engine, one queue set per budget.

A server hands :class:`RequestBatcher` every request it collected in one batching window
(:meth:`RequestBatcher.run`); the images go into the :class:`~dmpo_lightning.models.engine.EarlyExitEngine`
session of the request's budget, whose per-stage queues keep the samples that continue after an exit until
a stage holds a full batch. A request comes back once all its images have left, in arrival order per
budget. When the server has no full window waiting it calls ``run(..., flush=True)`` and every queued sample
runs to its exit at once, so a quiet server answers after one batching timeout.

Requests at different budgets do not share a stage call: their thresholds differ, and the engine decides
with one set of thresholds per session. ``full`` runs every block and only the last exit (the network
without early exits, as the baseline of the load benchmark).

The ONNX backend has no pooling engine: each window's images of one budget run as one batch through the
stage graphs (batch compaction inside the window only).

Pure torch: no web framework is imported.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.models.engine import EarlyExitEngine, EngineSession
from dmpo_lightning.models.exit_rules import is_local_rule
from dmpo_lightning.models.multi_exit import EarlyExitOutput
from dmpo_lightning.predictions import PredictionRow
from dmpo_lightning.serve.payload import FULL

__all__ = ["Completed", "RequestBatcher", "prediction_rows"]

Budget = float | str


@dataclass
class Completed:
    """One request whose images have all left: ``key`` as submitted, the budget used and the outputs."""

    key: Hashable
    budget: Budget
    output: EarlyExitOutput


def prediction_rows(
    predictor: EarlyExitPredictor,
    output: EarlyExitOutput,
    gflops: Sequence[float],
    names: Sequence[str | None] | None = None,
) -> list[PredictionRow]:
    """The package's prediction rows of one request (``exit`` numbered from 1, as in the reports).

    Args:
        predictor: Gives the class names.
        output: The engine's output for the request's images.
        gflops: Counted GFLOPs of leaving at each exit (0-based) under the budget that was used.
        names: A name per image (the row's ``path``: an uploaded file's name), ``None`` where there is none.
    """
    confidence = output.logits.float().softmax(dim=-1).max(dim=-1).values.tolist()
    score = output.score.float().tolist()
    rows = []
    for i, (c, e) in enumerate(zip(output.prediction.tolist(), output.exit_index.tolist(), strict=True)):
        rows.append(
            PredictionRow(
                class_index=int(c),
                class_name=predictor.class_names[int(c)],
                exit=int(e) + 1,
                confidence=float(confidence[i]),
                score=float(score[i]) if math.isfinite(score[i]) else None,
                gflops=float(gflops[int(e)]),
                path=names[i] if names is not None else None,
            )
        )
    return rows


class RequestBatcher:
    """Early exit over the requests of a server, every stage on full batches while requests keep coming.

    Args:
        predictor: A loaded :class:`~dmpo_lightning.deploy.predictor.EarlyExitPredictor` (torch backend:
            pooled through the engine; ONNX backend: one batch per window and budget).
        batch_size: Samples per stage call of the engine.

    Raises:
        ValueError: For a bad ``batch_size``.
    """

    def __init__(self, predictor: EarlyExitPredictor, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.predictor = predictor
        self.batch_size = batch_size
        self._thresholds: dict[Budget, list[float]] = {}
        self._sessions: dict[Budget, EngineSession] = {}
        self._keys: dict[Budget, list[Hashable]] = {}

    # ------------------------------------------------------------------------------------------ budgets
    def thresholds(self, budget: Budget) -> list[float]:
        """Per-exit thresholds of a calibrated budget, or of ``full`` (every exit but the last disabled)."""
        if budget not in self._thresholds:
            if budget == FULL:
                k = self.predictor.num_exits
                self._thresholds[budget] = [math.inf] * (k - 1) + [-math.inf]
            else:
                previous = self.predictor.budget
                try:
                    self.predictor.set_budget(float(budget))
                    self._thresholds[budget] = self.predictor.thresholds
                finally:
                    self.predictor.set_budget(previous)
        return self._thresholds[budget]

    def exit_gflops(self, budget: Budget) -> list[float]:
        """What leaving at each exit costs under ``budget`` (counted GFLOPs of the artefact).

        Exit ``k`` costs the embedding, the blocks up to it and the heads of every exit passed. Under
        ``full`` the torch backend skips the heads of disabled exits for a rule that scores each exit on
        its own logits (``confidence``, ``entropy``): the last exit then costs the full network's counted
        GFLOPs.
        """
        costs = list(self.predictor.exit_gflops)
        manifest_costs = self.predictor.manifest["costs"]
        skips_heads = self.predictor.model is not None and is_local_rule(self.predictor.exit_rule)  # type: ignore[arg-type]
        if budget == FULL and skips_heads and "full_gflops" in manifest_costs:
            costs[-1] = float(manifest_costs["full_gflops"])
        return costs

    # ------------------------------------------------------------------------------------------ running
    @property
    def waiting(self) -> int:
        """Requests submitted and not returned yet."""
        return sum(len(keys) for keys in self._keys.values())

    def _session(self, budget: Budget) -> EngineSession:
        if budget not in self._sessions:
            assert self.predictor.model is not None
            engine = EarlyExitEngine(
                self.predictor.model,
                self.thresholds(budget),
                batch_size=self.batch_size,
                rule=self.predictor.exit_rule,  # type: ignore[arg-type]
                temperatures=self.predictor.temperatures,
            )
            self._sessions[budget] = engine.session()
            self._keys[budget] = []
        return self._sessions[budget]

    def run(
        self, requests: Sequence[tuple[Hashable, torch.Tensor, Budget]], *, flush: bool = False
    ) -> list[Completed]:
        """Add the requests of one batching window; return every request now complete.

        Args:
            requests: ``(key, images [B, C, H, W], budget)`` per request; ``budget`` is a calibrated budget
                of the artefact or ``full``.
            flush: Run every queued sample to its exit (no request keeps waiting).

        Returns:
            The completed requests (of this and of earlier windows), oldest first per budget.
        """
        if self.predictor.model is None:
            return self._run_onnx(requests)
        done: list[Completed] = []
        for key, images, budget in requests:
            session = self._session(budget)
            self._keys[budget].append(key)
            for out in session.push(images):
                done.append(Completed(self._keys[budget].pop(0), budget, out))
        if flush:
            for budget, session in self._sessions.items():
                for out in session.flush():
                    done.append(Completed(self._keys[budget].pop(0), budget, out))
        return done

    def _run_onnx(self, requests: Sequence[tuple[Hashable, torch.Tensor, Budget]]) -> list[Completed]:
        stages: Any = self.predictor.onnx_stages
        by_budget: dict[Budget, list[tuple[Hashable, torch.Tensor]]] = {}
        for key, images, budget in requests:
            by_budget.setdefault(budget, []).append((key, images))
        done = []
        for budget, items in by_budget.items():
            x = torch.cat([images for _, images in items])
            pred, exit_index, score, logits = stages.run(
                x, self.thresholds(budget), self.predictor.exit_rule, temperatures=self.predictor.temperatures
            )
            start = 0
            for key, images in items:
                n = int(images.shape[0])
                part = slice(start, start + n)
                out = EarlyExitOutput(pred[part], exit_index[part], score[part], logits[part])
                done.append(Completed(key, budget, out))
                start += n
        return done
