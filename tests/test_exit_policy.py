"""One scoring path (registered rules), eval mode and skipped heads of the real early exit."""

from __future__ import annotations

import math

import pytest
import torch
from support.builders import make_tiny_vit
from support.early_exit import (
    MARGIN,
    SMALL_HEADS,
    TINY,
    MarginModule,
    between,
    margin_scores,
    randomise,
    registered_margin,
    simulated,
)

from dmpo_lightning import DMPOModule
from dmpo_lightning.models import MultiExitViT
from dmpo_lightning.models.exit_rules import exit_scores


@pytest.fixture(autouse=True, scope="module")
def _margin_rule():
    """The tests' margin rule, registered as a plugin would register it."""
    with registered_margin():
        yield


def test_a_registered_rule_drives_the_real_early_exit():
    module = MarginModule(**TINY).double().eval()
    randomise(module.model)
    x = torch.randn(48, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = module(x)
    scores, preds = margin_scores(logits)
    thresholds = [between(scores[:, k], 0.5) for k in range(3)] + [-math.inf]
    exits, pred = simulated(scores.double(), preds, thresholds)
    out = module.forward_early_exit(x, thresholds)
    assert torch.equal(out.exit_index, exits)
    assert torch.equal(out.prediction, pred)
    assert len(set(exits.tolist())) > 1
    # The confidence rule with the margin's thresholds decides differently, so this test can fail.
    conf_exits, _ = simulated(*exit_scores(logits, "confidence"), thresholds)
    assert not torch.equal(conf_exits, exits)


def test_the_module_rule_is_a_registered_name_and_an_unknown_one_is_refused():
    module = DMPOModule(**TINY)
    assert module.exit_rule == "confidence"
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"unknown exit rule 'nope'; allowed: confidence, entropy, patience"):
        module.forward_early_exit(x, [0.5] * 4, rule="nope")


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience"])
def test_builtin_rules_match_the_protocol_with_disabled_exits(rule):
    model = MultiExitViT(make_tiny_vit(), 5, SMALL_HEADS).double().eval()
    randomise(model)
    x = torch.randn(40, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        scores, preds = exit_scores(model(x), rule)
    if rule == "patience":
        thresholds = [math.inf, 2.0, 2.0, 0.0]
    else:
        thresholds = [math.inf, between(scores[:, 1], 0.4), between(scores[:, 2], 0.4), 0.0]
    exits, pred = simulated(scores.double(), preds, thresholds)
    calls = [0] * model.num_exits
    hooks = [
        head.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, head in enumerate(model.exits)
    ]
    out = model.forward_early_exit(x, thresholds, rule)
    for h in hooks:
        h.remove()
    assert torch.equal(out.exit_index, exits) and torch.equal(out.prediction, pred)
    assert (exits == 0).sum() == 0 and len(set(exits.tolist())) > 1
    # confidence/entropy score exit k from exit k alone: the disabled exit's head is never run;
    # patience needs exit 0's prediction for the run length at exit 1, so every head runs
    assert calls[0] == (1 if rule == "patience" else 0)
    assert calls[1] == 1


def test_last_score_off_keeps_predictions_and_leaves_nan_at_the_last_exit():
    model = MultiExitViT(make_tiny_vit(), 5, SMALL_HEADS).eval()
    randomise(model)
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        scores, _ = exit_scores(model(x), "entropy")
    thresholds = [between(scores[:, k], 0.6) for k in range(3)] + [-math.inf]
    full = model.forward_early_exit(x, thresholds, "entropy")
    lean = model.forward_early_exit(x, thresholds, "entropy", last_score=False)
    assert torch.equal(full.prediction, lean.prediction) and torch.equal(full.exit_index, lean.exit_index)
    last = full.exit_index == 3
    assert last.any() and (~last).any()
    assert torch.isnan(lean.score[last]).all()
    assert torch.equal(lean.score[~last], full.score[~last])


def test_a_local_registered_rule_skips_disabled_heads():
    model = MultiExitViT(make_tiny_vit(), 5, SMALL_HEADS).double().eval()
    randomise(model)
    x = torch.randn(24, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        scores, preds = margin_scores(model(x))
    thresholds = [math.inf, math.inf, between(scores[:, 2], 0.5), -math.inf]
    exits, pred = simulated(scores.double(), preds, thresholds)
    seen = []
    model.exits[0].register_forward_hook(lambda *_: seen.append(0))
    out = model.forward_early_exit(x, thresholds, MARGIN)
    assert torch.equal(out.exit_index, exits) and torch.equal(out.prediction, pred)
    assert seen == []


def test_string_thresholds_give_one_clear_error():
    model = MultiExitViT(make_tiny_vit(), 5, SMALL_HEADS).eval()
    with pytest.raises(ValueError, match="thresholds must be numbers, one per exit"):
        model.forward_early_exit(torch.randn(2, 3, 32, 32), ["a", 0.5, 0.5, 0.5])


def test_early_exit_runs_in_eval_mode_and_restores_the_mode():
    module = DMPOModule(
        **{**TINY, "exits": {**TINY["exits"], "early_head": "isqrt_cov", "head_dropout": 0.5}}
    ).train()
    bn = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bn
    before = {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}
    x = torch.randn(8, 3, 32, 32)
    thresholds = [0.3, 0.3, 0.3, -math.inf]
    out_train = module.forward_early_exit(x, thresholds)
    after = {k: v for k, v in module.state_dict().items() if k in before}
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed during early exit"
    assert module.training and all(m.training for m in module.modules())
    out_eval = module.eval().forward_early_exit(x, thresholds)
    assert torch.equal(out_train.prediction, out_eval.prediction)
    assert torch.equal(out_train.logits, out_eval.logits)  # dropout was off as well


def test_early_exit_restores_a_mixed_mode_exactly():
    model = MultiExitViT(make_tiny_vit(), 5, SMALL_HEADS).train()
    model.exits[1].eval()  # e.g. a frozen head kept in eval mode by the user
    before = [m.training for m in model.modules()]
    model.forward_early_exit(torch.randn(2, 3, 32, 32), [0.5, 0.5, 0.5, -math.inf])
    assert [m.training for m in model.modules()] == before
