"""Exit heads: shapes, identity bypass, matrix square root, numerical robustness, detach, errors."""

from __future__ import annotations

import pytest
import torch
from support.early_exit import randomise
from support.reference_heads import reference_isqrt_forward, reference_moment_forward, reference_newton_schulz
from torch import nn

from dmpo_lightning.models.heads import (
    Bypass,
    ExitHead,
    ISqrtCovHead,
    LinearHead,
    MomentHead,
    build_predictor,
    newton_schulz_sqrt,
)

D, C, NPT, N = 32, 5, 1, 17
SMALL = {"moment_dim": 64, "moment_groups": 4, "cov_dim": 8}


def _tokens(b: int = 2, n: int = N) -> torch.Tensor:
    return torch.randn(b, n, D)


@pytest.mark.parametrize("kind", ["linear", "moment", "isqrt_cov"])
@pytest.mark.parametrize("npt", [0, 1, 3])
def test_predictor_shapes(kind, npt):
    pool = "token" if npt else "avg"
    head = build_predictor(kind, D, C, npt, head_pool=pool, **SMALL)
    assert head(_tokens()).shape == (2, C)


def test_linear_head_pooling():
    x = _tokens()
    head = LinearHead(D, C, NPT, head_pool="avg", norm=False)
    torch.testing.assert_close(head(x), head.fc(x[:, NPT:].mean(1)))
    head = LinearHead(D, C, NPT, head_pool="token", norm=False)
    torch.testing.assert_close(head(x), head.fc(x[:, 0]))


def test_linear_head_init_norm_from(tiny_vit):
    nn.init.normal_(tiny_vit.norm.weight)
    head = LinearHead(D, C, NPT)
    head.init_norm_from(tiny_vit.norm)
    torch.testing.assert_close(head.norm.weight, tiny_vit.norm.weight)
    x = _tokens()
    torch.testing.assert_close(head(x), head.fc(tiny_vit.norm(x)[:, 0]))
    with pytest.raises(ValueError, match="shape"):
        head.init_norm_from(nn.LayerNorm(D + 1))
    with pytest.raises(ValueError, match="norm=False"):
        LinearHead(D, C, NPT, norm=False).init_norm_from(tiny_vit.norm)


def test_bypass_identity_at_init_and_gradient_flows():
    bypass = Bypass(D)
    assert bypass.down.out_features == D // 4
    assert Bypass(3).down.out_features == 1
    x = _tokens().requires_grad_()
    out = bypass(x)
    torch.testing.assert_close(out, x)
    out.square().sum().backward()
    assert x.grad is not None
    assert bypass.up.weight.grad is not None and bypass.up.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("d", [4, 16])
def test_newton_schulz_matches_eigh(d):
    m = torch.randn(3, d, 2 * d, dtype=torch.float64)
    a = m @ m.transpose(1, 2) / (2 * d) + 0.05 * torch.eye(d, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(a)
    expected = vecs @ torch.diag_embed(vals.sqrt()) @ vecs.transpose(1, 2)
    root = newton_schulz_sqrt(a, iterations=30, eps=0.0)
    torch.testing.assert_close(root, expected, rtol=1e-3, atol=1e-6)
    # the default 5 iterations are an approximation (iSQRT-COV's trade-off), still close in norm
    approx = newton_schulz_sqrt(a.float())
    rel = (approx.double() - expected).norm() / expected.norm()
    assert rel < 0.2


def test_newton_schulz_zero_matrix_is_finite():
    out = newton_schulz_sqrt(torch.zeros(2, 4, 4))
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_moment_second_order_matches_naive():
    head = MomentHead(D, C, NPT, moment_dim=16, moment_groups=4).eval()
    x = _tokens(b=1)
    p = head.proj(x[0, NPT:])  # [n, 16]
    ln = head.group_norm
    groups = [nn.functional.layer_norm(g, (4,), ln.weight, ln.bias) for g in p.split(4, 1)]
    groups = [g - g.mean(0) for g in groups]
    naive = torch.stack([groups[i].T @ groups[i + 1] / p.shape[0] for i in range(3)])
    naive = naive / naive.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(head.second_order(x)[0], naive)


def test_isqrt_features_are_upper_triangle():
    head = ISqrtCovHead(D, C, NPT, cov_dim=6)
    assert head.fc.in_features == 21
    rows, cols = torch.triu_indices(6, 6)
    mat = torch.randn(2, 6, 6)
    torch.testing.assert_close(mat.flatten(1)[:, head.triu_index], mat[:, rows, cols])


@pytest.mark.parametrize("kind", ["moment", "isqrt_cov"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("tokens", ["constant_over_tokens", "all_equal", "random"])
def test_second_order_heads_finite_batch_one(kind, train, tokens):
    head = build_predictor(kind, D, C, NPT, **SMALL).train(train)
    if tokens == "constant_over_tokens":
        x = torch.randn(1, 1, D).expand(1, N, D).clone()
    elif tokens == "all_equal":
        x = torch.ones(1, N, D)
    else:
        x = _tokens(b=1)
    x.requires_grad_()
    out = head(x)
    assert out.shape == (1, C) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["linear", "moment", "isqrt_cov"])
def test_finite_under_bf16_autocast(kind):
    head = build_predictor(kind, D, C, NPT, **SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(_tokens())
        if kind == "moment":
            assert head.second_order(_tokens()).dtype == torch.float32
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("detach", [True, False])
def test_exit_head_detach_input(detach):
    head = ExitHead(LinearHead(D, C, NPT), Bypass(D), detach_input=detach)
    x = _tokens().requires_grad_()
    head(x).sum().backward()
    assert (x.grad is None) == detach
    assert head.predictor.fc.weight.grad is not None


def test_exit_head_default_bypass_is_identity():
    head = ExitHead(LinearHead(D, C, NPT))
    assert isinstance(head.bypass, nn.Identity)
    x = _tokens()
    torch.testing.assert_close(head(x), head.predictor(x))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: build_predictor("mlp", D, C, NPT), "allowed: linear, moment, isqrt_cov"),
        (lambda: MomentHead(D, C, NPT, moment_groups=1), "^moment_groups must be an integer >= 2"),
        (
            lambda: MomentHead(D, C, NPT, moment_dim=100, moment_groups=3),
            "^moment_dim must be a positive multiple of moment_groups=3",
        ),
        (lambda: LinearHead(D, C, 0, head_pool="token"), "num_prefix_tokens=0"),
        (lambda: LinearHead(D, C, NPT, head_pool="max"), "^head_pool must be 'token' or 'avg'"),
        (lambda: ISqrtCovHead(D, C, NPT, cov_dim=0), "^cov_dim must be a positive"),
        (lambda: ISqrtCovHead(D, C, NPT, cov_iterations=0), "^cov_iterations must be an integer >= 1"),
        (lambda: MomentHead(D, C, NPT, head_dropout=1.0), r"^head_dropout must be in \[0, 1\)"),
        (lambda: LinearHead(D, 0, NPT), "num_classes must be a positive"),
        (lambda: LinearHead(D, C, -1), "num_prefix_tokens must be"),
        (lambda: Bypass(D, bypass_dim=0), "^bypass_dim must be a positive"),
        (lambda: newton_schulz_sqrt(torch.zeros(2, 3, 4)), "square matrices"),
    ],
)
def test_bad_options_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_tokens_raise():
    with pytest.raises(ValueError, match=r"\[B, N, 32\]"):
        MomentHead(D, C, NPT, moment_dim=64)(torch.randn(2, N, D + 1))
    with pytest.raises(ValueError, match="at least one patch token"):
        ISqrtCovHead(D, C, 2, cov_dim=4)(torch.randn(2, 2, D))


def test_moment_head_without_class_token_ignores_register_tokens():
    head = MomentHead(32, 3, num_prefix_tokens=4, moment_dim=16, class_token=False).eval()
    x = torch.randn(2, 20, 32)
    y = x.clone()
    y[:, :4] = torch.randn(2, 4, 32) * 10  # only the registers change
    torch.testing.assert_close(head(x), head(y))
    with_cls = MomentHead(32, 3, num_prefix_tokens=4, moment_dim=16).eval()
    assert not torch.allclose(with_cls(x), with_cls(y))  # a class token is read


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
