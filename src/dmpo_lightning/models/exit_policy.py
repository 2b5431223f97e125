"""Exit decisions of a real early-exit forward, shared by ``MultiExitViT.forward_early_exit`` and the engine.

One object decides, exit by exit, which of the still-active samples leave. It scores exactly as the protocol
simulated from cached outputs does, with a registered exit rule (``exit_rules.exit_score_step``, which is
``exit_rules.exit_scores`` applied exit by exit). A rule is always a registered name, so ``dmpo test``'s
simulated protocol, the real early exit, the thresholds file and an exported artefact all name the same rule.

Pure torch (no Lightning): importable with only ``torch`` and ``timm`` installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY, ExitRule, exit_score_step, is_local_rule

__all__ = ["ExitPolicy", "check_thresholds"]


def check_thresholds(thresholds: Sequence[float] | Tensor, num_exits: int) -> list[float]:
    """Thresholds as a list of ``num_exits`` Python floats (``+inf`` disables an exit).

    Raises:
        ValueError: If they are not numbers, not one per exit, or contain NaN.
    """
    try:
        values = torch.as_tensor(thresholds, dtype=torch.float64).flatten().tolist()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"thresholds must be numbers, one per exit (+inf disables an exit); got {thresholds!r}"
        ) from err
    if len(values) != num_exits:
        raise ValueError(
            f"got {len(values)} thresholds for a model with {num_exits} exits; give one per exit"
        )
    if any(math.isnan(t) for t in values):
        raise ValueError(f"thresholds contain NaN: {values}; use +inf to disable an exit")
    return values


class ExitPolicy:
    """Which active samples leave at exit ``k``: the first exit whose score is ``>= thresholds[k]``.

    Per-sample state that later exits need (the previous prediction and run length of ``patience``) travels
    in a ``carry`` dict of tensors whose
    first dimension is the active samples, so callers can compact, split and concatenate it with the tokens.

    Args:
        thresholds: One per exit; the last is ignored (the last exit takes every sample left).
        num_exits: K.
        rule: A registered exit rule (``models.exit_rules.EXIT_RULE_REGISTRY``).
        last_score: Compute the last exit's score (only the prediction is needed to answer).
        temperatures: One per exit (``calibration: temperature``): scores come from ``logits / T_k`` in
            float32, as ``dmpo test`` scores them; ``None`` = raw logits. The rule sees the scaled logits;
            the logits a forward returns stay raw.

    Raises:
        ValueError: For bad thresholds, bad temperatures or an unknown rule.
    """

    def __init__(
        self,
        thresholds: Sequence[float] | Tensor,
        num_exits: int,
        *,
        rule: ExitRule = "confidence",
        last_score: bool = True,
        temperatures: Sequence[float] | Tensor | None = None,
    ) -> None:
        self.thresholds = check_thresholds(thresholds, num_exits)
        self.temperatures: list[float] | None = None
        if temperatures is not None:
            temps = torch.as_tensor(temperatures, dtype=torch.float64).flatten().tolist()
            if len(temps) != num_exits or not all(math.isfinite(t) and t > 0 for t in temps):
                raise ValueError(f"need {num_exits} finite temperatures > 0 (one per exit); got {temps}")
            self.temperatures = None if all(t == 1.0 for t in temps) else temps
        self.num_exits = num_exits
        EXIT_RULE_REGISTRY.check(rule)
        self.rule = rule
        self.local = is_local_rule(rule)
        self.last_score = last_score
        self._skip = [self.local and t == math.inf for t in self.thresholds[:-1]] + [False]

    def needs_head(self, k: int) -> bool:
        """Whether exit ``k``'s head must run (``False`` only for a disabled exit of a local rule)."""
        return not self._skip[k]

    def decide(
        self, k: int, logits: Tensor, carry: dict[str, Tensor]
    ) -> tuple[Tensor | None, Tensor, Tensor, dict[str, Tensor]]:
        """Decide at exit ``k`` for the active samples whose exit-``k`` logits are ``logits [B, C]``.

        Args:
            k: 0-based exit (every exit whose head :meth:`needs_head` must be passed, in order).
            logits: Exit ``k``'s logits of the active samples.
            carry: State returned by the previous call for the same samples (``{}`` at the first call).

        Returns:
            ``(leave, score, pred, carry)``: ``leave [B]`` bool (``None`` at the last exit: everyone leaves),
            the score ``[B]`` (float; NaN at the last exit if ``last_score`` is off and the rule is
            its rule needs no score there), the prediction ``[B]`` and the state for the next exit.
        """
        last = k == self.num_exits - 1
        if self.temperatures is not None:
            logits = logits.float() / self.temperatures[k]
        if last and not self.last_score:
            pred = logits.float().softmax(dim=-1).max(dim=-1).indices  # exit_score_step's prediction
            score = torch.full(pred.shape, math.nan, device=logits.device)
            return None, score, pred, {}
        score, pred, run = exit_score_step(logits, self.rule, carry.get("pred"), carry.get("run"))
        carry = {"pred": pred, "run": run} if not self.local and not last else {}
        if last:
            return None, score, pred, carry
        return score >= self.thresholds[k], score, pred, carry
