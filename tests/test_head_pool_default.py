"""``exits.head_pool`` follows the backbone's own head by default; an explicit value still overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmpo_lightning.cli import main
from dmpo_lightning.models.backbone import build_backbone, default_head_pool
from dmpo_lightning.models.heads import LinearHead
from dmpo_lightning.models.multi_exit import ExitOptions, MultiExitViT

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
SMALL = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)

# timm name, extra kwargs, how timm's own head pools
BACKBONES = {
    "vit": ("vit_tiny_patch16_224", {}, "token"),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {}, "token"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, "token"),
    "eva02": ("eva02_tiny_patch14_224", {"ref_feat_shape": (4, 4)}, "avg"),
    "reg4_gap": ("vit_betwixt_patch16_reg4_gap_256", {}, "avg"),
    "rope_reg1_gap": ("vit_medium_patch16_rope_reg1_gap_256", {}, "avg"),
    "no_class_token": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, "avg"),
    "siglip": ("vit_base_patch16_siglip_224", {}, "avg"),  # no class token: its attention pool is the head
}


def backbone(family: str) -> torch.nn.Module:
    name, extra, _ = BACKBONES[family]
    return build_backbone(name, img_size=32, model_kwargs={**SMALL, **extra})


@pytest.mark.parametrize("family", list(BACKBONES))
def test_default_head_pool_is_how_the_backbone_pools(family: str) -> None:
    assert default_head_pool(backbone(family)) == BACKBONES[family][2]


@pytest.mark.parametrize("family", ["eva02", "reg4_gap", "no_class_token", "vit"])
def test_linear_heads_take_the_backbones_pooling_by_default(family: str) -> None:
    model = MultiExitViT(backbone(family), 5, {"blocks": [2, 4], "early_head": "linear"}, "lora")
    assert ExitOptions().head_pool is None
    pools = [head.predictor.pool for head in model.exits if isinstance(head.predictor, LinearHead)]
    assert pools == [BACKBONES[family][2]] * 2  # early and final linear heads
    assert model(torch.randn(2, 3, 32, 32))[-1].shape == (2, 5)


def test_an_explicit_head_pool_still_overrides() -> None:
    model = MultiExitViT(
        backbone("eva02"), 5, {"blocks": [2, 4], "early_head": "linear", "head_pool": "token"}
    )
    assert [head.predictor.pool for head in model.exits] == ["token", "token"]
    with pytest.raises(
        ValueError, match=r"exits\.head_pool='token' needs a class token.*set exits\.head_pool='avg'"
    ):
        MultiExitViT(backbone("reg4_gap"), 5, {"blocks": [2, 4], "head_pool": "token"})


@pytest.mark.parametrize(
    "family", ["reg4_gap", pytest.param("eva02", marks=pytest.mark.slow)]
)  # about 5 s each on CPU
def test_gap_and_eva02_backbones_train_with_the_default_head_pool(family: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    name, extra, _ = BACKBONES[family]
    kwargs = {**SMALL, **{k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()}}
    cli = main(
        [
            "fit",
            "-c",
            TINY,
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
