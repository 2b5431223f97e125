"""Every shipped method variant, dataset and experiment config runs, not only parses.

``tests/test_cli.py`` parses every config with ``--print_config``. Here:
- every ``configs/model/*.yaml`` trains one batch (``fit --trainer.fast_dev_run=1``) with the tiny backbone of
  ``tests/configs/tiny.yaml`` on synthetic data, and the built model has the architecture the file describes;
- every ``configs/data/*.yaml`` builds its data module on fake files laid out like the real dataset and yields
  a batch from the train, calibration and test loaders;
- every ``configs/experiments/*.yaml`` holds exactly the model of its ``configs/model/<variant>.yaml``
  (configs, not forks) and the shared paper recipe; two experiments train a batch on fake CIFAR-100 with CPU
  overrides;
- each fair baseline (static PEFT with DMPO's moment head, DMPO with a moment head at the last exit) differs
  from its variant in ``final_head`` only, and fits and tests through the CLI with a moment head at its last
  exit;
- ``configs/trainer/default.yaml`` and the quickstart keep the best checkpoint by the last exit's
  calibration accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from support.builders import TINY_CONFIG
from support.fakes import (
    write_cifar,
    write_cub,
    write_fashion_mnist,
    write_flowers102,
    write_food101,
    write_image_folder,
    write_image_list,
    write_imagenet,
    write_nabirds,
    write_stanford_cars,
    write_stanford_dogs,
    write_vtab1k,
)

from dmpo_lightning.cli import main
from dmpo_lightning.constants import IMAGE_KEY, LABEL_KEY
from dmpo_lightning.data.registry import DATASETS
from dmpo_lightning.models.adapters import AdaptFormerBlock
from dmpo_lightning.models.heads import ISqrtCovHead, LinearHead, MomentHead
from dmpo_lightning.schedules import preset_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG
MODEL_CONFIGS = sorted((ROOT / "configs" / "model").glob("*.yaml"))
DATA_CONFIGS = sorted((ROOT / "configs" / "data").glob("*.yaml"))
EXPERIMENT_CONFIGS = sorted((ROOT / "configs" / "experiments").glob("cifar100_*.yaml"))
"""The CIFAR-100 experiments (one per variant); the VTAB-1k and FGVC ones are checked in
test_data_list_files.py and test_data_fgvc.py."""
HEAD_CLASSES = {"linear": LinearHead, "moment": MomentHead, "isqrt_cov": ISqrtCovHead}

# The tiny backbone of tests/configs/tiny.yaml (4 blocks, dim 32); multi-exit variants get one exit per block.
TINY_BACKBONE = [
    "--model.init_args.backbone=vit_tiny_patch16_224",
    "--model.init_args.pretrained=false",
    "--model.init_args.checkpoint_path=null",
    "--model.init_args.img_size=32",
    "--model.init_args.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, mlp_ratio: 2}",
    "--model.init_args.peft.adapter_dim=8",
    "--model.init_args.exits.moment_dim=32",
    "--model.init_args.exits.cov_dim=8",
]
CPU_TRAINER = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.sync_batchnorm=false",
]


def _init_args(path: Path, section: str = "model") -> dict:
    return yaml.safe_load(path.read_text())[section]["init_args"]


def _opt(init: dict, group: str, field: str, default=None):
    """A grouped option of a config's ``model.init_args`` (``exits.blocks``), or ``default`` if unset."""
    return (init.get(group) or {}).get(field, default)


def _tiny_overrides(init: dict) -> list[str]:
    """Tiny-backbone overrides that keep the variant's exit layout (single exit or four exits)."""
    exits = _opt(init, "exits", "blocks")
    if isinstance(exits, int):
        return list(TINY_BACKBONE)  # "the last n blocks" works for any depth
    return [*TINY_BACKBONE, "--model.init_args.exits.blocks=[1, 2, 3, 4]"]


def test_there_is_a_model_config_per_variant():
    names = {p.stem for p in MODEL_CONFIGS}
    expected = {
        "static_peft",
        "linear_probe",
        "full_finetune",
        "sdn_linear",
        "sdn_bypass",
        "sdn_moment",
        "sdn_isqrt_cov",
        "dmpo",
        "dmpo_isqrt_cov",
        "phase1_only",
        "phase2_only",
        "switch_25",
        "switch_50",
        "switch_75",
        "distill_last",
        "exit_entropy",
        "exit_patience",
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_variant_trains_a_batch_with_the_tiny_backbone(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init = _init_args(path)
    cli = main(
        [
            "fit",
            "-c",
            TINY,
            "-c",
            str(path),
            *_tiny_overrides(init),
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
        ]
    )
    module = cli.model
    assert cli.trainer.state.finished
    # The architecture is the one the file describes.
    single = _opt(init, "exits", "blocks") == 1
    k = module.num_exits
    assert k == (1 if single else 4)
    peft = _opt(init, "peft", "method", "adaptformer")
    assert module.model.peft_method == peft
    has_adapters = any(isinstance(m, AdaptFormerBlock) for m in module.model.backbone.modules())
    assert has_adapters == (peft == "adaptformer")
    counts = module.model.count_parameters()
    assert (counts["trunk"] == 0) == (peft == "linear")
    if peft == "full":
        assert all(p.requires_grad for p in module.model.backbone.blocks.parameters())
    bypass = bool(_opt(init, "exits", "bypass", True))
    for i in range(k - 1):
        assert isinstance(module.model.exits[i].bypass, torch.nn.Identity) != bypass
        assert isinstance(
            module.model.exits[i].predictor, HEAD_CLASSES[_opt(init, "exits", "early_head", "moment")]
        )
    assert isinstance(
        module.model.exits[-1].predictor, HEAD_CLASSES[_opt(init, "exits", "final_head", "linear")]
    )
    assert isinstance(module.model.exits[-1].bypass, torch.nn.Identity)
    # The one epoch fast_dev_run trains is phase 1 (switch epochs in the files are >= 25 or half of training).
    phase1 = preset_weights(_opt(init, "schedule", "weight_phase1", "depth_increasing"), k)
    assert module.loss_weights.tolist() == pytest.approx(list(phase1))
    if "distill" in init:
        assert module.hparams.distill == init["distill"]
    for group, field in (("schedule", "switch_epoch"), ("schedule", "weight_phase2")):
        if field in (init.get(group) or {}):
            assert module.hparams[group][field] == init[group][field], f"{group}.{field}"
    evaluation = yaml.safe_load(path.read_text()).get("evaluation") or {}  # beside model:, not inside
    assert "evaluation" not in init
    if "rule" in evaluation:
        assert cli.config_init["fit"]["evaluation"].rule == evaluation["rule"]
    # Budgets a model with this exit layout can meet (single exit: only the full cost).
    budgets = evaluation.get("budgets", [0.33, 0.5, 0.75, 1.0])
    assert budgets == ([1.0] if single else [0.33, 0.5, 0.75, 1.0])


def test_variant_files_switch_where_their_names_say():
    for pct in (25, 50, 75):
        assert (
            _init_args(ROOT / "configs" / "model" / f"switch_{pct}.yaml")["schedule"]["switch_epoch"] == pct
        )
    one = _init_args(ROOT / "configs" / "model" / "phase1_only.yaml")["schedule"]
    two = _init_args(ROOT / "configs" / "model" / "phase2_only.yaml")["schedule"]
    assert one["weight_phase1"] == one["weight_phase2"] == "depth_increasing"
    assert two["weight_phase1"] == two["weight_phase2"] == "uniform"


def test_there_is_a_data_config_per_dataset():
    assert {p.stem for p in DATA_CONFIGS} == set(DATASETS)


def _fake_root(dataset: str, base: Path) -> Path | None:
    """Fake files in the dataset's real layout (None: the dataset needs no files)."""
    folder = base / dataset
    writers = {
        "cifar10": lambda: write_cifar(folder, "cifar10", per_batch=4),
        "cifar100": lambda: write_cifar(folder, "cifar100", per_batch=4),
        "fashion_mnist": lambda: write_fashion_mnist(folder, n_train=30, n_test=10),
        "food101": lambda: write_food101(folder, per_class=4),
        "flowers102": lambda: write_flowers102(folder, n_images=18),
        "cub200": lambda: write_cub(folder, per_class=6),
        "stanford_cars": lambda: write_stanford_cars(folder, per_split=12),
        "imagenet": lambda: write_imagenet(folder),
        "image_folder": lambda: write_image_folder(folder, ["a", "b", "c"], {"train": 6, "test": 2}),
        "image_list": lambda: write_image_list(folder, num_classes=3, sizes={"train": 8, "test": 4}),
        "vtab1k": lambda: write_vtab1k(folder, ["cifar"]),
        "nabirds": lambda: write_nabirds(folder, per_class=6, vpt=True),
        "stanford_dogs": lambda: write_stanford_dogs(folder, per_class=6, vpt=True),
    }
    return writers[dataset]() if dataset in writers else None


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=lambda p: p.stem)
def test_data_config_builds_loaders_on_fake_files(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init = _init_args(path, "data")
    dataset = init["dataset"]
    args = ["-c", TINY, "-c", str(path), "--data.init_args.num_workers=0", "--data.init_args.batch_size=4"]
    root = _fake_root(dataset, tmp_path)
    if root is not None:
        args += [f"--data.init_args.root={root}", "--data.init_args.download=false"]
    size = init.get("calibration_size")
    if isinstance(size, int) and size >= 8:  # the config's count is for the real dataset, not for the fakes
        args += ["--data.init_args.calibration_size=4"]
    if (
        init.get("val_source") == "dataset"
    ):  # tiny.yaml's calibration_size is refused with the dataset's split
        args += ["--data.init_args.calibration_size=null"]
    if dataset == "synthetic":
        args += ["--data.init_args.synthetic_sizes=[40, 8]", "--data.init_args.synthetic_num_classes=4"]
    cli = main(args, run=False)
    dm = cli.datamodule
    assert dm.dataset == dataset
    assert cli.model.hparams.num_classes == dm.num_classes
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), *dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch[IMAGE_KEY].shape[1:] == (3, 32, 32)
        assert int(batch[LABEL_KEY].max()) < dm.num_classes


# Experiments that run a variant on another backbone (docs/backbones.md): stem -> timm backbone name.
BACKBONE_EXPERIMENTS = {"cifar100_dmpo_dinov2_vits14": "vit_small_patch14_dinov2.lvd142m"}


def _variant_of(path: Path) -> str:
    name = path.stem.removeprefix("cifar100_")
    return "dmpo" if name in ("dmpo_multinode", "dmpo_dinov2_vits14") else name


def test_every_variant_has_a_cifar100_experiment():
    variants = {p.stem for p in MODEL_CONFIGS}
    assert {f"cifar100_{v}" for v in variants} <= {p.stem for p in EXPERIMENT_CONFIGS}
    assert any("multinode" in p.stem for p in EXPERIMENT_CONFIGS)


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.stem)
def test_experiment_is_its_model_variant_with_the_paper_recipe(path):
    config = yaml.safe_load(path.read_text())
    variant = yaml.safe_load((ROOT / "configs" / "model" / f"{_variant_of(path)}.yaml").read_text())
    backbone = BACKBONE_EXPERIMENTS.get(path.stem, "vit_base_patch16_224.augreg_in21k")
    variant["model"]["init_args"]["backbone"] = backbone
    assert config["model"] == variant["model"], (
        "an experiment's model must equal configs/model/<variant>.yaml"
    )
    trainer, data = config["trainer"], config["data"]["init_args"]
    assert trainer["max_epochs"] == 100 and trainer["precision"] == "bf16-mixed"
    assert trainer["accelerator"] == "gpu" and trainer["strategy"] == "ddp"
    assert config["data"]["class_path"] == "dmpo_lightning.BenchmarkDataModule"
    assert data["dataset"] == "cifar100" and data["calibration_size"] == 5000
    global_batch = data["batch_size"] * (
        trainer["devices"] * trainer["num_nodes"] if trainer["devices"] != -1 else 1
    )
    assert global_batch == 128
    optimizer = config["model"]["init_args"]["optimizer"]
    assert optimizer["class_path"] == "torch.optim.AdamW"
    assert optimizer["init_args"] == {"lr": 0.0005, "weight_decay": 0.05}
    assert config["model"]["init_args"]["backbone"] == backbone


@pytest.mark.parametrize("name", ["cifar100_dmpo_multinode", "cifar100_static_peft"])
def test_experiment_trains_a_batch_on_cpu_with_the_tiny_backbone(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ROOT / "configs" / "experiments" / f"{name}.yaml"
    root = write_cifar(tmp_path / "cifar", "cifar100", per_batch=8)
    cli = main(
        [
            "fit",
            "-c",
            str(path),
            *_tiny_overrides(_init_args(path)),
            *CPU_TRAINER,
            f"--data.init_args.root={root}",
            "--data.init_args.download=false",
            "--data.init_args.num_workers=0",
            "--data.init_args.calibration_size=8",
            "--data.init_args.batch_size=4",
            "--trainer.fast_dev_run=1",
            "--test_after_fit=false",
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert cli.datamodule.num_classes == cli.model.hparams.num_classes == 100
    expected_peft = _opt(_init_args(path), "peft", "method", "adaptformer")
    assert cli.model.hparams.peft["method"] == expected_peft
    assert cli.model.peft_options.method == expected_peft
    losses = {k: v for k, v in cli.trainer.callback_metrics.items() if "loss" in k}
    assert losses and all(bool(torch.isfinite(v)) for v in losses.values())


def test_the_best_checkpoint_is_chosen_by_calibration_accuracy_of_the_last_exit(tmp_path):
    for name in ("trainer/default.yaml", "quickstart.yaml"):
        conf = yaml.safe_load((ROOT / "configs" / name).read_text())
        (ckpt,) = [c for c in conf["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert ckpt["init_args"]["monitor"] == "val/acc_last" and ckpt["init_args"]["mode"] == "max", name
    args = ["fit", "-c", TINY, "-c", str(ROOT / "configs" / "trainer" / "default.yaml")]
    args += ["--trainer.max_epochs=3", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    args += ["--trainer.log_every_n_steps=1", "--model.init_args.exits.blocks=[2, 4]"]  # 2 exits: any K works
    cli = main(args)
    callback = cli.trainer.checkpoint_callback
    with open(Path(cli.trainer.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    accs = [float(r["val/acc_exit1"]) for r in rows if r.get("val/acc_exit1")]
    assert len(accs) == 3
    assert callback.best_model_score is not None
    assert float(callback.best_model_score) == pytest.approx(max(accs))
    assert [float(r["val/acc_last"]) for r in rows if r.get("val/acc_last")] == accs


FAIR = {"static_peft_moment": "static_peft", "dmpo_final_moment": "dmpo"}
"""The fair baselines and the variant each is a fair version of (they differ in ``exits.final_head`` only)."""


def _init(name: str) -> dict:
    return _init_args(ROOT / "configs" / "model" / f"{name}.yaml")


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
            str(ROOT / "configs" / "model" / f"{name}.yaml"),
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
    # them to a common reference (test_pretrain_tune.py)
    # (the full path = all blocks and the last head; the last exit of a multi-exit model adds the early heads)
    if k == 1:
        assert report["exits"][-1]["cost"] == pytest.approx(report["full_model"]["cost"])
    else:
        assert report["exits"][-1]["cost"] > report["full_model"]["cost"]
