"""evaluation/flops.py: counted exit costs equal the analytic formula, adapters and bypasses included."""

import torch
from support.builders import make_tiny_vit

from dmpo_lightning.evaluation.flops import count_exit_costs
from dmpo_lightning.models import MultiExitViT, build_backbone
from dmpo_lightning.models.adapters import PeftOptions
from dmpo_lightning.models.multi_exit import ExitOptions

LINEAR_EXITS = ExitOptions(blocks=(2, 4), bypass=False, early_head="linear")


def analytic_vit_macs(blocks, tokens, dim, hidden, patches, patch_in):
    """Matrix-multiply MACs of a ViT trunk (FlopCounterMode counts matmuls/convs, not norms/softmax)."""
    per_block = (
        tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * hidden
    )
    return patches * patch_in * dim + blocks * per_block


def test_counted_costs_equal_the_analytic_formula():
    # depth 4, dim 32, 32x32 input, patch 8 -> 16 patches + cls; mlp hidden 64; 5 classes;
    # linear heads, no bypass
    model = MultiExitViT(make_tiny_vit(), 5, LINEAR_EXITS, "linear")
    costs = count_exit_costs(model, (3, 32, 32))
    n, d, h, c = 17, 32, 64, 5
    head = d * c
    embed = 16 * (3 * 8 * 8) * d
    exit0 = analytic_vit_macs(2, n, d, h, 16, 3 * 64) + head
    exit1 = analytic_vit_macs(4, n, d, h, 16, 3 * 64) + 2 * head
    assert costs.exit_macs == (exit0, exit1)
    assert costs.full_macs == analytic_vit_macs(4, n, d, h, 16, 3 * 64) + head
    assert embed < exit0
    assert costs.fractions[-1] > 1.0  # the last exit also paid for the earlier head


def test_adapter_and_bypass_costs_are_counted():
    plain = MultiExitViT(make_tiny_vit(), 5, LINEAR_EXITS, "linear")
    adapted = MultiExitViT(
        make_tiny_vit(),
        5,
        ExitOptions(blocks=(2, 4), bypass=True, bypass_dim=8, early_head="linear"),
        PeftOptions(method="adaptformer", adapter_dim=8),
    )
    a, b = count_exit_costs(plain, (3, 32, 32)), count_exit_costs(adapted, (3, 32, 32))
    adapter = 4 * 17 * (32 * 8 + 8 * 32)  # 4 blocks, down + up per token
    bypass = 17 * (32 * 8 + 8 * 32)
    assert b.full_macs - a.full_macs == adapter
    assert b.exit_macs[0] - a.exit_macs[0] == adapter // 2 + bypass


def test_vit_small_counts_4_6_gmacs():
    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch16_224", pretrained=False)
    model = MultiExitViT(backbone, 1000, ExitOptions(blocks=(12,), bypass=False), "linear")
    costs = count_exit_costs(model, (3, 224, 224))
    assert round(costs.full_gflops, 1) == 4.6
