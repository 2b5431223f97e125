"""Bad model, threshold and data input (issue 16): refused with one clear message, or warned about loudly.

Each test fails on the code before the fix: thresholds of another checkpoint or of the wrong length were
accepted, test loaders were told apart by position, a mismatched ``checkpoint_path`` trained a truncated
model, register/prompt tokens were pooled as the class token, a random frozen trunk was trained silently,
RoPE ViTs, CNNs with ``img_size`` and one-class data died with raw tracebacks, and broken image files killed
training without a file name.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch import Trainer
from support.builders import evaluator
from support.fakes import write_image_folder
from torch.utils.data import DataLoader

from dmpo_lightning import BenchmarkDataModule, DMPOModule
from dmpo_lightning.cli import main
from dmpo_lightning.constants import SPLIT_KEY, THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
from dmpo_lightning.data import SplitTagged, UnreadableImageError
from dmpo_lightning.evaluation.thresholds import load_thresholds
from dmpo_lightning.models.backbone import build_backbone, describe_checkpoint
from dmpo_lightning.models.heads import LinearHead, MomentHead
from dmpo_lightning.models.multi_exit import MultiExitViT

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
TINY_KW = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)


def tiny_module(**overrides) -> DMPOModule:
    options = dict(
        num_classes=4,
        backbone="vit_tiny_patch16_224",
        img_size=32,
        backbone_kwargs=TINY_KW,
        exits={"blocks": [2, 4], "moment_dim": 16},
        peft={"method": "full", "adapter_dim": 4},
    )
    return DMPOModule(**{**options, **overrides})


# ------------------------------------------------------------------------------------------------ 1 + 2
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs with different seeds; the first one also ran `dmpo test` (thresholds.json)."""
    base = tmp_path_factory.mktemp("two_runs")
    out = {"base": base}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        for seed, name in ((0, "a"), (1, "b")):
            cli = main(
                [
                    "fit",
                    "-c",
                    TINY,
                    f"--seed_everything={seed}",
                    "--trainer.max_epochs=1",
                    "--model.init_args.schedule.switch_epoch=0",
                    f"--test_after_fit={name == 'a'}",
                    f"--evaluation.report_dir={base / ('report_' + name)}",
                ]
            )
            (ckpt,) = (base / cli.trainer.log_dir / "checkpoints").glob("*.ckpt")
            out[name] = ckpt
    out["thresholds"] = base / "report_a" / "thresholds.json"
    assert out["thresholds"].is_file()
    return out


def _predict(ckpt: Path, thresholds: Path, preds: Path, *extra: str) -> None:
    main(
        [
            "predict",
            "-c",
            TINY,
            f"--ckpt_path={ckpt}",
            f"--evaluation.thresholds_file={thresholds}",
            "--evaluation.predict_budget=0.5",
            f"--evaluation.predictions_file={preds}",
            *extra,
        ]
    )


def test_predict_refuses_thresholds_of_another_checkpoint(two_checkpoints, tmp_path):
    preds = tmp_path / "preds.csv"
    with pytest.raises(
        ValueError,
        match=r"calibrated on other weights \(weights:[0-9a-f]+ / file:[0-9a-f]+\)"
        r".*allow_other_checkpoint_thresholds=true",
    ) as info:
        _predict(two_checkpoints["b"], two_checkpoints["thresholds"], preds)
    assert str(two_checkpoints["thresholds"]) in str(info.value)
    assert not preds.exists()


def test_predict_with_override_warns_naming_both_hashes(two_checkpoints, tmp_path):
    preds = tmp_path / "preds.csv"
    stored = json.loads(two_checkpoints["thresholds"].read_text())
    with pytest.warns(UserWarning, match="using them anyway") as caught:
        _predict(
            two_checkpoints["b"],
            two_checkpoints["thresholds"],
            preds,
            "--evaluation.allow_other_checkpoint_thresholds=true",
        )
    message = next(str(w.message) for w in caught if "using them anyway" in str(w.message))
    assert stored["checkpoint_hash"] in message and stored["weights_hash"] in message
    assert re.search(r"this model holds \(weights:[0-9a-f]{64} / file:[0-9a-f]{64}\)", message)
    assert len(preds.read_text().splitlines()) == 1 + 24


def test_predict_accepts_its_own_thresholds_and_refuses_a_wrong_length(two_checkpoints, tmp_path):
    preds = tmp_path / "preds.csv"
    _predict(two_checkpoints["a"], two_checkpoints["thresholds"], preds)  # same checkpoint: accepted
    assert preds.is_file()
    data = json.loads(two_checkpoints["thresholds"].read_text())
    data["budgets"][0]["thresholds"] = data["budgets"][0]["thresholds"][:1]  # one entry for 4 exits
    bad = tmp_path / "short.json"
    bad.write_text(json.dumps(data))
    preds2 = tmp_path / "preds2.csv"
    with pytest.raises(ValueError, match=r"short\.json, budget 0\.5: holds 1 thresholds but the model has 4"):
        _predict(two_checkpoints["a"], bad, preds2)
    assert not preds2.exists()


def _thresholds_file(tmp_path: Path, thresholds: list, **top) -> Path:
    payload = {
        "format": THRESHOLDS_FORMAT,
        "format_version": THRESHOLDS_FORMAT_VERSION,
        "rule": "confidence",
        "fingerprint": {"backbone": "b"},
        "checkpoint_hash": "file:aaa",
        "weights_hash": "weights:bbb",
        "budgets": [{"budget": 0.5, "unit": "fraction", "thresholds": thresholds}],
        **top,
    }
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(payload))
    return path


def _load(path: Path, **kw) -> list[float]:
    options = dict(num_exits=3, model_hashes=["weights:bbb"])
    return load_thresholds(str(path), 0.5, {"backbone": "b"}, **{**options, **kw})


@pytest.mark.parametrize(
    ("thresholds", "match"),
    [
        ([0.9], r"holds 1 thresholds but the model has 3 exits"),
        ([0.9, 0.8, 0.7, 0.6], r"holds 4 thresholds but the model has 3 exits"),
        ([0.9, "high", "inf"], r"threshold 'high' of exit 1 is not a number; allowed: one number per exit, "),
        ([0.9, None, "inf"], r"threshold None of exit 1 is not a number.*NaN/null is not allowed"),
        ([True, 0.5, "inf"], r"threshold True of exit 0 is not a number"),
        ({"0": 0.5}, r"'thresholds' must be a list, got dict"),
    ],
)
def test_threshold_lists_are_validated(tmp_path, thresholds, match):
    path = _thresholds_file(tmp_path, thresholds)
    with pytest.raises(ValueError, match=match) as info:
        _load(path)
    assert str(path) in str(info.value)


def test_threshold_inf_disables_an_exit_and_hashes_match_either_way(tmp_path):
    path = _thresholds_file(tmp_path, [0.9, "inf", "inf"])
    assert _load(path) == [0.9, float("inf"), float("inf")]
    assert _load(path, model_hashes=["weights:zzz", "file:aaa"]) == [0.9, float("inf"), float("inf")]
    with pytest.raises(
        ValueError,
        match=r"calibrated on other weights \(weights:bbb / file:aaa\) than this "
        r"model holds \(weights:zzz\)",
    ):
        _load(path, model_hashes=["weights:zzz"])
    with pytest.warns(UserWarning, match=r"weights:bbb / file:aaa.*weights:zzz.*using them anyway"):
        assert _load(path, model_hashes=["weights:zzz"], allow_other_checkpoint=True)[0] == 0.9


# ----------------------------------------------------------------------------------------------------- 3
@pytest.fixture
def data() -> BenchmarkDataModule:
    dm = BenchmarkDataModule(
        dataset="synthetic",
        synthetic_sizes=(40, 12),
        synthetic_num_classes=4,
        calibration_size=8,
        batch_size=8,
        num_workers=0,
        image_size=32,
    )
    dm.setup()
    return dm


def _trainer(tmp_path: Path) -> Trainer:
    """A trainer whose evaluator writes its report to ``tmp_path/report`` (random weights on purpose)."""
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[evaluator(budgets=[0.75], report_dir=str(tmp_path / "report"))],
    )


def test_test_splits_are_identified_by_name_not_position(data, tmp_path):
    model = tiny_module()
    # calibration first: the old positional rule fitted thresholds on the test split and tested on cal
    _trainer(tmp_path).test(model, dataloaders=[data.dataloader("calibration"), data.dataloader("test")])
    report = model.test_report
    assert report is not None
    assert report["num_test"] == 12 and report["num_calibration"] == 8
    assert (tmp_path / "report" / "thresholds.json").is_file()


def test_batches_name_their_split(data):
    for split in ("train", "calibration", "test"):
        assert set(next(iter(data.dataloader(split)))[SPLIT_KEY]) == {split}


class _Untagged(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        item.pop(SPLIT_KEY)
        return item


def _loader(dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=8)


@pytest.mark.parametrize(
    ("loaders", "match"),
    [
        (
            lambda d: [_Untagged(d.split_dataset("test")), _Untagged(d.split_dataset("calibration"))],
            r"test dataloader 0 of 2 yields batches without a 'split' entry, so the test and calibration "
            r"splits cannot be told apart",
        ),
        (
            lambda d: [
                d.split_dataset("test"),
                d.split_dataset("calibration"),
                d.split_dataset("calibration"),
            ],
            r"test dataloaders 1 and 2 both hold 'calibration' samples; give exactly one loader per split",
        ),
        (
            lambda d: [d.split_dataset("calibration")],
            r"no test loader yielded samples of split 'test' \(only 'calibration'\)",
        ),
        (
            lambda d: [d.split_dataset("test"), d.split_dataset("train")],
            r"test dataloader 1 yields samples of split 'train'; allowed in `test` are 'test' and "
            r"'calibration'",
        ),
    ],
    ids=["untagged", "two_calibration_loaders", "calibration_only", "train_split"],
)
def test_ambiguous_test_loaders_are_refused(data, tmp_path, loaders, match):
    model = tiny_module()
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path).test(model, dataloaders=[_loader(d) for d in loaders(data)])
    assert not (tmp_path / "report" / "thresholds.json").exists()


def test_split_tagged_wraps_custom_datasets(data, tmp_path):
    model = tiny_module()
    test = SplitTagged(_Untagged(data.split_dataset("test")), "test")
    cal = SplitTagged(_Untagged(data.split_dataset("calibration")), "calibration")
    _trainer(tmp_path).test(model, dataloaders=[_loader(cal), _loader(test)])
    assert model.test_report["num_test"] == 12 and model.test_report["num_calibration"] == 8
    with pytest.raises(ValueError, match="split must be 'train', 'calibration' or 'test', got 'val'"):
        SplitTagged(test, "val")


def test_a_single_untagged_test_loader_is_the_test_split(data, tmp_path):
    model = tiny_module()
    with pytest.warns(UserWarning, match="no calibration split was evaluated"):
        _trainer(tmp_path).test(model, dataloaders=_loader(_Untagged(data.split_dataset("test"))))
    assert model.test_report["num_test"] == 12 and model.test_report["num_calibration"] == 0


# ----------------------------------------------------------------------------------------------------- 4
@pytest.fixture
def depth6_checkpoint(tmp_path) -> Path:
    kw = {**TINY_KW, "depth": 6}
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
    kw = {**TINY_KW, "depth": 6, **change}
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
        main(["fit", "-c", TINY, f"--model.init_args.checkpoint_path={depth6_checkpoint}"])
    assert not list(tmp_path.rglob("*.ckpt"))


# ----------------------------------------------------------------------------------------------------- 5
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
    # the default (head_pool: null) pools as the backbone does: the patch mean here (issue 30)
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


def test_moment_head_without_class_token_ignores_register_tokens():
    head = MomentHead(32, 3, num_prefix_tokens=4, moment_dim=16, class_token=False).eval()
    x = torch.randn(2, 20, 32)
    y = x.clone()
    y[:, :4] = torch.randn(2, 4, 32) * 10  # only the registers change
    torch.testing.assert_close(head(x), head(y))
    with_cls = MomentHead(32, 3, num_prefix_tokens=4, moment_dim=16).eval()
    assert not torch.allclose(with_cls(x), with_cls(y))  # a class token is read


# ----------------------------------------------------------------------------------------------------- 6
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


# ----------------------------------------------------------------------------------------------------- 7
# RoPE ViTs (EVA02) are supported (tests/test_backbone_families.py); what stays refused says so in one line.
_SMALL = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize(
    ("name", "blocks"),
    [("eva02_enormous_patch14_clip_224", "EvaBlockPostNorm"), ("vit_base_patch16_rpn_224", "ResPostBlock")],
)
def test_adaptformer_on_post_norm_blocks_is_refused_naming_method_and_backbone(name, blocks):
    backbone = build_backbone(name, img_size=32, model_kwargs=_SMALL)
    exits = {"blocks": [1, 2], "moment_dim": 16, "head_pool": "avg"}
    with pytest.raises(
        ValueError,
        match=rf"peft.method='adaptformer' is not supported on backbone '{name}' \({blocks} blocks\): "
        r"AdaptFormerBlock wraps the pre-norm blocks .*; choose another peft method or backbone",
    ):
        MultiExitViT(backbone, 3, exits, "adaptformer")
    for peft in ("lora", "linear", "full", "vpt"):  # the other methods do not depend on the block's layout
        backbone = build_backbone(name, img_size=32, model_kwargs=_SMALL)
        model = MultiExitViT(backbone, 3, exits, {"method": peft, "vpt_prompts": 2})
        assert [z.shape for z in model(torch.randn(2, 3, 32, 32))] == [(2, 3), (2, 3)]


def test_rope_vit_with_dynamic_img_size_is_refused():
    with pytest.raises(
        ValueError,
        match=r"backbone 'eva02_tiny_patch14_224' with dynamic_img_size=True is not supported: its rotary "
        r"position embedding depends on each input's grid",
    ):
        build_backbone(
            "eva02_tiny_patch14_224", img_size=32, model_kwargs={**_SMALL, "dynamic_img_size": True}
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
                TINY,
                "--model.init_args.backbone=eva02_enormous_patch14_clip_224",
                "--model.init_args.peft.method=adaptformer",
                "--model.init_args.exits.head_pool=avg",
            ]
        )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cnn_with_img_size_is_refused():
    with pytest.raises(
        ValueError,
        match=r"backbone 'resnet18' does not accept \['img_size'\] .*it is not a timm "
        r"VisionTransformer",
    ):
        build_backbone("resnet18", img_size=32)


def test_one_class_data_and_model_are_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"dataset 'synthetic' has 1 class; classification needs at least 2 "
        r"\(check synthetic_num_classes\)",
    ):
        BenchmarkDataModule(dataset="synthetic", synthetic_num_classes=1, num_workers=0)
    write_image_folder(tmp_path / "one", ["only"], {"train": 2, "test": 1})
    with pytest.raises(ValueError, match=r"dataset 'image_folder' under .*one has 1 class"):
        BenchmarkDataModule(dataset="image_folder", root=str(tmp_path / "one"), num_workers=0)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2 .*got 1"):
        tiny_module(num_classes=1)


def test_one_class_data_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"has 1 class; classification needs at least 2"):
        main(["fit", "-c", TINY, "--data.init_args.synthetic_num_classes=1"])


# ----------------------------------------------------------------------------------------------------- 8
@pytest.fixture
def broken_folder(tmp_path) -> dict[str, Path]:
    root = write_image_folder(tmp_path / "imgs", ["a", "b"], {"train": 6, "test": 2})
    truncated = root / "train" / "a" / "a_1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = root / "test" / "b" / "b_0.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 20)
    return {"root": root, "truncated": truncated, "garbage": garbage}


def _folder_data(root: Path, **kw) -> BenchmarkDataModule:
    return BenchmarkDataModule(
        dataset="image_folder",
        root=str(root),
        image_size=16,
        batch_size=4,
        calibration_size=2,
        num_workers=0,
        **kw,
    )


@pytest.mark.parametrize("which", ["truncated", "garbage"])
def test_unreadable_image_error_names_the_file(broken_folder, which):
    dm = _folder_data(broken_folder["root"])
    dm.setup()
    base = dm._base.train if which == "truncated" else dm._base.test
    path = str(broken_folder[which])
    index = next(i for i in range(len(base)) if base.path(i) == path)
    with pytest.raises(
        UnreadableImageError,
        match=rf"cannot read image file {re.escape(path)} .*"
        r"skip_unreadable_images=true",
    ):
        base[index]
    if which == "garbage":  # through the test loader, as training/testing meets it
        with pytest.raises(UnreadableImageError, match=re.escape(path)):
            list(dm.dataloader("test"))


def test_skip_unreadable_images_leaves_them_out_and_reports_them(broken_folder):
    with pytest.warns(  # the files are checked when the data module is built
        UserWarning, match=r"left out 2 unreadable image file\(s\) of 'image_folder': \[.*a_1\.jpg"
    ):
        dm = _folder_data(broken_folder["root"], skip_unreadable_images=True)
    dm.setup()
    assert len(dm._base.train) == 11 and len(dm._base.test) == 3
    for split in ("train", "calibration", "test"):
        for batch in dm.dataloader(split):
            assert batch["image"].shape[1:] == (3, 16, 16)


def test_unreadable_image_through_the_cli(broken_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(broken_folder["root"] / "test")  # only the truncated training image is left
    shutil.copytree(broken_folder["root"] / "train", broken_folder["root"] / "test")
    args = [
        "fit",
        "-c",
        TINY,
        "--data.init_args.dataset=image_folder",
        f"--data.init_args.root={broken_folder['root']}",
        "--data.init_args.calibration_size=2",
        "--trainer.limit_train_batches=null",
        "--trainer.max_epochs=1",
        "--model.init_args.schedule.switch_epoch=0",
    ]
    with pytest.raises(UnreadableImageError, match=r"cannot read image file .*a_1\.jpg"):
        main(args)


# ---------------------------------------------------------------------------------------------------- 10
def _doc_blocks() -> list[str]:
    text = (ROOT / "docs" / "extending.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_extending_examples_run():
    namespace: dict = {}
    blocks = [b for b in _doc_blocks() if "class " in b]
    assert len(blocks) == 2
    for block in blocks:
        exec(block, namespace)
    options = dict(
        num_classes=4,
        img_size=32,
        backbone="vit_tiny_patch16_224",
        backbone_kwargs=TINY_KW,
        exits={"blocks": [2, 4], "moment_dim": 16},
        peft={"method": "full", "adapter_dim": 4},
    )
    focal = namespace["FocalDMPO"](**options)
    logits = focal(torch.randn(3, 3, 32, 32))
    loss, parts = focal.compute_loss(logits, torch.tensor([0, 1, 2]))
    assert loss.ndim == 0 and torch.isfinite(loss) and parts == {}
    wide = namespace["WideDropoutDMPO"](**options)
    assert wide.model.exits[0].predictor.drop.p == 0.3
    assert [z.shape for z in wide(torch.randn(2, 3, 32, 32))] == [(2, 4), (2, 4)]
