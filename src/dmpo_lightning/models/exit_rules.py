"""Per-exit confidence scores from exit logits: max softmax probability, negative entropy or patience."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["EXIT_RULES", "ExitRule", "exit_score_step", "exit_scores", "stack_exit_logits"]

ExitRule = Literal["confidence", "entropy", "patience"]
"""How an exit's confidence is scored (higher = more confident; a sample leaves when score >= threshold)."""

EXIT_RULES: tuple[str, ...] = get_args(ExitRule)
"""The allowed values of :data:`ExitRule`."""

_LOG_CLAMP = 1e-30
"""Probabilities are clamped to this before the log of the entropy, so ``0 * log 0`` counts as 0."""


def _check_rule(rule: str) -> None:
    if rule not in EXIT_RULES:
        raise ValueError(f"unknown exit rule {rule!r}; allowed: {', '.join(repr(r) for r in EXIT_RULES)}")


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
        rule: ``confidence``, ``entropy`` or ``patience`` (see :func:`exit_scores`).
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
    if rule == "confidence":
        score = conf
    elif rule == "entropy":
        score = (probs * probs.clamp_min(_LOG_CLAMP).log()).sum(dim=-1)
    else:
        score = run
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
