"""Items that used to be written twice now have one definition, used by every caller."""

import os

import pytest
import torch

from dmpo_lightning import constants, files
from dmpo_lightning.errors import ConfigError
from dmpo_lightning.evaluation import protocol, protocol_run, report
from dmpo_lightning.evaluation.flops import ExitCosts
from dmpo_lightning.models import adapters, heads


def _costs(exit_gflops, full):
    return ExitCosts(tuple(g * 1e9 for g in exit_gflops), full * 1e9, (3, 32, 32))


@pytest.mark.parametrize(("budget", "option"), [(0.1, "fraction"), (1.5, "fraction"), (0.5, "gflops")])
def test_config_check_and_protocol_refuse_a_budget_with_the_same_sentence(budget, option):
    costs = _costs([1.0, 2.0, 4.0], 4.0)
    with pytest.raises(ConfigError) as config_err:
        protocol_run.check_budgets([budget], option, costs)
    scores = torch.rand(20, 3)
    correct = torch.rand(20, 3) > 0.5
    unit = protocol.protocol_budget_unit(option)
    with pytest.raises(ValueError) as protocol_err:
        protocol.select_budgets(
            scores, correct, costs.exit_gflops, 4.0, [budget], unit, protocol.search_qs(5)
        )
    same = str(protocol_err.value).replace("unit of costs", "GFLOPs")  # the config check names the cost unit
    assert str(config_err.value) == f"{same}; fix evaluation.budgets"
    assert "outside the achievable range" in str(config_err.value)


def test_budgets_at_both_ends_of_the_range_pass_both_checks():
    costs = _costs([1.0, 2.0, 4.0], 4.0)
    protocol_run.check_budgets([0.25, 1.0], "fraction", costs)
    protocol_run.check_budgets([1.0, 4.0], "gflops", costs)
    assert protocol.check_budget_range([1.0, 4.0], 1.0, 4.0, "absolute", "GFLOPs") == [1.0, 4.0]


def test_budget_unit_option_and_protocol_unit_are_translated_in_one_place():
    assert protocol.protocol_budget_unit("gflops") == "absolute"
    assert protocol.protocol_budget_unit("fraction") == "fraction"
    with pytest.raises(
        ValueError, match=r"budget_unit must be one of \('fraction', 'gflops'\); got 'absolute'"
    ):
        protocol.protocol_budget_unit("absolute")
    from typing import get_args

    assert tuple(protocol.BUDGET_UNIT_OPTIONS) == get_args(protocol.BudgetUnitOption)
    assert set(protocol.BUDGET_UNIT_OPTIONS.values()) == set(get_args(protocol.BudgetUnit))


def _write_report(path):
    files.write_json(path, {"a": 2})


def _write_plot(path):
    report.plot_curve(path, report.build_report(costs=[1.0, 2.0], full_cost=2.0, anytime_top1=[0.5, 0.6]))


def _write_export(path):
    from dmpo_lightning import serialization

    serialization.write_trainable(str(path), {"w": torch.ones(2)}, {"a": 1}, overwrite=True)


@pytest.mark.parametrize("write", [_write_report, _write_plot, _write_export], ids=lambda f: f.__name__)
def test_reports_plots_and_exports_are_written_atomically(tmp_path, monkeypatch, write):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write(path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    monkeypatch.undo()
    write(path)
    assert path.read_bytes() != b"old" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_atomic_write_without_overwrite_refuses_and_leaves_nothing(tmp_path):
    target = tmp_path / "x.bin"
    files.atomic_write_bytes(target, b"1", overwrite=False)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        files.atomic_write_bytes(target, b"2", overwrite=False)
    assert target.read_bytes() == b"1"
    files.atomic_write_bytes(target, b"3")
    assert target.read_bytes() == b"3" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_fingerprint_keys_nest_and_are_the_names_users_write():
    assert set(constants.ARCHITECTURE_KEYS) < set(constants.MODEL_FINGERPRINT_KEYS)
    # the exit rule is not part of the model: thresholds.json records it beside the fingerprint
    assert constants.THRESHOLDS_FINGERPRINT_KEYS == constants.MODEL_FINGERPRINT_KEYS


def test_the_module_fingerprint_has_exactly_the_fingerprint_keys():
    from dmpo_lightning.module import DMPOModule

    module = DMPOModule(
        backbone="vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        backbone_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        num_classes=3,
        exits={"blocks": 2, "early_head": "linear"},
        peft={"method": "full"},
    )
    fingerprint = module.model_fingerprint()
    assert tuple(fingerprint) == constants.THRESHOLDS_FINGERPRINT_KEYS
    assert fingerprint["exits.blocks"] == list(module.model.exit_blocks)
    assert fingerprint["peft.method"] == "full" and fingerprint["exits.early_head"] == "linear"


def test_dropout_and_positive_int_are_refused_with_the_same_sentence_everywhere():
    from dmpo_lightning.models.multi_exit import ExitOptions

    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=rf"^head_dropout must be in \[0, 1\), got {bad}$"):
            heads.build_predictor("linear", 8, 2, 1, head_dropout=bad)
        with pytest.raises(ValueError, match=rf"^exits.head_dropout must be in \[0, 1\), got {bad}$"):
            ExitOptions(head_dropout=bad)
        with pytest.raises(ValueError, match=rf"^dropout must be in \[0, 1\), got {bad}$"):
            adapters.LoRALinear(torch.nn.Linear(4, 4), dropout=bad)
    with pytest.raises(ValueError, match=r"^cov_dim must be a positive integer, got 0$"):
        heads.ISqrtCovHead(8, 2, 1, cov_dim=0)
    with pytest.raises(ValueError, match=r"^exits.cov_dim must be a positive integer, got 0$"):
        ExitOptions(cov_dim=0)
    with pytest.raises(ValueError, match=r"^lora_rank must be a positive integer, got 0$"):
        adapters.LoRALinear(torch.nn.Linear(4, 4), rank=0)
