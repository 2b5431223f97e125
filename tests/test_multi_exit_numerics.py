"""Numerical robustness of the whole multi-exit model (forward *and* backward).

Under CPU autocast and on degenerate inputs. Head-level forward checks live in test_heads.py; here every exit
of MultiExitViT is checked, gradients included, with the second-order heads fed by a real trunk.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.builders import TINY_CONFIG, make_tiny_vit

from dmpo_lightning.cli import main
from dmpo_lightning.models import MultiExitViT
from dmpo_lightning.models.heads import build_predictor
from dmpo_lightning.models.multi_exit import ExitOptions

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG
NUM_CLASSES = 5


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        return out.dtype == dtype
    except (RuntimeError, ValueError):
        return False


PRECISIONS = [
    pytest.param(None, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16-autocast"),
    pytest.param(
        torch.float16,
        id="fp16-autocast",
        marks=pytest.mark.skipif(not _cpu_autocast_supports(torch.float16), reason="no float16 CPU autocast"),
    ),
]


def _autocast(dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def _model(early_head: str, constant_tokens: bool = False) -> MultiExitViT:
    model = MultiExitViT(
        make_tiny_vit(),
        NUM_CLASSES,
        ExitOptions(blocks=(1, 2, 3, 4), early_head=early_head, moment_dim=32, moment_groups=4, cov_dim=8),
    )
    if constant_tokens:  # without position embeddings a constant image gives identical patch tokens
        with torch.no_grad():
            model.backbone.pos_embed.zero_()
    return model


def _images(kind: str) -> torch.Tensor:
    if kind == "random":
        return torch.randn(4, 3, 32, 32)
    if kind == "batch_of_one":
        return torch.randn(1, 3, 32, 32)
    if kind == "constant_tokens":
        return torch.full((2, 3, 32, 32), 0.5)
    if kind == "zeros_batch_of_one":
        return torch.zeros(1, 3, 32, 32)
    raise ValueError(kind)


INPUTS = ["random", "batch_of_one", "constant_tokens", "zeros_batch_of_one"]


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("early_head", ["moment", "isqrt_cov"])
def test_every_exit_and_every_gradient_is_finite(early_head, inputs, dtype):
    """Training mode (BatchNorm on batch statistics, as in training_step), forward and backward."""
    model = _model(early_head, constant_tokens=inputs == "constant_tokens").train()
    x = _images(inputs)
    if inputs == "constant_tokens":
        with torch.no_grad():
            patches = model.backbone.patch_embed(x)
        assert torch.equal(patches, patches[:, :1].expand_as(patches))  # really degenerate: all tokens equal
    target = torch.arange(x.shape[0]) % NUM_CLASSES
    with _autocast(dtype):
        logits = model(x)
        loss = sum(F.cross_entropy(z.float(), target) for z in logits)
    assert len(logits) == 4
    for k, z in enumerate(logits):
        assert z.shape == (x.shape[0], NUM_CLASSES)
        assert torch.isfinite(z.float()).all(), f"exit {k} logits not finite"
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing[:5]
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, bad[:5]
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)
    if inputs == "constant_tokens":
        return  # zero covariance: iSQRT-COV features are exactly 0, its classifier rightly gets no gradient
    # every early head received a gradient through its second-order branch
    for k, exit_head in enumerate(model.exits[:-1]):
        branch = exit_head.predictor.fc_second if early_head == "moment" else exit_head.predictor.fc
        assert branch.weight.grad.abs().sum() > 0, f"exit {k}: no gradient through the {early_head} branch"


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("kind", ["moment", "isqrt_cov"])
def test_second_order_heads_backward_under_autocast(kind, dtype):
    """test_heads.py checks the forward under bf16; here the backward under each autocast dtype, on tokens
    that make the covariance vanish (all patch tokens equal) and on ordinary ones."""
    head = build_predictor(kind, 32, NUM_CLASSES, 1, moment_dim=32, moment_groups=4, cov_dim=8).train()
    for tokens in (torch.randn(3, 17, 32), torch.randn(3, 1, 32).expand(3, 17, 32).clone()):
        tokens.requires_grad_()
        with _autocast(dtype):
            out = head(tokens)
        assert torch.isfinite(out.float()).all()
        out.float().square().sum().backward()
        assert torch.isfinite(tokens.grad).all()
        for name, p in head.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        head.zero_grad()


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("early_head", ["moment", "isqrt_cov"])
def test_eval_and_early_exit_forward_under_autocast(early_head, dtype):
    """Evaluation mode (BatchNorm running statistics): all-exits and true early-exit forward, a normal batch
    followed by a single constant image whose patch tokens are all equal."""
    model = _model(early_head, constant_tokens=True).eval()
    x = torch.cat([torch.randn(5, 3, 32, 32), torch.full((1, 3, 32, 32), 0.5)])
    with _autocast(dtype), torch.no_grad():
        logits = model(x)
        single = model(x[-1:])
        out = model.forward_early_exit(x, thresholds=[0.3, 0.3, 0.3, 0.0])
    assert all(torch.isfinite(z.float()).all() for z in logits + single)
    assert torch.isfinite(out.score).all() and torch.isfinite(out.logits.float()).all()
    # the decisions agree with what the forward returns: a sample leaves early only with score >= threshold,
    # and its prediction is the argmax of the logits of the exit it left at
    early = out.exit_index < 3
    assert bool((out.score[early] >= 0.3).all())
    assert torch.equal(out.prediction, out.logits.float().argmax(dim=-1))


@pytest.mark.slow
def test_bf16_mixed_fit_and_test_end_to_end(tmp_path, monkeypatch):
    """Lightning's bf16-mixed precision on CPU: losses, metrics, FLOP counting and the report stay finite."""
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "-c",
            TINY,
            "--trainer.precision=bf16-mixed",
            "--trainer.max_epochs=2",
            "--model.init_args.exits.early_head=isqrt_cov",
            "--test_after_fit=true",
        ]
    )
    assert cli.trainer.precision == "bf16-mixed"
    report = json.loads((Path(cli.trainer.log_dir) / "dmpo_test" / "report.json").read_text())
    assert all(0.0 <= e["top1"] <= 1.0 for e in report["exits"])
    assert 0.0 <= report["auc"]["value"] <= 1.0
    metrics = cli.trainer.callback_metrics
    losses = {k: float(v) for k, v in metrics.items() if "loss" in k or k.startswith("train/ce")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
