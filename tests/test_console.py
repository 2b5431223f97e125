"""console.py: the ``dmpo`` program (the dispatcher of fit/validate/test/predict, export and serve).

``dmpo --help`` lists every subcommand; a bad option, a broken image or a bad file ends the run with one
``dmpo <subcommand>: error: ...`` line (no traceback, no dump of the parsed options) and exit status 2 for
configuration errors, 1 for errors met while running; the console script exits 0 after a run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.builders import TINY_CONFIG
from support.fakes import write_image_folder

from dmpo_lightning.console import console_main

TINY = TINY_CONFIG


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


def test_an_unreadable_image_ends_the_run_with_one_line_naming_the_file(tmp_path, monkeypatch, capsys):

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


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "dmpo_lightning", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_console_script_exits_zero_after_a_run(tmp_path):
    # setuptools' wrapper calls sys.exit(<entry>()): a returned object would become exit status 1
    dmpo = Path(sys.executable).parent / "dmpo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(
        [
            str(dmpo),
            "fit",
            "-c",
            TINY,
            "--trainer.max_epochs=1",
            "--model.init_args.schedule.switch_epoch=0",
            "--trainer.limit_train_batches=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DMPOCLI object" not in out.stderr


def test_help_and_version_in_a_subprocess():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out.stdout
    version = _run("--version")
    assert version.returncode == 0
    assert "dmpo-lightning" in version.stdout
