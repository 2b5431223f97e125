"""Helpers of the real-early-exit tests: a tiny module, a custom exit rule (margin) and threshold picking."""

from __future__ import annotations

import torch

from dmpo_lightning import DMPOModule
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.models.multi_exit import ExitOptions
from support.builders import TINY_MODULE

TINY = {**TINY_MODULE, "num_classes": 5}
SMALL_HEADS = ExitOptions(moment_dim=32, cov_dim=8)


def margin_scores(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 minus top-2 softmax probability per exit (a rule the package does not ship)."""
    probs = torch.stack(logits, dim=1).float().softmax(dim=-1)
    top = probs.topk(2, dim=-1)
    return top.values[..., 0] - top.values[..., 1], top.indices[..., 0]


class MarginModule(DMPOModule):
    def score_exits(self, logits):
        return margin_scores(logits)


class LocalMarginModule(MarginModule):
    score_exits_is_local = True


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
