"""Per-exit losses: weighted cross-entropy over exits and last-exit distillation (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["check_finite_loss", "distillation_losses", "exit_cross_entropies", "weighted_sum"]


def exit_cross_entropies(
    logits: Sequence[torch.Tensor], target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of every exit ``[K]``.

    Examples:
        >>> z = [torch.zeros(2, 3), torch.zeros(2, 3)]
        >>> exit_cross_entropies(z, torch.tensor([0, 1]))
        tensor([1.0986, 1.0986])
    """
    return torch.stack([F.cross_entropy(z.float(), target, label_smoothing=label_smoothing) for z in logits])


def distillation_losses(logits: Sequence[torch.Tensor], temperature: float = 4.0) -> torch.Tensor:
    """KL divergence from the last exit (teacher, not back-propagated) to every exit, times T^2 ``[K]``.

    The last entry is 0 (the teacher does not teach itself).
    """
    if temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {temperature}")
    teacher = F.log_softmax(logits[-1].detach().float() / temperature, dim=-1)
    losses = [
        F.kl_div(
            F.log_softmax(z.float() / temperature, dim=-1), teacher, log_target=True, reduction="batchmean"
        )
        * temperature**2
        for z in logits[:-1]
    ]
    losses.append(torch.zeros((), device=logits[-1].device))
    return torch.stack(losses)


def weighted_sum(per_exit: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * per_exit[k]``."""
    return (per_exit * weights.to(per_exit)).sum()


def check_finite_loss(loss: torch.Tensor, parts: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    """Raise ``FloatingPointError`` (naming the per-exit parts and what to try) if ``loss`` is not finite."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss.detach().item()} at epoch {epoch}, global step {step} "
            f"(per-exit parts: { {k: round(float(v.detach()), 4) for k, v in parts.items()} }); "
            "lower the learning rate, check the inputs for NaN/inf, or use precision 32"
        )
