"""Budgeted-batch evaluation protocol (MSDNet's): thresholds from a calibration split, curve, budgets, AUC.

Everything here is pure torch on cached per-exit outputs, vectorised over samples and over values of q
(chunked over q only to bound memory); the only Python loop is over the K exits. Notation (MSDNet's
budgeted-batch evaluation): ``scores [N, K]`` (higher = more confident, see
:mod:`~dmpo_lightning.models.exit_rules`), ``correct [N, K]`` (bool, prediction == label),
``costs [K]`` (``C_k``, the cumulative cost of a sample leaving at exit k, any unit) and ``full_cost``
(``F_full``, same unit). Exits are 0-based in tensors and 1-based in formulas and printed tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from dmpo_lightning.models.exit_rules import stack_exit_logits

__all__ = [
    "BUDGET_UNIT_OPTIONS",
    "BudgetChoice",
    "BudgetUnit",
    "BudgetUnitOption",
    "BudgetedCurve",
    "OperatingPoint",
    "ThresholdEvaluation",
    "anytime_accuracy",
    "area_under_curve",
    "assign_exits",
    "budgeted_curve",
    "calibrate_thresholds",
    "check_budget_range",
    "default_qs",
    "evaluate_thresholds",
    "exit_quotas",
    "operating_points",
    "protocol_budget_unit",
    "search_qs",
    "select_budgets",
    "target_exit_distribution",
    "topk_correct",
]

BudgetUnit = Literal["fraction", "absolute"]
"""``fraction``: a budget is a fraction of ``full_cost``; ``absolute``: in the unit of ``costs`` (GFLOPs).
These words are also the ``unit`` stored in reports and ``thresholds.json``."""

BudgetUnitOption = Literal["fraction", "gflops"]
"""The user's ``budget_unit`` option (``DMPOModule``): the costs are counted in GFLOPs, so an absolute budget
is named ``gflops`` there. :data:`BUDGET_UNIT_OPTIONS` translates it to :data:`BudgetUnit`."""

BUDGET_UNIT_OPTIONS: dict[str, BudgetUnit] = {"fraction": "fraction", "gflops": "absolute"}
"""``budget_unit`` option -> the protocol's :data:`BudgetUnit` (the one translation between the two)."""


def protocol_budget_unit(option: str) -> BudgetUnit:
    """The protocol's unit for a ``budget_unit`` option (``fraction`` or ``gflops``).

    Raises:
        ValueError: If ``option`` is neither.
    """
    if option not in BUDGET_UNIT_OPTIONS:
        raise ValueError(f"budget_unit must be one of {tuple(BUDGET_UNIT_OPTIONS)}; got {option!r}")
    return BUDGET_UNIT_OPTIONS[option]


def check_budget_range(
    budgets: Sequence[float],
    cheapest_cost: float,
    full_cost: float,
    budget_unit: BudgetUnit,
    cost_unit: str = "unit of costs",
) -> list[float]:
    """Check that every budget lies in the achievable range; return the budgets as costs.

    The cheapest policy sends every sample out at the first exit (``cheapest_cost``, the first exit's
    cumulative cost); the dearest runs the full model (``full_cost``). Both ends are allowed, with a relative
    slack of :data:`BUDGET_TOLERANCE`.

    Args:
        budgets: Budgets in ``budget_unit``.
        cheapest_cost: Cost of the first exit.
        full_cost: Cost of the full model (the ``fraction`` unit's 1.0).
        budget_unit: ``fraction`` of ``full_cost`` or ``absolute`` (unit of the costs).
        cost_unit: Name of the costs' unit in the message (e.g. ``GFLOPs``).

    Returns:
        The budgets in the unit of the costs.

    Raises:
        ValueError: For a budget out of range (stated in the unit used) or an unknown ``budget_unit``.

    Example:
        >>> check_budget_range([0.5, 1.0], 1.0, 4.0, "fraction")
        [2.0, 4.0]
        >>> check_budget_range([0.1], 1.0, 4.0, "fraction")
        Traceback (most recent call last):
        ...
        ValueError: budget 0.1 (fraction of the full model's cost) is outside the achievable range ...
    """
    if budget_unit not in get_args(BudgetUnit):
        raise ValueError(f"budget_unit must be one of {get_args(BudgetUnit)}; got {budget_unit!r}")
    scale = full_cost if budget_unit == "fraction" else 1.0
    lo, hi = cheapest_cost / scale, full_cost / scale
    what = "fraction of the full model's cost" if budget_unit == "fraction" else f"absolute cost, {cost_unit}"
    out = []
    for b in budgets:
        if not lo * (1 - BUDGET_TOLERANCE) <= float(b) <= hi * (1 + BUDGET_TOLERANCE):
            raise ValueError(
                f"budget {b} ({what}) is outside the achievable range [{lo:.6g}, {hi:.6g}]: the cheapest "
                f"policy (every sample at the first exit) costs {lo:.6g} and the full model {hi:.6g}"
            )
        out.append(float(b) * scale)
    return out


QUOTA_TOLERANCE = 1e-9
"""``m_k = floor(n * pi_k(q) + QUOTA_TOLERANCE * max(1, n * pi_k(q) / 1e5))``.

``n * pi_k(q)`` is computed in float64, so a share that is exactly an integer in rational arithmetic
(e.g. ``n = 36``, ``q = 1.4``, ``K = 2``: ``pi_1 = 5/12``, ``n * pi_1 = 15``) may come out as
``14.999999999999998``; the tolerance makes it 15 as intended (a plain float floor gets tens of
thousands of such cases wrong on the default grid). On the default grid ``q = i / 20`` the result was
checked equal to the exact rational floor for every ``n <= 10^5`` and ``K <= 8``.
"""

BUDGET_TOLERANCE = 1e-9
"""Relative slack when comparing a calibration cost with a budget (and a budget with its allowed range)."""

_MAX_CHUNK_ELEMENTS = 1 << 22
"""Largest ``Q_chunk * N * K`` processed at once (bounds memory for thousands of q on 50,000 samples)."""


# ----------------------------------------------------------------------------------------------- inputs
def _check_scores(scores: Tensor, name: str = "scores") -> Tensor:
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{name} must be a tensor [N, K] (samples, exits); got {shape}")
    if scores.shape[1] == 0:
        raise ValueError(f"{name} has no exit (shape {tuple(scores.shape)}); K must be >= 1")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be floating point; got dtype {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} contain NaN or infinite values; scores must be finite")
    return scores


def _check_correct(correct: Tensor, scores: Tensor, name: str = "correct") -> Tensor:
    if not isinstance(correct, Tensor) or correct.dtype != torch.bool:
        what = correct.dtype if isinstance(correct, Tensor) else type(correct).__name__
        raise ValueError(f"{name} must be a bool tensor [N, K], e.g. preds == labels[:, None]; got {what}")
    if correct.shape != scores.shape:
        raise ValueError(
            f"{name} must have the shape of the scores [N, K] = {tuple(scores.shape)}; "
            f"got {tuple(correct.shape)}"
        )
    return correct


def _check_costs(costs: Tensor | Sequence[float], num_exits: int) -> Tensor:
    costs_t = torch.as_tensor(costs, dtype=torch.float64).cpu()
    if costs_t.ndim != 1 or costs_t.numel() != num_exits:
        raise ValueError(f"costs must be one value per exit, shape [{num_exits}]; got {tuple(costs_t.shape)}")
    if not bool(torch.isfinite(costs_t).all()) or bool((costs_t < 0).any()):
        raise ValueError(f"costs must be finite and >= 0; got {costs_t.tolist()}")
    return costs_t


def _check_thresholds(thresholds: Tensor, scores: Tensor) -> Tensor:
    """Thresholds as ``[Q, K]`` on the scores' device and in their dtype."""
    t = thresholds[None] if isinstance(thresholds, Tensor) and thresholds.ndim == 1 else thresholds
    if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[1] != scores.shape[1]:
        shape = tuple(thresholds.shape) if isinstance(thresholds, Tensor) else type(thresholds).__name__
        raise ValueError(
            f"thresholds must be a tensor [K] or [Q, K] with K = {scores.shape[1]} (the scores' exits); "
            f"got {shape}"
        )
    if bool(torch.isnan(t).any()):
        raise ValueError("thresholds contain NaN; use +inf to disable an exit")
    return t.to(device=scores.device, dtype=scores.dtype)


def _check_full_cost(full_cost: float) -> float:
    full = float(full_cost)
    if not full > 0 or full == float("inf"):
        raise ValueError(f"full_cost must be a finite number > 0; got {full_cost}")
    return full


def _as_qs(qs: Tensor | Sequence[float] | None, device: torch.device) -> Tensor:
    q = default_qs() if qs is None else torch.as_tensor(qs, dtype=torch.float64)
    q = q.to(device=device, dtype=torch.float64)
    if q.ndim != 1 or q.numel() == 0:
        raise ValueError(f"qs must be a non-empty 1-D sequence of q values; got shape {tuple(q.shape)}")
    if bool(torch.isnan(q).any()) or bool((q < 0).any()):
        raise ValueError(f"q values must be in [0, inf] (0 and inf are the limits); got {q.tolist()}")
    return q


def _q_chunks(num_q: int, per_q: int) -> list[slice]:
    step = max(1, _MAX_CHUNK_ELEMENTS // max(1, per_q))
    return [slice(i, min(i + step, num_q)) for i in range(0, num_q, step)]


# ------------------------------------------------------------------------------------------ q and pi_k(q)
def default_qs() -> Tensor:
    """The protocol's q grid: ``q = i / 20`` for ``i = 1..39`` (float64).

    Example:
        >>> qs = default_qs()
        >>> qs.numel(), qs[0].item(), qs[19].item(), qs[-1].item()
        (39, 0.05, 1.0, 1.95)
    """
    return torch.arange(1, 40, dtype=torch.float64) / 20


def search_qs(num: int = 1000, lo: float = 1e-2, hi: float = 1e2) -> Tensor:
    """A fine q grid for budget search: ``num`` log-spaced values in ``[lo, hi]``, default grid, 0, inf.

    ``q = 0`` (every calibration sample at exit 1) and ``q = inf`` (every sample at the last exit) are
    the limits of ``pi(q)``; including them guarantees a feasible choice for any budget >= ``C_1``.

    Args:
        num: Number of log-spaced values.
        lo: Smallest log-spaced value (> 0).
        hi: Largest log-spaced value.

    Returns:
        Sorted, unique q values (float64).
    """
    if num < 1 or not 0 < lo < hi:
        raise ValueError(f"need num >= 1 and 0 < lo < hi; got num={num}, lo={lo}, hi={hi}")
    grid = torch.logspace(
        torch.log10(torch.tensor(lo)).item(), torch.log10(torch.tensor(hi)).item(), num, dtype=torch.float64
    )
    limits = torch.tensor([0.0, float("inf")], dtype=torch.float64)
    return torch.unique(torch.cat([grid, default_qs(), limits]))


def target_exit_distribution(q: float | Tensor | Sequence[float], num_exits: int) -> Tensor:
    """Target share of samples per exit: ``pi_k(q) = q^k / sum_{j=1..K} q^j``, k = 1..K.

    ``q < 1`` favours early exits, ``q = 1`` is uniform, ``q > 1`` favours late ones. ``q = 0`` and
    ``q = inf`` are the limits (all mass on the first / last exit). Computed in float64 as
    ``q^(k-1) / sum_j q^(j-1)`` for ``q <= 1`` and ``q^(k-K) / sum_j q^(j-K)`` for ``q > 1`` (every power
    <= 1, so no overflow for any q).

    Args:
        q: One q (returns ``[K]``) or a 1-D tensor/sequence of Q values (returns ``[Q, K]``), each in
            ``[0, inf]``.
        num_exits: K >= 1.

    Returns:
        ``pi [K]`` or ``[Q, K]`` (float64); rows sum to 1.

    Example:
        >>> target_exit_distribution(0.5, 3)  # (1/2, 1/4, 1/8) / (7/8)
        tensor([0.5714, 0.2857, 0.1429], dtype=torch.float64)
        >>> target_exit_distribution([1.0, float("inf")], 2)
        tensor([[0.5000, 0.5000],
                [0.0000, 1.0000]], dtype=torch.float64)
    """
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1; got {num_exits}")
    q_t = torch.as_tensor(q, dtype=torch.float64)
    scalar = q_t.ndim == 0
    q_t = _as_qs(q_t.reshape(-1), q_t.device)
    k = torch.arange(num_exits, dtype=torch.float64, device=q_t.device)  # k - 1 in the formula
    big = q_t > 1
    exponent = torch.where(big[:, None], k - (num_exits - 1), k)  # all <= 0 for q > 1, >= 0 for q <= 1
    powers = torch.pow(q_t[:, None], exponent)  # 0^0 = 1 in torch: q = 0 gives (1, 0, ..., 0)
    pi = powers / powers.sum(dim=1, keepdim=True)  # q = inf: inf^(-j) = 0 and inf^0 = 1 give (0, ..., 1)
    return pi[0] if scalar else pi


def exit_quotas(pi: Tensor, n: int) -> Tensor:
    """``m_k = floor(n * pi_k)`` with the float tolerance documented at :data:`QUOTA_TOLERANCE`.

    Args:
        pi: Target distribution ``[..., K]`` (float64).
        n: Number of calibration samples.

    Returns:
        Integer quotas (int64), same shape as ``pi``.
    """
    x = pi * n
    return torch.floor(x + QUOTA_TOLERANCE * torch.clamp(x / 1e5, min=1.0)).to(torch.int64)


# --------------------------------------------------------------------------------------------- thresholds
def _calibrate_chunk(scores: Tensor, sorted_scores: Tensor, order: Tensor, quotas: Tensor) -> Tensor:
    n, num_exits = scores.shape
    num_q = quotas.shape[0]
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    thresholds = torch.full((num_q, num_exits), float("inf"), dtype=scores.dtype, device=scores.device)
    thresholds[:, -1] = -float("inf")
    remaining = torch.ones(0)
    for k in range(num_exits - 1):
        m = quotas[:, k]
        if k == 0:  # everyone remains: the m-th highest s_1 is simply sorted_scores[m - 1]
            ok = (m >= 1) & (m <= n)
            pos = (m - 1).clamp(0, n - 1)
        else:
            # running count of not-yet-exited samples in descending s_k order: the m-th of them is T_k
            count = remaining.view(torch.uint8).index_select(1, order[:, k]).cumsum(dim=1, dtype=torch.int32)
            m32 = m.to(torch.int32)
            ok = (m32 >= 1) & (m32 <= count[:, -1])
            pos = torch.searchsorted(count, m32.clamp(min=1)[:, None]).squeeze(1).clamp(max=n - 1)
        t = torch.where(ok, sorted_scores[pos, k], inf)
        thresholds[:, k] = t
        if k < num_exits - 2:
            stay = scores[None, :, k] < t[:, None]  # every remaining sample with s_k >= T_k exits at k
            remaining = stay if k == 0 else remaining & stay
    return thresholds


def calibrate_thresholds(scores: Tensor, qs: Tensor | Sequence[float] | None = None) -> Tensor:
    """Per-exit thresholds on the calibration split for each q (EVALUATION.md section 4.3).

    With n calibration samples, for exits k = 1..K-1 in order: ``m_k = floor(n * pi_k(q))`` (a share of
    all n, not of the samples left; see :data:`QUOTA_TOLERANCE` for the float floor); among the samples
    that have not exited yet, the m_k-th highest ``s_k`` is ``T_k`` (``T_k = +inf`` if ``m_k = 0`` or
    fewer than m_k samples remain); then every remaining sample with ``s_k >= T_k`` exits at k. So with
    ties at ``T_k`` *more* than m_k samples can exit at k (all tied samples are treated alike), leaving
    fewer for later exits. ``T_K = -inf``: the last exit takes everyone left.

    Vectorised over samples and q (one sort per exit; chunked over q to bound memory).

    Args:
        scores: Calibration scores ``[n, K]`` (finite; higher = more confident).
        qs: q values ``[Q]`` in ``[0, inf]``; ``None`` = :func:`default_qs`.

    Returns:
        Thresholds ``[Q, K]`` in the scores' dtype (each finite threshold is one of the scores).

    Raises:
        ValueError: If the calibration split is empty or the inputs are malformed.

    Example:
        Five samples, two exits. q = 1.5 gives ``pi_1 = 1 / (1 + q) = 0.4``, so ``m_1 = 2`` and ``T_1``
        is the second highest ``s_1`` (0.8). q = 0.5 gives ``pi_1 = 2/3``, ``m_1 = floor(3.33) = 3``: the
        third highest ``s_1`` is 0.6, and the tie lets four samples exit. q = 100 gives ``m_1 = 0``.

        >>> s1 = torch.tensor([0.9, 0.6, 0.8, 0.6, 0.3])
        >>> scores = torch.stack([s1, torch.ones(5)], dim=1)
        >>> thresholds = calibrate_thresholds(scores, [1.5, 0.5, 100.0])
        >>> thresholds
        tensor([[0.8000,   -inf],
                [0.6000,   -inf],
                [   inf,   -inf]])
        >>> assign_exits(scores, thresholds)
        tensor([[0, 1, 0, 1, 1],
                [0, 0, 0, 0, 1],
                [1, 1, 1, 1, 1]])
    """
    scores = _check_scores(scores)
    n, num_exits = scores.shape
    if n == 0:
        raise ValueError("the calibration split is empty (scores has 0 rows); thresholds need >= 1 sample")
    q = _as_qs(qs, scores.device)
    quotas = exit_quotas(target_exit_distribution(q, num_exits), n)
    sorted_scores, order = torch.sort(scores, dim=0, descending=True, stable=True)
    chunks = _q_chunks(q.numel(), n * 2)
    return torch.cat([_calibrate_chunk(scores, sorted_scores, order, quotas[c]) for c in chunks], dim=0)


def assign_exits(scores: Tensor, thresholds: Tensor) -> Tensor:
    """Exit of each sample under thresholds: the first k with ``s_k >= T_k``; the last exit always.

    Args:
        scores: ``[N, K]``.
        thresholds: ``[K]`` or ``[Q, K]`` (the last column is ignored: the last exit takes everyone).
            They are compared in the scores' dtype, as a real early-exit forward compares a float32 score
            with a Python-float threshold.

    Returns:
        0-based exit indices (int64), ``[N]`` for ``[K]`` thresholds, ``[Q, N]`` for ``[Q, K]``.
    """
    scores = _check_scores(scores)
    t = _check_thresholds(thresholds, scores)
    single = thresholds.ndim == 1
    num_q, (n, num_exits) = t.shape[0], scores.shape
    exits = torch.full((num_q, n), num_exits - 1, dtype=torch.int64, device=scores.device)
    for k in range(num_exits - 2, -1, -1):  # the earliest exit that accepts is written last
        exits.masked_fill_(scores[None, :, k] >= t[:, k, None], k)
    return exits[0] if single else exits


# ------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class ThresholdEvaluation:
    """Accuracy, expected cost and exit histogram of threshold policies on one split.

    Attributes:
        accuracy: Share of all samples whose exit predicts correctly ``[Q]`` (float64).
        expected_cost: ``sum_k (n_k / N) * C_k`` ``[Q]`` (float64, unit of ``costs``).
        histogram: Samples leaving at each exit, ``n_k`` ``[Q, K]`` (int64).
    """

    accuracy: Tensor
    expected_cost: Tensor
    histogram: Tensor


def evaluate_thresholds(
    scores: Tensor, correct: Tensor, thresholds: Tensor, costs: Tensor | Sequence[float]
) -> ThresholdEvaluation:
    """Apply thresholds to a split: accuracy, expected cost and exit histogram (EVALUATION.md section 4.4).

    Args:
        scores: ``[N, K]``.
        correct: ``[N, K]`` bool, prediction of each exit == label.
        thresholds: ``[K]`` or ``[Q, K]``.
        costs: ``C_k`` ``[K]``.

    Returns:
        A :class:`ThresholdEvaluation` with a leading ``[Q]`` dimension, none for ``[K]`` thresholds.

    Raises:
        ValueError: If the split is empty or shapes disagree.
    """
    scores = _check_scores(scores)
    correct = _check_correct(correct, scores)
    n, num_exits = scores.shape
    if n == 0:
        raise ValueError("cannot evaluate thresholds on an empty split (0 samples)")
    costs_t = _check_costs(costs, num_exits).to(scores.device)
    t = _check_thresholds(thresholds, scores)
    single = thresholds.ndim == 1
    histogram = torch.empty(t.shape[0], num_exits, dtype=torch.int64, device=scores.device)
    hits = torch.zeros(t.shape[0], dtype=torch.int64, device=scores.device)
    for c in _q_chunks(t.shape[0], n * 2):
        # per exit, no [Q, N] index tensor: who leaves here = still undecided and s_k >= T_k
        undecided = torch.ones(c.stop - c.start, n, dtype=torch.bool, device=scores.device)
        for k in range(num_exits):
            leave = undecided & (scores[None, :, k] >= t[c, k, None]) if k < num_exits - 1 else undecided
            histogram[c, k] = leave.sum(dim=1, dtype=torch.int64)
            hits[c] += (leave & correct[None, :, k]).sum(dim=1, dtype=torch.int64)
            if k < num_exits - 1:
                undecided &= ~leave
    accuracy = hits.to(torch.float64) / n
    expected_cost = histogram.to(torch.float64) @ costs_t / n
    if single:
        return ThresholdEvaluation(accuracy[0], expected_cost[0], histogram[0])
    return ThresholdEvaluation(accuracy, expected_cost, histogram)


def anytime_accuracy(correct: Tensor) -> Tensor:
    """Accuracy of every exit alone (anytime prediction, EVALUATION.md section 2).

    Args:
        correct: ``[N, K]`` bool (for top-5, pass :func:`topk_correct` with ``k=5``).

    Returns:
        ``[K]`` float64.

    Example:
        >>> anytime_accuracy(torch.tensor([[True, True], [False, True]]))
        tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    if not isinstance(correct, Tensor) or correct.dtype != torch.bool or correct.ndim != 2:
        raise ValueError("correct must be a bool tensor [N, K] (prediction of each exit == label)")
    if correct.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty split (0 samples)")
    return correct.to(torch.float64).mean(dim=0)


def topk_correct(logits: Tensor | Sequence[Tensor], labels: Tensor, k: int = 5) -> Tensor:
    """Whether each exit's top-k classes contain the label.

    Args:
        logits: ``[N, K, C]`` or a list of K tensors ``[N, C]``.
        labels: ``[N]`` integer labels.
        k: How many top classes count (``k <= C``).

    Returns:
        ``[N, K]`` bool.
    """
    stacked = stack_exit_logits(logits)
    if labels.shape != stacked.shape[:1]:
        raise ValueError(f"labels must be [N] = [{stacked.shape[0]}]; got {tuple(labels.shape)}")
    if not 1 <= k <= stacked.shape[2]:
        raise ValueError(f"k must be between 1 and the number of classes C = {stacked.shape[2]}; got {k}")
    top = stacked.topk(k, dim=2).indices  # [N, K, k]
    return (top == labels[:, None, None]).any(dim=2)


# ------------------------------------------------------------------------------------------------ curve
@dataclass(frozen=True)
class BudgetedCurve:
    """The dynamic (budgeted-batch) curve: thresholds from calibration, evaluated on test, per q.

    Attributes:
        qs: ``[Q]`` q values (float64).
        thresholds: ``[Q, K]`` fitted on the calibration split.
        costs: ``C_k`` ``[K]`` (float64).
        full_cost: ``F_full``.
        test_accuracy: ``[Q]``.
        test_cost: Expected cost per test sample ``[Q]``.
        test_cost_fraction: ``test_cost / full_cost`` ``[Q]``.
        test_histogram: ``[Q, K]`` test samples per exit.
        cal_accuracy: ``[Q]`` on the calibration split.
        cal_cost: ``[Q]`` on the calibration split.
        cal_histogram: ``[Q, K]`` on the calibration split.
    """

    qs: Tensor
    thresholds: Tensor
    costs: Tensor
    full_cost: float
    test_accuracy: Tensor
    test_cost: Tensor
    test_cost_fraction: Tensor
    test_histogram: Tensor
    cal_accuracy: Tensor
    cal_cost: Tensor
    cal_histogram: Tensor


def budgeted_curve(
    cal_scores: Tensor,
    cal_correct: Tensor,
    test_scores: Tensor,
    test_correct: Tensor,
    costs: Tensor | Sequence[float],
    full_cost: float,
    qs: Tensor | Sequence[float] | None = None,
) -> BudgetedCurve:
    """Thresholds per q from the calibration split, then test accuracy and cost (EVALUATION.md section 4).

    Args:
        cal_scores: ``[n, K]`` calibration scores.
        cal_correct: ``[n, K]`` bool.
        test_scores: ``[N, K]`` test scores.
        test_correct: ``[N, K]`` bool.
        costs: ``C_k`` ``[K]``.
        full_cost: ``F_full`` (same unit as costs).
        qs: q values; ``None`` = :func:`default_qs`.

    Returns:
        The :class:`BudgetedCurve`.
    """
    _check_scores(cal_scores, "cal_scores")
    _check_scores(test_scores, "test_scores")
    if cal_scores.shape[1] != test_scores.shape[1]:
        raise ValueError(
            f"calibration and test scores must have the same number of exits; got {cal_scores.shape[1]} "
            f"and {test_scores.shape[1]}"
        )
    full = _check_full_cost(full_cost)
    costs_t = _check_costs(costs, cal_scores.shape[1])
    q = _as_qs(qs, cal_scores.device)
    thresholds = calibrate_thresholds(cal_scores, q)
    cal = evaluate_thresholds(cal_scores, cal_correct, thresholds, costs_t)
    test = evaluate_thresholds(test_scores, test_correct, thresholds.to(test_scores.device), costs_t)
    return BudgetedCurve(
        qs=q,
        thresholds=thresholds,
        costs=costs_t,
        full_cost=full,
        test_accuracy=test.accuracy,
        test_cost=test.expected_cost,
        test_cost_fraction=test.expected_cost / full,
        test_histogram=test.histogram,
        cal_accuracy=cal.accuracy,
        cal_cost=cal.expected_cost,
        cal_histogram=cal.histogram,
    )


# ------------------------------------------------------------------------------------ operating points
@dataclass(frozen=True)
class BudgetChoice:
    """Thresholds chosen on the calibration split for one budget.

    Attributes:
        budget: The budget as given.
        budget_unit: ``fraction`` (of ``full_cost``) or ``absolute`` (unit of ``costs``).
        budget_cost: The budget in the unit of ``costs``.
        budget_fraction: The budget as a fraction of ``full_cost``.
        q: The chosen q (0 and inf are the limits: all at the first / last exit).
        thresholds: ``[K]``.
        cal_accuracy: Calibration accuracy of the choice.
        cal_cost: Calibration expected cost (``<= budget_cost``).
        cal_histogram: ``[K]`` calibration samples per exit.
    """

    budget: float
    budget_unit: BudgetUnit
    budget_cost: float
    budget_fraction: float
    q: float
    thresholds: Tensor
    cal_accuracy: float
    cal_cost: float
    cal_histogram: Tensor


@dataclass(frozen=True)
class OperatingPoint(BudgetChoice):
    """A :class:`BudgetChoice` with its test results.

    Attributes:
        test_accuracy: Test accuracy under the chosen thresholds.
        test_cost: Test expected cost (may exceed the budget: only calibration cost is constrained).
        test_cost_fraction: ``test_cost / full_cost``.
        test_histogram: ``[K]`` test samples per exit.
    """

    test_accuracy: float = float("nan")
    test_cost: float = float("nan")
    test_cost_fraction: float = float("nan")
    test_histogram: Tensor | None = None


def select_budgets(
    cal_scores: Tensor,
    cal_correct: Tensor,
    costs: Tensor | Sequence[float],
    full_cost: float,
    budgets: Sequence[float] = (0.25, 0.33, 0.5, 0.75, 1.0),
    budget_unit: BudgetUnit = "fraction",
    qs: Tensor | Sequence[float] | None = None,
) -> list[BudgetChoice]:
    """For each budget B, the calibration policy with the largest accuracy among those costing <= B.

    Candidates are the thresholds of every q in ``qs`` (default :func:`search_qs`: 1,000 log-spaced values
    in [0.01, 100], the 39 default values and the limits q = 0 and q = inf); ties in calibration accuracy
    go to the lower calibration cost, then to the q that comes first in ``qs`` (the smallest, for a sorted
    grid such as :func:`search_qs`). Costs are compared with a relative slack of
    :data:`BUDGET_TOLERANCE`. The grid is searched exhaustively (vectorised), not by bisection, because
    calibration accuracy need not be monotone in q.

    Args:
        cal_scores: ``[n, K]``.
        cal_correct: ``[n, K]`` bool.
        costs: ``C_k`` ``[K]``.
        full_cost: ``F_full``.
        budgets: Budgets in ``budget_unit``.
        budget_unit: ``fraction`` of ``full_cost`` (e.g. 0.25) or ``absolute`` (unit of ``costs``, GFLOPs).
        qs: Candidate q values; ``None`` = :func:`search_qs`.

    Returns:
        One :class:`BudgetChoice` per budget, in the given order.

    Raises:
        ValueError: If a budget is below ``C_1`` (every sample at the first exit, the cheapest policy) or
            above ``full_cost``, stated in the unit used; or on malformed inputs.
    """
    budgets = [float(b) for b in budgets]
    if budget_unit not in get_args(BudgetUnit):
        raise ValueError(f"budget_unit must be one of {get_args(BudgetUnit)}; got {budget_unit!r}")
    cal_scores = _check_scores(cal_scores, "cal_scores")
    _check_correct(cal_correct, cal_scores, "cal_correct")
    full = _check_full_cost(full_cost)
    costs_t = _check_costs(costs, cal_scores.shape[1])
    scale = full if budget_unit == "fraction" else 1.0
    budget_costs = check_budget_range(budgets, costs_t[0].item(), full, budget_unit)
    q = _as_qs(search_qs() if qs is None else qs, cal_scores.device)
    thresholds = calibrate_thresholds(cal_scores, q)
    cal = evaluate_thresholds(cal_scores, cal_correct, thresholds, costs_t)
    choices = []
    for b, b_cost in zip(budgets, budget_costs, strict=True):
        feasible = cal.expected_cost <= b_cost * (1 + BUDGET_TOLERANCE)
        if not bool(feasible.any()):
            raise ValueError(
                f"no q in qs meets budget {b} ({budget_unit}) on the calibration split: the cheapest q "
                f"costs {cal.expected_cost.min().item() / scale:.6g}; include q = 0 (every sample at exit 1)"
            )
        best_acc = torch.where(feasible, cal.accuracy, -1.0).max()
        cands = feasible & (cal.accuracy == best_acc)
        best_cost = torch.where(cands, cal.expected_cost, float("inf")).min()
        i = int(torch.nonzero(cands & (cal.expected_cost == best_cost))[0, 0])  # first in qs
        choices.append(
            BudgetChoice(
                budget=float(b),
                budget_unit=budget_unit,
                budget_cost=b_cost,
                budget_fraction=b_cost / full,
                q=q[i].item(),
                thresholds=thresholds[i],
                cal_accuracy=cal.accuracy[i].item(),
                cal_cost=cal.expected_cost[i].item(),
                cal_histogram=cal.histogram[i],
            )
        )
    return choices


def operating_points(
    cal_scores: Tensor,
    cal_correct: Tensor,
    test_scores: Tensor,
    test_correct: Tensor,
    costs: Tensor | Sequence[float],
    full_cost: float,
    budgets: Sequence[float] = (0.25, 0.33, 0.5, 0.75, 1.0),
    budget_unit: BudgetUnit = "fraction",
    qs: Tensor | Sequence[float] | None = None,
) -> list[OperatingPoint]:
    """Thresholds per budget from the calibration split, and the test accuracy/cost they give (section 4.6).

    See :func:`select_budgets` for the search and the errors. Only the calibration cost is constrained;
    the reported test cost can be slightly above the budget.

    Args:
        cal_scores: ``[n, K]`` calibration scores.
        cal_correct: ``[n, K]`` bool.
        test_scores: ``[N, K]`` test scores.
        test_correct: ``[N, K]`` bool.
        costs: ``C_k`` ``[K]``.
        full_cost: ``F_full``.
        budgets: Budgets in ``budget_unit``.
        budget_unit: ``fraction`` of ``full_cost`` or ``absolute`` (unit of ``costs``, GFLOPs).
        qs: Candidate q values; ``None`` = :func:`search_qs`.

    Returns:
        One :class:`OperatingPoint` per budget, in the given order.

    Raises:
        ValueError: As :func:`select_budgets`, or if the test split is empty or malformed.
    """
    choices = select_budgets(cal_scores, cal_correct, costs, full_cost, budgets, budget_unit, qs)
    _check_scores(test_scores, "test_scores")
    if test_scores.shape[1] != cal_scores.shape[1]:
        raise ValueError(
            f"calibration and test scores must have the same number of exits; got {cal_scores.shape[1]} "
            f"and {test_scores.shape[1]}"
        )
    if not choices:
        return []
    thresholds = torch.stack([c.thresholds for c in choices]).to(test_scores.device)
    test = evaluate_thresholds(test_scores, test_correct, thresholds, costs)
    full = float(full_cost)
    return [
        OperatingPoint(
            **{f: getattr(c, f) for f in BudgetChoice.__dataclass_fields__},
            test_accuracy=test.accuracy[i].item(),
            test_cost=test.expected_cost[i].item(),
            test_cost_fraction=test.expected_cost[i].item() / full,
            test_histogram=test.histogram[i],
        )
        for i, c in enumerate(choices)
    ]


def area_under_curve(
    cost_fraction: Tensor | Sequence[float],
    accuracy: Tensor | Sequence[float],
    lo: float = 0.25,
    hi: float = 1.0,
) -> float:
    """Mean accuracy of the accuracy-vs-cost-fraction curve over ``[lo, hi]`` (trapezoid / ``(hi - lo)``).

    Points are sorted by cost; points sharing a cost are merged into their mean accuracy; the curve is
    the polyline through them. Outside the points' cost range: below the cheapest point the accuracy
    counts as **0** (no policy on the curve meets such a budget), above the most expensive point it
    stays at that point's accuracy (a larger budget can always be met by it). So a curve that does not
    reach down to ``lo`` is penalised, never extrapolated optimistically.

    Args:
        cost_fraction: ``[Q]`` cost as a fraction of the full model.
        accuracy: ``[Q]`` accuracy (any scale; the result has the same scale).
        lo: Start of the range.
        hi: End of the range (> lo).

    Returns:
        The mean accuracy over the range (a float).

    Example:
        >>> round(area_under_curve([0.25, 0.5, 1.0], [0.5, 0.7, 0.8]), 12)  # (0.25*0.6 + 0.5*0.75) / 0.75
        0.7
        >>> area_under_curve([0.5], [0.9], lo=0.0, hi=1.0)  # 0 below 0.5, 0.9 above
        0.45
    """
    x = torch.as_tensor(cost_fraction, dtype=torch.float64).reshape(-1).cpu()
    y = torch.as_tensor(accuracy, dtype=torch.float64).reshape(-1).cpu()
    if x.shape != y.shape or x.numel() == 0:
        raise ValueError(
            f"cost_fraction and accuracy must be non-empty and of equal length; got "
            f"{x.numel()} and {y.numel()}"
        )
    if not bool(torch.isfinite(x).all() & torch.isfinite(y).all()):
        raise ValueError("cost_fraction and accuracy must be finite")
    if not hi > lo:
        raise ValueError(f"need hi > lo; got lo={lo}, hi={hi}")
    xs, inverse = torch.unique(x, return_inverse=True)  # sorted
    ys = torch.zeros_like(xs).index_add_(0, inverse, y) / torch.bincount(inverse).to(torch.float64)
    start = max(lo, xs[0].item())  # the curve is 0 on [lo, start)
    if start >= hi:
        return 0.0
    inner = xs[(xs > start) & (xs < hi)]
    knots = torch.cat([torch.tensor([start, *inner.tolist(), hi], dtype=torch.float64)])
    idx = torch.searchsorted(xs, knots, right=True)  # >= 1 because every knot is >= xs[0]
    left = idx - 1
    right = idx.clamp(max=xs.numel() - 1)
    width = (xs[right] - xs[left]).clamp(min=torch.finfo(torch.float64).tiny)
    values = ys[left] + (knots - xs[left]).clamp(min=0) / width * (ys[right] - ys[left])
    values = torch.where(idx == xs.numel(), ys[-1], values)  # flat beyond the most expensive point
    return float(torch.trapezoid(values, knots) / (hi - lo))
