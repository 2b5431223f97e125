"""Hugging Face Hub backbones (``hf-hub:<owner>/<repo>``, registry names with ``pretrained: true``, timm's
``local-dir:``), offline: names resolve without a download, weights load from a local Hub cache the test
writes, and a missing cache entry is one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from support.builders import TINY_CONFIG
from timm.models import save_for_hf

from dmpo_lightning.cli import main
from dmpo_lightning.data.transforms import timm_data_config
from dmpo_lightning.models.backbone import build_backbone, check_backbone_name, resolve_backbone_name

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)
REPO = "timm/vit_tiny_patch16_224.augreg_in21k"  # timm's own repo name for that registry entry


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, torch.Tensor]]:
    """A local Hugging Face cache holding REPO (config.json + model.safetensors of a tiny random ViT), as
    ``hf download`` leaves it; the Hub itself is never reached (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.25, 0.25, 0.25), "std": (0.2, 0.2, 0.2)}
    save_for_hf(model, str(snapshot), safe_serialization=True)
    (cache / f"models--{REPO.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "architecture"),
    [
        ("hf-hub:timm/vit_base_patch16_224.augreg_in21k", "vit_base_patch16_224"),
        ("hf-hub:timm/eva02_small_patch14_224.mim_in22k", "eva02_small_patch14_224"),
        ("hf_hub:timm/deit_small_patch16_224.fb_in1k", "deit_small_patch16_224"),  # timm's old spelling
        ("vit_small_patch16_224.augreg_in21k", "vit_small_patch16_224"),
    ],
)
def test_hub_and_registry_names_resolve_offline(name: str, architecture: str) -> None:
    assert resolve_backbone_name(name) == architecture
    check_backbone_name(name)  # refused every hf-hub: name before


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("hf-hub:timm/vit_base_patch16_224.bogus", r"no pretrained tag 'bogus' for 'vit_base_patch16_224'"),
        ("hf-hub:timm/vit_bsae_patch16_224", r"timm has no model 'vit_bsae_patch16_224'.*similar"),
        (
            "hf-hub:someone/my-vit",
            r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set.*hf download",
        ),
        ("hf-hub:vit_base_patch16_224", r"a Hugging Face Hub backbone is 'hf-hub:<owner>/<repo>'"),
        ("hgf:timm/vit_base_patch16_224", r"Unknown model source 'hgf'"),
        ("timm/vit_base_patch16_224", r"looks like a Hugging Face Hub repo id"),
        ("local-dir:/no/such/folder", r"config\.json does not exist; a local-dir: backbone is a folder"),
    ],
)
def test_bad_hub_names_are_one_sentence(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_backbone_name(name)


def test_hub_backbone_loads_from_the_local_cache(hub_cache) -> None:
    _cache, weights = hub_cache
    model = build_backbone(f"hf-hub:{REPO}", pretrained=True, img_size=32)
    assert len(model.blocks) == 4 and model.embed_dim == 32  # the architecture comes from the repo's config
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert resolve_backbone_name(f"hf-hub:{REPO}") == "vit_tiny_patch16_224"  # read from the cached config
    assert tuple(timm_data_config(f"hf-hub:{REPO}")["mean"]) == (0.25, 0.25, 0.25)  # the repo's own config


def test_registry_name_with_pretrained_loads_through_timms_hub_support(hub_cache) -> None:
    _cache, weights = hub_cache
    model = build_backbone(
        "vit_tiny_patch16_224.augreg_in21k",
        pretrained=True,
        img_size=32,
        model_kwargs={k: v for k, v in TINY.items() if k != "img_size"},
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_weights_missing_from_the_cache_offline_are_one_sentence(hub_cache) -> None:
    with pytest.raises(
        ValueError,
        match=r"pretrained weights of backbone 'vit_tiny_patch16_224\.augreg_in21k_ft_in1k' could not be "
        r"fetched from the Hugging Face Hub \(HF_HUB_OFFLINE is set\): LocalEntryNotFoundError.*"
        r"checkpoint_path",
    ):
        build_backbone(
            "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
            pretrained=True,
            img_size=32,
            model_kwargs={"depth": 4},
        )


def test_hub_name_and_checkpoint_path_together_are_refused(hub_cache, tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    with pytest.raises(ValueError, match=r"names its weights \(Hub or local-dir\) and checkpoint_path"):
        build_backbone(f"hf-hub:{REPO}", checkpoint_path=str(weights))


def test_local_dir_backbone(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    save_for_hf(model, str(tmp_path / "my_vit"), safe_serialization=True)
    loaded = build_backbone(f"local-dir:{tmp_path / 'my_vit'}", pretrained=True, img_size=32)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert resolve_backbone_name(f"local-dir:{tmp_path / 'my_vit'}") == "vit_tiny_patch16_224"


def test_cli_trains_a_hub_backbone(hub_cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "-c",
            TINY_CONFIG,
            f"--model.init_args.backbone=hf-hub:{REPO}",
            "--model.init_args.pretrained=true",
            "--model.init_args.backbone_kwargs=null",
        ]
    )
    assert cli.model.hparams.backbone == f"hf-hub:{REPO}"
    assert cli.datamodule.data_config.mean == (0.25, 0.25, 0.25)  # linked timm_model: the repo's config
    assert list((Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
