"""models/backbone.py loading weights: ``checkpoint_path``, ``pretrained`` and what is refused.

Weights that fill less than the whole trunk are refused, naming the missing and unexpected keys: a Hugging
Face ``transformers`` ViT state dict, a partial or prefixed timm state dict, and a Hub repo with part of the
weights. A complete file loads bit-exact; extra tensors only warn. A file of another architecture (depth,
width) is refused naming both; a crafted pickle is not unpickled; a frozen trunk left with its random
initial weights (``pretrained: false``, no ``checkpoint_path``) is warned about."""

from __future__ import annotations

import pickle
import re
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from support.builders import TINY_CONFIG, TINY_MODULE, tiny_module
from support.pickles import torch_file

from dmpo_lightning import DMPOModule
from dmpo_lightning.cli import main
from dmpo_lightning.console import console_main
from dmpo_lightning.models.backbone import build_backbone, describe_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = TINY_MODULE["backbone_kwargs"]


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **SMALL)
    return {k: v.clone() for k, v in model.state_dict().items()}


def transformers_vit_state(width: int = 192, depth: int = 2) -> dict[str, torch.Tensor]:
    """Key names and shapes of a ``transformers`` ``ViTModel`` state dict (handed in by mistake)."""
    state = {
        "vit.embeddings.cls_token": torch.zeros(1, 1, width),
        "vit.embeddings.position_embeddings": torch.zeros(1, 197, width),
        "vit.embeddings.patch_embeddings.projection.weight": torch.zeros(width, 3, 16, 16),
        "vit.embeddings.patch_embeddings.projection.bias": torch.zeros(width),
    }
    for i in range(depth):
        for part in ("query", "key", "value"):
            state[f"vit.encoder.layer.{i}.attention.attention.{part}.weight"] = torch.zeros(width, width)
    return state


def test_a_transformers_vit_state_dict_is_refused_naming_keys_and_the_timm_name(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(transformers_vit_state(), path)
    with pytest.raises(ValueError) as err:
        build_backbone("vit_tiny_patch16_224", checkpoint_path=str(path))
    message = str(err.value)
    assert "filled only 0 of the 150 tensors of backbone 'vit_tiny_patch16_224'" in message
    assert "missing 150 (cls_token, pos_embed, patch_embed.proj.weight" in message
    assert "unexpected 10 (vit.embeddings.cls_token" in message
    assert "Hugging Face transformers ViT keys, which timm does not convert" in message
    assert "facebook/deit-tiny-patch16-224 -> deit_tiny_patch16_224.fb_in1k" in message  # width 192
    assert "google/vit-base" not in message  # only the names of this width


def test_a_partial_timm_state_dict_is_refused_with_the_count(tmp_path: Path) -> None:
    state = tiny_state()
    for key in [k for k in state if k.startswith("blocks.3.mlp")]:
        del state[key]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(
        ValueError, match=r"filled only 50 of the 54 tensors .*missing 4 \(blocks\.3\.mlp\.fc1"
    ):
        build_backbone(
            "vit_tiny_patch16_224",
            checkpoint_path=str(tmp_path / "partial.pth"),
            img_size=32,
            model_kwargs=SMALL,
        )


def test_a_prefixed_state_dict_names_the_prefix(tmp_path: Path) -> None:
    torch.save({f"model.backbone.{k}": v for k, v in tiny_state().items()}, tmp_path / "prefixed.pth")
    with pytest.raises(
        ValueError, match=r"the file's keys carry the prefix 'model\.backbone\.'.*--ckpt_path"
    ):
        build_backbone(
            "vit_tiny_patch16_224",
            checkpoint_path=str(tmp_path / "prefixed.pth"),
            img_size=32,
            model_kwargs=SMALL,
        )


def test_a_complete_file_loads_and_extra_tensors_only_warn(tmp_path: Path) -> None:
    state = tiny_state(seed=4)
    torch.save({**state, "head.weight": torch.zeros(7, 32), "head.bias": torch.zeros(7)}, tmp_path / "a.pth")
    model = build_backbone(
        "vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "a.pth"), img_size=32, model_kwargs=SMALL
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.save({**state, "teacher.proj": torch.zeros(3)}, tmp_path / "b.pth")
    with pytest.warns(
        UserWarning, match=r"holds 1 tensor\(s\) the model does not use \(teacher\.proj\); all 54"
    ):
        build_backbone(
            "vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "b.pth"), img_size=32, model_kwargs=SMALL
        )


def test_through_the_cli_it_is_one_sentence_before_any_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save(transformers_vit_state(width=32), tmp_path / "hf.bin")
    argv = [
        "dmpo",
        "fit",
        "-c",
        TINY_CONFIG,
        f"--model.init_args.checkpoint_path={tmp_path / 'hf.bin'}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "filled only 0 of the 54 tensors" in err
    assert not (tmp_path / "runs").exists()


def test_a_hub_repo_with_part_of_the_weights_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    repo = "someone/half-vit"
    snapshot = tmp_path / "hub" / "models--someone--half-vit" / "snapshots" / ("0" * 40)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **SMALL)
    save_for_hf(model, str(snapshot), safe_serialization=True)
    half = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("blocks.2")}
    save_file(half, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        ValueError, match=r"the pretrained weights of 'hf-hub:someone/half-vit' filled only 42 of"
    ):
        build_backbone(f"hf-hub:{repo}", pretrained=True, img_size=32)


def test_a_folder_as_checkpoint_path_or_a_file_as_data_root_says_so(tmp_path: Path) -> None:
    from dmpo_lightning.data import BenchmarkDataModule, DatasetLayoutError

    with pytest.raises(
        FileNotFoundError, match=r"checkpoint_path '.*' is a folder; give the timm weights file"
    ):
        build_backbone("vit_tiny_patch16_224", checkpoint_path=str(tmp_path))
    (tmp_path / "cifar.tar").write_bytes(b"x")
    with pytest.raises(
        DatasetLayoutError, match=r"root='.*cifar\.tar' for dataset 'cifar10' is a file; give the"
    ):
        BenchmarkDataModule("cifar10", root=str(tmp_path / "cifar.tar"))


def test_backbone_checkpoint_path_refuses_a_crafted_file(tmp_path, pickle_marker):
    """``checkpoint_path`` (a local timm checkpoint) goes through timm's loader with weights_only=True."""
    path = torch_file(tmp_path / "backbone.pth", pickle_marker, "checkpoint")
    # timm 1.0.31 words it "weights_only=True blocked loading"; older timm passes torch's error on
    with pytest.raises((RuntimeError, pickle.UnpicklingError), match=r"[Ww]eights.only"):
        DMPOModule(**TINY_MODULE, checkpoint_path=str(path))
    assert not pickle_marker.exists()


@pytest.fixture
def depth6_checkpoint(tmp_path) -> Path:
    kw = {**SMALL, "depth": 6}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **kw)
    path = tmp_path / "depth6.pth"
    torch.save(model.state_dict(), path)
    return path


def test_describe_checkpoint(depth6_checkpoint):
    assert describe_checkpoint(str(depth6_checkpoint)) == {
        "depth": 6,
        "embed_dim": 32,
        "patch_size": 8,
        "in_chans": 3,
    }


@pytest.mark.parametrize(
    ("change", "builds"),
    [
        ({"depth": 4}, r"builds depth 4, embed_dim 32, patch_size 8"),
        (
            {"embed_dim": 64},
            r"builds depth 6, "
            r"embed_dim 64, patch_size 8 \(timm: size mismatch for",
        ),
    ],
)
def test_checkpoint_path_of_another_architecture_is_refused(depth6_checkpoint, change, builds):
    kw = {**SMALL, "depth": 6, **change}
    with pytest.raises(ValueError) as info:
        build_backbone(
            "vit_tiny_patch16_224", checkpoint_path=str(depth6_checkpoint), img_size=32, model_kwargs=kw
        )
    message = str(info.value)
    assert re.search(
        r"holds a ViT with depth 6, embed_dim 32, patch_size 8, but backbone 'vit_tiny_patch16_224'", message
    )
    assert re.search(builds, message)
    assert "set model backbone_kwargs {depth: 6, embed_dim: 32, patch_size: 8}" in message
    assert message.count("size mismatch") <= 1  # one line, not one per parameter


def test_checkpoint_path_mismatch_through_the_cli(depth6_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"holds a ViT with depth 6.*builds depth 4"):
        main(["fit", "-c", TINY_CONFIG, f"--model.init_args.checkpoint_path={depth6_checkpoint}"])
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("peft", ["adaptformer", "lora", "vpt", "linear"])
def test_frozen_random_trunk_warns(peft):
    with pytest.warns(
        UserWarning,
        match=rf"peft.method='{peft}' freezes the trunk .* pretrained=false and no "
        r"checkpoint_path is set: the frozen trunk keeps its random initial weights",
    ):
        tiny_module(peft={"method": peft}, pretrained=False)


def test_full_training_from_scratch_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tiny_module(peft={"method": "full"}, pretrained=False)


def test_frozen_random_trunk_warns_through_the_cli():
    # tests/configs/tiny.yaml trains the default adaptformer with pretrained: false
    with pytest.warns(UserWarning, match=r"the frozen trunk keeps its random initial weights"):
        main(["-c", TINY_CONFIG], run=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*frozen trunk keeps its random")
        main(["-c", TINY_CONFIG, "--model.init_args.peft.method=full"], run=False)
