"""Optimizer defaults: AdamW over trainable parameters, warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["default_optimizer", "param_groups", "warmup_cosine"]


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """AdamW with lr 1e-3 and weight decay 0.05 (METHOD.md section 4; scale lr by batch / 256)."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters in groups by component (``trunk``, ``bypass``, ``heads``).

    Biases, norm weights, prompt tokens and other 1-d parameters get no weight decay. Group names are kept
    in the ``name`` key so learning-rate monitors can tell them apart.
    """
    groups: list[dict[str, Any]] = []
    for component, named in model.parameter_groups().items():
        decay = [p for n, p in named if p.ndim > 1 and "peft_prompts" not in n]
        no_decay = [p for n, p in named if not (p.ndim > 1 and "peft_prompts" not in n)]
        if decay:
            groups.append({"params": decay, "name": component})
        if no_decay:
            groups.append({"params": no_decay, "name": f"{component}_no_decay", "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters; check the peft setting")
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to ``min_factor``.

    Examples:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = warmup_cosine(opt, total_steps=10, warmup_fraction=0.2)
        >>> [round(sched.lr_lambdas[0](s), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    total_steps = max(int(total_steps), 1)
    warmup = round(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
