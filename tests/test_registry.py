"""Registries of exit rules, predictors and PEFT methods: one definition of each name list, clear errors."""

import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch
from support.builders import TINY_CONFIG
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dmpo_lightning.models import adapters, exit_rules, heads, multi_exit
from dmpo_lightning.models.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG

REGISTRIES = {
    "exit rule": (exit_rules.EXIT_RULE_REGISTRY, exit_rules.ExitRule, exit_rules.EXIT_RULES),
    "predictor": (heads.PREDICTOR_REGISTRY, heads.PredictorKind, heads.PREDICTOR_KINDS),
    "peft": (adapters.PEFT_REGISTRY, adapters.PeftMethod, adapters.PEFT_METHODS),
}


@pytest.mark.parametrize("kind", REGISTRIES)
def test_literal_and_name_tuple_are_the_registry(kind):
    registry, literal, names = REGISTRIES[kind]
    assert len(registry) >= 3
    assert get_args(literal) == registry.names() == names


def test_the_model_and_module_signatures_use_the_same_literals():
    from dmpo_lightning.evaluation.evaluator import EvaluationOptions
    from dmpo_lightning.module import DMPOModule

    module_hints = get_type_hints(DMPOModule.__init__)
    model_hints = get_type_hints(multi_exit.MultiExitViT.__init__)
    # The module and the model take the same option groups; the groups' fields carry the literals.
    assert module_hints["peft"] is adapters.PeftOptions and module_hints["exits"] is multi_exit.ExitOptions
    assert adapters.PeftOptions in get_args(model_hints["peft"])
    assert multi_exit.ExitOptions in get_args(model_hints["exits"])
    peft_hints = get_type_hints(adapters.PeftOptions)
    exit_hints = get_type_hints(multi_exit.ExitOptions)
    assert peft_hints["method"] is adapters.PeftMethod
    assert exit_hints["early_head"] is exit_hints["final_head"] is heads.PredictorKind
    assert get_type_hints(EvaluationOptions)["rule"] == exit_rules.ExitRule | None


def test_registry_rejects_duplicates_and_bad_names_and_lists_the_allowed():
    reg: Registry[int] = Registry("colour")
    reg.register("red")(1)
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        reg.register("red")(2)
    with pytest.raises(ValueError, match="must be a non-empty string"):
        reg.register("has space")
    with pytest.raises(ValueError, match=r"unknown colour 'blue'; allowed: red$"):
        reg.get("blue")
    assert reg.get("red") == 1 and "red" in reg and list(reg) == ["red"]
    with pytest.raises(ValueError, match="no colour is registered"):
        Registry("colour").literal()


def _tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=0
    )


def test_a_registered_exit_rule_reaches_the_protocol_and_the_real_early_exit(scratch_registries):
    @exit_rules.register_exit_rule("margin")
    def margin(probs, run):
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]

    logits = torch.randn(6, 3, 5)
    scores, _ = exit_rules.exit_scores(logits, "margin")
    top2 = logits.softmax(-1).topk(2, dim=-1).values
    torch.testing.assert_close(scores, top2[..., 0] - top2[..., 1])
    assert exit_rules.is_local_rule("margin")

    model = multi_exit.MultiExitViT(
        _tiny_vit(), 4, multi_exit.ExitOptions(blocks=(1, 2, 3), early_head="linear"), "linear"
    ).eval()
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        all_logits = torch.stack(model(x), dim=1)
        sim_scores, _ = exit_rules.exit_scores(all_logits, "margin")
        t = sim_scores[:, :2].median().item()  # about half of the samples leave early
        out = model.forward_early_exit(x, [t, t, -float("inf")], rule="margin")
    leaves = sim_scores[:, :2] >= t
    expected_exit = torch.where(leaves.any(1), leaves.float().argmax(1), torch.full((16,), 2))
    assert 0 < int((expected_exit < 2).sum()) < 16
    torch.testing.assert_close(out.exit_index, expected_exit)
    torch.testing.assert_close(out.score, sim_scores.gather(1, expected_exit[:, None])[:, 0])


def test_a_registered_non_local_rule_gets_the_run_length(scratch_registries):
    exit_rules.register_exit_rule("run_squared", local=False)(lambda probs, run: run**2)
    logits = torch.tensor([[[0.0, 1.0], [0.0, 2.0], [3.0, 0.0]]])
    torch.testing.assert_close(
        exit_rules.exit_scores(logits, "run_squared")[0], torch.tensor([[1.0, 4.0, 1.0]])
    )
    assert not exit_rules.is_local_rule("run_squared")


def test_unknown_names_are_refused_with_the_allowed_list():
    with pytest.raises(ValueError, match="unknown exit rule 'margn'; allowed: confidence, entropy, patience"):
        exit_rules.exit_scores(torch.zeros(1, 2, 3), "margn")
    with pytest.raises(ValueError, match="unknown predictor kind 'mlp'; allowed: linear, moment, isqrt_cov"):
        heads.build_predictor("mlp", 8, 2, 1)
    with pytest.raises(ValueError, match="unknown PEFT method 'lroa'; allowed: adaptformer, lora, vpt"):
        adapters.inject_peft(_tiny_vit(), "lroa")


def test_a_registered_predictor_is_built_with_only_its_options(scratch_registries):
    @heads.register_predictor("first_token", options=("head_dropout",))
    class FirstToken(nn.Module):
        def __init__(self, dim, num_classes, num_prefix_tokens, head_dropout=0.0):
            super().__init__()
            self.fc = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(dim, num_classes))

        def forward(self, x):
            return self.fc(x[:, 0])

    head = heads.build_predictor("first_token", 8, 3, 1, head_dropout=0.25, moment_dim=7)
    assert isinstance(head, FirstToken) and head.fc[0].p == 0.25
    model = multi_exit.MultiExitViT(_tiny_vit(), 4, {"blocks": [2, 3], "early_head": "first_token"}, "linear")
    assert isinstance(model.exits[0].predictor, FirstToken)
    assert [t.shape for t in model(torch.randn(2, 3, 16, 16))] == [(2, 4), (2, 4)]


def test_a_predictor_registration_naming_an_option_it_lacks_fails_at_once(scratch_registries):
    with pytest.raises(TypeError, match=r"does not accept the options \['moment_groups'\]"):

        @heads.register_predictor("bad", options=("head_dropout", "moment_groups"))
        class Bad(nn.Module):
            def __init__(self, dim, num_classes, num_prefix_tokens, head_dropout=0.0):
                super().__init__()

    assert "bad" not in heads.PREDICTOR_REGISTRY


def test_a_registered_peft_method_is_injected_and_only_its_parameters_train(scratch_registries):
    @adapters.register_peft("bias_shift")
    def inject(model, trunk, indices, options, num_prefix_tokens):
        assert isinstance(options, adapters.PeftOptions) and options.method == "bias_shift"
        for i in indices:
            trunk[i].register_parameter("peft_shift", nn.Parameter(torch.zeros(1)))
        return [f"blocks.{i}" for i in indices]

    vit = _tiny_vit()
    assert adapters.inject_peft(vit, "bias_shift", blocks=[0, 2]) == ["blocks.0", "blocks.2"]
    trainable = sorted(n for n, p in vit.named_parameters() if p.requires_grad)
    assert trainable == ["blocks.0.peft_shift", "blocks.2.peft_shift"]
    with pytest.raises(ValueError, match="inject_peft must run once"):
        adapters.inject_peft(vit, "bias_shift")
    with pytest.raises(ValueError, match="trains must be"):
        adapters.register_peft("x", trains="some")


@pytest.mark.slow
def test_cli_help_lists_the_registered_names_and_rejects_a_typo():
    env_cmd = [sys.executable, "-m", "dmpo_lightning", "fit"]
    helped = subprocess.run(
        [*env_cmd, "--model.help", "dmpo_lightning.DMPOModule"], capture_output=True, text=True, timeout=300
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--model.peft.method {adaptformer,lora,vpt,linear,full}" in helped.stdout
    assert "--model.exits.early_head {linear,moment,isqrt_cov}" in helped.stdout
    assert "--model.evaluation" not in helped.stdout  # evaluation options are not the model's
    top = subprocess.run([*env_cmd, "--help"], capture_output=True, text=True, timeout=300)
    assert "--evaluation.rule RULE" in top.stdout and "confidence" in top.stdout, top.stdout[-3000:]
    assert "AdaptFormer bottleneck width r." in helped.stdout  # the field's docstring is its help
    typo = subprocess.run(
        [*env_cmd, "-c", TINY, "--model.init_args.peft.method=lroa", "--print_config"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert typo.returncode != 0
    assert "Got value: lroa" in typo.stderr


def test_dataset_literal_is_built_from_the_dataset_table():
    from dmpo_lightning.data import BenchmarkDataModule
    from dmpo_lightning.data.registry import DATASETS, DatasetName

    assert get_args(DatasetName) == tuple(DATASETS)
    assert get_type_hints(BenchmarkDataModule.__init__)["dataset"] is DatasetName
