"""PEFT injection: targeted names, identity at step 0, trainable set, VPT token bookkeeping, errors."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from support.builders import SHALLOW_VIT_KWARGS, TINY_CONFIG
from timm.models.vision_transformer import Block
from torch import nn

from dmpo_lightning.cli import main
from dmpo_lightning.constants import PEFT_PREFIX
from dmpo_lightning.models.adapters import (
    AdaptFormerBlock,
    LoRALinear,
    PeftOptions,
    PromptedBlock,
    count_parameters,
    inject_peft,
    mark_trainable,
    num_prompt_tokens,
    peft_parameter_names,
)
from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.models.multi_exit import MultiExitViT

D, DEPTH, N_PATCHES = 32, 4, 16  # tiny_vit: 32x32 input, patch 8


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("method", "param_name"), [("adaptformer", "peft_up"), ("lora", "peft_lora_b")])
def test_identity_at_init_then_differs(tiny_vit, images, method, param_name):
    base = copy.deepcopy(tiny_vit)
    inject_peft(tiny_vit, method)
    tiny_vit.eval()
    with torch.no_grad():
        expected = base.forward_features(images)
        torch.testing.assert_close(tiny_vit.forward_features(images), expected, atol=1e-6, rtol=0)
        for name, module in tiny_vit.named_modules():
            if name.endswith(param_name):
                module.weight.normal_(0, 0.5)
        assert not torch.allclose(tiny_vit.forward_features(images), expected, atol=1e-4)


def test_adaptformer_passes_attn_mask_like_timm(tiny_vit, images):
    base = copy.deepcopy(tiny_vit)
    inject_peft(tiny_vit, "adaptformer")
    n = 1 + N_PATCHES
    mask = torch.rand(n, n) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_vit.forward_features(images, attn_mask=mask),
            base.forward_features(images, attn_mask=mask),
            atol=1e-6,
            rtol=0,
        )


def test_adaptformer_forward_signature_matches_timm_block():
    ours = list(inspect.signature(AdaptFormerBlock.forward).parameters)
    timm_params = list(inspect.signature(Block.forward).parameters)
    assert ours == timm_params


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("adaptformer", {}, [f"blocks.{i}" for i in range(DEPTH)]),
        ("adaptformer", {"blocks": [-1, 0]}, ["blocks.0", "blocks.3"]),
        ("lora", {}, [f"blocks.{i}.attn.qkv" for i in range(DEPTH)]),
        (
            "lora",
            {"lora_targets": ("attn.proj", "fc2"), "blocks": [1]},
            ["blocks.1.attn.proj", "blocks.1.mlp.fc2"],
        ),
        ("vpt", {}, [f"blocks.{i}" for i in range(DEPTH)]),
        ("vpt", {"vpt_deep": False}, ["blocks.0"]),
        ("linear", {}, []),
        ("full", {}, []),
    ],
)
def test_replaced_names(tiny_vit, method, options, expected):
    blocks = options.pop("blocks", None)
    assert inject_peft(tiny_vit, PeftOptions(method=method, **options), blocks=blocks) == expected


@pytest.mark.parametrize("method", ["adaptformer", "lora", "vpt", "linear", "full"])
def test_trainable_set_is_exactly_peft(tiny_vit, method):
    inject_peft(tiny_vit, method)
    peft = set(peft_parameter_names(tiny_vit))
    everything = {n for n, _ in tiny_vit.named_parameters()}
    if method == "linear":
        assert _trainable(tiny_vit) == set() and peft == set()
    elif method == "full":
        assert _trainable(tiny_vit) == everything and peft == set()
    else:
        blocks = range(DEPTH)
        expected = {
            "adaptformer": {
                f"blocks.{i}.peft_{a}.{w}" for i in blocks for a in ("down", "up") for w in ("weight", "bias")
            },
            "lora": {f"blocks.{i}.attn.qkv.peft_lora_{x}.weight" for i in blocks for x in "ab"},
            "vpt": {f"blocks.{i}.peft_prompts" for i in blocks},  # deep VPT by default
        }[method]
        assert peft == expected and _trainable(tiny_vit) == expected
        assert all(any(part.startswith(PEFT_PREFIX) for part in n.split(".")) for n in expected)


def test_parameter_counts_match_formula(tiny_vit):
    r, lr = 8, 4
    am = copy.deepcopy(tiny_vit)
    inject_peft(am, PeftOptions(method="adaptformer", adapter_dim=r))
    assert count_parameters(am) == DEPTH * (2 * D * r + r + D)
    lm = copy.deepcopy(tiny_vit)
    inject_peft(lm, PeftOptions(method="lora", lora_rank=lr))
    assert count_parameters(lm) == DEPTH * lr * (D + 3 * D)  # qkv: D -> 3D, no LoRA bias
    total_base = count_parameters(tiny_vit, trainable_only=False)
    assert count_parameters(lm, trainable_only=False) == total_base + DEPTH * 4 * D * lr


def test_only_peft_params_receive_gradients(tiny_vit, images):
    inject_peft(tiny_vit, PeftOptions(adapter_dim=4))
    tiny_vit.train()
    for name, p in tiny_vit.named_parameters():
        if "peft_up" in name:
            nn.init.normal_(p, std=0.1)
    tiny_vit.forward_features(images).square().mean().backward()
    for name, p in tiny_vit.named_parameters():
        if PEFT_PREFIX in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_mark_trainable_switches_methods(tiny_vit):
    inject_peft(tiny_vit, "lora")
    mark_trainable(tiny_vit, "linear")
    assert _trainable(tiny_vit) == set()
    mark_trainable(tiny_vit, "lora")
    assert _trainable(tiny_vit) == set(peft_parameter_names(tiny_vit))


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_sequence_grows_and_prompt_count(tiny_vit, images, deep):
    p = 3
    inject_peft(tiny_vit, PeftOptions(method="vpt", vpt_prompts=p, vpt_deep=deep))
    with torch.no_grad():
        out = tiny_vit.forward_features(images)
    assert out.shape == (2, 1 + p + N_PATCHES, D)
    assert num_prompt_tokens(tiny_vit) == p
    assert count_parameters(tiny_vit) == (DEPTH if deep else 1) * p * D
    assert _trainable(tiny_vit) == set(peft_parameter_names(tiny_vit))
    assert all(n.endswith("peft_prompts") for n in peft_parameter_names(tiny_vit))


def test_vpt_prompt_count_per_block(tiny_vit):
    inject_peft(tiny_vit, PeftOptions(method="vpt", vpt_prompts=2), blocks=[2, 3])
    assert [num_prompt_tokens(tiny_vit, after_block=i) for i in range(DEPTH)] == [0, 0, 2, 2]
    assert tiny_vit.blocks[2].insert and not tiny_vit.blocks[3].insert


def test_vpt_init_bound_follows_vpt():
    vit_like = nn.Module()
    block = Block(D, num_heads=2)
    vit_like.blocks = nn.Sequential(block)
    inject_peft(vit_like, PeftOptions(method="vpt", vpt_prompts=50), num_prefix_tokens=1)
    bound = math.sqrt(6.0 / (3 * 16 * 16 + D))  # no patch_embed: VPT's 3x16x16 assumption
    prompts = vit_like.blocks[0].peft_prompts
    assert prompts.abs().max() <= bound


def test_vpt_replace_overwrites_prompt_slots():
    npt, p = 1, 2
    wrapper = PromptedBlock(nn.Identity(), D, num_prompts=p, num_prefix_tokens=npt, insert=False)
    x = torch.randn(2, npt + p + 5, D)
    y = x.clone()
    y[:, npt : npt + p] += 10.0
    out_x, out_y = wrapper(x), wrapper(y)
    torch.testing.assert_close(out_x, out_y)
    torch.testing.assert_close(out_x[:, npt : npt + p], wrapper.peft_prompts.expand(2, -1, -1))
    torch.testing.assert_close(out_x[:, :npt], x[:, :npt])
    torch.testing.assert_close(out_x[:, npt + p :], x[:, npt + p :])


def test_vpt_insert_places_prompts_after_prefix():
    wrapper = PromptedBlock(nn.Identity(), D, num_prompts=2, num_prefix_tokens=1, insert=True)
    x = torch.randn(2, 6, D)
    out = wrapper(x)
    assert out.shape == (2, 8, D)
    torch.testing.assert_close(out[:, 1:3], wrapper.peft_prompts.expand(2, -1, -1))
    torch.testing.assert_close(out[:, 3:], x[:, 1:])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"method": "prefix"}, "allowed: adaptformer, lora, vpt, linear, full"),
        ({"method": "adaptformer", "adapter_dim": 0}, "adapter_dim must be a positive integer"),
        ({"method": "adaptformer", "adapter_scale": float("nan")}, "adapter_scale must be a finite"),
        ({"method": "vpt", "vpt_prompts": 0}, "vpt_prompts must be a positive integer"),
        ({"method": "lora", "lora_targets": ("nope",)}, r"matched no module.*attn\.qkv"),
        ({"method": "adaptformer", "blocks": [4]}, "out of range"),
        ({"method": "adaptformer", "blocks": [1, -3]}, "unique"),
        ({"method": "adaptformer", "adapter_dropout": 1.0}, r"adapter_dropout must be in \[0, 1\)"),
    ],
)
def test_bad_options_raise(tiny_vit, options, match):
    blocks = options.pop("blocks", None)
    with pytest.raises(ValueError, match=match):
        inject_peft(tiny_vit, PeftOptions(**options), blocks=blocks)


def test_lora_target_must_be_linear(tiny_vit):
    with pytest.raises(TypeError, match=r"not nn\.Linear"):
        inject_peft(tiny_vit, PeftOptions(method="lora", lora_targets=("norm1",)))


def test_inject_twice_raises(tiny_vit):
    inject_peft(tiny_vit, "lora")
    with pytest.raises(ValueError, match="already has PEFT wrappers"):
        inject_peft(tiny_vit, "adaptformer")


def test_model_without_blocks_raises():
    with pytest.raises(TypeError, match="blocks"):
        inject_peft(nn.Linear(2, 2), "adaptformer")


def test_wrappers_reject_wrong_layers():
    with pytest.raises(TypeError, match=r"timm\.models\.vision_transformer\.Block"):
        AdaptFormerBlock(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LoRALinear(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize(
    ("name", "blocks"),
    [("eva02_enormous_patch14_clip_224", "EvaBlockPostNorm"), ("vit_base_patch16_rpn_224", "ResPostBlock")],
)
def test_adaptformer_on_post_norm_blocks_is_refused_naming_method_and_backbone(name, blocks):
    backbone = build_backbone(name, img_size=32, model_kwargs=SHALLOW_VIT_KWARGS)
    exits = {"blocks": [1, 2], "moment_dim": 16, "head_pool": "avg"}
    with pytest.raises(
        ValueError,
        match=rf"peft.method='adaptformer' is not supported on backbone '{name}' \({blocks} blocks\): "
        r"AdaptFormerBlock wraps the pre-norm blocks .*; choose another peft method or backbone",
    ):
        MultiExitViT(backbone, 3, exits, "adaptformer")
    for peft in ("lora", "linear", "full", "vpt"):  # the other methods do not depend on the block's layout
        backbone = build_backbone(name, img_size=32, model_kwargs=SHALLOW_VIT_KWARGS)
        model = MultiExitViT(backbone, 3, exits, {"method": peft, "vpt_prompts": 2})
        assert [z.shape for z in model(torch.randn(2, 3, 32, 32))] == [(2, 3), (2, 3)]


def test_unsupported_peft_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"peft\.method='adaptformer' is not supported on backbone 'eva02_enormous_patch14_clip_224'",
    ):
        main(
            [
                "fit",
                "-c",
                TINY_CONFIG,
                "--model.init_args.backbone=eva02_enormous_patch14_clip_224",
                "--model.init_args.peft.method=adaptformer",
                "--model.init_args.exits.head_pool=avg",
            ]
        )
    assert not list(tmp_path.rglob("*.ckpt"))
