"""torchmetrics Metrics for early exit: accuracy/cost under fixed thresholds, per-sample output caching."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities import dim_zero_cat

from dmpo_lightning.evaluation.protocol import assign_exits

__all__ = ["BudgetedAccuracy", "ExitOutputsCollector", "exit_accuracy"]


def _check_batch(scores: Tensor, preds: Tensor, target: Tensor, num_exits: int | None = None) -> None:
    if scores.ndim != 2 or preds.shape != scores.shape:
        raise ValueError(
            f"scores and preds must both be [B, K]; got {tuple(scores.shape)} and {tuple(preds.shape)}"
        )
    if num_exits is not None and scores.shape[1] != num_exits:
        raise ValueError(
            f"expected K = {num_exits} exits (one threshold each); got scores {tuple(scores.shape)}"
        )
    if target.shape != scores.shape[:1]:
        raise ValueError(f"target must be [B] = [{scores.shape[0]}]; got {tuple(target.shape)}")


class BudgetedAccuracy(Metric):
    """Accuracy and expected cost of an early-exit policy with fixed per-exit thresholds.

    Each sample leaves at the first exit k with ``score_k >= thresholds[k]`` (the last exit takes the
    rest) and is scored with that exit's prediction. States are sums (``dist_reduce_fx="sum"``), so
    uneven batches and DDP give the exact dataset-level values. The expected cost is computed from the
    exit histogram, ``sum_k n_k * C_k / total``, which makes a separate cost-sum state redundant (and
    keeps the value exact instead of summing floats per batch).

    Args:
        thresholds: ``[K]`` per-exit thresholds (``inf`` disables an exit; the last is ignored).
        costs: ``[K]`` cumulative cost ``C_k`` of a sample leaving at exit k (any unit, e.g. GFLOPs).
        kwargs: Forwarded to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = BudgetedAccuracy(thresholds=[0.8, float("-inf")], costs=[1.0, 3.0])
        >>> scores = torch.tensor([[0.9, 0.5], [0.3, 0.7], [0.85, 0.1]])
        >>> preds = torch.tensor([[1, 1], [0, 2], [2, 0]])
        >>> metric.update(scores, preds, torch.tensor([1, 2, 0]))  # exits 0, 1, 0: correct, correct, wrong
        >>> metric.update(scores[:1], preds[:1], torch.tensor([0]))  # exit 0: wrong
        >>> out = metric.compute()
        >>> out["accuracy"], out["expected_cost"], out["histogram"]
        (tensor(0.5000), tensor(1.5000), tensor([3, 1]))
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    correct: Tensor
    total: Tensor
    histogram: Tensor
    thresholds: Tensor
    costs: Tensor

    def __init__(
        self, thresholds: Tensor | Sequence[float], costs: Tensor | Sequence[float], **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        t = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
        c = torch.as_tensor(costs, dtype=torch.float32).flatten()
        if t.numel() == 0 or t.shape != c.shape:
            raise ValueError(
                f"thresholds and costs need one value per exit (K >= 1); got {t.numel()} and {c.numel()}"
            )
        if bool(torch.isnan(t).any()) or not bool(torch.isfinite(c).all()):
            raise ValueError("thresholds must not be NaN (inf disables an exit) and costs must be finite")
        self.register_buffer("thresholds", t)
        self.register_buffer("costs", c)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("histogram", default=torch.zeros(t.numel(), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch.

        Args:
            scores: ``[B, K]`` exit scores (higher = more confident).
            preds: ``[B, K]`` predicted class of every exit.
            target: ``[B]`` labels.
        """
        _check_batch(scores, preds, target, self.thresholds.numel())
        if scores.shape[0] == 0:
            return
        exits = assign_exits(scores.float(), self.thresholds.to(torch.float32))
        chosen = preds.gather(1, exits[:, None]).squeeze(1)
        self.correct += (chosen == target).sum()
        self.total += target.numel()
        self.histogram += torch.bincount(exits, minlength=self.thresholds.numel())

    def compute(self) -> dict[str, Tensor]:
        """``accuracy`` (scalar), ``expected_cost`` (scalar, unit of ``costs``) and ``histogram`` ``[K]``.

        With no sample seen, accuracy and expected cost are NaN.
        """
        total = self.total.to(torch.float32)
        return {
            "accuracy": self.correct.to(torch.float32) / total,
            "expected_cost": (self.histogram.to(torch.float32) * self.costs).sum() / total,
            "histogram": self.histogram.clone(),
        }


class ExitOutputsCollector(Metric):
    """Collects per-sample exit outputs (index, scores, predictions, target) across batches and DDP ranks.

    The cached outputs that the budgeted-batch protocol needs (EVALUATION.md section 4.1). States are
    concatenated (``dist_reduce_fx="cat"``); :meth:`compute` sorts by sample index and drops duplicated
    indices, which a ``DistributedSampler`` adds to pad the last batch (the duplicates hold the same
    sample, so keeping the first copy is exact).

    Args:
        kwargs: Forwarded to :class:`torchmetrics.Metric`.

    Example:
        >>> collector = ExitOutputsCollector()
        >>> collector.update(torch.tensor([2, 0]), torch.tensor([[0.9, 0.8], [0.1, 0.6]]),
        ...                  torch.tensor([[1, 1], [0, 2]]), torch.tensor([1, 2]))
        >>> collector.update(torch.tensor([1, 2]), torch.tensor([[0.5, 0.5], [0.9, 0.8]]),
        ...                  torch.tensor([[3, 3], [1, 1]]), torch.tensor([3, 1]))  # index 2 again: padding
        >>> out = collector.compute()
        >>> out["index"], out["target"]
        (tensor([0, 1, 2]), tensor([2, 3, 1]))
        >>> out["preds"]
        tensor([[0, 2],
                [3, 3],
                [1, 1]])
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    index: list[Tensor]
    scores: list[Tensor]
    preds: list[Tensor]
    target: list[Tensor]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("index", "scores", "preds", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, scores: Tensor, preds: Tensor, target: Tensor) -> None:
        """Store a batch.

        Args:
            index: ``[B]`` sample indices in the split (``constants.INDEX_KEY``).
            scores: ``[B, K]`` exit scores.
            preds: ``[B, K]`` predicted class of every exit.
            target: ``[B]`` labels.
        """
        _check_batch(scores, preds, target)
        if index.shape != target.shape:
            raise ValueError(f"index must be [B] = [{target.shape[0]}]; got {tuple(index.shape)}")
        if self.scores and scores.shape[1] != self.scores[0].shape[1]:
            raise ValueError(
                f"every batch needs the same number of exits; got {scores.shape[1]} after "
                f"{self.scores[0].shape[1]}"
            )
        self.index.append(index.detach().long())
        self.scores.append(scores.detach())
        self.preds.append(preds.detach().long())
        self.target.append(target.detach().long())

    def compute(self) -> dict[str, Tensor]:
        """``index [N]``, ``scores [N, K]``, ``preds [N, K]``, ``target [N]``, sorted by index, unique.

        Raises:
            RuntimeError: If nothing was collected.
        """
        if isinstance(self.index, list) and not self.index:
            raise RuntimeError("ExitOutputsCollector.compute() called before any update: nothing collected")
        index = dim_zero_cat(self.index)
        scores, preds, target = dim_zero_cat(self.scores), dim_zero_cat(self.preds), dim_zero_cat(self.target)
        index, order = torch.sort(index, stable=True)
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        order = order[keep]
        return {"index": index[keep], "scores": scores[order], "preds": preds[order], "target": target[order]}


def exit_accuracy(num_classes: int) -> MetricCollection:
    """One exit's accuracy metrics: ``acc`` (top-1) and, for more than 5 classes, ``acc_top5``."""
    metrics: dict[str, Metric | MetricCollection] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)
