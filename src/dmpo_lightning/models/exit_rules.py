"""Per-exit confidence scores from exit logits: max softmax probability, negative entropy or patience."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dmpo_lightning.models.registry import Registry

__all__ = [
    "EXIT_RULES",
    "EXIT_RULE_REGISTRY",
    "ExitRule",
    "ExitRuleSpec",
    "exit_score_step",
    "exit_scores",
    "is_local_rule",
    "register_exit_rule",
    "stack_exit_logits",
]

_LOG_CLAMP = 1e-30
"""Probabilities are clamped to this before the log of the entropy, so ``0 * log 0`` counts as 0."""

RuleScore = Callable[[Tensor, Tensor], Tensor]
"""``score(probs [B, C] float32, run [B] float) -> score [B]`` (higher = more confident)."""


@dataclass(frozen=True)
class ExitRuleSpec:
    """A registered exit rule.

    Attributes:
        score: ``score(probs, run)``: the exit's score from its softmax ``probs [B, C]`` (float32) and
            ``run [B]``, the number of consecutive exits up to this one whose prediction equals this one's.
        local: The score depends on this exit's logits only (not on ``run``); a real early exit may then
            skip the heads of disabled exits.
    """

    score: RuleScore
    local: bool = True


EXIT_RULE_REGISTRY: Registry[ExitRuleSpec] = Registry("exit rule")
"""Every exit rule by name; add one with :func:`register_exit_rule` in this file."""


def register_exit_rule(name: str, *, local: bool = True) -> Callable[[RuleScore], RuleScore]:
    """Decorator registering ``score(probs, run) -> [B]`` as exit rule ``name`` (see :class:`ExitRuleSpec`).

    The rule then serves the simulated protocol (:func:`exit_scores`), the real early exit and predict,
    which all score through :func:`exit_score_step`. Register it in this file to make it one of the CLI's
    ``exit_rule`` choices (the :data:`ExitRule` literal is built at the end of this file).
    """

    def add(score: RuleScore) -> RuleScore:
        EXIT_RULE_REGISTRY.register(name)(ExitRuleSpec(score, local))
        return score

    return add


@register_exit_rule("confidence")
def _confidence(probs: Tensor, run: Tensor) -> Tensor:
    """Maximum softmax probability, in ``(0, 1]`` (MSDNet's rule)."""
    return probs.max(dim=-1).values


@register_exit_rule("entropy")
def _negative_entropy(probs: Tensor, run: Tensor) -> Tensor:
    """Negative entropy ``sum_c p_c log p_c``, in ``[-log C, 0]`` (``0 log 0`` counts as 0)."""
    return (probs * probs.clamp_min(_LOG_CLAMP).log()).sum(dim=-1)


@register_exit_rule("patience", local=False)
def _patience(probs: Tensor, run: Tensor) -> Tensor:
    """Consecutive agreeing exits ending here (PABEE's rule)."""
    return run


def is_local_rule(rule: str) -> bool:
    """Whether the rule's score at exit k depends on exit k's logits only.

    Raises:
        ValueError: If the rule is unknown.
    """
    return EXIT_RULE_REGISTRY.get(rule).local


def _check_rule(rule: str) -> None:
    EXIT_RULE_REGISTRY.check(rule)


def stack_exit_logits(logits: Tensor | Sequence[Tensor]) -> Tensor:
    """Validate per-exit logits and return them as one ``[N, K, C]`` tensor.

    Args:
        logits: ``[N, K, C]`` (samples, exits, classes) or a sequence of K tensors ``[N, C]``, one per exit
            (what ``MultiExitViT.forward`` returns).

    Returns:
        The logits as a floating tensor ``[N, K, C]``.

    Raises:
        ValueError: If the shapes are wrong or inconsistent, there is no exit or no class, or the logits
            are not floating point.
    """
    if isinstance(logits, Tensor):
        if logits.ndim != 3:
            raise ValueError(
                f"logits must be [N, K, C] (samples, exits, classes) or a list of K tensors [N, C]; "
                f"got a tensor of shape {tuple(logits.shape)}"
            )
        stacked = logits
    else:
        tensors = list(logits)
        if not tensors:
            raise ValueError("logits is an empty list; give one [N, C] tensor per exit (at least one exit)")
        for k, t in enumerate(tensors):
            if not isinstance(t, Tensor) or t.ndim != 2:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"logits of exit {k} must be a tensor [N, C]; got {shape}")
            if t.shape != tensors[0].shape:
                raise ValueError(
                    f"every exit's logits must have the same shape [N, C]; exit 0 has "
                    f"{tuple(tensors[0].shape)}, exit {k} has {tuple(t.shape)}"
                )
        stacked = torch.stack(tensors, dim=1)
    if stacked.shape[1] == 0 or stacked.shape[2] == 0:
        raise ValueError(
            f"logits need at least one exit and one class; got shape [N, K, C] = {tuple(stacked.shape)}"
        )
    if not stacked.is_floating_point():
        raise ValueError(f"logits must be floating point; got dtype {stacked.dtype}")
    return stacked


def exit_score_step(
    logits: Tensor,
    rule: ExitRule = "confidence",
    previous_pred: Tensor | None = None,
    previous_run: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Score one exit's logits ``[B, C]``, incrementally over exits (what a true early-exit forward needs).

    :func:`exit_scores` is this function applied exit by exit, so a real early-exit forward that calls it
    takes exactly the decisions of the protocol simulated from cached outputs. The softmax is taken in
    float32 (``logits.float()``), as in ``MultiExitViT``'s ``step_scores``.

    Args:
        logits: Logits of one exit ``[B, C]``.
        rule: A registered rule: ``confidence``, ``entropy``, ``patience`` (see :func:`exit_scores`), ...
        previous_pred: Prediction of the previous exit ``[B]`` (``None`` at the first exit).
        previous_run: ``run`` returned for the previous exit ``[B]`` (``None`` at the first exit).

    Returns:
        ``(score [B] float, prediction [B] long, run [B] float)``; ``run`` counts the consecutive exits,
        this one included, whose prediction equals this exit's (it is the ``patience`` score).

    Raises:
        ValueError: If the rule is unknown or the shapes are wrong.
    """
    _check_rule(rule)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits of one exit must be [B, C] with C >= 1; got shape {tuple(logits.shape)}")
    if (previous_pred is None) != (previous_run is None):
        raise ValueError("give both previous_pred and previous_run (later exits) or neither (first exit)")
    probs = logits.float().softmax(dim=-1)
    conf, pred = probs.max(dim=-1)
    if previous_pred is None or previous_run is None:
        run = torch.ones_like(conf)
    else:
        if previous_pred.shape != pred.shape or previous_run.shape != pred.shape:
            raise ValueError(
                f"previous_pred and previous_run must be [B] = {tuple(pred.shape)}; got "
                f"{tuple(previous_pred.shape)} and {tuple(previous_run.shape)}"
            )
        run = torch.where(pred == previous_pred, previous_run + 1, torch.ones_like(previous_run))
    score = EXIT_RULE_REGISTRY.get(rule).score(probs, run)
    return score, pred, run


def exit_scores(logits: Tensor | Sequence[Tensor], rule: ExitRule = "confidence") -> tuple[Tensor, Tensor]:
    """Per-exit confidence scores and predictions from every exit's logits.

    Every rule gives a score where higher means more confident, so the same per-exit threshold machinery
    (:mod:`dmpo_lightning.evaluation.protocol`: a sample leaves at the first exit k with ``s_k >= T_k``)
    serves all of them. The prediction of every exit is the argmax of its softmax.

    - ``confidence``: the maximum softmax probability, in ``(0, 1]`` (MSDNet's rule).
    - ``entropy``: the negative entropy of the softmax, ``sum_c p_c log p_c``, in ``[-log C, 0]``; so
      ``score >= T`` means ``entropy <= -T`` (``0 log 0`` counts as 0).
    - ``patience``: the number of consecutive exits ending at exit k (k included) whose prediction equals
      exit k's, as a float: 1 at the first exit and right after the prediction changes (PABEE's rule;
      a threshold of ``t`` means "leave once t exits in a row agree").

    The last exit's score is irrelevant to the protocol (its threshold is -inf: it takes every sample).

    Args:
        logits: ``[N, K, C]`` (samples, exits, classes) or a sequence of K tensors ``[N, C]``.
        rule: ``confidence``, ``entropy`` or ``patience``.

    Returns:
        ``(scores, preds)``: scores ``[N, K]`` and predictions ``[N, K]`` (long). Scores are float32
        whatever the logits' dtype, because the softmax is taken in float32.

    Raises:
        ValueError: If the rule is unknown or the logits are not ``[N, K, C]`` (or a list of ``[N, C]``).

    Example:
        >>> import math
        >>> logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [math.log(9.0), 0.0]]])
        >>> scores, preds = exit_scores(logits, "confidence")
        >>> scores
        tensor([[0.7500, 0.7500, 0.9000]])
        >>> preds
        tensor([[1, 0, 0]])
        >>> exit_scores(logits, "patience")[0]
        tensor([[1., 1., 2.]])
        >>> exit_scores(torch.zeros(1, 1, 4), "entropy")[0]  # uniform over 4 classes: -log 4
        tensor([[-1.3863]])
    """
    _check_rule(rule)
    stacked = stack_exit_logits(logits)
    scores, preds = [], []
    prev_pred: Tensor | None = None
    prev_run: Tensor | None = None
    for k in range(stacked.shape[1]):
        score, prev_pred, prev_run = exit_score_step(stacked[:, k], rule, prev_pred, prev_run)
        scores.append(score)
        preds.append(prev_pred)
    return torch.stack(scores, dim=1), torch.stack(preds, dim=1)


EXIT_RULES: tuple[str, ...] = EXIT_RULE_REGISTRY.names()
"""The exit rules registered in this file (the CLI's choices)."""

if TYPE_CHECKING:
    ExitRule = str
else:
    ExitRule = EXIT_RULE_REGISTRY.literal()
"""How an exit's confidence is scored (higher = more confident; a sample leaves when score >= threshold):
``Literal`` of the rules registered above, so ``--help`` lists them and a typo is rejected."""
