"""models/multi_exit.py: ``MultiExitViT``, the trunk with its exits (shapes, trainable sets, early exit).

Its head options have one name and one default; ``exits.head_pool`` follows the backbone's own head by
default (an explicit value still overrides), and a class token is never assumed where the backbone has none.
"""

import json
from pathlib import Path

import pytest
import torch
from support.builders import TINY_CONFIG, TINY_MODULE, make_tiny_vit

from dmpo_lightning.cli import main
from dmpo_lightning.models import MultiExitViT
from dmpo_lightning.models.backbone import build_backbone, default_head_pool, embed_tokens
from dmpo_lightning.models.exit_rules import exit_scores
from dmpo_lightning.models.heads import LinearHead, MomentHead
from dmpo_lightning.models.multi_exit import ExitOptions

SMALL_HEADS = dict(moment_dim=32, moment_groups=4, cov_dim=8)


def make_model(peft="adaptformer", **exits):
    """A tiny model with exits after every block; ``exits`` are :class:`ExitOptions` fields."""
    return MultiExitViT(
        make_tiny_vit(), 5, ExitOptions(**{"blocks": (1, 2, 3, 4), **SMALL_HEADS, **exits}), peft
    )


@pytest.mark.parametrize("early_head", ["moment", "isqrt_cov", "linear"])
@pytest.mark.parametrize("peft", ["adaptformer", "lora", "vpt", "linear", "full"])
def test_all_exit_shapes(peft, early_head):
    model = make_model(peft=peft, early_head=early_head).eval()
    logits = model(torch.randn(3, 3, 32, 32))
    assert len(logits) == 4
    assert all(z.shape == (3, 5) for z in logits)
    assert model(torch.randn(3, 3, 32, 32), upto=1).__len__() == 2
    assert model.forward_static(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_adapted_trunk_equals_pretrained_at_step_zero():
    base = make_tiny_vit().eval()
    model = MultiExitViT(make_tiny_vit(), num_classes=5, exits=SMALL_HEADS, peft="adaptformer").eval()
    # Copy the "pre-trained" weights into the wrapped blocks (AdaptFormer keeps them under base_layer).
    wrapped = model.backbone.state_dict()
    for name, tensor in base.state_dict().items():
        parts = name.split(".")
        if parts[0] == "blocks":
            wrapped_name = ".".join([*parts[:2], "base_layer", *parts[2:]])
        else:
            wrapped_name = name
        wrapped[wrapped_name].copy_(tensor)
    x = torch.randn(2, 3, 32, 32)
    tokens = embed_tokens(model.backbone, x)
    for block in model.backbone.blocks:
        tokens = block(tokens)
    torch.testing.assert_close(model.backbone.norm(tokens), base.forward_features(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("peft", "trunk_prefixes"),
    [
        ("adaptformer", ("peft_down", "peft_up")),
        ("lora", ("peft_lora_a", "peft_lora_b")),
        ("vpt", ("peft_prompts",)),
        ("linear", ()),
    ],
)
def test_trainable_parameters_are_exactly_the_named_ones(peft, trunk_prefixes):
    model = make_model(peft=peft)
    groups = model.parameter_groups()
    for name, _ in groups["trunk"]:
        assert any(p in name for p in trunk_prefixes), name
    assert bool(groups["trunk"]) == bool(trunk_prefixes)
    assert all(".bypass." in n for n, _ in groups["bypass"])
    assert len({n.split(".")[1] for n, _ in groups["bypass"]}) == 3  # early exits only
    # independent of parameter_groups(): by name, every exit parameter and the trunk's PEFT ones train
    names = dict(model.named_parameters())
    expected = {n for n in names if n.startswith("exits.") or any(p in n for p in trunk_prefixes)}
    assert {n for n, p in names.items() if p.requires_grad} == expected
    counts = model.count_parameters()
    assert counts["trainable"] == sum(names[n].numel() for n in expected)
    assert counts["trunk"] == sum(names[n].numel() for n in expected if n.startswith("backbone."))


def test_full_finetuning_trains_every_used_trunk_parameter():
    model = make_model(peft="full")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.startswith(("backbone.norm.", "backbone.fc_norm.")) for n in frozen)


def test_bypass_off_removes_bypass_parameters():
    model = make_model(bypass=False)
    assert model.parameter_groups()["bypass"] == []


def test_detach_trunk_stops_early_exit_gradients():
    for detach in (False, True):
        model = make_model(peft="adaptformer", detach_trunk=detach)
        torch.nn.init.normal_(model.backbone.blocks[0].peft_up.weight, std=0.1)
        logits = model(torch.randn(2, 3, 32, 32))
        logits[0].sum().backward()  # exit after block 1 only
        grad = model.backbone.blocks[0].peft_down.weight.grad
        if detach:
            assert grad is None or torch.count_nonzero(grad) == 0
        else:
            assert grad is not None and torch.count_nonzero(grad) > 0


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience"])
def test_early_exit_forward_matches_simulated_protocol(rule):
    torch.manual_seed(0)
    model = make_model(early_head="linear").double().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = torch.stack(model(x), dim=1)
    scores, preds = exit_scores(logits, rule)
    # Thresholds at the median of each exit's scores: about half the remaining samples leave per exit.
    thresholds = scores.median(dim=0).values.tolist()
    if rule == "patience":  # every score at exit 0 is 1: demand two agreeing exits instead
        thresholds = [2.0, 2.0, 2.0, 0.0]
    thresholds[-1] = float("-inf")
    expected_exit = torch.full((32,), 3)
    for k in reversed(range(3)):
        expected_exit = torch.where(
            scores[:, k] >= thresholds[k], torch.full_like(expected_exit, k), expected_exit
        )
    out = model.forward_early_exit(x, thresholds, rule)
    assert torch.equal(out.exit_index, expected_exit)
    assert torch.equal(out.prediction, preds[torch.arange(32), expected_exit])
    assert len(set(out.exit_index.tolist())) > 1


def test_early_exit_rejects_wrong_threshold_count():
    model = make_model().eval()
    with pytest.raises(ValueError, match="got 2 thresholds for a model with 4 exits"):
        model.forward_early_exit(torch.randn(1, 3, 32, 32), [0.5, 0.5])


def test_upto_out_of_range():
    with pytest.raises(ValueError, match=r"allowed are 0\.\.3"):
        make_model()(torch.randn(1, 3, 32, 32), upto=4)


HEAD_OPTIONS = ("head_pool", "head_dropout", "moment_dim", "moment_groups", "cov_dim", "cov_iterations")


def test_each_head_option_has_one_name_and_one_default_from_exits_to_the_head_classes():
    import dataclasses
    import inspect

    from dmpo_lightning.models import heads

    defaults = {f.name: f.default for f in dataclasses.fields(ExitOptions)}
    seen = set()
    for kind in heads.PREDICTOR_KINDS:
        spec = heads.PREDICTOR_REGISTRY.get(kind)
        params = inspect.signature(spec.build).parameters
        for name in set(spec.options) & set(HEAD_OPTIONS):
            assert params[name].default == defaults[name], (kind, name)
            seen.add(name)
    build = inspect.signature(heads.build_predictor).parameters
    assert all(build[name].default == defaults[name] for name in HEAD_OPTIONS)
    assert seen == set(HEAD_OPTIONS)  # every head option reaches a head class under its own name


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("moment_dim", 30, r"exits.moment_dim must be a positive multiple of exits.moment_groups=4, got 30"),
        ("moment_groups", 1, r"exits.moment_groups must be an integer >= 2"),
        ("cov_dim", 0, r"exits.cov_dim must be a positive integer, got 0"),
        ("cov_iterations", 0, r"exits.cov_iterations must be an integer >= 1, got 0"),
        ("head_dropout", 1.5, r"exits.head_dropout must be in \[0, 1\), got 1.5"),
        ("head_pool", "max", r"exits.head_pool must be 'token' or 'avg', got 'max'"),
        ("bypass_dim", 0, r"exits.bypass_dim must be a positive integer, got 0"),
    ],
)
def test_a_bad_head_option_is_named_as_the_user_writes_it(option, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        ExitOptions(**{option: value})
    with pytest.raises(ValueError, match=f"^{message}"):
        MultiExitViT(make_tiny_vit(), 5, {"blocks": (2, 4), option: value})


def _reg_gap_vit() -> torch.nn.Module:
    return build_backbone(
        "vit_betwixt_patch16_reg4_gap_256",
        img_size=32,
        model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
    )


def test_reg_gap_backbone_has_registers_but_no_class_token():
    backbone = _reg_gap_vit()
    assert backbone.cls_token is None and backbone.num_prefix_tokens == 4


def test_token_pooling_without_a_class_token_is_refused():
    with pytest.raises(
        ValueError,
        match=r"exits.head_pool='token' needs a class token, but the backbone has none "
        r"\(its 4 prefix token\(s\) are registers.*set exits.head_pool='avg'",
    ):
        MultiExitViT(_reg_gap_vit(), 3, {"blocks": [1, 2], "moment_dim": 16, "head_pool": "token"})
    # the default (head_pool: null) pools as the backbone does: the patch mean here
    assert (
        MultiExitViT(_reg_gap_vit(), 3, {"blocks": [1, 2], "moment_dim": 16}).exits[-1].predictor.pool
        == "avg"
    )
    with pytest.raises(
        ValueError,
        match=r"head_pool='token' needs a class token but the 4 prefix token\(s\) are "
        r"registers/prompts",
    ):
        LinearHead(32, 3, 4, head_pool="token", class_token=False)


@pytest.mark.parametrize("peft", ["adaptformer", "vpt"])
def test_heads_of_a_model_without_class_token_pool_patch_tokens(peft):
    exits = {"blocks": [1, 2], "head_pool": "avg", "moment_dim": 16}
    model = MultiExitViT(_reg_gap_vit(), 3, exits, {"method": peft, "vpt_prompts": 2})
    moment = model.exits[0].predictor
    assert isinstance(moment, MomentHead) and not moment.class_token
    assert moment.num_prefix_tokens == 4 + (2 if peft == "vpt" else 0)
    model(torch.randn(2, 3, 32, 32))


SMALL = TINY_MODULE["backbone_kwargs"]


# timm name, extra kwargs, how timm's own head pools: exits.head_pool follows it by default
HEAD_POOL_BACKBONES = {
    "vit": ("vit_tiny_patch16_224", {}, "token"),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {}, "token"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, "token"),
    "eva02": ("eva02_tiny_patch14_224", {"ref_feat_shape": (4, 4)}, "avg"),
    "reg4_gap": ("vit_betwixt_patch16_reg4_gap_256", {}, "avg"),
    "rope_reg1_gap": ("vit_medium_patch16_rope_reg1_gap_256", {}, "avg"),
    "no_class_token": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, "avg"),
    "siglip": ("vit_base_patch16_siglip_224", {}, "avg"),  # no class token: its attention pool is the head
}


def family_backbone(family: str) -> torch.nn.Module:
    name, extra, _ = HEAD_POOL_BACKBONES[family]
    return build_backbone(name, img_size=32, model_kwargs={**SMALL, **extra})


@pytest.mark.parametrize("family", list(HEAD_POOL_BACKBONES))
def test_default_head_pool_is_how_the_backbone_pools(family: str) -> None:
    assert default_head_pool(family_backbone(family)) == HEAD_POOL_BACKBONES[family][2]


@pytest.mark.parametrize("family", ["eva02", "reg4_gap", "no_class_token", "vit"])
def test_linear_heads_take_the_backbones_pooling_by_default(family: str) -> None:
    model = MultiExitViT(family_backbone(family), 5, {"blocks": [2, 4], "early_head": "linear"}, "lora")
    assert ExitOptions().head_pool is None
    pools = [head.predictor.pool for head in model.exits if isinstance(head.predictor, LinearHead)]
    assert pools == [HEAD_POOL_BACKBONES[family][2]] * 2  # early and final linear heads
    assert model(torch.randn(2, 3, 32, 32))[-1].shape == (2, 5)


def test_an_explicit_head_pool_still_overrides() -> None:
    model = MultiExitViT(
        family_backbone("eva02"), 5, {"blocks": [2, 4], "early_head": "linear", "head_pool": "token"}
    )
    assert [head.predictor.pool for head in model.exits] == ["token", "token"]
    with pytest.raises(
        ValueError, match=r"exits\.head_pool='token' needs a class token.*set exits\.head_pool='avg'"
    ):
        MultiExitViT(family_backbone("reg4_gap"), 5, {"blocks": [2, 4], "head_pool": "token"})


@pytest.mark.parametrize(
    "family", ["reg4_gap", pytest.param("eva02", marks=pytest.mark.slow)]
)  # about 5 s each on CPU
def test_gap_and_eva02_backbones_train_with_the_default_head_pool(family: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    name, extra, _ = HEAD_POOL_BACKBONES[family]
    kwargs = {**SMALL, **{k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()}}
    cli = main(
        [
            "fit",
            "-c",
            TINY_CONFIG,
            f"--model.init_args.backbone={name}",
            f"--model.init_args.backbone_kwargs={json.dumps(kwargs)}",
            "--model.init_args.exits.early_head=linear",
            "--trainer.max_epochs=1",
            "--model.init_args.schedule.switch_epoch=0",
            "--test_after_fit=true",
        ]
    )
    assert cli.model.hparams.exits["head_pool"] is None  # not written: the backbone's pooling
    assert {head.predictor.pool for head in cli.model.model.exits} == {"avg"}
    report = json.loads((Path(cli.trainer.log_dir) / "dmpo_test" / "report.json").read_text())
    assert len(report["exits"]) == 4
