"""cli.py and parsing.py: ``dmpo fit/validate/test/predict`` run in-process (``dmpo_lightning.cli.main``).

Every shipped config parses; options are linked (``num_classes`` from the data, a written value that
disagrees is refused, with or without a checkpoint); fit + test + predict write their files into the run,
never over another run's (named logger versions, every logger); checkpoints are read with
``weights_only=True`` only; options given with ``--ckpt_path`` are kept.
"""

import csv
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from support.builders import ONE_EPOCH, TINY_CONFIG
from support.fakes import write_cifar
from support.pickles import torch_file
from support.runs import fit_runs

from dmpo_lightning.cli import main
from dmpo_lightning.errors import ConfigError, ConfigFileExistsError
from dmpo_lightning.models.engine import EngineSession
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.parsing import wandb_offline_unless_logged_in

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CONFIG
TINY_BACKBONE = [
    "--model.init_args.backbone=vit_tiny_patch16_224",
    "--model.init_args.pretrained=false",
    "--model.init_args.img_size=32",
    "--model.init_args.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2}",
    "--model.init_args.exits.blocks=[1, 2, 3, 4]",
    "--model.init_args.peft.adapter_dim=8",
    "--model.init_args.exits.moment_dim=32",
]
FULL_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
EXPERIMENT_CONFIGS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
PARTIAL_CONFIGS = sorted(
    p for sub in ("trainer", "data", "model") for p in (ROOT / "configs" / sub).glob("*.yaml")
)


def _print_config(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("path", FULL_CONFIGS + EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_every_complete_config_parses(path, capsys):
    out = _print_config(capsys, "-c", str(path))
    assert "class_path: dmpo_lightning" in out


@pytest.mark.parametrize("path", PARTIAL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_partial_config_parses_combined_with_the_quickstart(path, capsys):
    out = _print_config(capsys, "-c", str(ROOT / "configs" / "quickstart.yaml"), "-c", str(path))
    assert "model:" in out


def test_num_classes_is_linked_from_data_and_backbone_to_data():
    cli = main(["-c", TINY], run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 4
    assert cli.datamodule.hparams.timm_model == "vit_tiny_patch16_224"
    assert cli.datamodule.hparams.image_size == 32


def test_tiny_fit_then_test_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "-c", TINY, "--test_after_fit=true"])
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()
    ckpts = list((log_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts
    report_dir = log_dir / "dmpo_test"
    report = json.loads((report_dir / "report.json").read_text())
    assert len(report["exits"]) == 4
    assert report["num_test"] == 24 and report["num_calibration"] == 16
    assert report["checkpoint_hash"].startswith("file:")
    for name in ("curve.csv", "accuracy_vs_flops.png", "thresholds.json", "exit_outputs.pt"):
        assert (report_dir / name).is_file(), name
    metrics = (log_dir / "metrics.csv").read_text()
    assert "test/acc_exit3" in metrics and "test/auc" in metrics and "loss_weight/exit_0" in metrics

    # A separate `dmpo test` process reloads the checkpoint without extra arguments but refuses to overwrite.
    with pytest.raises(FileExistsError, match="already holds a dmpo test report"):
        main(
            [
                "test",
                "-c",
                TINY,
                f"--ckpt_path={ckpts[0]}",
                f"--evaluation.report_dir={report_dir}",
            ]
        )
    second = tmp_path / "second"
    main(["test", "-c", TINY, f"--ckpt_path={ckpts[0]}", f"--evaluation.report_dir={second}"])
    assert json.loads((second / "report.json").read_text())["exits"] == report["exits"]

    # dmpo predict with a calibrated budget: real early exit, per-sample CSV.
    preds = tmp_path / "preds.csv"
    main(
        [
            "predict",
            "-c",
            TINY,
            f"--ckpt_path={ckpts[0]}",
            f"--evaluation.thresholds_file={report_dir / 'thresholds.json'}",
            "--evaluation.predict_budget=0.5",
            f"--evaluation.predictions_file={preds}",
        ]
    )
    lines = preds.read_text().splitlines()
    assert lines[0] == "index,label,class_index,class_name,exit,confidence,score,gflops,error"
    assert len(lines) == 1 + 24

    loaded = DMPOModule.load_from_checkpoint(ckpts[0])
    assert loaded.model.exit_blocks == (1, 2, 3, 4)


def test_vit_cifar_recipe_runs_with_a_tiny_backbone_on_fake_cifar100(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_cifar(tmp_path / "cifar", "cifar100", per_batch=8)
    cli = main(
        [
            "fit",
            "-c",
            str(ROOT / "configs" / "vit_cifar.yaml"),
            *TINY_BACKBONE,
            f"--data.init_args.root={root}",
            "--data.init_args.download=false",
            "--data.init_args.num_workers=0",
            "--data.init_args.calibration_size=8",
            "--data.init_args.batch_size=4",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.fast_dev_run=1",
            "--test_after_fit=false",
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert cli.datamodule.num_classes == cli.model.hparams.num_classes == 100
    assert all(torch.isfinite(v) for k, v in cli.trainer.callback_metrics.items() if "loss" in k)
    assert any("loss" in k for k in cli.trainer.callback_metrics)


def test_num_classes_mismatch_between_checkpoint_and_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "-c", TINY, "--trainer.max_epochs=1", "--model.init_args.schedule.switch_epoch=0"])
    ckpt = next((Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    with pytest.raises(ValueError, match=r"the data has 5 classes but --ckpt_path .* was trained on 4"):
        main(["test", "-c", TINY, f"--ckpt_path={ckpt}", "--data.init_args.synthetic_num_classes=5"])
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["num_classes"] == 4


# --------------------------------------------------------- checkpoints are read with weights_only=True only
def good_cli_checkpoint(path: Path) -> Path:
    """A genuine checkpoint of the tiny CLI config's model (tensors and plain values only)."""
    module = main(["-c", TINY_CONFIG], run=False).model
    module.train_steps.fill_(2)  # stands for two training steps
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}
    torch.save({**ckpt, "global_step": 2, "pytorch-lightning_version": "2.6.6"}, path)
    return path


@pytest.mark.usefixtures("unsafe_torch_default")
def test_cli_refuses_weights_only_false_before_building_anything(tmp_path, monkeypatch):
    path = good_cli_checkpoint(tmp_path / "good.ckpt")
    unrestricted = []
    real_load = torch.load
    monkeypatch.setattr(
        torch,
        "load",
        lambda *a, **k: unrestricted.append(a) if k.get("weights_only") is not True else real_load(*a, **k),
    )
    report = tmp_path / "report"
    args = ["test", "-c", TINY_CONFIG, f"--ckpt_path={path}", "--weights_only=false"]
    with pytest.raises(ConfigError, match=r"^--weights_only=false: weights_only must be true: checkpoints"):
        main([*args, f"--evaluation.report_dir={report}"])
    assert unrestricted == [] and not report.exists()


def test_dmpo_test_ckpt_path_refuses_a_crafted_ckpt(tmp_path, pickle_marker):
    path = torch_file(tmp_path / "evil.ckpt", pickle_marker, "checkpoint")
    report = tmp_path / "report"
    with pytest.raises(ValueError, match=r"ckpt_path .*evil\.ckpt was not loaded: it holds Python objects"):
        main(
            [
                "test",
                "-c",
                TINY_CONFIG,
                f"--ckpt_path={path}",
                f"--evaluation.report_dir={report}",
            ]
        )
    assert not pickle_marker.exists()
    assert not report.exists()


@pytest.mark.usefixtures("unsafe_torch_default")
def test_dmpo_test_reads_a_good_checkpoint_with_weights_only_each_time(tmp_path, monkeypatch):
    """Both reads of ``--ckpt_path`` (LightningCLI's hparams, then the Trainer's restore) pass True."""
    path = good_cli_checkpoint(tmp_path / "good.ckpt")
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only", "not passed"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    main(
        [
            "test",
            "-c",
            TINY_CONFIG,
            f"--ckpt_path={path}",
            f"--evaluation.report_dir={tmp_path / 'r'}",
        ]
    )
    # the CLI reads the checkpoint more than once (hparams, class count, weights): every read is safe
    assert len(seen) >= 2 and all(w is True for w in seen), seen
    assert (tmp_path / "r" / "report.json").is_file()


@pytest.mark.usefixtures("unsafe_torch_default")
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_cli_reads_checkpoints_with_weights_only_by_default(subcommand, capsys):
    with pytest.raises(SystemExit):
        main([subcommand, "-c", TINY_CONFIG, "--print_config"])
    assert "\nweights_only: true\n" in capsys.readouterr().out


# --------------------------------------------------------------------------- num_classes written explicitly
@pytest.mark.parametrize("value", [10, 7])  # 10 is DMPOModule's default: written, it is checked too
def test_explicit_num_classes_that_disagrees_with_the_data_is_refused(value, tmp_path):
    with pytest.raises(
        ConfigError,
        match=rf"model\.init_args\.num_classes={value} disagrees with the data, which has 4 classes; .*"
        r"leave it out, set it to 4",
    ):
        main(["fit", "-c", TINY, f"--model.init_args.num_classes={value}"])
    assert not list(tmp_path.rglob("*")), "nothing is written"


def test_explicit_num_classes_in_a_config_file_is_refused(tmp_path):
    extra = tmp_path / "classes.yaml"
    extra.write_text("model:\n  init_args:\n    num_classes: 10\n")
    with pytest.raises(ConfigError, match=r"num_classes=10 disagrees with the data, which has 4 classes"):
        main(["fit", "-c", TINY, "-c", str(extra)])


def test_short_option_form_is_refused_too():
    with pytest.raises(ConfigError, match=r"num_classes=10 disagrees with the data"):
        main(["-c", TINY, "--model.num_classes=10"], run=False)


def test_explicit_num_classes_equal_to_the_data_is_accepted():
    cli = main(["-c", TINY, "--model.init_args.num_classes=4"], run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 4


def test_num_classes_left_out_is_linked_silently():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["-c", TINY], run=False)
    assert cli.model.hparams.num_classes == 4
    assert not [w for w in caught if "num_classes" in str(w.message)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint of one tiny one-epoch `dmpo fit`."""
    return fit_runs(tmp_path_factory.mktemp("fit"), seeds=(0,))["a"]


@pytest.mark.slow
def test_explicit_num_classes_is_checked_with_a_checkpoint(tiny_checkpoint, tmp_path):
    report = tmp_path / "report"
    with pytest.raises(ConfigError, match=r"differ from them \(num_classes: given 10, checkpoint 4\)"):
        main(
            [
                "test",
                "-c",
                TINY,
                f"--ckpt_path={tiny_checkpoint}",
                "--model.init_args.num_classes=10",
                f"--evaluation.report_dir={report}",
            ]
        )
    assert not report.exists()


@pytest.mark.slow
def test_explicit_num_classes_must_match_the_checkpoint_when_no_dataset_is_read(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(images / "a.png")
    preds = tmp_path / "preds.csv"
    args = [
        "predict",
        "-c",
        TINY,
        f"--ckpt_path={tiny_checkpoint}",
        f"--data.init_args.predict_paths={images}",
        f"--evaluation.predictions_file={preds}",
    ]
    with pytest.raises(ConfigError, match=r"differ from them \(num_classes: given 10, checkpoint 4\)"):
        main([*args, "--model.init_args.num_classes=10"])
    assert not preds.exists()
    main([*args, "--model.init_args.num_classes=4"])  # the checkpoint's own value is fine
    assert len(preds.read_text().splitlines()) == 2


EXP1 = "--trainer.logger.init_args.version=exp1"


# ------------------------------------------------------- run folders: never lose or overwrite a run's files
def _bytes(folder: Path, *names: str) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_named_logger_version_never_loses_the_training_run(tmp_path):
    main(["fit", "-c", TINY, *ONE_EPOCH, EXP1])
    run = tmp_path / "runs" / "dmpo" / "exp1"
    kept = _bytes(run, "metrics.csv", "config.yaml", "hparams.yaml")
    files = sorted(p.name for p in run.iterdir())
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")

    # a second, new fit into the same folder is refused before anything is written
    with pytest.raises(
        ConfigFileExistsError, match=r"log folder .*exp1 already holds a run .*resume that run"
    ):
        main(["fit", "-c", TINY, *ONE_EPOCH, EXP1])
    # ... and so is a "resume" from another run's checkpoint
    other = main(["fit", "-c", TINY, *ONE_EPOCH, "--trainer.limit_train_batches=1"])
    (other_ckpt,) = (Path(other.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    with pytest.raises(
        ConfigFileExistsError, match=r"exp1 already holds a run .* is not one of its checkpoints"
    ):
        main(["fit", "-c", TINY, "--trainer.max_epochs=2", EXP1, f"--ckpt_path={other_ckpt}"])
    assert _bytes(run, "metrics.csv", "config.yaml", "hparams.yaml") == kept

    # test and predict of the run's checkpoint belong to the run: each writes a new folder inside it, never
    # a file of the training run
    main(["test", "-c", str(run / "config.yaml"), f"--ckpt_path={ckpt}"])
    assert _bytes(run, "metrics.csv", "config.yaml", "hparams.yaml") == kept
    evaluated = run / "dmpo_test"
    assert (evaluated / "report.json").is_file() and (evaluated / "config.yaml").is_file()
    assert "test/acc_exit3" in (evaluated / "metrics.csv").read_text()
    main(["test", "-c", str(run / "config.yaml"), f"--ckpt_path={ckpt}"])  # a second test: a second folder
    assert (run / "dmpo_test_1" / "report.json").is_file()
    main(["predict", "-c", str(run / "config.yaml"), f"--ckpt_path={ckpt}"])
    assert (run / "dmpo_predict" / "predictions.csv").is_file()
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [*files, "dmpo_test", "dmpo_test_1", "dmpo_predict"]
    )
    assert not list(run.rglob(".dmpo-claim"))  # every claim was released

    # a resume into its own folder appends to metrics.csv and keeps config.yaml / hparams.yaml
    old_rows = _rows(run / "metrics.csv")
    main(
        [
            "fit",
            "-c",
            TINY,
            "--trainer.max_epochs=2",
            "--model.init_args.schedule.switch_epoch=0",
            EXP1,
            f"--ckpt_path={ckpt}",
        ]
    )
    assert _bytes(run, "config.yaml", "hparams.yaml") == {k: kept[k] for k in ("config.yaml", "hparams.yaml")}
    assert (run / "config.1.yaml").is_file() and (run / "hparams.1.yaml").is_file()
    assert f"ckpt_path: {ckpt}" in (run / "config.1.yaml").read_text()
    rows = _rows(run / "metrics.csv")
    assert [{k: v for k, v in r.items() if v} for r in rows[: len(old_rows)]] == [
        {k: v for k, v in r.items() if v} for r in old_rows
    ]
    assert {r["epoch"] for r in rows[len(old_rows) :] if r.get("epoch")} == {"1"}


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["default", "tensorboard", "wandb"])
def test_every_logger_gives_each_run_its_own_folder(logger, tmp_path):
    config = ["-c", str(ROOT / "configs" / "trainer" / f"{logger}.yaml")]
    args = ["fit", "-c", TINY, *config, *ONE_EPOCH, "--trainer.max_epochs=1", "--test_after_fit=true"]
    args += ["--trainer.limit_train_batches=1", "--trainer.enable_progress_bar=false"]
    args += ["--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1"]
    dirs = [Path(main(args).trainer.log_dir) for _ in range(2)]  # the second run gets a folder of its own
    assert dirs[0] != dirs[1]
    for d in dirs:
        assert (d / "config.yaml").is_file() and (d / "dmpo_test" / "report.json").is_file()
        assert (d / "calibration_indices.json").is_file()


# --------------------------------------------------------------------------- options given with --ckpt_path
@pytest.mark.slow  # fits a tiny model through the CLI, then tests and predicts from its checkpoint
def test_cli_keeps_predict_engine_and_time_early_exit_given_with_a_checkpoint(tmp_path, monkeypatch):
    """``--ckpt_path`` restores the model's options; these two evaluation options given with it are kept."""
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "-c", TINY, "--test_after_fit=false"])
    log_dir = Path(cli.trainer.log_dir)
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    report_dir = tmp_path / "report"
    main(
        [
            "test",
            f"--config={log_dir / 'config.yaml'}",
            f"--ckpt_path={ckpt}",
            f"--evaluation.report_dir={report_dir}",
            "--evaluation.time_early_exit=8",
        ]
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert report.get("early_exit_speed"), "time_early_exit given on the command line was dropped"
    pushes: list[int] = []
    original = EngineSession.push
    monkeypatch.setattr(EngineSession, "push", lambda s, b: pushes.append(len(b)) or original(s, b))
    main(
        [
            "predict",
            f"--config={log_dir / 'config.yaml'}",
            f"--ckpt_path={ckpt}",
            f"--evaluation.thresholds_file={report_dir / 'thresholds.json'}",
            "--evaluation.predict_budget=0.5",
            f"--evaluation.predictions_file={tmp_path / 'p.csv'}",
            "--evaluation.predict_engine=true",
        ]
    )
    assert pushes, "predict_engine given on the command line was dropped"
    assert (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    ("env", "netrc_text", "mode"),
    [
        ({}, None, "offline"),  # no account: a W&B logger in a config logs offline instead of blocking
        ({"WANDB_API_KEY": "k"}, None, None),
        ({}, "machine api.wandb.ai login user password k\n", None),
        ({"WANDB_MODE": "online"}, None, "online"),  # the user's own setting is kept
    ],
)
def test_wandb_runs_offline_unless_the_user_is_logged_in(tmp_path, monkeypatch, env, netrc_text, mode):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if netrc_text is not None:
        (tmp_path / ".netrc").write_text(netrc_text)
        (tmp_path / ".netrc").chmod(0o600)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    wandb_offline_unless_logged_in()
    assert os.environ.get("WANDB_MODE") == mode
