"""BudgetedAccuracy and ExitOutputsCollector against hand-computed values over uneven batches."""

from __future__ import annotations

import pytest
import torch

from dmpo_lightning.evaluation.metrics import BudgetedAccuracy, ExitOutputsCollector
from dmpo_lightning.evaluation.protocol import evaluate_thresholds

INF = float("inf")


def test_budgeted_accuracy_hand_computed_over_uneven_batches():
    metric = BudgetedAccuracy(thresholds=[0.8, 0.6, -INF], costs=[1.0, 2.0, 4.0])
    scores = torch.tensor([[0.9, 0.1, 0], [0.5, 0.7, 0], [0.5, 0.5, 0], [0.8, 0.9, 0], [0.1, 0.6, 0]])
    preds = torch.tensor([[1, 0, 0], [0, 2, 0], [1, 1, 3], [4, 4, 4], [0, 5, 1]])
    target = torch.tensor([1, 2, 0, 3, 5])
    # exits: 0, 1, 2, 0, 1 -> predictions 1, 2, 3, 4, 5 -> correct: yes, yes, no, no, yes
    metric.update(scores[:1], preds[:1], target[:1])
    metric.update(scores[1:4], preds[1:4], target[1:4])
    metric.update(scores[4:], preds[4:], target[4:])
    metric.update(scores[:0], preds[:0], target[:0])  # an empty batch changes nothing
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(3 / 5)
    assert out["histogram"].tolist() == [2, 2, 1]
    assert out["expected_cost"].item() == pytest.approx((2 * 1.0 + 2 * 2.0 + 1 * 4.0) / 5)
    # same as the protocol on the whole split at once
    ev = evaluate_thresholds(scores, preds == target[:, None], torch.tensor([0.8, 0.6, -INF]), [1, 2, 4])
    assert ev.accuracy.item() == pytest.approx(out["accuracy"].item())
    assert ev.histogram.tolist() == out["histogram"].tolist()
    metric.reset()
    assert metric.histogram.tolist() == [0, 0, 0] and metric.total.item() == 0


def test_budgeted_accuracy_flags_and_errors():
    assert BudgetedAccuracy.full_state_update is False
    assert BudgetedAccuracy.higher_is_better is True
    with pytest.raises(ValueError, match="one value per exit"):
        BudgetedAccuracy(thresholds=[0.5, -INF], costs=[1.0])
    metric = BudgetedAccuracy(thresholds=[0.5, -INF], costs=[1.0, 2.0])
    with pytest.raises(ValueError, match="expected K = 2"):
        metric.update(torch.zeros(3, 3), torch.zeros(3, 3).long(), torch.zeros(3).long())
    with pytest.raises(ValueError, match="target must be"):
        metric.update(torch.zeros(3, 2), torch.zeros(3, 2).long(), torch.zeros(2).long())


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric ExitOutputsCollector")
def test_collector_sorts_and_drops_padding_duplicates():
    c = ExitOutputsCollector()
    assert ExitOutputsCollector.full_state_update is False
    c.update(
        torch.tensor([3, 1]),
        torch.tensor([[0.3, 0.4], [0.1, 0.2]]),
        torch.tensor([[3, 3], [1, 1]]),
        torch.tensor([30, 10]),
    )
    c.update(
        torch.tensor([0, 2, 4]),
        torch.tensor([[0.0, 0.1], [0.2, 0.3], [0.4, 0.5]]),
        torch.tensor([[0, 0], [2, 2], [4, 4]]),
        torch.tensor([0, 20, 40]),
    )
    # DDP padding: sample 0 again
    c.update(torch.tensor([0]), torch.tensor([[0.0, 0.1]]), torch.tensor([[0, 0]]), torch.tensor([0]))
    out = c.compute()
    assert out["index"].tolist() == [0, 1, 2, 3, 4]
    assert out["target"].tolist() == [0, 10, 20, 30, 40]
    assert out["preds"][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(out["scores"][:, 1], torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    c.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        c.compute()


def test_collector_errors():
    c = ExitOutputsCollector()
    with pytest.raises(ValueError, match="index must be"):
        c.update(torch.tensor([0]), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2))
    c.update(torch.tensor([0]), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1))
    with pytest.raises(ValueError, match="same number of exits"):
        c.update(torch.tensor([1]), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1))
