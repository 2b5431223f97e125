"""Runs the examples of docs/ARCHITECTURE.md's extension guide and of docs/extending.md, as written there."""

import re
from pathlib import Path

import torch
from support.builders import TINY_MODULE
from timm.models.vision_transformer import VisionTransformer

from dmpo_lightning.data import registry as data_registry
from dmpo_lightning.models import adapters, exit_rules, heads
from dmpo_lightning.models.multi_exit import MultiExitViT

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
EXAMPLE = re.compile(r"<!-- example: (?P<name>[\w-]+) -->\s*```python\n(?P<code>.*?)```", re.S)
KINDS = ("exit-rule", "predictor", "peft", "dataset", "backbone")


def examples() -> dict[str, str]:
    return {m["name"]: m["code"] for m in EXAMPLE.finditer(GUIDE.read_text())}


def run_example(name: str) -> dict:
    namespace: dict = {"__name__": f"guide_{name.replace('-', '_')}"}
    exec(compile(examples()[name], f"{GUIDE.name}:{name}", "exec"), namespace)
    return namespace


def test_the_guide_has_one_example_and_one_table_row_per_kind_of_extension():
    text = GUIDE.read_text()
    assert sorted(examples()) == sorted(KINDS)
    for row in (
        "| exit rule |",
        "| predictor (exit head) |",
        "| PEFT method |",
        "| dataset |",
        "| backbone family |",
    ):
        assert row in text, row


def test_exit_rule_example(scratch_registries):
    run_example("exit-rule")
    assert "margin" in exit_rules.EXIT_RULE_REGISTRY
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    model = MultiExitViT(vit, 3, exits={"blocks": [1, 2], "early_head": "linear"}, peft="linear").eval()
    with torch.no_grad():
        out = model.forward_early_exit(torch.randn(4, 3, 16, 16), [0.0, -float("inf")], rule="margin")
    assert bool((out.exit_index == 0).all())  # every margin is >= 0


def test_predictor_example(scratch_registries):
    namespace = run_example("predictor")
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    model = MultiExitViT(vit, 3, exits={"blocks": [1, 2], "early_head": "mean_max"}, peft="linear")
    assert isinstance(model.exits[0].predictor, namespace["MeanMaxHead"])


def test_peft_example(scratch_registries):
    run_example("peft")
    assert "gain" in adapters.PEFT_REGISTRY


def test_dataset_example(scratch_registries):
    namespace = run_example("dataset")
    assert namespace["dm"].num_classes == 3
    assert "fake3" in data_registry.DATASETS


def test_backbone_example():
    run_example("backbone")


def test_examples_leave_no_registration_behind():
    assert "margin" not in exit_rules.EXIT_RULE_REGISTRY
    assert "mean_max" not in heads.PREDICTOR_REGISTRY
    assert "gain" not in adapters.PEFT_REGISTRY
    assert "fake3" not in data_registry.DATASETS


def _doc_blocks() -> list[str]:
    text = (GUIDE.parent / "extending.md").read_text()
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
        backbone_kwargs=TINY_MODULE["backbone_kwargs"],
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
