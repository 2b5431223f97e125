"""Per-exit compute cost, counted with ``torch.utils.flop_counter.FlopCounterMode`` (never typed in)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dmpo_lightning.models.backbone import explicit_attention
from dmpo_lightning.models.multi_exit import MultiExitViT

__all__ = ["GIGA", "ExitCosts", "count_exit_costs", "count_macs"]

GIGA = 1e9
UNIT = "GFLOPs (10^9 multiply-accumulates, the field's convention)"


@dataclass(frozen=True)
class ExitCosts:
    """Counted cost of the model, in multiply-accumulates (MACs, the field's "FLOPs").

    Attributes:
        exit_macs: ``C_k``: embedding + blocks up to exit k + heads of exits 0..k (cumulative), per exit.
        full_macs: ``F_full``: embedding + all blocks + the final head, no early-exit heads.
        input_shape: ``(C, H, W)`` the costs were counted at (batch of one).
    """

    exit_macs: tuple[float, ...]
    full_macs: float
    input_shape: tuple[int, ...]

    @property
    def exit_gflops(self) -> tuple[float, ...]:
        """``C_k`` in GFLOPs (10^9 MACs)."""
        return tuple(c / GIGA for c in self.exit_macs)

    @property
    def full_gflops(self) -> float:
        """``F_full`` in GFLOPs (10^9 MACs)."""
        return self.full_macs / GIGA

    @property
    def fractions(self) -> tuple[float, ...]:
        """``C_k / F_full``."""
        return tuple(c / self.full_macs for c in self.exit_macs)

    def to_dict(self) -> dict:
        """JSON-ready dict with GFLOPs and fractions."""
        d = asdict(self)
        d.update(
            exit_gflops=list(self.exit_gflops),
            full_gflops=self.full_gflops,
            fractions=list(self.fractions),
            unit=UNIT,
        )
        return d


def count_macs(fn: nn.Module, *args: torch.Tensor) -> float:
    """Multiply-accumulates of one call ``fn(*args)`` (FlopCounterMode counts 2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter, explicit_attention(fn):
        fn(*args)
    return counter.get_total_flops() / 2


@torch.no_grad()
def count_exit_costs(model: MultiExitViT, input_shape: Sequence[int]) -> ExitCosts:
    """Count ``C_k`` for every exit and ``F_full`` of a :class:`~dmpo_lightning.models.MultiExitViT`.

    Each exit's cost comes from a forward truncated at that exit (``model(x, upto=k)``), with attention
    switched to the explicit path so its matrix products are counted (fused SDPA is not counted on CPU).

    Args:
        model: A model with ``num_exits``, ``forward(x, upto=k)`` and ``forward_static(x)``.
        input_shape: ``(C, H, W)`` of one input image.

    Returns:
        The counted costs (batch of one).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {shape}")
    param = next(model.parameters())
    x = torch.zeros((1, *shape), dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        exit_macs = tuple(count_macs(_Truncated(model, k), x) for k in range(model.num_exits))
        full = count_macs(_Static(model), x)
    finally:
        model.train(was_training)
    return ExitCosts(exit_macs=exit_macs, full_macs=full, input_shape=shape)


class _Truncated(nn.Module):
    def __init__(self, model: MultiExitViT, upto: int) -> None:
        super().__init__()
        self.model = model
        self.upto = upto

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x, upto=self.upto)


class _Static(nn.Module):
    def __init__(self, model: MultiExitViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_static(x)


def default_input_shape(model: Any) -> tuple[int, ...]:
    """``(C, H, W)`` the model's patch embedding was built for (``MultiExitViT``)."""
    pe: Any = model.backbone.patch_embed
    return (int(pe.proj.in_channels), *(int(s) for s in pe.img_size))
