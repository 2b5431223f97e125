"""The `dmpo` command never loses or overwrites a run's files, and refuses rather than give a silent result.

Every case runs the real CLI in-process (``dmpo_lightning.cli.main``) on the tiny synthetic config.
"""

from __future__ import annotations

import csv
import errno
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml

from dmpo_lightning.cli import main
from dmpo_lightning.errors import ConfigFileExistsError
from dmpo_lightning.evaluation import report as report_module
from dmpo_lightning.module import DMPOModule

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
ONE_EPOCH = ["--trainer.max_epochs=1", "--model.init_args.schedule.switch_epoch=0"]
EXP1 = "--trainer.logger.init_args.version=exp1"


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
    dirs = [Path(main(args).trainer.log_dir) for _ in range(2)]  # the second run used to hit FileExistsError
    assert dirs[0] != dirs[1]
    for d in dirs:
        assert (d / "config.yaml").is_file() and (d / "dmpo_test" / "report.json").is_file()
        assert (d / "calibration_indices.json").is_file()


@pytest.mark.slow
def test_a_failed_report_write_leaves_no_partial_folder_and_the_table_is_printed(
    tmp_path, monkeypatch, capsys
):
    cli = main(["fit", "-c", TINY, *ONE_EPOCH])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    report = tmp_path / "report"
    args = ["test", "-c", TINY, f"--ckpt_path={ckpt}", f"--evaluation.report_dir={report}"]

    def disk_full(*args, **kwargs):  # the plot is the 4th of 5 files: report.json, curve.csv, thresholds.json
        raise OSError(errno.ENOSPC, "No space left on device")

    capsys.readouterr()
    with monkeypatch.context() as mp:
        mp.setattr(report_module, "plot_curve", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            main(args)
    out = capsys.readouterr().out
    assert "Early-exit evaluation: results on the test split" in out  # the results were printed first
    assert "Budgeted early exit" in out or "budget" in out.lower()
    assert not report.exists()
    assert not [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".report")
    ]  # no temporary folder left

    main(args)  # the rerun is not blocked
    # reliability.png is written only with calibration: temperature
    assert sorted(p.name for p in report.iterdir()) == sorted(
        set(report_module.REPORT_FILES) - {"reliability.png"}
    )


def test_report_goes_into_an_existing_empty_folder(tmp_path):
    cli = main(["fit", "-c", TINY, *ONE_EPOCH, "--trainer.limit_train_batches=1"])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    for folder in ("empty", "notes"):
        main(
            [
                "test",
                "-c",
                TINY,
                f"--ckpt_path={ckpt}",
                f"--evaluation.report_dir={tmp_path / folder}",
            ]
        )
        written = {p.name for p in (tmp_path / folder).iterdir()}
        assert set(report_module.REPORT_FILES) - {"reliability.png"} <= written
    assert (tmp_path / "notes" / "readme.txt").read_text() == "mine"


@pytest.mark.skipif(
    hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0, reason="root writes"
)
def test_a_read_only_report_dir_fails_before_the_evaluation(tmp_path):
    cli = main(["fit", "-c", TINY, *ONE_EPOCH, "--trainer.limit_train_batches=1"])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"report_dir .*locked/report cannot be written .*not writable"):
            main(
                [
                    "test",
                    "-c",
                    TINY,
                    f"--ckpt_path={ckpt}",
                    f"--evaluation.report_dir={locked}/report",
                ]
            )
    finally:
        locked.chmod(0o700)


def test_untrained_evaluation_only_on_request(tmp_path):
    report = tmp_path / "untrained"
    main(["test", "-c", TINY, "--evaluation.allow_untrained=true", f"--evaluation.report_dir={report}"])
    assert json.loads((report / "report.json").read_text())["checkpoint_hash"].startswith("weights:")


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
    rows = _rows(Path(cli.trainer.log_dir) / "metrics.csv")
    accs = [float(r["val/acc_exit1"]) for r in rows if r.get("val/acc_exit1")]
    assert len(accs) == 3
    assert callback.best_model_score is not None
    assert float(callback.best_model_score) == pytest.approx(max(accs))
    assert [float(r["val/acc_last"]) for r in rows if r.get("val/acc_last")] == accs


@pytest.mark.slow
def test_a_checkpoint_trained_from_a_weights_file_is_tested_offline_after_the_file_moved(tmp_path, capsys):
    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, embed_dim=32,
        depth=4, num_heads=2, mlp_ratio=2.0,
    )  # fmt: skip
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    cli = main(["fit", "-c", TINY, *ONE_EPOCH, f"--model.init_args.checkpoint_path={weights}"])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert trained["model.backbone.patch_embed.proj.weight"].equal(backbone.patch_embed.proj.weight)
    weights.unlink()  # moved, and no network (HF_HUB_OFFLINE=1)

    for module in (
        DMPOModule.load_from_checkpoint(ckpt),
        DMPOModule.load_from_checkpoint(ckpt, checkpoint_path=None),
        DMPOModule.load_from_checkpoint(checkpoint_path=ckpt, map_location="cpu"),
    ):
        state = module.state_dict()
        assert all(state[k].equal(v) for k, v in trained.items())
    assert DMPOModule.load_from_checkpoint(ckpt, checkpoint_path=None).hparams.checkpoint_path is None
    assert DMPOModule.load_from_checkpoint(ckpt).hparams.checkpoint_path == str(weights)

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [
                "test",
                "-c",
                TINY,
                f"--ckpt_path={ckpt}",
                f"--evaluation.report_dir={tmp_path / 'r'}",
            ]
        )
    assert (tmp_path / "r" / "report.json").is_file()
    # test needs neither the fit-only callbacks' states (no warning asking for them) ...
    assert not [w for w in caught if "Please add the following callbacks" in str(w.message)]
    # ... and dmpo test prints its own report, not Lightning's table of repeated per-loader columns
    out = capsys.readouterr().out
    assert "DataLoader 0" not in out and "DataLoader 1" not in out
    assert "Anytime prediction" in out


def test_an_unwritable_report_dir_fails_before_the_evaluation(tmp_path, monkeypatch, capsys):
    """As root every folder is writable, so the write probe fails here the way a read-only folder does."""
    cli = main(["fit", "-c", TINY, *ONE_EPOCH, "--trainer.limit_train_batches=1"])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    mkdtemp = tempfile.mkdtemp

    def read_only(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".dmpo-write-check-"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return mkdtemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    capsys.readouterr()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(
        ValueError, match=r"report_dir .*/locked/report cannot be written \(.* is not writable: "
    ):
        main(
            [
                "test",
                "-c",
                TINY,
                f"--ckpt_path={ckpt}",
                f"--evaluation.report_dir={tmp_path}/locked/report",
            ]
        )
    assert "Early-exit evaluation" not in capsys.readouterr().out  # failed before the evaluation ran
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_config_error_examples():
    import doctest

    import dmpo_lightning.errors

    assert doctest.testmod(dmpo_lightning.errors).failed == 0
