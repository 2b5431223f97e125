"""An early-exit engine that keeps every stage's batch full (throughput mode).

A per-batch early-exit forward (:meth:`~dmpo_lightning.models.MultiExitViT.forward_early_exit`) runs the
blocks after exit 1 only on the samples of *that* batch that continue: with half of them leaving at each
exit, the last stages run on a handful of samples, where per-operation overhead (and on a GPU kernel-launch
latency), not arithmetic, sets the time. The engine pools the samples that continue after exit ``k`` from
several input batches (one queue per stage) and runs stage ``k + 1`` only when its queue holds a full batch,
or when the input is exhausted. Results come back in input order, and every decision is taken by the
same :class:`~dmpo_lightning.models.exit_policy.ExitPolicy` as ``forward_early_exit``, so predictions and
exits equal the protocol simulated from all-exit outputs (``exit_rules.exit_scores`` +
``protocol.assign_exits``) with the same thresholds and rule.

Example::

    engine = EarlyExitEngine(model, thresholds, batch_size=64)
    out = engine.run(loader_of_image_batches)  # EarlyExitOutput over all samples, in input order
    for batch_out in engine.stream(batches):   # or one EarlyExitOutput per input batch, in order
        ...
    session = engine.session()                 # or push batches as they arrive (a serving loop):
    done = session.push(images)                # the input batches completed so far, in order
    done += session.flush()                    # at the end of the input: all the rest

Pure torch (no Lightning): usable with only ``torch`` and ``timm`` installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dmpo_lightning.constants import IMAGE_KEY
from dmpo_lightning.models.exit_rules import ExitRule
from dmpo_lightning.models.multi_exit import EarlyExitOutput, MultiExitViT, check_finite_inputs, eval_mode

__all__ = ["EarlyExitEngine", "EngineSession"]


class _Queue:
    """Samples waiting for one stage: a list of chunks (dicts of tensors with a common first dimension)."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Tensor]] = []
        self.size = 0

    def push(self, chunk: dict[str, Tensor]) -> None:
        n = int(chunk["id"].shape[0])
        if n:
            self.chunks.append(chunk)
            self.size += n

    def pop(self, n: int) -> dict[str, Tensor]:
        taken: list[dict[str, Tensor]] = []
        have = 0
        while have < n:
            chunk = self.chunks[0]
            size = int(chunk["id"].shape[0])
            if have + size <= n:
                taken.append(self.chunks.pop(0))
                have += size
            else:
                cut = n - have
                taken.append({k: v[:cut] for k, v in chunk.items()})
                self.chunks[0] = {k: v[cut:] for k, v in chunk.items()}
                have = n
        self.size -= n
        if len(taken) == 1:
            return taken[0]
        return {k: torch.cat([c[k] for c in taken]) for k in taken[0]}


@dataclass
class _Pending:
    """Output buffers of one input batch until all of its samples have left."""

    start: int
    size: int
    prediction: Tensor
    exit_index: Tensor
    score: Tensor
    logits: Tensor
    remaining: int

    def output(self) -> EarlyExitOutput:
        return EarlyExitOutput(self.prediction, self.exit_index, self.score, self.logits)


class EarlyExitEngine:
    """Early exit over a stream of image batches with full batches at every stage.

    Args:
        model: A :class:`~dmpo_lightning.models.MultiExitViT`, or a ``DMPOModule`` (then its model and its
            ``exit_rule`` are used).
        thresholds: One per exit (the last is ignored; ``+inf`` disables an exit).
        batch_size: Samples per stage call (the last calls of a stream may be smaller).
        rule: A registered exit rule (``None``: a ``DMPOModule``'s ``exit_rule``, else ``confidence``).
        last_score: Compute the score of samples that reach the last exit.
        temperatures: One per exit (``calibration: temperature``): scores come from ``logits / T_k``, as in
            ``forward_early_exit``; ``None``: a ``DMPOModule``'s ``exit_temperatures`` (those ``dmpo
            predict`` loaded with the thresholds), raw logits for a bare model.

    Raises:
        ValueError: For bad thresholds, temperatures, rule or batch size.
    """

    def __init__(
        self,
        model: nn.Module,
        thresholds: Sequence[float] | Tensor,
        batch_size: int = 64,
        *,
        rule: ExitRule | None = None,
        last_score: bool = True,
        temperatures: Sequence[float] | Tensor | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(model, MultiExitViT) and isinstance(getattr(model, "model", None), MultiExitViT):
            module: Any = model
            if rule is None:
                rule = module.exit_rule
            stored = getattr(module, "exit_temperatures", None)
            if temperatures is None and isinstance(stored, Tensor) and not bool((stored == 1).all()):
                temperatures = stored
            model = module.model
        if not isinstance(model, MultiExitViT):
            raise ValueError(f"model must be a MultiExitViT or a DMPOModule; got {type(model).__name__}")
        self.model = model
        self.batch_size = batch_size
        self.policy = model.early_exit_policy(
            thresholds,
            rule or "confidence",
            last_score=last_score,
            temperatures=temperatures,
        )

    # ------------------------------------------------------------------------------------------ public
    def run(self, batches: Iterable[Any]) -> EarlyExitOutput:
        """Early exit over every batch; one :class:`EarlyExitOutput` for all samples, in input order.

        Args:
            batches: Image tensors ``[B, C, H, W]`` (or mappings with an ``"image"`` entry, or tuples whose
                first item is the images), of any sizes.
        """
        outs = list(self.stream(batches))
        if not outs:
            device = _device_of(self.model)
            return EarlyExitOutput(
                torch.empty(0, dtype=torch.long, device=device),
                torch.empty(0, dtype=torch.long, device=device),
                torch.empty(0, dtype=torch.float32, device=device),
                torch.empty(0, self.model.num_classes, device=device),
            )
        return EarlyExitOutput(*(torch.cat([getattr(o, f) for o in outs]) for f in _FIELDS))

    def stream(self, batches: Iterable[Any]) -> Iterator[EarlyExitOutput]:
        """Yield one :class:`EarlyExitOutput` per input batch, in input order, as soon as it is complete.

        The model runs in eval mode under ``torch.no_grad`` while the generator runs; its previous mode is
        restored when the generator finishes or is closed.
        """
        with eval_mode(self.model):
            session = EngineSession(self, _switch_mode=False)
            for batch in batches:
                yield from session.push(batch)
            yield from session.flush()

    def session(self) -> EngineSession:
        """An empty :class:`EngineSession`: push batches one by one, then flush (for serving loops)."""
        return EngineSession(self)


class EngineSession:
    """One pass of an :class:`EarlyExitEngine` over input batches that arrive one at a time.

    :meth:`push` queues a batch and runs every stage that holds a full batch; it returns the input batches
    that are complete (all their samples have left), oldest first. :meth:`flush` runs the remaining samples
    through partial batches. Every pushed batch comes back exactly once, in push order, also empty ones.
    Each call runs in eval mode (the model's previous mode restored) without gradients.
    """

    def __init__(self, engine: EarlyExitEngine, *, _switch_mode: bool = True) -> None:
        self.engine = engine
        self._switch_mode = _switch_mode  # False inside ``stream``, which holds eval mode itself
        self.model = engine.model
        self.device = _device_of(engine.model)
        self.queues = [_Queue() for _ in range(engine.model.num_exits)]
        self.pending: list[_Pending] = []
        self.next_id = 0

    def push(self, batch: Any) -> list[EarlyExitOutput]:
        """Add one input batch (see :meth:`EarlyExitEngine.run`); return the batches now complete."""
        x = _images(batch).to(self.device, non_blocking=True)
        n = int(x.shape[0])
        device = self.device
        self.pending.append(
            _Pending(
                start=self.next_id,
                size=n,
                prediction=torch.empty(n, dtype=torch.long, device=device),
                exit_index=torch.empty(n, dtype=torch.long, device=device),
                score=torch.empty(n, dtype=torch.float32, device=device),
                logits=torch.empty(n, self.model.num_classes, dtype=x.dtype, device=device),
                remaining=n,
            )
        )
        self.queues[0].push({"id": torch.arange(self.next_id, self.next_id + n, device=device), "x": x})
        self.next_id += n
        self._drain(flush=False)
        done = []
        while self.pending and self.pending[0].remaining == 0:
            done.append(self.pending.pop(0).output())
        return done

    def flush(self) -> list[EarlyExitOutput]:
        """Run every queued sample to its exit; return all batches not returned yet, in order."""
        self._drain(flush=True)
        for p in self.pending:
            if p.remaining:  # cannot happen: every sample leaves at the last exit at the latest
                raise RuntimeError(f"early-exit engine lost {p.remaining} samples of a batch")
        done = [p.output() for p in self.pending]
        self.pending = []
        return done

    @property
    def waiting(self) -> int:
        """Samples pushed whose batch has not been returned yet."""
        return sum(p.size for p in self.pending)

    def _drain(self, flush: bool) -> None:
        """Run stages in order while they hold a full batch (``flush``: until every queue is empty)."""
        size = self.engine.batch_size
        mode = eval_mode(self.model) if self._switch_mode else contextlib.nullcontext()
        with mode, torch.no_grad():
            for k, queue in enumerate(self.queues):
                while queue.size >= size or (flush and queue.size > 0):
                    self._run_stage(k, queue.pop(min(size, queue.size)))

    def _run_stage(self, k: int, items: dict[str, Tensor]) -> None:
        ids, x = items.pop("id"), items.pop("x")
        policy = self.engine.policy
        tokens, logits = self.model.run_stage(k, x, head=policy.needs_head(k))
        if logits is None:  # disabled exit of a local rule: everyone continues, state unchanged
            self.queues[k + 1].push({"id": ids, "x": tokens, **items})
            return
        leave, score, pred, carry = policy.decide(k, logits, items)
        if leave is None:
            self._record(ids, pred, k, score, logits)
            return
        if bool(leave.any()):
            self._record(ids[leave], pred[leave], k, score[leave], logits[leave])
            stay = ~leave
            ids, tokens = ids[stay], tokens[stay]
            carry = {name: value[stay] for name, value in carry.items()}
        self.queues[k + 1].push({"id": ids, "x": tokens, **carry})

    def _record(self, ids: Tensor, pred: Tensor, k: int, score: Tensor, logits: Tensor) -> None:
        if ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        for p in self.pending:
            if p.start > hi or p.start + p.size <= lo:
                continue
            sel = (ids >= p.start) & (ids < p.start + p.size)
            local = ids[sel] - p.start
            p.prediction[local] = pred[sel]
            p.exit_index[local] = k
            p.score[local] = score[sel].float()
            p.logits[local] = logits[sel].to(p.logits.dtype)
            p.remaining -= int(local.numel())


_FIELDS = ("prediction", "exit_index", "score", "logits")


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, Mapping) and IMAGE_KEY in batch:
        x = batch[IMAGE_KEY]
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
    else:
        raise ValueError(
            f"each batch must be an image tensor [B, C, H, W], a mapping with an {IMAGE_KEY!r} entry or a "
            f"tuple (images, ...); got {type(batch).__name__}"
        )
    if x.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W]; got shape {tuple(x.shape)}")
    check_finite_inputs(x)
    return x
