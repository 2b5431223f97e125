"""Exit rules: confidence, negative entropy and patience on hand-computed logits."""

from __future__ import annotations

import math

import pytest
import torch

from dmpo_lightning.models.exit_rules import EXIT_RULES, exit_score_step, exit_scores, stack_exit_logits

LN3 = math.log(3.0)


def test_rules_listed():
    assert EXIT_RULES == ("confidence", "entropy", "patience")


def test_confidence_is_max_softmax():
    # softmax([0, ln 3]) = (1/4, 3/4); softmax([ln 3, 0]) = (3/4, 1/4); softmax([0, 0, 0, 0]) = 1/4 each
    logits = torch.tensor([[[0.0, LN3], [LN3, 0.0]], [[0.0, 0.0], [5.0, 5.0]]])
    scores, preds = exit_scores(logits, "confidence")
    assert scores.dtype == torch.float32 and preds.dtype == torch.long
    assert torch.allclose(scores, torch.tensor([[0.75, 0.75], [0.5, 0.5]]))
    assert preds.tolist() == [[1, 0], [0, 0]]  # ties go to the first class


def test_entropy_is_negative_entropy():
    p = torch.tensor([0.75, 0.25])
    h = -(p * p.log()).sum()
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])
    scores, _ = exit_scores(logits, "entropy")
    assert scores[0, 0].item() == pytest.approx(-h.item(), rel=1e-6)
    assert scores[0, 1].item() == pytest.approx(-math.log(2.0), rel=1e-6)
    # a (numerically) one-hot softmax has entropy 0, not NaN
    peaked, _ = exit_scores(torch.tensor([[[1000.0, 0.0, 0.0]]]), "entropy")
    assert peaked.item() == 0.0
    # higher score = more confident: the peaked distribution beats the flatter one
    assert scores[0, 0] > scores[0, 1]


def test_patience_counts_agreeing_run():
    # argmax per exit: 1, 1, 2, 2, 2, 0
    classes = [1, 1, 2, 2, 2, 0]
    logits = torch.nn.functional.one_hot(torch.tensor(classes), 3).float()[None] * 4.0  # [1, 6, 3]
    scores, preds = exit_scores(logits, "patience")
    assert preds[0].tolist() == classes
    assert scores[0].tolist() == [1.0, 2.0, 1.0, 2.0, 3.0, 1.0]
    assert scores.dtype == torch.float32


def test_list_input_equals_stacked_and_step_matches():
    g = torch.Generator().manual_seed(0)
    per_exit = [torch.randn(7, 5, generator=g) for _ in range(3)]
    for rule in EXIT_RULES:
        a = exit_scores(per_exit, rule)
        b = exit_scores(torch.stack(per_exit, dim=1), rule)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        prev_pred = prev_run = None
        for k, logits in enumerate(per_exit):
            score, prev_pred, prev_run = exit_score_step(logits, rule, prev_pred, prev_run)
            assert torch.equal(score, a[0][:, k]) and torch.equal(prev_pred, a[1][:, k])


def test_half_precision_logits_score_in_float32():
    scores, _ = exit_scores(torch.randn(4, 2, 3).half(), "confidence")
    assert scores.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="unknown exit rule 'margin'"):
        exit_scores(torch.zeros(2, 2, 3), "margin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[N, K, C\]"):
        exit_scores(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="empty list"):
        stack_exit_logits([])
    with pytest.raises(ValueError, match="same shape"):
        stack_exit_logits([torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match=r"exit 1 must be a tensor \[N, C\]"):
        stack_exit_logits([torch.zeros(2, 3), torch.zeros(2, 3, 1)])
    with pytest.raises(ValueError, match="floating point"):
        stack_exit_logits(torch.zeros(2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one exit and one class"):
        exit_scores(torch.zeros(2, 0, 3))
    with pytest.raises(ValueError, match="both previous_pred and previous_run"):
        exit_score_step(torch.zeros(2, 3), "patience", previous_pred=torch.zeros(2, dtype=torch.long))
