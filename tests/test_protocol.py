"""Budgeted-batch protocol: pi(q), thresholds vs a literal reference, evaluation, budgets, AUC.

Also the budget check ``dmpo test`` runs before the evaluation (evaluation/protocol_run.py): it refuses a
budget in the protocol's own words, naming the option.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import get_args

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dmpo_lightning.errors import ConfigError
from dmpo_lightning.evaluation import protocol, protocol_run
from dmpo_lightning.evaluation.flops import ExitCosts
from dmpo_lightning.evaluation.protocol import (
    anytime_accuracy,
    area_under_curve,
    assign_exits,
    budgeted_curve,
    calibrate_thresholds,
    default_qs,
    evaluate_thresholds,
    exit_quotas,
    operating_points,
    search_qs,
    select_budgets,
    target_exit_distribution,
    topk_correct,
)

INF = float("inf")


# --------------------------------------------------------------- literal reference (EVALUATION.md 4.3)
def reference_thresholds(scores: list[list[float]], q: Fraction, num_exits: int) -> list[float]:
    """Section 4.3 read literally, sample by sample, with exact rational m_k."""
    n = len(scores)
    denom = sum(q**j for j in range(1, num_exits + 1))
    remaining = list(range(n))
    thresholds = []
    for k in range(num_exits - 1):
        m = math.floor(n * q ** (k + 1) / denom)
        if m == 0 or len(remaining) < m:
            t = INF
        else:
            t = sorted((scores[i][k] for i in remaining), reverse=True)[m - 1]
        thresholds.append(t)
        remaining = [i for i in remaining if not scores[i][k] >= t]
    return [*thresholds, -INF]


def reference_exits(scores: list[list[float]], thresholds: list[float]) -> list[int]:
    exits = []
    for row in scores:
        k = 0
        while k < len(row) - 1 and not row[k] >= thresholds[k]:
            k += 1
        exits.append(k)
    return exits


def reference_evaluate(scores, correct, thresholds, costs):
    exits = reference_exits(scores, thresholds)
    n = len(scores)
    hist = [exits.count(k) for k in range(len(costs))]
    acc = sum(correct[i][e] for i, e in enumerate(exits)) / n
    cost = sum(hist[k] / n * costs[k] for k in range(len(costs)))
    return acc, cost, hist


@st.composite
def cached_outputs(draw):
    num_exits = draw(st.integers(1, 5))
    n = draw(st.integers(1, 40))
    values = st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9, 1.0])  # a small set: many ties
    scores = draw(st.lists(st.lists(values, min_size=num_exits, max_size=num_exits), min_size=n, max_size=n))
    correct = draw(
        st.lists(st.lists(st.booleans(), min_size=num_exits, max_size=num_exits), min_size=n, max_size=n)
    )
    q_numerators = draw(st.lists(st.integers(1, 39), min_size=1, max_size=6, unique=True))
    return scores, correct, q_numerators


@settings(max_examples=150, deadline=None)
@given(cached_outputs())
@example(([[float(i) / 36, 0.5] for i in range(36)], [[True, False]] * 36, [28]))  # n * pi_1 = 15 exactly
def test_thresholds_and_exits_match_literal_reference(data):
    scores, correct, q_numerators = data
    num_exits = len(scores[0])
    s = torch.tensor(scores, dtype=torch.float32)
    qs = torch.tensor(q_numerators, dtype=torch.float64) / 20
    thresholds = calibrate_thresholds(s, qs)
    exits = assign_exits(s, thresholds)
    costs = [1.0 + 2.0 * k for k in range(num_exits)]
    ev = evaluate_thresholds(s, torch.tensor(correct), thresholds, costs)
    s_floats = s.tolist()  # the float32 values as Python floats, so comparisons are exact
    for row, i in enumerate(q_numerators):
        ref_t = reference_thresholds(s_floats, Fraction(i, 20), num_exits)
        assert thresholds[row].tolist() == ref_t
        assert exits[row].tolist() == reference_exits(s_floats, ref_t)
        acc, cost, hist = reference_evaluate(s_floats, correct, ref_t, costs)
        assert ev.histogram[row].tolist() == hist
        assert ev.accuracy[row].item() == pytest.approx(acc, abs=1e-12)
        assert ev.expected_cost[row].item() == pytest.approx(cost, rel=1e-12)


def test_chunking_over_q_gives_the_same_thresholds(monkeypatch):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 7, (300, 4), generator=g).float() / 7
    full = calibrate_thresholds(scores, search_qs(50))
    monkeypatch.setattr(protocol, "_MAX_CHUNK_ELEMENTS", 1000)
    assert torch.equal(calibrate_thresholds(scores, search_qs(50)), full)
    assert torch.equal(assign_exits(scores, full), assign_exits(scores, full))


# ---------------------------------------------------------------------------------------------- pi(q)
def test_default_qs():
    qs = default_qs()
    assert qs.shape == (39,)
    assert torch.allclose(qs, torch.arange(1, 40, dtype=torch.float64) / 20)


@pytest.mark.parametrize("num_exits", [1, 2, 4, 7])
def test_pi_sums_to_one_and_matches_formula(num_exits):
    qs = torch.cat([default_qs(), torch.tensor([0.0, 1e-6, 50.0, 1e6, INF], dtype=torch.float64)])
    pi = target_exit_distribution(qs, num_exits)
    assert pi.shape == (qs.numel(), num_exits)
    assert torch.allclose(pi.sum(dim=1), torch.ones(qs.numel(), dtype=torch.float64))
    for q in [0.3, 1.0, 1.7]:
        expected = torch.tensor([q**k for k in range(1, num_exits + 1)], dtype=torch.float64)
        assert torch.allclose(target_exit_distribution(q, num_exits), expected / expected.sum())


def test_pi_limits():
    assert target_exit_distribution(0.0, 3).tolist() == [1.0, 0.0, 0.0]
    assert target_exit_distribution(INF, 3).tolist() == [0.0, 0.0, 1.0]
    assert target_exit_distribution(1e6, 4)[-1].item() > 0.999  # large q: mass on the last exit
    assert target_exit_distribution(1e-6, 4)[0].item() > 0.999


def test_quota_floor_is_exact_on_rational_shares():
    # q = 1.4, K = 2, n = 36: pi_1 = 5/12 exactly, n * pi_1 = 15, but 14.999999999999998 in float64
    pi = target_exit_distribution(1.4, 2)
    assert torch.floor(pi * 36).tolist() == [14.0, 20.0]  # what a plain float floor would give
    assert exit_quotas(pi, 36).tolist() == [15, 21]
    scores = torch.stack([torch.arange(36.0), torch.zeros(36)], dim=1)
    ev = evaluate_thresholds(scores, scores > 0, calibrate_thresholds(scores, [1.4]), [1, 2])
    assert ev.histogram.tolist() == [[15, 21]]
    assert exit_quotas(target_exit_distribution(1.0, 3), 300).tolist() == [100, 100, 100]


def test_pi_rejects_bad_q():
    with pytest.raises(ValueError, match="q values must be in"):
        target_exit_distribution(-0.5, 3)
    with pytest.raises(ValueError, match="num_exits"):
        target_exit_distribution(0.5, 0)


# ----------------------------------------------------------------------------------------- thresholds
def _distinct_scores(n: int, num_exits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g).float() / n for _ in range(num_exits)], dim=1)


def test_last_threshold_is_minus_inf_and_quotas_met_without_ties():
    n, num_exits = 1000, 4
    scores = _distinct_scores(n, num_exits)
    qs = default_qs()
    thresholds = calibrate_thresholds(scores, qs)
    assert thresholds.shape == (39, num_exits)
    assert torch.all(thresholds[:, -1] == -INF)
    hist = evaluate_thresholds(scores, torch.ones(n, num_exits, dtype=torch.bool), thresholds, [1, 2, 3, 4])
    quotas = exit_quotas(target_exit_distribution(qs, num_exits), n)
    # distinct scores and enough samples left: exactly m_k samples exit at every early exit
    assert torch.equal(hist.histogram[:, :-1], quotas[:, :-1])
    assert torch.all(hist.histogram.sum(dim=1) == n)


def test_histogram_shifts_to_later_exits_as_q_grows():
    n, num_exits = 2000, 4
    scores = _distinct_scores(n, num_exits, seed=3)
    ev = evaluate_thresholds(
        scores, torch.ones(n, num_exits, dtype=torch.bool), calibrate_thresholds(scores), [1.0, 2.0, 3.0, 4.0]
    )
    first, last = ev.histogram[:, 0], ev.histogram[:, -1]
    assert torch.all(first[1:] <= first[:-1])
    assert torch.all(last[1:] >= last[:-1])
    assert torch.all(ev.expected_cost[1:] >= ev.expected_cost[:-1])


def test_ties_let_more_than_the_quota_exit():
    scores = torch.tensor([[0.9, 0.0], [0.5, 0.0], [0.5, 0.0], [0.5, 0.0], [0.1, 0.0]])
    thresholds = calibrate_thresholds(scores, [1.0])  # q = 1, K = 2: m_1 = floor(5 / 2) = 2
    assert thresholds[0].tolist() == [0.5, -INF]
    assert assign_exits(scores, thresholds)[0].tolist() == [0, 0, 0, 0, 1]  # 4 exit at exit 1, not 2


def test_quota_zero_or_too_few_left_gives_inf():
    scores = torch.tensor([[0.9, 0.9, 0.0], [0.8, 0.8, 0.0]])
    # q = 0.05, K = 3, n = 2: m = floor(2 * 0.952) = 1, floor(2 * 0.0476) = 0 -> T_2 = inf
    assert calibrate_thresholds(scores, [0.05])[0].tolist() == pytest.approx([0.9, INF, -INF])
    # q = inf: all m = 0 except the last; q = 0: m_1 = n
    t = calibrate_thresholds(scores, [INF, 0.0])
    assert t[0].tolist() == [INF, INF, -INF]
    assert assign_exits(scores, t).tolist() == [[2, 2], [0, 0]]


def test_single_exit_model():
    scores = torch.rand(10, 1)
    t = calibrate_thresholds(scores)
    assert torch.all(t == -INF)
    assert torch.all(assign_exits(scores, t) == 0)


def test_assign_exits_single_threshold_vector():
    scores = torch.tensor([[0.2, 0.9, 0.1], [0.7, 0.1, 0.1], [0.1, 0.1, 0.1]])
    assert assign_exits(scores, torch.tensor([0.5, 0.8, 2.0])).tolist() == [1, 0, 2]


def test_input_errors():
    with pytest.raises(ValueError, match="calibration split is empty"):
        calibrate_thresholds(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        calibrate_thresholds(torch.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        calibrate_thresholds(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="floating point"):
        calibrate_thresholds(torch.zeros(3, 2, dtype=torch.long))
    scores = torch.rand(4, 3)
    with pytest.raises(ValueError, match="thresholds must be"):
        assign_exits(scores, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="bool tensor"):
        evaluate_thresholds(scores, torch.ones(4, 3), torch.zeros(3), [1, 2, 3])
    with pytest.raises(ValueError, match="shape of the scores"):
        evaluate_thresholds(scores, torch.ones(4, 2, dtype=torch.bool), torch.zeros(3), [1, 2, 3])
    with pytest.raises(ValueError, match="one value per exit"):
        evaluate_thresholds(scores, torch.ones(4, 3, dtype=torch.bool), torch.zeros(3), [1, 2])
    with pytest.raises(ValueError, match="same number of exits"):
        budgeted_curve(scores, scores > 0, torch.rand(4, 2), torch.rand(4, 2) > 0, [1, 2, 3], 3.0)
    with pytest.raises(ValueError, match="full_cost"):
        budgeted_curve(scores, scores > 0, scores, scores > 0, [1, 2, 3], 0.0)


# ---------------------------------------------------------------------------------------------- curve
def _toy_split(n: int, num_exits: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and correctness where later exits are more accurate and confidence predicts correctness."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, num_exits, generator=g)
    skill = torch.linspace(0.4, 0.9, num_exits)
    correct = torch.rand(n, num_exits, generator=g) < (skill + 0.3 * (scores - 0.5)).clamp(0, 1)
    return scores, correct


def test_budgeted_curve_on_identical_splits():
    scores, correct = _toy_split(500)
    costs = [1.0, 2.0, 3.0, 4.0]
    curve = budgeted_curve(scores, correct, scores, correct, costs, full_cost=4.0)
    assert curve.qs.shape == (39,) and curve.thresholds.shape == (39, 4)
    assert torch.equal(curve.test_accuracy, curve.cal_accuracy)
    assert torch.equal(curve.test_histogram, curve.cal_histogram)
    assert torch.allclose(curve.test_cost_fraction, curve.test_cost / 4.0)
    assert torch.all(curve.test_histogram.sum(dim=1) == 500)


def test_anytime_and_topk():
    correct = torch.tensor([[True, False], [True, True], [False, True], [False, True]])
    assert anytime_accuracy(correct).tolist() == [0.5, 0.75]
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0]], [[0.0, 1.0, 2.0, 3.0]]])  # [N=2, K=1, C=4]
    labels = torch.tensor([1, 1])
    assert topk_correct(logits, labels, k=1).tolist() == [[False], [False]]
    assert topk_correct(logits, labels, k=2).tolist() == [[True], [False]]
    assert topk_correct(logits, labels, k=3).tolist() == [[True], [True]]
    with pytest.raises(ValueError, match="number of classes"):
        topk_correct(logits, labels, k=5)
    with pytest.raises(ValueError, match="empty split"):
        anytime_accuracy(torch.zeros(0, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------------- operating points
COSTS = [1.0, 2.0, 3.0, 4.2]
FULL = 4.0


def test_operating_points_respect_budget_and_are_best_on_calibration():
    cal_s, cal_c = _toy_split(400, seed=1)
    test_s, test_c = _toy_split(300, seed=2)
    qs = search_qs(300)
    budgets = [0.25, 0.33, 0.5, 0.75, 1.0]
    points = operating_points(cal_s, cal_c, test_s, test_c, COSTS, FULL, budgets, qs=qs)
    grid = evaluate_thresholds(cal_s, cal_c, calibrate_thresholds(cal_s, qs), COSTS)
    for b, p in zip(budgets, points, strict=True):
        assert p.budget == b and p.budget_unit == "fraction"
        assert p.cal_cost <= b * FULL * (1 + 1e-9)
        feasible = grid.expected_cost <= b * FULL * (1 + 1e-9)
        assert p.cal_accuracy == grid.accuracy[feasible].max().item()
        assert p.thresholds[-1].item() == -INF
        again = evaluate_thresholds(test_s, test_c, p.thresholds, COSTS)
        assert p.test_accuracy == again.accuracy.item()
        assert p.test_cost_fraction == pytest.approx(again.expected_cost.item() / FULL)
        assert torch.equal(p.test_histogram, again.histogram)
    assert points[0].cal_accuracy <= points[-1].cal_accuracy  # a larger budget never hurts on calibration


def test_budget_at_cheapest_cost_puts_everyone_at_exit_one():
    cal_s, cal_c = _toy_split(200, seed=4)
    (choice,) = select_budgets(cal_s, cal_c, COSTS, FULL, [COSTS[0] / FULL], qs=search_qs(50))
    assert choice.q == 0.0
    assert choice.cal_histogram.tolist() == [200, 0, 0, 0]
    assert choice.cal_cost == COSTS[0]


def test_absolute_and_fraction_budgets_agree():
    cal_s, cal_c = _toy_split(300, seed=5)
    qs = search_qs(200)
    frac = select_budgets(cal_s, cal_c, COSTS, FULL, [0.4, 0.8], "fraction", qs)
    absolute = select_budgets(cal_s, cal_c, COSTS, FULL, [0.4 * FULL, 0.8 * FULL], "absolute", qs)
    for a, b in zip(frac, absolute, strict=True):
        assert a.q == b.q and a.cal_accuracy == b.cal_accuracy and torch.equal(a.thresholds, b.thresholds)
        assert a.budget_cost == pytest.approx(b.budget_cost) and b.budget_unit == "absolute"


@pytest.mark.parametrize(
    ("budget", "unit", "pattern"),
    [
        (0.1, "fraction", r"budget 0.1 \(fraction of the full model's cost\) is outside .*\[0.25, 1\]"),
        (1.5, "fraction", r"outside .*\[0.25, 1\]"),
        (0.5, "absolute", r"budget 0.5 \(absolute cost, unit of costs\) is outside .*\[1, 4\]"),
        (4.5, "absolute", r"\[1, 4\]"),
    ],
)
def test_budget_out_of_range_errors(budget, unit, pattern):
    cal_s, cal_c = _toy_split(50)
    with pytest.raises(ValueError, match=pattern):
        select_budgets(cal_s, cal_c, COSTS, FULL, [budget], unit, qs=search_qs(10))


def test_budget_unit_and_empty_split_errors():
    cal_s, cal_c = _toy_split(50)
    with pytest.raises(ValueError, match="budget_unit"):
        select_budgets(cal_s, cal_c, COSTS, FULL, [0.5], "gflop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration split is empty"):
        select_budgets(cal_s[:0], cal_c[:0], COSTS, FULL, [0.5], qs=search_qs(10))


# ------------------------------------------------------------------------------------------------ AUC
def test_auc_hand_computed():
    # trapezoids: [0.25, 0.5] mean 0.6, [0.5, 1.0] mean 0.75 -> (0.15 + 0.375) / 0.75 = 0.7
    assert area_under_curve([1.0, 0.25, 0.5], [0.8, 0.5, 0.7]) == pytest.approx(0.7)
    # clipped to [0.5, 0.75]: line from 0.7 to 0.75 -> mean 0.725
    assert area_under_curve([0.25, 0.5, 1.0], [0.5, 0.7, 0.8], lo=0.5, hi=0.75) == pytest.approx(0.725)
    # range inside one segment: interpolated both ends, mean of 0.55 and 0.65
    assert area_under_curve([0.25, 0.5], [0.5, 0.7], lo=0.3, hi=0.45) == pytest.approx(0.6)


def test_auc_outside_the_curve():
    # below the cheapest point counts 0, above the most expensive point stays flat
    assert area_under_curve([0.5, 0.75], [0.6, 0.8], lo=0.25, hi=1.0) == pytest.approx(
        (0.25 * 0 + 0.25 * 0.7 + 0.25 * 0.8) / 0.75
    )
    assert area_under_curve([1.2], [0.9], lo=0.25, hi=1.0) == 0.0
    assert area_under_curve([0.1], [0.9], lo=0.25, hi=1.0) == pytest.approx(0.9)
    # duplicate costs are merged into their mean
    assert area_under_curve([0.25, 0.25, 1.0], [0.4, 0.6, 0.5]) == pytest.approx(0.5)


def test_auc_errors():
    with pytest.raises(ValueError, match="equal length"):
        area_under_curve([0.1, 0.2], [0.5])
    with pytest.raises(ValueError, match="hi > lo"):
        area_under_curve([0.1], [0.5], lo=1.0, hi=0.5)


# ------------------------------------------------------------------------------------- on an accelerator
def test_protocol_on_accelerator_matches_cpu(accelerator):
    """Run with ``--accelerator gpu`` on the GPU box: the collected outputs live on the device there."""
    device = torch.device("cuda" if accelerator in ("gpu", "cuda") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--accelerator gpu but CUDA is not available")
    cal_s, cal_c = _toy_split(500, seed=7)
    test_s, test_c = _toy_split(400, seed=8)
    args = (cal_s, cal_c, test_s, test_c)
    on_dev = [a.to(device) for a in args]
    ref = budgeted_curve(*args, COSTS, FULL)
    got = budgeted_curve(*on_dev, COSTS, FULL)
    assert torch.equal(got.thresholds.cpu(), ref.thresholds)
    assert torch.equal(got.test_histogram.cpu(), ref.test_histogram)
    assert torch.allclose(got.test_accuracy.cpu(), ref.test_accuracy)
    ref_points = operating_points(*args, COSTS, FULL, [0.3, 0.6], qs=search_qs(100))
    got_points = operating_points(*on_dev, COSTS, FULL, [0.3, 0.6], qs=search_qs(100))
    for a, b in zip(ref_points, got_points, strict=True):
        assert a.q == b.q and a.test_accuracy == b.test_accuracy


def test_budget_search_without_a_feasible_q():
    cal_s, cal_c = _toy_split(100)
    with pytest.raises(ValueError, match="no q in qs meets budget"):
        select_budgets(cal_s, cal_c, COSTS, FULL, [0.25], qs=[1.0, 2.0])
    # budgets may be any iterable
    (choice,) = select_budgets(cal_s, cal_c, COSTS, FULL, iter([0.5]), qs=search_qs(20))
    assert choice.cal_cost <= 0.5 * FULL


def _costs(exit_gflops, full):
    return ExitCosts(tuple(g * 1e9 for g in exit_gflops), full * 1e9, (3, 32, 32))


@pytest.mark.parametrize(("budget", "option"), [(0.1, "fraction"), (1.5, "fraction"), (0.5, "gflops")])
def test_config_check_and_protocol_refuse_a_budget_with_the_same_sentence(budget, option):
    costs = _costs([1.0, 2.0, 4.0], 4.0)
    with pytest.raises(ConfigError) as config_err:
        protocol_run.check_budgets([budget], option, costs)
    scores = torch.rand(20, 3)
    correct = torch.rand(20, 3) > 0.5
    unit = protocol.protocol_budget_unit(option)
    with pytest.raises(ValueError) as protocol_err:
        protocol.select_budgets(
            scores, correct, costs.exit_gflops, 4.0, [budget], unit, protocol.search_qs(5)
        )
    same = str(protocol_err.value).replace("unit of costs", "GFLOPs")  # the config check names the cost unit
    assert str(config_err.value) == f"{same}; fix evaluation.budgets"
    assert "outside the achievable range" in str(config_err.value)


def test_budgets_at_both_ends_of_the_range_pass_both_checks():
    costs = _costs([1.0, 2.0, 4.0], 4.0)
    protocol_run.check_budgets([0.25, 1.0], "fraction", costs)
    protocol_run.check_budgets([1.0, 4.0], "gflops", costs)
    assert protocol.check_budget_range([1.0, 4.0], 1.0, 4.0, "absolute", "GFLOPs") == [1.0, 4.0]


def test_budget_unit_options_translate_to_protocol_units():
    assert protocol.protocol_budget_unit("gflops") == "absolute"
    assert protocol.protocol_budget_unit("fraction") == "fraction"
    with pytest.raises(
        ValueError, match=r"budget_unit must be one of \('fraction', 'gflops'\); got 'absolute'"
    ):
        protocol.protocol_budget_unit("absolute")
    assert tuple(protocol.BUDGET_UNIT_OPTIONS) == get_args(protocol.BudgetUnitOption)
    assert set(protocol.BUDGET_UNIT_OPTIONS.values()) == set(get_args(protocol.BudgetUnit))
