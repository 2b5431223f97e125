"""Issue 16 cases the other bad-input tests missed, through the real CLI (audit: docs/bad_input_cases.md).

- ``num_classes`` written explicitly (on the command line or in a config file, the default 10 included) that
  disagrees with the data or the checkpoint is refused instead of being silently replaced by the linked value;
  the same value as the data is accepted;
- ``dmpo --help`` lists the ``export`` subcommand (dispatched outside LightningCLI);
- a CNN backbone with ``img_size``, and a frozen random trunk, through ``dmpo fit``;
- the README's focal-loss example runs as printed (it imports what it uses).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dmpo_lightning.cli import main
from dmpo_lightning.console import console_main
from dmpo_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")  # synthetic data with 4 classes


# --------------------------------------------------------------------------------------------- num_classes
@pytest.mark.parametrize("value", [10, 7])  # 10 is DMPOModule's default: it used to pass unnoticed
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
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny one-epoch runs (seeds 0 and 1); the first also ran `dmpo test` (thresholds.json)."""
    base = tmp_path_factory.mktemp("fit")
    out = {}
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
                    f"--evaluation.report_dir={base / 'report'}",
                ]
            )
            (out[name],) = (base / cli.trainer.log_dir / "checkpoints").glob("*.ckpt")
    out["thresholds"] = base / "report" / "thresholds.json"
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(runs) -> Path:
    return runs["a"]


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


# ------------------------------------------------------------------------------------------ dmpo --help
def test_help_lists_the_export_subcommand(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dmpo", "--help"])
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert re.search(rf"^\s+{sub}\s", out, flags=re.M), sub
    assert re.search(r"^\s+export\s+Write a deployable early-exit artefact", out, flags=re.M), out
    assert re.search(r"^\s+serve\s+Serve an exported artefact over HTTP", out, flags=re.M), out
    assert "dmpo <command> --help" in out


@pytest.mark.slow
def test_the_console_script_help_lists_export(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dmpo_lightning", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "export" in out.stdout and "serve" in out.stdout and "dmpo <command> --help" in out.stdout


def test_export_help_is_reachable(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dmpo", "export", "--help"])
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: dmpo export")


# ---------------------------------------------------------------------------------- model options via CLI
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--model.init_args.backbone=resnet18", r"backbone 'resnet18' does not accept \[.*'img_size'"),
        ("--model.init_args.exits.blocks=[1, 2, 5]", r"exit block 5 is out of range: allowed are 1\.\.4"),
        ("--data.init_args.dataset=cifar10", r"dataset 'cifar10' needs root=<folder>"),
        (
            "--model.init_args.checkpoint_path=missing.pth",
            r"backbone checkpoint_path 'missing\.pth' does not",
        ),
    ],
    ids=["cnn_with_img_size", "exit_block", "data_root", "backbone_weights_file"],
)
def test_constructor_errors_print_one_sentence_without_the_option_dump(
    option, message, tmp_path, monkeypatch, capsys
):
    """jsonargparse wrapped these in a union error that dumped every model option (``Namespace(...)``)."""
    monkeypatch.setattr(sys, "argv", ["dmpo", "fit", "-c", TINY, option])
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("dmpo fit: error:")]
    assert re.match(rf"dmpo fit: error: {message}", line), line
    assert "Namespace(" not in err and "Union subtypes" not in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_frozen_random_trunk_warns_through_the_cli():
    # tests/configs/tiny.yaml trains the default adaptformer with pretrained: false
    with pytest.warns(UserWarning, match=r"the frozen trunk keeps its random initial weights"):
        main(["-c", TINY], run=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*frozen trunk keeps its random")
        main(["-c", TINY, "--model.init_args.peft.method=full"], run=False)


# --------------------------------------------------------------------------------------------- README
def test_readme_focal_loss_example_runs_as_printed():
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "FocalDMPO" in b]
    namespace: dict = {}
    exec(block, namespace)  # a missing import fails here with NameError
    module = namespace["FocalDMPO"](
        num_classes=3,
        backbone="vit_tiny_patch16_224",
        img_size=32,
        backbone_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        exits={"blocks": [1, 2]},
        peft={"method": "full"},
    )
    loss, parts = module.compute_loss(module(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    assert loss.ndim == 0 and torch.isfinite(loss) and parts == {}


# ------------------------------------------------------------------------------------------ broken image
def test_an_unreadable_image_ends_the_run_with_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from support.fakes import write_image_folder

    root = write_image_folder(tmp_path / "imgs", ["a", "b"], {"train": 6, "test": 6})
    broken = root / "train" / "a" / "a_1.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated JPEG
    argv = [
        "dmpo",
        "fit",
        "-c",
        TINY,
        "--data.init_args.dataset=image_folder",
        f"--data.init_args.root={root}",
        "--data.init_args.calibration_size=2",
        "--trainer.limit_train_batches=null",
        "--trainer.max_epochs=1",
        "--model.init_args.schedule.switch_epoch=0",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert re.search(rf"^dmpo fit: error: cannot read image file {re.escape(str(broken))} ", err, re.M), err
    assert "skip_unreadable_images=true" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


# ------------------------------------------------------------------------------ thresholds in dmpo predict
@pytest.mark.slow
@pytest.mark.parametrize("what", ["other_checkpoint", "string", "wrong_length"])
def test_bad_thresholds_in_predict_print_one_line_with_status_2(what, runs, tmp_path, monkeypatch, capsys):
    """These were a ValueError traceback (status 1) from inside the predict loop."""
    thresholds, ckpt = runs["thresholds"], runs["a"]
    if what == "other_checkpoint":
        ckpt, match = runs["b"], r"calibrated on other weights .*allow_other_checkpoint_thresholds=true"
    else:
        data = json.loads(thresholds.read_text())
        for entry in data["budgets"]:
            entry["thresholds"] = ["high", *entry["thresholds"][1:]] if what == "string" else [0.5]
        thresholds = tmp_path / "bad.json"
        thresholds.write_text(json.dumps(data))
        match = r"threshold 'high' of exit 0 is not a number" if what == "string" else r"holds 1 thresholds"
    preds = tmp_path / "preds.csv"
    argv = [
        "dmpo",
        "predict",
        "-c",
        TINY,
        f"--ckpt_path={ckpt}",
        f"--evaluation.thresholds_file={thresholds}",
        "--evaluation.predict_budget=0.5",
        f"--evaluation.predictions_file={preds}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("dmpo predict: error:")]
    assert re.search(match, line), line
    assert f"evaluation.thresholds_file: thresholds file {thresholds}" in line
    assert "Traceback" not in err
    assert not preds.exists()
