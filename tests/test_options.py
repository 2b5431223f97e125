"""Option groups: a model rebuilt from a module's hparams alone, old flat checkpoints, typo keys refused."""

from __future__ import annotations

import dataclasses
import warnings

import lightning
import pytest
import torch

from dmpo_lightning.evaluation.evaluator import EvaluationOptions
from dmpo_lightning.models.adapters import PeftOptions
from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.models.multi_exit import ExitOptions, MultiExitViT
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.options import LEGACY_FLAT_OPTIONS, flat_options
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
EVALUATION = {"rule": "entropy", "budgets": [0.5, 0.75]}
GROUPS = {
    "peft": PeftOptions,
    "exits": ExitOptions,
    "schedule": ScheduleOptions,
    "evaluation": EvaluationOptions,
}


def tiny_module(**overrides) -> DMPOModule:
    torch.manual_seed(0)
    kwargs = dict(num_classes=3, **BACKBONE, exits=EXITS, peft=PEFT, schedule=SCHEDULE, evaluation=EVALUATION)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "peft.method=.* freezes the trunk", UserWarning)
        return DMPOModule(**{**kwargs, **overrides})


def test_a_model_rebuilt_from_the_hparams_alone_is_the_same_model():
    m = tiny_module()
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


def _flat_checkpoint(module: DMPOModule) -> dict:
    """The checkpoint an older version wrote: the same weights, the hyperparameters under the flat names."""
    flat = flat_options(module.hparams)
    for group in GROUPS:
        if group not in LEGACY_FLAT_OPTIONS:  # `peft` is both a group and the flat method name
            del flat[group]
    assert isinstance(flat["peft"], str) and flat["exit_blocks"] == [2, 4] and flat["exit_rule"] == "entropy"
    assert not any(isinstance(v, dict) for k, v in flat.items() if k != "backbone_kwargs")
    return {
        "state_dict": module.state_dict(),
        "hyper_parameters": flat,
        "pytorch-lightning_version": lightning.__version__,
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "pre-zip-format"])
def test_an_old_flat_checkpoint_loads_into_the_groups_without_a_warning(tmp_path, zip_format):
    module = tiny_module()
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = tmp_path / "old.ckpt"
    torch.save(_flat_checkpoint(module), path, _use_new_zipfile_serialization=zip_format)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loaded = DMPOModule.load_from_checkpoint(path)
    for name in GROUPS:
        assert loaded.hparams[name] == module.hparams[name], name
    assert loaded.exit_options == module.exit_options and loaded.peft_options == module.peft_options
    assert loaded.evaluation_options.rule == "entropy" and loaded.schedule_options.switch_epoch == 1
    assert not any(k in loaded.hparams for k in ("exit_blocks", "lora_rank", "exit_rule", "switch_epoch"))
    state = module.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_flat_kwargs_from_python_warn_with_the_new_names_and_unknown_ones_are_refused():
    with pytest.warns(FutureWarning, match=r"exit_blocks -> exits\.blocks.*lora_rank -> peft\.lora_rank"):
        old = tiny_module(exits=None, peft=None, exit_blocks=[2, 4], lora_rank=2)
    assert old.exit_options.blocks == (2, 4) and old.peft_options.lora_rank == 2
    with pytest.warns(FutureWarning, match=r"peft -> peft\.method"):
        assert tiny_module(peft="vpt").peft_options.method == "vpt"
    with pytest.raises(TypeError, match="'exit_blockz'"):
        tiny_module(exit_blockz=[2, 4])


def test_a_typo_key_in_a_group_is_refused_naming_the_allowed_fields():
    allowed = ", ".join(f.name for f in dataclasses.fields(ExitOptions))
    with pytest.raises(ValueError, match="no option 'blockz'") as err:
        ExitOptions.coerce({"blockz": 1})
    assert allowed in str(err.value)
    with pytest.raises(ValueError, match=r"exits has no option 'blockz'; its options are blocks, "):
        tiny_module(exits={"blockz": [2, 4]})
    assert ExitOptions.coerce({"blocks": 1}) == ExitOptions(blocks=1)


def test_an_old_flat_config_is_refused_naming_the_new_options(tmp_path, capsys):
    from pathlib import Path

    from dmpo_lightning.cli import main

    tiny = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
    old = tmp_path / "old.yaml"
    # the model part of a config written before the groups: a flat option under init_args
    old.write_text("model:\n  class_path: dmpo_lightning.DMPOModule\n  init_args:\n    exit_blocks: [2, 4]\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(tiny), "--config", str(old), "--print_config"], run=False)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "Option 'exit_blocks' is not accepted" in err
    assert err.count("the model options are grouped now") == 1 and "exit_blocks -> exits.blocks" in err
