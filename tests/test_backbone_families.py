"""Backbone families beyond the plain ViT: DINOv2 (with and without registers), distilled DeiT, EVA02 (RoPE),
SigLIP (attention pooling), ``*_gap_*`` register models and ViTs with ``class_token=False``.

For a tiny random configuration of each (depth 4, dim 32, 32x32 images, no download):
- the trunk tokens after every exit block equal timm's ``forward_intermediates`` and the final norm
  reproduces ``forward_features``;
- the final ``linear`` exit is timm's own head (same logits as the timm classifier when its weights are
  copied in): SigLIP's attention pool, DeiT's mean of the class and distillation heads, fc_norm after
  average pooling;
- every PEFT method builds, trains (gradients reach exactly its trainable parameters) and is live (its
  parameters change the output);
- after a training step, ``forward_early_exit`` and ``EarlyExitEngine`` equal the simulated protocol;
- FLOPs counting runs and grows with the exit;
- ``dmpo fit`` + ``dmpo test`` run through the CLI (slow).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from support.builders import SHALLOW_VIT_KWARGS, TINY_CONFIG, TINY_MODULE
from torch.nn import functional as F

from dmpo_lightning.cli import main
from dmpo_lightning.evaluation.flops import count_exit_costs
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.models import MultiExitViT
from dmpo_lightning.models.adapters import PEFT_METHODS, PeftOptions
from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.models.engine import EarlyExitEngine
from dmpo_lightning.models.exit_rules import exit_scores
from dmpo_lightning.models.heads import AttentionPoolHead, DistilledHead, LinearHead

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG
SIZE = 32
SMALL = TINY_MODULE["backbone_kwargs"]

# family -> (timm name, extra constructor kwargs, head_pool giving timm's own pooling, final predictor class)
FAMILIES: dict[str, tuple[str, dict, str, type]] = {
    "dinov2": ("vit_small_patch14_dinov2", {}, "token", LinearHead),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {}, "token", LinearHead),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, "token", DistilledHead),
    "eva02_rope": ("eva02_tiny_patch14_224", {"ref_feat_shape": (4, 4)}, "avg", LinearHead),
    "rope_reg1_gap": ("vit_medium_patch16_rope_reg1_gap_256", {}, "avg", LinearHead),
    "siglip_map": ("vit_base_patch16_siglip_224", {}, "token", AttentionPoolHead),
    "reg4_gap": ("vit_betwixt_patch16_reg4_gap_256", {}, "avg", LinearHead),
    "no_class_token": (
        "vit_tiny_patch16_224",
        {"class_token": False, "global_pool": "avg"},
        "avg",
        LinearHead,
    ),
}
IDS = list(FAMILIES)
EXITS = [1, 3, 4]


def timm_kwargs(family: str) -> dict:
    return {**SMALL, **FAMILIES[family][1]}


def lively(model: torch.nn.Module) -> torch.nn.Module:
    """Layer scales of about 1 instead of DINOv2's 1e-5 init, so random blocks are not near-identities."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def reference(family: str, num_classes: int = 0) -> torch.nn.Module:
    """timm's own model (random weights), to compare with."""
    name = FAMILIES[family][0]
    return lively(
        timm.create_model(
            name, pretrained=False, num_classes=num_classes, img_size=SIZE, **timm_kwargs(family)
        )
    )


def backbone_of(ref: torch.nn.Module) -> torch.nn.Module:
    """The same weights without a classifier, as ``build_backbone`` returns them."""
    backbone = copy.deepcopy(ref)
    backbone.reset_classifier(0)
    return backbone


def multi_exit(
    family: str, backbone: torch.nn.Module | None = None, peft: str = "adaptformer", **options
) -> MultiExitViT:
    """A small multi-exit model of ``family``; ``options``: fields of ``PeftOptions`` or ``ExitOptions``."""
    if backbone is None:
        backbone = lively(
            build_backbone(FAMILIES[family][0], img_size=SIZE, model_kwargs=timm_kwargs(family))
        )
    options = {
        "adapter_dim": 4,
        "moment_dim": 16,
        "cov_dim": 8,
        "vpt_prompts": 2,
        "lora_rank": 2,
        "head_pool": FAMILIES[family][2],
        **options,
    }
    peft_fields = {f.name for f in dataclasses.fields(PeftOptions)}
    peft_options = {"method": peft, **{k: v for k, v in options.items() if k in peft_fields}}
    exits = {"blocks": EXITS, **{k: v for k, v in options.items() if k not in peft_fields}}
    return MultiExitViT(backbone, 5, exits, peft_options)


def stage_tokens(model: MultiExitViT, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Trunk tokens and logits after every exit, by the stage chain the early exit runs."""
    tokens, logits, h = [], [], x
    for k in range(model.num_exits):
        h, out = model.run_stage(k, h)
        tokens.append(h)
        logits.append(out)
    return tokens, logits


@pytest.mark.parametrize("family", IDS)
def test_backbone_builds_and_is_the_expected_kind(family):
    _, _, pool, head_cls = FAMILIES[family]
    model = multi_exit(family)
    assert type(model.exits[-1].predictor) is head_cls
    if family == "siglip_map":
        assert model.backbone.attn_pool is None  # moved into the final head, not duplicated
    if pool == "avg":
        assert model.exits[-1].predictor.pool == "avg"


@pytest.mark.parametrize("family", IDS)
def test_trunk_equals_timms_forward_intermediates_and_features(family):
    torch.manual_seed(0)
    ref = reference(family).eval()
    model = multi_exit(family, backbone_of(ref), peft="linear").eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    npt = ref.num_prefix_tokens
    with torch.no_grad():
        tokens, logits = stage_tokens(model, x)
        inter = ref.forward_intermediates(
            x,
            indices=[e - 1 for e in EXITS],
            output_fmt="NLC",
            return_prefix_tokens=npt > 0,
            norm=False,
            intermediates_only=True,
        )
        features = ref.forward_features(x)
        all_exits = model(x)
    assert len(inter) == len(EXITS)
    for ours, theirs in zip(tokens, inter, strict=True):
        expected = torch.cat([theirs[1], theirs[0]], dim=1) if npt > 0 else theirs
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.norm(tokens[-1]), features, rtol=0, atol=1e-5)
    for a, b in zip(all_exits, logits, strict=True):  # forward() runs the same trunk as the stages
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("peft", ["adaptformer", "lora", "linear"])
@pytest.mark.parametrize("family", IDS)
def test_final_exit_is_timms_own_head(family, peft):
    """With timm's classifier weights copied in, the last exit gives timm's logits (PEFT at identity)."""
    torch.manual_seed(0)
    ref = reference(family, num_classes=5).eval()
    with torch.no_grad():  # no zero-initialised norms or biases: every part of the head must matter
        for name, p in ref.named_parameters():
            if not name.startswith("blocks."):
                p.add_(torch.randn_like(p) * 0.1)
    model = multi_exit(family, backbone_of(ref), peft=peft).eval()
    head = model.exits[-1].predictor
    with torch.no_grad():
        head.fc.load_state_dict(ref.head.state_dict())
        if isinstance(head, DistilledHead):
            head.fc_dist.load_state_dict(ref.head_dist.state_dict())
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(model.forward_static(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x)[-1], expected, rtol=0, atol=1e-5)
    if isinstance(
        head, DistilledHead
    ):  # the distillation token is used: another dist head changes the answer
        with torch.no_grad():
            head.fc_dist.weight.add_(1.0)
            assert not torch.allclose(model.forward_static(x), expected, atol=1e-3)


def test_gap_head_pools_then_normalises_like_timms_fc_norm():
    """The average-pooling head pools the tokens, then normalises, as timm does (not LayerNorm per token)."""
    head = LinearHead(32, 3, 4, head_pool="avg", class_token=False, norm_after_pool=True).eval()
    with torch.no_grad():
        head.norm.weight.normal_()
        head.norm.bias.normal_()
    x = torch.randn(2, 20, 32) * 3 + torch.randn(1, 20, 1)
    expected = head.fc(head.norm(x[:, 4:].mean(1)))
    torch.testing.assert_close(head(x), expected)
    per_token = head.fc(head.norm(x[:, 4:]).mean(1))
    assert not torch.allclose(expected, per_token, atol=1e-3)


def _perturb_peft(model: MultiExitViT) -> int:
    n = 0
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "peft_" in name:
                p.add_(torch.randn_like(p))
                n += 1
    return n


@pytest.mark.parametrize("peft", PEFT_METHODS)
@pytest.mark.parametrize("family", IDS)
def test_every_peft_method_trains_on_every_family(family, peft):
    torch.manual_seed(0)
    model = multi_exit(family, peft=peft)
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert [tuple(z.shape) for z in logits] == [(4, 5)] * len(EXITS)
    sum(F.cross_entropy(z, y) for z in logits).backward()
    trunk = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    if peft == "linear":
        assert not trunk
    elif peft == "full":
        assert len(trunk) == len(
            [
                p
                for n, p in model.backbone.named_parameters()
                if not n.startswith("norm.") and not n.startswith("fc_norm.")
            ]
        )
    else:
        assert trunk and all("peft_" in n for n, _ in trunk)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} receives no gradient"
    # PEFT parameters are live: changing them changes the trunk (EVA02's fused-bias qkv path bypassed LoRA)
    if peft in ("adaptformer", "lora", "vpt"):
        model.eval()
        with torch.no_grad():
            before = model(x)[-1]
            assert _perturb_peft(model) > 0
            assert not torch.allclose(model(x)[-1], before, atol=1e-4)


@pytest.mark.parametrize("family", IDS)
def test_adaptformer_and_lora_start_as_the_pretrained_trunk(family):
    torch.manual_seed(0)
    ref = reference(family).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = ref.forward_features(x)
    for peft in ("adaptformer", "lora"):
        model = multi_exit(family, backbone_of(ref), peft=peft).eval()
        with torch.no_grad():
            tokens, _ = stage_tokens(model, x)
        torch.testing.assert_close(ref.norm(tokens[-1]), expected, rtol=0, atol=1e-5)


def test_vpt_prompts_are_prefix_tokens_for_rope():
    """RoPE rotates patch tokens only: the prompts must be skipped like the class token."""
    model = multi_exit("eva02_rope", peft="vpt", vpt_deep=False)
    attn = [b.attn if hasattr(b, "attn") else b.base_layer.attn for b in model.backbone.blocks]
    assert [a.num_prefix_tokens for a in attn] == [1 + 2] * 4
    assert model.num_prefix_tokens == 3
    model(torch.randn(2, 3, SIZE, SIZE))


def simulated(model: MultiExitViT, x: torch.Tensor, thresholds: list[float]):
    with torch.no_grad():
        logits = torch.stack(model(x), dim=1)
    scores, preds = exit_scores(logits, "confidence")
    exits = assign_exits(scores, torch.tensor(thresholds, dtype=scores.dtype))
    return preds.gather(1, exits[:, None]).squeeze(1), exits, scores


@pytest.mark.parametrize("family", IDS)
def test_training_step_then_early_exit_equals_the_simulated_protocol(family):
    torch.manual_seed(0)
    peft = "vpt" if family in ("eva02_rope", "siglip_map") else "lora"
    model = multi_exit(family, peft=peft).double()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(24, 3, SIZE, SIZE, dtype=torch.float64), torch.randint(0, 5, (24,))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        opt.zero_grad()
        loss = sum(F.cross_entropy(z, y) for z in model(x))
        loss.backward()
        opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    model.eval()
    _, _, scores = simulated(model, x, [0.0] * 3)
    thresholds = [float(scores[:, k].quantile(q)) + 1e-9 for k, q in ((0, 0.6), (1, 0.5))] + [-math.inf]
    pred, exits, _ = simulated(model, x, thresholds)
    assert len(set(exits.tolist())) >= 2, "thresholds should spread samples over exits"
    out = model.forward_early_exit(x, thresholds)
    assert torch.equal(out.exit_index, exits) and torch.equal(out.prediction, pred)
    engine = EarlyExitEngine(model, thresholds, batch_size=8).run(torch.split(x, 5))
    assert torch.equal(engine.exit_index, exits) and torch.equal(engine.prediction, pred)


@pytest.mark.parametrize("family", IDS)
def test_flops_are_counted_and_grow_with_the_exit(family):
    costs = count_exit_costs(multi_exit(family), (3, SIZE, SIZE))
    macs = list(costs.exit_macs)
    assert all(m > 0 for m in macs) and macs == sorted(macs) and len(set(macs)) == len(macs)
    assert 0 < costs.full_macs <= macs[-1]
    # the full model costs at least its blocks: each block's attention and MLP matrix products
    assert costs.full_macs > 4 * SMALL["embed_dim"] ** 2 * (SIZE // SMALL["patch_size"]) ** 2


# ------------------------------------------------------------------------------------------ CLI and deploy
def _cli_args(family: str) -> list[str]:
    name, extra, pool, _ = FAMILIES[family]
    kwargs = {**SMALL, **{k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()}}
    return [
        f"--model.init_args.backbone={name}",
        f"--model.init_args.backbone_kwargs={json.dumps(kwargs)}",
        f"--model.init_args.exits.head_pool={pool}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("family", IDS)
def test_fit_and_test_through_the_cli(family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["-c", TINY, *_cli_args(family)]
    cli = main(
        [
            "fit",
            *args,
            "--trainer.max_epochs=1",
            "--model.init_args.schedule.switch_epoch=0",
            "--test_after_fit=true",
        ]
    )
    log_dir = Path(cli.trainer.log_dir)
    report = json.loads((log_dir / "dmpo_test" / "report.json").read_text())
    assert len(report["exits"]) == 4 and report["num_test"] == 24
    # a separate `dmpo test` rebuilds the model from the checkpoint and reproduces the report
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    second = tmp_path / "second"
    main(["test", *args, f"--ckpt_path={ckpt}", f"--evaluation.report_dir={second}"])
    assert json.loads((second / "report.json").read_text())["exits"] == report["exits"]


@pytest.mark.parametrize("onnx", [False, True])
@pytest.mark.parametrize("family", ["dinov2_reg4", "eva02_rope", "siglip_map"])
def test_deploy_export_and_predictor(tmp_path, family, onnx):
    from support.runs import make_run
    from support.runs import simulated as deploy_simulated

    from dmpo_lightning.deploy.export import export_artefact
    from dmpo_lightning.deploy.predictor import EarlyExitPredictor

    if onnx:
        pytest.importorskip("onnxruntime")
    name, _, pool, _ = FAMILIES[family]
    peft = "lora" if family == "eva02_rope" else "adaptformer"  # EVA02: the LoRA merge on its fused-bias qkv
    r = make_run(
        tmp_path,
        backbone=name,
        backbone_kwargs=timm_kwargs(family),
        exits={"head_pool": pool},
        peft={"method": peft},
        quantiles=(0.3, 0.6),
    )
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]), onnx=onnx)
    predictor = EarlyExitPredictor.load(
        out, budget=0.5, **({"backend": "onnx", "num_threads": 1} if onnx else {})
    )
    got = predictor(r["x"])
    t = predictor.thresholds
    pred, exits, logits = deploy_simulated(r["module"].model, r["x"], t)
    assert int((got.prediction != pred).sum()) == 0 and torch.equal(got.exit, exits + 1)
    torch.testing.assert_close(got.logits, logits, atol=1e-4, rtol=0)


def test_dinov2_experiment_config_parses(capsys):
    path = ROOT / "configs" / "experiments" / "cifar100_dmpo_dinov2_vits14.yaml"
    config = yaml.safe_load(path.read_text())
    init = config["model"]["init_args"]
    assert init["backbone"].startswith("vit_small_patch14_") and "dinov2" in init["backbone"]
    assert init["pretrained"] is True and init["img_size"] % 14 == 0
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(path), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["backbone"] == init["backbone"]
    assert printed["data"]["init_args"]["dataset"] == "cifar100"


@pytest.mark.parametrize(
    ("peft", "final_head", "trains"),
    [("full", "linear", True), ("adaptformer", "linear", False), ("full", "moment", False)],
)
def test_siglip_attention_pool_trains_with_the_trunk_and_only_when_used(peft, final_head, trains):
    model = multi_exit("siglip_map", peft=peft, final_head=final_head)
    head = model.exits[-1].predictor
    pool = head.attn_pool if final_head == "linear" else model.backbone.attn_pool
    assert all(p.requires_grad is trains for p in pool.parameters())
    trainable = {n for group in model.parameter_groups().values() for n, _ in group}
    assert any("attn_pool" in n for n in trainable) is trains


def test_pretrained_attention_pool_weights_reach_the_final_head(tmp_path):
    """The attention pool comes from the weights file (as with pretrained=true), not a fresh random init."""
    from safetensors.torch import save_file

    ref = reference("siglip_map")
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    backbone = build_backbone(
        FAMILIES["siglip_map"][0],
        checkpoint_path=str(path),
        img_size=SIZE,
        model_kwargs=timm_kwargs("siglip_map"),
    )
    model = multi_exit("siglip_map", backbone)
    ours = model.exits[-1].predictor.attn_pool.state_dict()
    assert ours.keys() == ref.attn_pool.state_dict().keys()
    for k, v in ref.attn_pool.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert torch.equal(model.exits[-1].predictor.norm.weight, ref.norm.weight)


# RoPE ViTs (EVA02) are supported (tests/test_backbone_families.py); what stays refused says so in one line.


def test_rope_vit_with_dynamic_img_size_is_refused():
    with pytest.raises(
        ValueError,
        match=r"backbone 'eva02_tiny_patch14_224' with dynamic_img_size=True is not supported: its rotary "
        r"position embedding depends on each input's grid",
    ):
        build_backbone(
            "eva02_tiny_patch14_224",
            img_size=32,
            model_kwargs={**SHALLOW_VIT_KWARGS, "dynamic_img_size": True},
        )


@pytest.mark.parametrize(
    ("name", "kwargs", "why"),
    [
        (
            "swin_tiny_patch4_window7_224",
            {"img_size": 32},
            r"it is hierarchical \(stages of shrinking token grids",
        ),
        ("naflexvit_base_patch16_gap", {"img_size": 32}, r"its token path differs from VisionTransformer's"),
        ("resnet18", {}, r"it is not a vision transformer \(no patch tokens; a CNN works on feature maps\)"),
        ("convnext_atto", {}, r"it is not a vision transformer"),
    ],
)
def test_hierarchical_naflex_and_cnn_backbones_are_refused_in_one_sentence(name, kwargs, why):
    with pytest.raises(ValueError) as info:
        build_backbone(name, **kwargs)
    message = str(info.value)
    assert re.search(
        rf"^backbone '{name}' is a \w+, not a token-based vision transformer MultiExitViT supports: ", message
    )
    assert re.search(why, message) and "supported are timm VisionTransformer" in message
    assert "\n" not in message


def test_cnn_with_img_size_is_refused():
    with pytest.raises(
        ValueError,
        match=r"backbone 'resnet18' does not accept \['img_size'\] .*it is not a timm "
        r"VisionTransformer",
    ):
        build_backbone("resnet18", img_size=32)
