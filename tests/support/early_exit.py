"""Helpers of the real-early-exit tests: a tiny module, a registered custom exit rule (margin), thresholds."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from dmpo_lightning import DMPOModule
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY, exit_scores, register_exit_rule
from dmpo_lightning.models.multi_exit import ExitOptions, MultiExitViT
from support.builders import TINY_MODULE
from support.runs import TINY_HP

TINY = {**TINY_MODULE, "num_classes": 5}
SMALL_HEADS = ExitOptions(moment_dim=32, cov_dim=8)
TEMPERATURES = [0.4, 2.5, 0.6, 1.0]
"""Per-exit temperatures far enough from 1 to change which exit some samples leave at."""


MARGIN = "test_margin"
"""A rule the package does not ship: top-1 minus top-2 softmax probability (see :func:`registered_margin`)."""


def _margin(probs: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


@contextlib.contextmanager
def registered_margin() -> Iterator[None]:
    """Register :data:`MARGIN` for the tests inside, as a plugin would; dropped again afterwards."""
    if MARGIN in EXIT_RULE_REGISTRY:
        yield
        return
    register_exit_rule(MARGIN)(_margin)
    try:
        yield
    finally:
        EXIT_RULE_REGISTRY._entries.pop(MARGIN, None)


def margin_scores(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-exit margin scores and predictions ``[B, K]`` of the registered margin rule."""
    return exit_scores(logits, MARGIN)


class MarginModule(DMPOModule):
    """A subclass that exits by the margin rule."""

    exit_rule = MARGIN


def randomise(model: torch.nn.Module, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)


def between(column: torch.Tensor, q: float) -> float:
    """A threshold strictly between two observed scores near quantile q (never equal to a score)."""
    s = column.sort().values
    i = min(max(int(q * len(s)), 1), len(s) - 1)
    return float((s[i - 1] + s[i]) / 2)


def simulated(scores: torch.Tensor, preds: torch.Tensor, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    exits = assign_exits(scores, torch.tensor(thresholds, dtype=torch.float64))
    return exits, preds.gather(1, exits[:, None]).squeeze(1)


def thresholded_module() -> DMPOModule:
    """A tiny module (``support.runs.TINY_HP``) with perturbed trainable weights and median thresholds.

    Its buffers hold thresholds at each early exit's median confidence on random images (so samples spread
    over the exits) and temperatures 1; ``train_steps`` stays 0 (writers refuse it unless allowed).
    """
    torch.manual_seed(0)
    m = DMPOModule(**TINY_HP)
    with torch.no_grad():
        for p in m.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        scores, _ = exit_scores(m.model(x), m.exit_rule)
    m.exit_thresholds.copy_(torch.tensor([float(scores[:, k].quantile(0.5)) for k in range(3)] + [-math.inf]))
    return m


def record_stage_calls(monkeypatch) -> list[tuple[int, int]]:
    """Records (stage, batch size) of every ``MultiExitViT.run_stage`` call from now on."""
    calls: list[tuple[int, int]] = []
    original = MultiExitViT.run_stage

    def spy(self, k, inputs, *, head=True):
        calls.append((k, int(inputs.shape[0])))
        return original(self, k, inputs, head=head)

    monkeypatch.setattr(MultiExitViT, "run_stage", spy)
    return calls
