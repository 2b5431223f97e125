"""Fold a trained PEFT method into the frozen weights, so the tuned trunk costs the base model's FLOPs.

Which methods can be folded is declared where they are registered
(:func:`~dmpo_lightning.models.adapters.register_peft`'s ``mergeable``): each module such a method adds
has a ``merged()`` method returning a plain module that computes the same function. LoRA is one:
``LoRALinear(x) = W x + b + s * B (A x)`` equals ``Linear(W + s * B A, b)``. AdaptFormer is not: its
bottleneck is a parallel branch with a ReLU between two projections, a non-linear function of the input that
no single weight matrix reproduces; VPT prompts are extra tokens, not weights either.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from dmpo_lightning.models.adapters import PEFT_REGISTRY

__all__ = ["MergeableModule", "check_mergeable", "is_mergeable", "merge_peft"]


@runtime_checkable
class MergeableModule(Protocol):
    """A module a mergeable PEFT method added: ``merged()`` is the plain module to put in its place."""

    def merged(self) -> nn.Module:
        """The plain module computing the same function (frozen)."""
        ...


def is_mergeable(method: str) -> bool:
    """Whether the registered PEFT ``method`` folds into the frozen weights."""
    return PEFT_REGISTRY.get(method).mergeable


def check_mergeable(method: str) -> None:
    """Raise with the reason if a PEFT method cannot be folded into the frozen weights.

    Raises:
        ValueError: If ``method`` is not registered with ``mergeable=True``.
    """
    if is_mergeable(method):
        return
    mergeable = [name for name in PEFT_REGISTRY.names() if PEFT_REGISTRY.get(name).mergeable]
    raise ValueError(
        f"--merge folds a PEFT method into the frozen weights, which only methods registered as mergeable "
        f"can do ({', '.join(mergeable)}); this model was trained with peft.method={method!r}, whose trained "
        "modules are not a weight update (an adapter branch, prompt tokens, or nothing to fold) and run as "
        "trained: export it without --merge"
    )


def merge_peft(model: nn.Module) -> list[str]:
    """Replace every PEFT module that has ``merged()`` by the plain module it returns, in place.

    Args:
        model: Any module (e.g. a :class:`~dmpo_lightning.models.MultiExitViT`).

    Returns:
        Names of the replaced modules (their parameters are now ``<name>.weight`` / ``<name>.bias``).
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, MergeableModule):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
        replaced.append(name)
    return replaced
