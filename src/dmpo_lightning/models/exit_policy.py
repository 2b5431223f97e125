"""Exit decisions of a real early-exit forward, shared by ``MultiExitViT.forward_early_exit`` and the engine.

One object decides, exit by exit, which of the still-active samples leave. It scores exactly as the protocol
simulated from cached outputs does: either with a built-in rule (``exit_rules.exit_score_step``, which is
``exit_rules.exit_scores`` applied exit by exit) or with a user scoring function that has the contract of
``DMPOModule.score_exits``. So a subclass that changes the scoring changes the simulated protocol of
``dmpo test`` and the real early exit of ``dmpo predict`` alike.

Pure torch (no Lightning): importable with only ``torch`` and ``timm`` installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dmpo_lightning.models.exit_rules import EXIT_RULE_REGISTRY, ExitRule, exit_score_step, is_local_rule

__all__ = ["ExitPolicy", "Scorer", "check_thresholds"]

Scorer = Callable[[list[Tensor]], tuple[Tensor, Tensor]]
"""``scorer(logits of exits 0..k) -> (scores [B, k + 1], preds [B, k + 1])``, as ``score_exits``."""

_LOGITS = "logits_"


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

    Per-sample state that later exits need (the previous prediction and run length of ``patience``, the
    earlier logits a non-local ``scorer`` is called with) travels in a ``carry`` dict of tensors whose
    first dimension is the active samples, so callers can compact, split and concatenate it with the tokens.

    Args:
        thresholds: One per exit; the last is ignored (the last exit takes every sample left).
        num_exits: K.
        rule: Built-in rule, used when ``scorer`` is ``None``.
        scorer: Scoring function with the contract of ``DMPOModule.score_exits`` (see :data:`Scorer`).
        scorer_is_local: ``scorer``'s score at exit k depends on exit k's logits only: it is called with
            ``[logits_k]`` alone, and heads of disabled exits are skipped.
        last_score: Compute the last exit's score (only the prediction is needed to answer).
        temperatures: One per exit (``calibration: temperature``): scores come from ``logits / T_k`` in
            float32, as ``dmpo test`` scores them; ``None`` = raw logits. The rule and the scorer both see the
            scaled logits; the logits a forward returns stay raw.

    Raises:
        ValueError: For bad thresholds, bad temperatures or an unknown rule.
    """

    def __init__(
        self,
        thresholds: Sequence[float] | Tensor,
        num_exits: int,
        *,
        rule: ExitRule = "confidence",
        scorer: Scorer | None = None,
        scorer_is_local: bool = False,
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
        if scorer is None:
            EXIT_RULE_REGISTRY.check(rule)
        if scorer is not None and not callable(scorer):
            raise ValueError(f"scorer must be callable (like DMPOModule.score_exits); got {scorer!r}")
        self.rule = rule
        self.scorer = scorer
        self.local = scorer_is_local if scorer is not None else is_local_rule(rule)
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
            built-in), the prediction ``[B]`` and the state for the next exit.
        """
        last = k == self.num_exits - 1
        if self.temperatures is not None:
            logits = logits.float() / self.temperatures[k]
        if self.scorer is None:
            if last and not self.last_score:
                pred = logits.float().softmax(dim=-1).max(dim=-1).indices  # exit_score_step's prediction
                score = torch.full(pred.shape, math.nan, device=logits.device)
                return None, score, pred, {}
            score, pred, run = exit_score_step(logits, self.rule, carry.get("pred"), carry.get("run"))
            carry = {"pred": pred, "run": run} if not self.local and not last else {}
        else:
            if self.local:
                history = [logits]
            else:
                history = [carry[f"{_LOGITS}{j}"] for j in range(k)] + [logits]
            scores, preds = self.scorer(history)
            width = len(history)
            for name, t in (("scores", scores), ("preds", preds)):
                if not isinstance(t, Tensor) or tuple(t.shape) != (logits.shape[0], width):
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"the scorer must return {name} of shape [B, {width}] = [{logits.shape[0]}, {width}] "
                        f"for the logits of {width} exit(s); got {got}"
                    )
            score, pred = scores[:, -1], preds[:, -1].long()
            if self.local or last:
                carry = {}
            else:
                carry = {**carry, f"{_LOGITS}{k}": logits}
        if last:
            return None, score, pred, carry
        return score >= self.thresholds[k], score, pred, carry
