"""Issue 28, pattern 9: mistakes in options and inputs are one sentence (status 2), or work as written.

- a checkpoint trained on other classes than the data's in `dmpo test` / `dmpo predict` (was a traceback
  from the checkpoint loader, after the run folder was made);
- ``--model.init_args.schedule.switch_epoch null`` on the command line works as ``switch_epoch: null`` in
  YAML (jsonargparse turned the null into the text 'None');
- an option group written as a value (``peft: lora``, ``exits: 4``) says the group is a mapping and shows it
  (was "Unable to load config 'lora'" or a TypeError about ``**``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support.runs import make_run

from dmpo_lightning.cli import main
from dmpo_lightning.console import console_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")


def _dmpo(monkeypatch, capsys, *argv: str) -> tuple[int, list[str]]:
    """``dmpo <argv>`` in-process: its exit status and its ``error:`` lines."""
    monkeypatch.setattr(sys, "argv", ["dmpo", *argv])
    with pytest.raises(SystemExit) as info:
        console_main()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return int(info.value.code), [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize("sub", ["test", "predict"])
def test_a_checkpoint_of_other_classes_than_the_data_is_one_sentence_before_any_work(
    sub, tmp_path, monkeypatch, capsys
):
    run = make_run(tmp_path)  # 4 classes
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    status, lines = _dmpo(
        monkeypatch,
        capsys,
        sub,
        "-c",
        TINY,
        f"--ckpt_path={run['ckpt']}",
        "--data.init_args.synthetic_num_classes=10",
    )
    assert status == 2
    assert lines == [
        f"dmpo {sub}: error: the data has 10 classes but --ckpt_path {run['ckpt']} was trained on 4: a "
        f"trained model keeps its classes, so dmpo {sub} needs data with the same 4 classes (fix the data "
        "options), or train a new model without --ckpt_path"
    ]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no folder, no file


@pytest.mark.parametrize(
    "words",
    [
        ["--model.init_args.schedule.switch_epoch", "null"],
        ["--model.init_args.schedule.switch_epoch=null"],
        ["--model.init_args.schedule.switch_epoch=~"],
    ],
    ids=["space", "equals", "tilde"],
)
def test_a_null_written_on_the_command_line_is_a_null_as_in_yaml(words, tmp_path):
    cli = main(["-c", TINY, "--model.init_args.schedule.ramp_epochs=1", *words], run=False)
    assert cli.model.hparams.schedule["switch_epoch"] is None  # resolved at fit time (60 % of max_epochs)
    assert cli.model.hparams.schedule["ramp_epochs"] == 1  # the group's other values stay
    assert cli.model.hparams.peft["adapter_dim"] == 8  # and so do the config file's


@pytest.mark.parametrize(
    ("config", "argv", "group", "mapping", "got"),
    [
        ("peft: lora", [], "peft", "{method: lora}` (from Python also PeftOptions", "the str 'lora'"),
        (
            None,
            ["--model.init_args.peft", "lora"],
            "peft",
            "{method: lora}` (from Python also PeftOptions",
            "the str 'lora'",
        ),
        ("exits: 4", [], "exits", "{blocks: 4}` (from Python also ExitOptions", "the int 4"),
        ("schedule: 3", [], "schedule", "{weight_phase1: 3}` (from Python also ScheduleOptions", "the int 3"),
    ],
    ids=["peft_yaml", "peft_command_line", "exits_yaml", "schedule_yaml"],
)
def test_an_option_group_written_as_a_value_shows_the_mapping_to_write(
    config, argv, group, mapping, got, tmp_path, monkeypatch, capsys
):
    extra = []
    if config is not None:
        (tmp_path / "group.yaml").write_text(f"model:\n  init_args:\n    {config}\n")
        extra = ["-c", str(tmp_path / "group.yaml")]
    status, lines = _dmpo(monkeypatch, capsys, "fit", "-c", TINY, *extra, *argv)
    assert status == 2
    (line,) = lines
    written = f"model.init_args.{group} is a group of options, a mapping: e.g. `{group}: {mapping}(...)), "
    written += f"not {got}"
    assert line.endswith(f"error: {written}"), line
    assert not (tmp_path / "runs").exists()
