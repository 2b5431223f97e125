"""Optimizer defaults: AdamW over trainable parameters, warm-up + cosine learning-rate schedule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

__all__ = ["default_optimizer", "format_parameter_budget", "param_groups", "warmup_cosine"]


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """AdamW with lr 1e-3 and weight decay 0.05 (METHOD.md section 4; scale lr by batch / 256)."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


class _NamedParameters:
    """What :func:`timm.optim.param_groups_weight_decay` reads of a module: ``named_parameters()``."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self._named = named

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self._named


class _HasParameterGroups(Protocol):
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]: ...


def param_groups(model: _HasParameterGroups) -> list[dict[str, Any]]:
    """Trainable parameters in groups by component (``trunk``, ``bypass``, ``heads``).

    Which parameters get no weight decay is timm's rule (:func:`timm.optim.param_groups_weight_decay`):
    biases, norm weights and other 1-d parameters, plus the names (or ``fnmatch`` patterns) the model's
    ``no_weight_decay()`` returns (for ``MultiExitViT``: the trunk's position embedding, class/register
    tokens and VPT prompts). Group names are kept in the ``name`` key so learning-rate monitors can tell them
    apart; the decayed groups keep the optimizer's own ``weight_decay``.

    Raises:
        ValueError: If nothing is trainable.
    """
    no_decay_names = getattr(model, "no_weight_decay", None)
    skip = set(no_decay_names()) if callable(no_decay_names) else set()
    groups: list[dict[str, Any]] = []
    for component, named in model.parameter_groups().items():
        split = param_groups_weight_decay(
            _NamedParameters(named),  # type: ignore[arg-type]
            weight_decay=1.0,  # any non-zero value: the decayed group's key is dropped below
            no_weight_decay_list=skip,
        )
        decay = [p for g in split if g["weight_decay"] != 0.0 for p in g["params"]]
        no_decay = [p for g in split if g["weight_decay"] == 0.0 for p in g["params"]]
        if decay:
            groups.append({"params": decay, "name": component})
        if no_decay:
            groups.append({"params": no_decay, "name": f"{component}_no_decay", "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters; check the peft setting")
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to ``min_factor``.

    torch's ``SequentialLR(LinearLR, CosineAnnealingLR)``: during the ``w = round(total_steps *
    warmup_fraction)`` warm-up steps the factor is ``(step + 1) / w``; then
    ``min_factor + (1 - min_factor) * (1 + cos(pi * (step - w) / (total_steps - w))) / 2``, reaching
    ``min_factor`` at ``total_steps``.

    Examples:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = warmup_cosine(opt, total_steps=10, warmup_fraction=0.2)
        >>> lrs = []
        >>> for _ in range(11):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3))
        ...     opt.step()
        ...     sched.step()
        >>> [lrs[s] for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    total_steps = max(int(total_steps), 1)
    warmup = round(total_steps * warmup_fraction)
    base_lrs = {float(g["lr"]) for g in optimizer.param_groups}
    if min_factor != 0.0 and len(base_lrs) > 1:
        raise ValueError(
            f"min_factor={min_factor} needs one learning rate for every parameter group (torch's "
            f"CosineAnnealingLR has one eta_min); got {sorted(base_lrs)}. Use min_factor=0"
        )
    eta_min = min_factor * max(base_lrs)
    cosine_steps = max(1, total_steps - warmup)
    if warmup <= 1:  # a one-step warm-up has factor 1: the cosine alone
        if warmup == 1:
            cosine_steps = max(1, total_steps - 1)
            return SequentialLR(
                optimizer,
                [LinearLR(optimizer, 1.0, 1.0, total_iters=1), _cosine(optimizer, cosine_steps, eta_min)],
                milestones=[1],
            )
        return _cosine(optimizer, cosine_steps, eta_min)
    linear = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [linear, _cosine(optimizer, cosine_steps, eta_min)], milestones=[warmup])


def _cosine(optimizer: torch.optim.Optimizer, steps: int, eta_min: float) -> CosineAnnealingLR:
    return CosineAnnealingLR(optimizer, T_max=steps, eta_min=eta_min)


def format_parameter_budget(counts: dict[str, int]) -> str:
    """``trainable parameters: trunk 2,208, ..., total 49,708 (17.53% of all)`` (``count_parameters()``)."""
    share = 100 * counts["trainable"] / max(counts["total"], 1)
    return (
        "trainable parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        + f" ({share:.2f}% of all)"
    )
