"""evaluation/thresholds.py: a thresholds file is used only for the model it was calibrated on.

A file of other weights is refused (or used with a warning naming both hashes when asked), a list of the
wrong length, a non-number or a null is refused naming the file, ``inf`` disables an exit, a pickle named
``thresholds.json`` is refused as invalid JSON; through ``dmpo predict`` each refusal is one line with
status 2.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from support.builders import TINY_CONFIG, tiny_module
from support.pickles import torch_file
from support.runs import fit_runs

from dmpo_lightning.cli import main
from dmpo_lightning.console import console_main
from dmpo_lightning.constants import THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
from dmpo_lightning.evaluation.thresholds import load_thresholds
from dmpo_lightning.files import to_jsonable

TINY = TINY_CONFIG


@pytest.mark.parametrize("kind", ["checkpoint", "pickle"])
def test_dmpo_predict_refuses_a_pickled_thresholds_file(tmp_path, pickle_marker, kind):
    path = torch_file(tmp_path / "thresholds.json", pickle_marker, kind)
    preds = tmp_path / "preds.csv"
    with pytest.raises(ValueError, match=r"thresholds file .*thresholds\.json is not valid JSON"):
        main(
            [
                "predict",
                "-c",
                TINY_CONFIG,
                "--evaluation.allow_untrained=true",
                f"--evaluation.thresholds_file={path}",
                "--evaluation.predict_budget=0.5",
                f"--evaluation.predictions_file={preds}",
            ]
        )
    assert not pickle_marker.exists()
    assert not preds.exists()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs with different seeds; the first one also ran `dmpo test` (thresholds.json)."""
    return fit_runs(tmp_path_factory.mktemp("two_runs"))


def _predict(ckpt: Path, thresholds: Path, preds: Path, *extra: str) -> None:
    main(
        [
            "predict",
            "-c",
            TINY,
            f"--ckpt_path={ckpt}",
            f"--evaluation.thresholds_file={thresholds}",
            "--evaluation.predict_budget=0.5",
            f"--evaluation.predictions_file={preds}",
            *extra,
        ]
    )


def test_predict_refuses_thresholds_of_another_checkpoint(two_checkpoints, tmp_path):
    preds = tmp_path / "preds.csv"
    with pytest.raises(
        ValueError,
        match=r"calibrated on other weights \(weights:[0-9a-f]+ / file:[0-9a-f]+\)"
        r".*allow_other_checkpoint_thresholds=true",
    ) as info:
        _predict(two_checkpoints["b"], two_checkpoints["thresholds"], preds)
    assert str(two_checkpoints["thresholds"]) in str(info.value)
    assert not preds.exists()


def test_predict_with_override_warns_naming_both_hashes(two_checkpoints, tmp_path):
    preds = tmp_path / "preds.csv"
    stored = json.loads(two_checkpoints["thresholds"].read_text())
    with pytest.warns(UserWarning, match="using them anyway") as caught:
        _predict(
            two_checkpoints["b"],
            two_checkpoints["thresholds"],
            preds,
            "--evaluation.allow_other_checkpoint_thresholds=true",
        )
    message = next(str(w.message) for w in caught if "using them anyway" in str(w.message))
    assert stored["checkpoint_hash"] in message and stored["weights_hash"] in message
    assert re.search(r"this model holds \(weights:[0-9a-f]{64} / file:[0-9a-f]{64}\)", message)
    assert len(preds.read_text().splitlines()) == 1 + 24


def test_predict_accepts_its_own_thresholds_and_refuses_a_wrong_length(two_checkpoints, tmp_path):
    preds = tmp_path / "preds.csv"
    _predict(two_checkpoints["a"], two_checkpoints["thresholds"], preds)  # same checkpoint: accepted
    assert preds.is_file()
    data = json.loads(two_checkpoints["thresholds"].read_text())
    data["budgets"][0]["thresholds"] = data["budgets"][0]["thresholds"][:1]  # one entry for 4 exits
    bad = tmp_path / "short.json"
    bad.write_text(json.dumps(data))
    preds2 = tmp_path / "preds2.csv"
    with pytest.raises(ValueError, match=r"short\.json, budget 0\.5: holds 1 thresholds but the model has 4"):
        _predict(two_checkpoints["a"], bad, preds2)
    assert not preds2.exists()


def _thresholds_file(tmp_path: Path, thresholds: list, **top) -> Path:
    payload = {
        "format": THRESHOLDS_FORMAT,
        "format_version": THRESHOLDS_FORMAT_VERSION,
        "rule": "confidence",
        "fingerprint": {"backbone": "b"},
        "checkpoint_hash": "file:aaa",
        "weights_hash": "weights:bbb",
        "budgets": [{"budget": 0.5, "unit": "fraction", "thresholds": thresholds}],
        **top,
    }
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(payload))
    return path


def _load(path: Path, **kw) -> list[float]:
    options = dict(num_exits=3, model_hashes=["weights:bbb"])
    return load_thresholds(str(path), 0.5, {"backbone": "b"}, **{**options, **kw})


@pytest.mark.parametrize(
    ("thresholds", "match"),
    [
        ([0.9], r"holds 1 thresholds but the model has 3 exits"),
        ([0.9, 0.8, 0.7, 0.6], r"holds 4 thresholds but the model has 3 exits"),
        ([0.9, "high", "inf"], r"threshold 'high' of exit 1 is not a number; allowed: one number per exit, "),
        ([0.9, None, "inf"], r"threshold None of exit 1 is not a number.*NaN/null is not allowed"),
        ([True, 0.5, "inf"], r"threshold True of exit 0 is not a number"),
        ({"0": 0.5}, r"'thresholds' must be a list, got dict"),
    ],
)
def test_threshold_lists_are_validated(tmp_path, thresholds, match):
    path = _thresholds_file(tmp_path, thresholds)
    with pytest.raises(ValueError, match=match) as info:
        _load(path)
    assert str(path) in str(info.value)


def test_threshold_inf_disables_an_exit_and_hashes_match_either_way(tmp_path):
    path = _thresholds_file(tmp_path, [0.9, "inf", "inf"])
    assert _load(path) == [0.9, float("inf"), float("inf")]
    assert _load(path, model_hashes=["weights:zzz", "file:aaa"]) == [0.9, float("inf"), float("inf")]
    with pytest.raises(
        ValueError,
        match=r"calibrated on other weights \(weights:bbb / file:aaa\) than this "
        r"model holds \(weights:zzz\)",
    ):
        _load(path, model_hashes=["weights:zzz"])
    with pytest.warns(UserWarning, match=r"weights:bbb / file:aaa.*weights:zzz.*using them anyway"):
        assert _load(path, model_hashes=["weights:zzz"], allow_other_checkpoint=True)[0] == 0.9


@pytest.mark.slow
@pytest.mark.parametrize("what", ["other_checkpoint", "string", "wrong_length"])
def test_bad_thresholds_in_predict_print_one_line_with_status_2(
    what, two_checkpoints, tmp_path, monkeypatch, capsys
):
    """Raised inside the predict loop, these still reach the user as one line with status 2, no traceback."""
    thresholds, ckpt = two_checkpoints["thresholds"], two_checkpoints["a"]
    if what == "other_checkpoint":
        ckpt, match = (
            two_checkpoints["b"],
            r"calibrated on other weights .*allow_other_checkpoint_thresholds=true",
        )
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


def test_a_thresholds_file_of_an_absolute_budget_is_found_with_the_gflops_option(tmp_path):
    path = tmp_path / "thresholds.json"
    entry = {"budget": 2.0, "unit": "absolute", "thresholds": [0.5, 0.6, float("-inf")]}
    header = {"format": THRESHOLDS_FORMAT, "format_version": THRESHOLDS_FORMAT_VERSION}
    path.write_text(json.dumps(to_jsonable({**header, "fingerprint": {}, "budgets": [entry]})))
    got = load_thresholds(str(path), 2.0, {}, unit="gflops", num_exits=3)
    assert got[:2] == [0.5, 0.6]
    with pytest.raises(ValueError, match=r"budget 2.0 \(fraction\) is not in"):
        load_thresholds(str(path), 2.0, {}, unit="fraction", num_exits=3)


@pytest.mark.parametrize(
    ("option", "other"),
    [
        ("backbone", "vit_small_patch16_224"),
        ("num_classes", 5),
        ("exits.blocks", [2, 4]),
        ("exits.early_head", "linear"),
        ("exits.final_head", "moment"),
        ("peft.method", "lora"),
    ],
)
def test_thresholds_of_a_model_that_differs_in_any_architecture_option_are_refused(tmp_path, option, other):
    """Each option that changes the model is in the fingerprint a module checks, named as users write it."""
    ours = tiny_module().model_fingerprint()
    path = _thresholds_file(tmp_path, [0.9, 0.8, 0.7, "-inf"], fingerprint={**ours, option: other})
    differs = rf"calibrated for another model \({re.escape(option)}: file {re.escape(repr(other))} vs"
    with pytest.raises(ValueError, match=differs):
        load_thresholds(str(path), 0.5, ours, num_exits=4)
    path = _thresholds_file(tmp_path, [0.9, 0.8, 0.7, "-inf"], fingerprint=ours)
    assert load_thresholds(str(path), 0.5, ours, num_exits=4) == [0.9, 0.8, 0.7, float("-inf")]
