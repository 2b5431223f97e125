"""Option groups: a model rebuilt from a module's hparams alone, one name per option, typo keys refused."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from support.builders import TINY_CONFIG

from dmpo_lightning.models.adapters import PeftOptions
from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.models.multi_exit import ExitOptions, MultiExitViT
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.options import dotted_options
from dmpo_lightning.schedules import ScheduleOptions

BACKBONE = dict(
    backbone="vit_tiny_patch16_224",
    img_size=32,
    backbone_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0},
)
# Non-default values in every group, so a field lost on the way shows up as a different model or option.
EXITS = {"blocks": [2, 4], "early_head": "isqrt_cov", "cov_dim": 8, "bypass_dim": 4, "head_dropout": 0.1}
PEFT = {"method": "lora", "lora_rank": 2, "lora_alpha": 4.0, "lora_targets": ["qkv", "fc1"]}
SCHEDULE = {"switch_epoch": 1, "ramp_epochs": 1, "weight_phase1": "uniform"}
GROUPS = {
    "peft": PeftOptions,
    "exits": ExitOptions,
    "schedule": ScheduleOptions,
}


def configured_module(**overrides) -> DMPOModule:
    """A tiny module with a non-default value in every option group."""
    torch.manual_seed(0)
    kwargs = dict(num_classes=3, **BACKBONE, exits=EXITS, peft=PEFT, schedule=SCHEDULE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "peft.method=.* freezes the trunk", UserWarning)
        return DMPOModule(**{**kwargs, **overrides})


def test_a_model_rebuilt_from_the_hparams_alone_is_the_same_model():
    m = configured_module()
    h = m.hparams
    for name, cls in GROUPS.items():  # every field of every group is in the hyperparameters, as a dict
        assert isinstance(h[name], dict), name
        assert set(h[name]) == {f.name for f in dataclasses.fields(cls)}, name
    backbone = build_backbone(h.backbone, img_size=h.img_size, model_kwargs=h.backbone_kwargs)
    rebuilt = MultiExitViT(backbone, h.num_classes, h.exits, h.peft)
    ours, theirs = m.model.state_dict(), rebuilt.state_dict()
    assert list(theirs) == list(ours)
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    assert rebuilt.exit_blocks == m.model.exit_blocks == (2, 4)
    assert rebuilt.exit_options == m.exit_options and rebuilt.peft_options == m.peft_options
    assert m.peft_options.lora_targets == ("qkv", "fc1")  # lists are stored as tuples
    assert any(".mlp.fc1.peft_lora_a" in k for k in ours)  # the non-default targets reached the model


def test_options_have_one_name_and_other_spellings_are_refused_with_the_mapping_to_write():
    with pytest.raises(TypeError, match="unexpected keyword argument 'exit_blocks'"):
        configured_module(exit_blocks=[2, 4])
    with pytest.raises(
        TypeError, match=r"^peft is a group of options, a mapping: e.g. `peft: \{method: vpt\}`"
    ):
        configured_module(peft="vpt")
    with pytest.raises(
        TypeError, match=r"^exits is a group of options, a mapping: e.g. `exits: \{blocks: 2\}`"
    ):
        configured_module(exits=2)


def test_the_fingerprint_names_each_option_as_the_user_writes_it():
    fingerprint = configured_module().model_fingerprint()
    assert fingerprint == {
        "backbone": "vit_tiny_patch16_224",
        "num_classes": 3,
        "exits.blocks": [2, 4],
        "exits.early_head": "isqrt_cov",
        "exits.final_head": "linear",
        "peft.method": "lora",
    }
    assert dotted_options({"peft": PeftOptions("vpt"), "img_size": 32})["peft.method"] == "vpt"


def test_a_typo_key_in_a_group_is_refused_naming_the_allowed_fields():
    allowed = ", ".join(f.name for f in dataclasses.fields(ExitOptions))
    with pytest.raises(ValueError, match="no option 'blockz'") as err:
        ExitOptions.coerce({"blockz": 1})
    assert allowed in str(err.value)
    with pytest.raises(ValueError, match=r"exits has no option 'blockz'; its options are blocks, "):
        configured_module(exits={"blockz": [2, 4]})
    assert ExitOptions.coerce({"blocks": 1}) == ExitOptions(blocks=1)


def test_evaluation_under_the_model_is_refused_naming_where_it_goes(tmp_path, capsys):

    from dmpo_lightning.cli import main

    tiny = TINY_CONFIG
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  init_args:\n    evaluation:\n      budgets: [0.5]\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(tiny), "--config", str(old), "--print_config"], run=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "the evaluation options are not model options: write `evaluation:` at the top level" in err


def test_a_flat_option_of_the_first_days_is_refused_naming_the_accepted_keys(tmp_path, capsys):

    from dmpo_lightning.cli import main

    tiny = TINY_CONFIG
    old = tmp_path / "old.yaml"
    # a group's field written directly under init_args
    old.write_text("model:\n  class_path: dmpo_lightning.DMPOModule\n  init_args:\n    exit_blocks: [2, 4]\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(tiny), "--config", str(old), "--print_config"], run=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Option 'exit_blocks' is not accepted" in err and "model.init_args accepts:" in err
