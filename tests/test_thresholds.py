"""evaluation/thresholds.py: a thresholds file is used only for the model it was calibrated on.

A file of other weights is refused (or used with a warning naming both hashes when asked), a list of the
wrong length, a non-number or a null is refused naming the file, ``inf`` disables an exit, a pickle named
``thresholds.json`` is refused as invalid JSON; through ``dmpo predict`` each refusal is one line with
status 2.
"""

from __future__ import annotations

import pytest
from support.builders import TINY_CONFIG
from support.pickles import torch_file

from dmpo_lightning.cli import main

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
