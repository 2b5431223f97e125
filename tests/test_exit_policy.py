"""One scoring path (registered rules), eval mode and skipped heads of the real early exit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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
from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions
from dmpo_lightning.models import ISqrtCovHead, MomentHead, MultiExitViT, newton_schulz_sqrt
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


# ------------------------------------------------------------------------------ leaner heads (issue 13)
def reference_moment_forward(m: MomentHead, x: torch.Tensor) -> torch.Tensor:
    """MomentHead.forward as it was before the lean version (LayerNorm of all tokens for the class token)."""
    xn = m.norm(x)
    cls = xn[:, 0] if m.num_prefix_tokens > 0 else xn.mean(dim=1)
    first = m.fc_first(m.drop(cls))
    p = m.proj(x[:, m.num_prefix_tokens :]).float()
    b, n, _ = p.shape
    p = p.reshape(b, n, m.groups, m.group_dim)
    p = F.layer_norm(p, (m.group_dim,), m.group_norm.weight, m.group_norm.bias, m.group_norm.eps)
    p = (p - p.mean(dim=1, keepdim=True)).permute(0, 2, 1, 3)
    cov = F.normalize(p[:, :-1].transpose(-1, -2) @ p[:, 1:] / n, dim=-1, eps=1e-12)
    second = m.fc_second(m.drop(m.conv(cov).flatten(1)))
    return 0.5 * (first + second)


def reference_newton_schulz(a: torch.Tensor, iterations: int, eps: float = 1e-5) -> torch.Tensor:
    """newton_schulz_sqrt before the lean version: every product with Z = I and the unused last Z."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1) + eps
    y, z = a / trace, eye
    for _ in range(iterations):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


def reference_isqrt_forward(m: ISqrtCovHead, x: torch.Tensor) -> torch.Tensor:
    z = m.reduce(x[:, m.num_prefix_tokens :])
    b, n, d = z.shape
    z = m.act(m.bn(z.reshape(b * n, d))).reshape(b, n, d).float()
    z = z - z.mean(dim=1, keepdim=True)
    root = reference_newton_schulz(z.transpose(1, 2) @ z / n, m.iterations)
    return m.fc(m.drop(root.flatten(1)[:, m.triu_index]))


STATE_KEYS = {
    "moment": {
        "norm.weight",
        "norm.bias",
        "fc_first.weight",
        "fc_first.bias",
        "proj.weight",
        "proj.bias",
        "group_norm.weight",
        "group_norm.bias",
        "conv.0.weight",
        "conv.0.bias",
        "conv.2.weight",
        "conv.2.bias",
        "fc_second.weight",
        "fc_second.bias",
    },
    "isqrt": {
        "reduce.weight",
        "reduce.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    },
}


@pytest.mark.parametrize("prefix", [1, 0, 5])
@pytest.mark.parametrize(("dim", "tokens", "proj"), [(32, 17, 32), (96, 50, 128)])
def test_lean_moment_head_equals_the_reference(prefix, dim, tokens, proj):
    torch.manual_seed(1)
    head = MomentHead(dim, 7, prefix, moment_dim=proj).eval()
    randomise(head, 0.2)
    assert set(head.state_dict()) == STATE_KEYS["moment"]  # checkpoints still load
    x = torch.randn(6, tokens + prefix, dim)
    with torch.no_grad():
        diff = (head(x) - reference_moment_forward(head, x)).abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_lean_newton_schulz_and_isqrt_head_equal_the_reference(iterations):
    torch.manual_seed(2)
    a = torch.randn(4, 12, 30)
    a = a @ a.transpose(1, 2) / 30
    assert torch.equal(newton_schulz_sqrt(a, iterations), reference_newton_schulz(a, iterations))
    head = ISqrtCovHead(32, 7, 1, cov_dim=12, cov_iterations=iterations).eval()
    randomise(head, 0.2)
    head.bn.running_var.uniform_(0.5, 2.0)
    assert set(head.state_dict()) == STATE_KEYS["isqrt"]
    x = torch.randn(5, 20, 32)
    with torch.no_grad():
        assert (head(x) - reference_isqrt_forward(head, x)).abs().max() <= 1e-5


# --------------------------------------------------------------- dmpo test times the real early exit
@pytest.mark.slow
def test_dmpo_test_times_the_real_early_exit_into_the_report(tmp_path):
    import json
    from pathlib import Path

    import lightning.pytorch as pl

    from dmpo_lightning.cli import main

    tiny = str(Path(__file__).parent / "configs" / "tiny.yaml")
    args = ["-c", tiny, "--evaluation.time_early_exit=16", "--evaluation.allow_untrained=true"]
    cli = main([*args, f"--evaluation.report_dir={tmp_path / 'r'}"], run=False)
    evaluator = DMPOEvaluator(cli.config_init["evaluation"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[evaluator]
    )
    trainer.test(cli.model, datamodule=cli.datamodule)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    speed = report["early_exit_speed"]
    assert speed["images"] == 16 and speed["device"].startswith("cpu")
    assert [r["budget"] for r in speed["budgets"]] == [b["budget"] for b in report["budgets"]] == [0.5, 0.75]
    for r in speed["budgets"]:
        assert r["full_ms_per_image"] > 0 and r["early_ms_per_image"] > 0 and r["engine_ms_per_image"] > 0
        assert sum(r["exit_histogram"]) == 16 and r["flops_speedup"] >= 1


def test_time_early_exit_option_is_validated():
    with pytest.raises(ValueError, match="time_early_exit must be an integer >= 0"):
        EvaluationOptions(time_early_exit=-1)


def test_early_exit_restores_a_mixed_mode_exactly():
    model = MultiExitViT(make_tiny_vit(), 5, SMALL_HEADS).train()
    model.exits[1].eval()  # e.g. a frozen head kept in eval mode by the user
    before = [m.training for m in model.modules()]
    model.forward_early_exit(torch.randn(2, 3, 32, 32), [0.5, 0.5, 0.5, -math.inf])
    assert [m.training for m in model.modules()] == before
