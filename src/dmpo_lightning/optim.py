"""Optimizer defaults: AdamW over trainable parameters, warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any, Protocol

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "check_learning_rates",
    "default_optimizer",
    "format_parameter_budget",
    "param_groups",
    "warmup_cosine",
]


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
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.1,
    min_factor: float = 0.0,
    *,
    warmup_steps: int | None = None,
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to ``min_factor``.

    One ``LambdaLR`` whatever the length: during the ``w = round(total_steps * warmup_fraction)`` warm-up
    steps (or ``warmup_steps``) the factor is ``(step + 1) / w``; then ``min_factor + (1 - min_factor) *
    (1 + cos(pi * (step - w) / (total_steps - w))) / 2``, reaching ``min_factor`` at ``total_steps`` and
    staying there. A resumed run restores the step count, not the plan, so a run resumed to train longer
    follows the cosine of its new length from the step it stopped at (``DMPOModule`` keeps the warm-up it
    had: ``warmup_steps``).

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
    warmup = round(total_steps * warmup_fraction) if warmup_steps is None else min(warmup_steps, total_steps)
    cosine_steps = max(1, total_steps - warmup)
    # a function (not an object): LambdaLR's state then holds the step count only, never the plan
    return _Replannable(optimizer, partial(_warmup_cosine_factor, warmup, cosine_steps, float(min_factor)))


class _Replannable(LambdaLR):
    """A ``LambdaLR`` that, restored from a checkpoint, sets the learning rate of that step by its own plan.

    The optimizer's state restores the learning rate the interrupted run used last; under a new plan (a run
    resumed to train longer) the first resumed step would run at that stale value.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count, then set each group's learning rate for that step under this plan."""
        super().load_state_dict(state_dict)
        for group, base, factor in zip(
            self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(self.last_epoch)


def _warmup_cosine_factor(warmup: int, cosine_steps: int, min_factor: float, step: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = min(step - warmup, cosine_steps)
    return min_factor + (1.0 - min_factor) * (1.0 + math.cos(math.pi * t / cosine_steps)) / 2.0


def check_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Refuse a negative, infinite or NaN learning rate before the first step.

    Raises:
        ValueError: Naming the option (``model.init_args.optimizer.init_args.lr``) and what is allowed.
    """
    for group in optimizer.param_groups:
        lr = float(group.get("lr", 0.0))
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(
                f"model.init_args.optimizer: learning rate {lr} is not allowed; the learning rate must be a "
                "finite number >= 0 (e.g. --model.init_args.optimizer.init_args.lr=0.001)"
            )


def format_parameter_budget(counts: dict[str, int]) -> str:
    """``trainable parameters: trunk 2,208, ..., total 49,708 (17.53% of all)`` (``count_parameters()``)."""
    share = 100 * counts["trainable"] / max(counts["total"], 1)
    return (
        "trainable parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        + f" ({share:.2f}% of all)"
    )
