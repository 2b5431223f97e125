"""models/backbone.py: building a timm ViT trunk by name, exit blocks, and the block loop equal to timm's."""

import pytest
import torch
from support.builders import TINY_VIT_KWARGS

from dmpo_lightning.models.backbone import (
    build_backbone,
    embed_tokens,
    explicit_attention,
    resolve_exit_blocks,
)


def test_manual_block_loop_reproduces_timm_forward_features(tiny_vit):
    x = torch.randn(3, 3, 32, 32)
    tokens = embed_tokens(tiny_vit, x)
    for block in tiny_vit.blocks:
        tokens = block(tokens)
    manual = tiny_vit.norm(tokens)
    torch.testing.assert_close(manual, tiny_vit.forward_features(x), rtol=0, atol=1e-6)


def test_build_backbone_by_name_without_weights():
    kwargs = {k: v for k, v in TINY_VIT_KWARGS.items() if k != "img_size"}
    model = build_backbone("vit_tiny_patch16_224", img_size=32, in_chans=1, model_kwargs=kwargs)
    assert len(model.blocks) == 4
    assert model.patch_embed.proj.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 32)


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("not_a_model_xyz", {}, ValueError, "unknown backbone 'not_a_model_xyz'"),
        ("resnet18", {}, ValueError, "not a token-based vision transformer"),
        (
            "vit_tiny_patch16_224",
            {"model_kwargs": {"num_classes": 3}},
            ValueError,
            "may not set 'num_classes'",
        ),
        ("vit_tiny_patch16_224", {"model_kwargs": {"img_size": 64}}, ValueError, "may not set 'img_size'"),
        (
            "vit_tiny_patch16_224",
            {"checkpoint_path": "/nonexistent/w.pth"},
            FileNotFoundError,
            "does not exist",
        ),
    ],
)
def test_build_backbone_errors(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_backbone(name, **kwargs)


def test_build_backbone_from_local_checkpoint_file(tmp_path, tiny_vit):
    # A user's downloaded timm checkpoint: loaded through pretrained_cfg_overlay, classifier reset,
    # no download.
    path = tmp_path / "weights.pth"
    torch.save(tiny_vit.state_dict(), path)
    kwargs = {k: v for k, v in TINY_VIT_KWARGS.items() if k != "img_size"}
    model = build_backbone(
        "vit_tiny_patch16_224", checkpoint_path=str(path), img_size=32, model_kwargs=kwargs
    )
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, tiny_vit.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(
    ("spec", "depth", "expected"),
    [
        (None, 12, (3, 6, 9, 12)),
        (None, 4, (1, 2, 3, 4)),
        (None, 2, (1, 2)),
        ([3, 6, 9, 12], 12, (3, 6, 9, 12)),
        ([2, -1], 4, (2, 4)),
        (2, 12, (11, 12)),
        (1, 4, (4,)),
    ],
)
def test_resolve_exit_blocks(spec, depth, expected):
    assert resolve_exit_blocks(spec, depth) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([0, 4], r"out of range: allowed are 1\.\.4"),
        ([2, 5], r"out of range: allowed are 1\.\.4"),
        ([3, 2, 4], "must be sorted"),
        ([2, 2, 4], "duplicates"),
        ([1, 2], "last exit sits after block 2"),
        ([], "empty"),
        (0, r"allowed is 1\.\.4"),
        ([1.5, 4], "must be integers"),
    ],
)
def test_resolve_exit_blocks_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_exit_blocks(spec, 4)


def test_truncated_last_exit_allowed_when_asked():
    assert resolve_exit_blocks([1, 2], 4, require_last=False) == (1, 2)


def test_explicit_attention_is_temporary_and_equivalent(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    fused = [b.attn.fused_attn for b in tiny_vit.blocks]
    ref = tiny_vit.forward_features(x)
    with explicit_attention(tiny_vit):
        assert not any(b.attn.fused_attn for b in tiny_vit.blocks)
        torch.testing.assert_close(tiny_vit.forward_features(x), ref, rtol=1e-5, atol=1e-5)
    assert [b.attn.fused_attn for b in tiny_vit.blocks] == fused
