"""EarlyExitEngine: full pooled batches per stage give the simulated protocol's exits and predictions."""

from __future__ import annotations

import math

import pytest
import torch
from support.builders import make_tiny_vit
from support.early_exit import (
    MARGIN,
    TEMPERATURES,
    TINY,
    MarginModule,
    between,
    margin_scores,
    randomise,
    registered_margin,
    simulated,
    thresholded_module,
)

from dmpo_lightning.models import MultiExitViT
from dmpo_lightning.models.engine import EarlyExitEngine
from dmpo_lightning.models.exit_rules import exit_scores
from dmpo_lightning.models.multi_exit import ExitOptions

N = 37  # not a multiple of any engine batch size used below


@pytest.fixture(autouse=True, scope="module")
def _margin_rule():
    """The tests' margin rule, registered as a plugin would register it."""
    with registered_margin():
        yield


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = MultiExitViT(make_tiny_vit(), 5, ExitOptions(moment_dim=32, cov_dim=8)).double().eval()
    randomise(model)
    x = torch.randn(N, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    return model, x, logits


def check(model, x, thresholds, scores, preds, *, input_batch, engine_batch, **kwargs):
    exits, pred = simulated(scores.double(), preds, thresholds)
    engine = EarlyExitEngine(model, thresholds, batch_size=engine_batch, **kwargs)
    out = engine.run(torch.split(x, input_batch))
    assert torch.equal(out.exit_index, exits)
    assert torch.equal(out.prediction, pred)
    per_batch = model.forward_early_exit(x, thresholds, kwargs.get("rule", "confidence"))
    torch.testing.assert_close(out.logits, per_batch.logits, rtol=0, atol=1e-10)
    assert torch.equal(per_batch.exit_index, exits) and torch.equal(per_batch.prediction, pred)
    return exits


@pytest.mark.parametrize(("input_batch", "engine_batch"), [(1, 1), (1, 4), (10, 8), (37, 64), (5, 16)])
@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience"])
def test_engine_equals_the_simulated_protocol(setup, rule, input_batch, engine_batch):
    model, x, logits = setup
    scores, preds = exit_scores(logits, rule)
    if rule == "patience":
        thresholds = [2.0, 2.0, 3.0, 0.0]
    else:
        thresholds = [between(scores[:, k], 0.5) for k in range(3)] + [-math.inf]
    exits = check(
        model, x, thresholds, scores, preds, input_batch=input_batch, engine_batch=engine_batch, rule=rule
    )
    assert len(set(exits.tolist())) > 1


@pytest.mark.parametrize("rule", ["confidence", "patience"])
def test_mixed_thresholds_with_disabled_exits(setup, rule):
    model, x, logits = setup
    scores, preds = exit_scores(logits, rule)
    if rule == "patience":
        thresholds = [math.inf, 2.0, math.inf, 0.0]
    else:
        thresholds = [math.inf, between(scores[:, 1], 0.5), math.inf, -math.inf]
    exits = check(model, x, thresholds, scores, preds, input_batch=6, engine_batch=8, rule=rule)
    assert set(exits.tolist()) == {1, 3}


def test_every_sample_leaves_at_the_first_exit(setup):
    model, x, logits = setup
    scores, preds = exit_scores(logits, "confidence")
    exits = check(model, x, [-math.inf, 0.5, 0.5, 0.5], scores, preds, input_batch=8, engine_batch=8)
    assert (exits == 0).all()


def test_no_sample_leaves_before_the_last_exit(setup):
    model, x, logits = setup
    scores, preds = exit_scores(logits, "confidence")
    exits = check(model, x, [math.inf] * 4, scores, preds, input_batch=9, engine_batch=4)
    assert (exits == 3).all()


def test_a_registered_custom_rule(setup):
    model, x, logits = setup
    scores, preds = margin_scores(logits)
    thresholds = [between(scores[:, k], 0.4) for k in range(3)] + [-math.inf]
    check(model, x, thresholds, scores, preds, input_batch=7, engine_batch=8, rule=MARGIN)


def test_empty_input_and_empty_batches(setup):
    model, x, _ = setup
    engine = EarlyExitEngine(model, [0.5] * 4, batch_size=8)
    out = engine.run([])
    assert out.prediction.shape == (0,) and out.logits.shape == (0, 5)
    outs = list(engine.stream([x[:0], x[:3], x[:0]]))
    assert [o.prediction.shape[0] for o in outs] == [0, 3, 0]


def test_stream_yields_each_input_batch_in_order(setup):
    model, x, logits = setup
    scores, preds = exit_scores(logits, "confidence")
    thresholds = [between(scores[:, k], 0.5) for k in range(3)] + [-math.inf]
    _, pred = simulated(scores.double(), preds, thresholds)
    sizes = [5, 1, 12, 19]
    outs = list(EarlyExitEngine(model, thresholds, batch_size=8).stream(torch.split(x, sizes)))
    assert [o.prediction.shape[0] for o in outs] == sizes
    assert torch.equal(torch.cat([o.prediction for o in outs]), pred)


def test_engine_accepts_a_module_and_uses_its_exit_rule():
    module = MarginModule(**TINY).double().train()
    randomise(module.model)
    x = torch.randn(20, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        scores, preds = margin_scores(module.eval()(x))
    module.train()
    thresholds = [between(scores[:, k], 0.5) for k in range(3)] + [-math.inf]
    exits, pred = simulated(scores.double(), preds, thresholds)
    out = EarlyExitEngine(module, thresholds, batch_size=6).run([{"image": x[:11]}, (x[11:],)])
    assert torch.equal(out.exit_index, exits) and torch.equal(out.prediction, pred)
    assert module.model.training  # mode restored


def test_bad_arguments(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        EarlyExitEngine(model, [0.5] * 4, batch_size=0)
    with pytest.raises(ValueError, match="got 3 thresholds"):
        EarlyExitEngine(model, [0.5] * 3)
    with pytest.raises(ValueError, match="MultiExitViT or a DMPOModule"):
        EarlyExitEngine(torch.nn.Linear(2, 2), [0.5] * 4)
    with pytest.raises(ValueError, match="each batch must be an image tensor"):
        EarlyExitEngine(model, [0.5] * 4).run(["not images"])


def test_session_push_and_flush_return_every_batch_once_in_order():
    module = thresholded_module()
    torch.manual_seed(3)
    x = torch.randn(29, 3, 32, 32)
    thresholds = module.exit_thresholds.tolist()
    expected = module.model.forward_early_exit(x, thresholds, temperatures=TEMPERATURES)
    module.model.train()
    try:
        session = EarlyExitEngine(module.model, thresholds, batch_size=8, temperatures=TEMPERATURES).session()
        done = []
        for part in torch.split(x, [3, 0, 9, 1, 16]):
            done += session.push(part)
            assert module.model.training, "each push restores the model's mode"
        assert session.waiting == 29 - sum(o.prediction.shape[0] for o in done)
        done += session.flush()
    finally:
        module.model.eval()
    assert [o.prediction.shape[0] for o in done] == [3, 0, 9, 1, 16]
    assert torch.equal(torch.cat([o.exit_index for o in done]), expected.exit_index)
    assert torch.equal(torch.cat([o.prediction for o in done]), expected.prediction)
    raw = module.model.forward_early_exit(x, thresholds)
    assert not torch.equal(raw.exit_index, expected.exit_index), "the temperatures should matter here"
