"""Fair baselines (issue 19): static PEFT with DMPO's moment head; DMPO with a moment head at the last exit.

- each file differs from the variant it is a fair version of (``static_peft``, ``dmpo``) in ``final_head``
  only;
- each fits one tiny epoch and runs ``dmpo test`` through the CLI (the real code path: ``dmpo fit`` with
  ``test_after_fit``), and the built model has a moment head at its last exit;
- the pre-train-then-tune benchmark reads them as distinct training runs (not merged with the variant they
  derive from) and compares them in its paired table.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from dmpo_lightning.cli import main
from dmpo_lightning.models.heads import LinearHead, MomentHead

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
MODELS = ROOT / "configs" / "model"
FAIR = {"static_peft_moment": "static_peft", "dmpo_final_moment": "dmpo"}
TINY_BACKBONE = [
    "--model.init_args.backbone=vit_tiny_patch16_224",
    "--model.init_args.pretrained=false",
    "--model.init_args.img_size=32",
    "--model.init_args.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, mlp_ratio: 2}",
    "--model.init_args.peft.adapter_dim=8",
    "--model.init_args.exits.moment_dim=32",
]


def _init(name: str) -> dict:
    return yaml.safe_load((MODELS / f"{name}.yaml").read_text())["model"]["init_args"]


@pytest.mark.parametrize("name", sorted(FAIR))
def test_fair_variant_changes_only_the_last_head(name):
    fair, base = _init(name), _init(FAIR[name])
    assert fair["exits"]["final_head"] == "moment" and base["exits"]["final_head"] == "linear"

    def without_final_head(init: dict) -> dict:
        exits = {k: v for k, v in init["exits"].items() if k != "final_head"}
        return {**init, "exits": exits}

    assert without_final_head(fair) == without_final_head(base)
    experiment = ROOT / "configs" / "experiments" / f"cifar100_{name}.yaml"
    assert yaml.safe_load(experiment.read_text())["model"]["init_args"] == fair


@pytest.mark.parametrize("name", sorted(FAIR))
def test_fair_variant_fits_and_tests_with_the_tiny_backbone(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init = _init(name)
    exits = (
        []
        if init["exits"]["blocks"] == 1
        # on the tiny model the first exit (bypass + moment head) costs more than a third of the full model
        else [
            "--model.init_args.exits.blocks=[1, 2, 3, 4]",
            "--evaluation.budgets=[0.5, 0.75, 1.0]",
        ]
    )
    cli = main(
        [
            "fit",
            "-c",
            TINY,
            "-c",
            str(MODELS / f"{name}.yaml"),
            *TINY_BACKBONE,
            *exits,
            "--trainer.max_epochs=1",
            "--test_after_fit=true",
        ]
    )
    model = cli.model.model
    k = 1 if init["exits"]["blocks"] == 1 else 4
    assert cli.model.num_exits == k
    assert isinstance(model.exits[-1].predictor, MomentHead)
    if k > 1:
        assert all(isinstance(model.exits[i].predictor, MomentHead) for i in range(k - 1))
    else:
        assert not any(isinstance(e.predictor, LinearHead) for e in model.exits)
    report = json.loads((Path(cli.trainer.log_dir) / "dmpo_test" / "report.json").read_text())
    assert len(report["exits"]) == k and report["num_test"] == 24
    assert all(0.0 <= e["top1"] <= 1.0 for e in report["exits"])
    # costs are fractions of this model's own full path (its last head included); the benchmark rescales
    # them to a common reference (tests/test_pretrain_tune.py)
    # (the full path = all blocks and the last head; the last exit of a multi-exit model adds the early heads)
    if k == 1:
        assert report["exits"][-1]["cost"] == pytest.approx(report["full_model"]["cost"])
    else:
        assert report["exits"][-1]["cost"] > report["full_model"]["cost"]


def _benchmark():
    if "pretrain_tune" in sys.modules:
        return sys.modules["pretrain_tune"]
    spec = importlib.util.spec_from_file_location("pretrain_tune", ROOT / "benchmarks" / "pretrain_tune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_tune"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["pretrain_tune"]
        raise
    return module


def test_benchmark_trains_fair_variants_as_their_own_runs():
    bench = _benchmark()
    settings = bench.Settings()
    names = ["static_peft", "static_peft_moment", "dmpo", "dmpo_final_moment"]
    jobs = bench.plan(names, settings, bench.MODEL_CONFIGS, {v: [0] for v in names})
    assert [j.name for j in jobs] == names  # none merged with the variant it derives from
    assert (
        bench.module_kwargs("static_peft_moment", settings, bench.MODEL_CONFIGS)["exits"]["final_head"]
        == "moment"
    )
    assert set(bench.FAIR_BASELINES) <= set(bench.available_variants(bench.MODEL_CONFIGS))
