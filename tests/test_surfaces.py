"""Issue 28's rules on every surface at once (the tables of ``support.surfaces``).

- Untrained weights are never evaluated, predicted with or exported as results: every entry point of
  ``EVALUATING_SURFACES`` (``Trainer.test``/``Trainer.predict`` from Python, ``dmpo test``, ``dmpo predict``,
  ``dmpo export``, ``export_artefact``) refuses a checkpoint saved before any training step, naming it, and
  writes nothing.
- Non-finite inputs are refused with the reason, never predicted (a NaN pixel came out as class 0 with
  confidence NaN): every entry point of ``TENSOR_SURFACES`` raises naming the images, or gives the image's
  row an error and predicts the others. The surfaces that read image files: ``tests/test_images.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.runs import make_run
from support.surfaces import EVALUATING_SURFACES, TENSOR_SURFACES, Refused

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.files import file_sha256


@pytest.fixture
def untrained(tmp_path):
    """A run whose checkpoint was saved before any training step (global_step 0, train_steps 0)."""
    run = make_run(tmp_path)
    payload = torch.load(run["ckpt"], weights_only=True)
    payload["global_step"] = 0
    payload["state_dict"]["train_steps"] = torch.zeros((), dtype=torch.long)
    torch.save(payload, run["ckpt"])
    thresholds = json.loads(run["thresholds"].read_text())
    thresholds["checkpoint_hash"] = f"file:{file_sha256(str(run['ckpt']))}"  # the test of this checkpoint
    run["thresholds"].write_text(json.dumps(thresholds))
    return run


@pytest.mark.parametrize("surface", list(EVALUATING_SURFACES))
def test_every_surface_refuses_untrained_weights(surface, untrained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises((ValueError, Refused)) as info:
        EVALUATING_SURFACES[surface](untrained, out)
    message = str(info.value)
    assert "untrained" in message or "before any training step" in message, message
    assert "allow_untrained" in message or "allow-untrained" in message, message  # says how to do it anyway
    # no report, thresholds, predictions or artefact (the data module's split file is written at setup,
    # before the weights are loaded from the checkpoint)
    written = [p.name for p in out.rglob("*") if p.is_file() and p.name != "calibration_indices.json"]
    assert not [n for n in written if n.endswith((".json", ".csv", ".safetensors", ".pt"))], written


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    run = make_run(base)
    run["art"] = export_artefact(str(base / "art"), run=str(run["run"]))
    return run


@pytest.mark.parametrize("surface", list(TENSOR_SURFACES))
def test_every_surface_refuses_non_finite_inputs_with_the_reason(surface, trained):
    x = torch.randn(4, 3, 32, 32)
    x[2, 1, 5, 5] = math.nan
    x_before = x.clone()
    try:
        errors = TENSOR_SURFACES[surface](trained, x)
    except ValueError as err:
        assert "1 of the 4 images in the batch (index 2) hold NaN or infinite values" in str(err)
    else:  # the writer: a row per sample, the non-finite one with its reason and no prediction
        assert errors[:2] == [None, None] and errors[3] is None, errors
        assert "NaN or infinite" in errors[2], errors
    assert torch.equal(x.nan_to_num(), x_before.nan_to_num())  # the input is not modified


def test_a_registered_rule_travels_to_thresholds_export_and_predictor_and_is_refused_where_unknown(tmp_path):
    """Issue 28/4: a rule registered with ``register_exit_rule`` is carried by name by every file.

    ``dmpo test``'s evaluator fits thresholds for it (``thresholds.json["rule"]``, ``report.json``), the
    artefact names it (``manifest.json["exit_rule"]``) and the predictor scores with it, agreeing with the
    module's own early exit; where the rule is not registered (another process without the plugin), loading
    the artefact is refused naming the rule.
    """
    from support.early_exit import MARGIN, registered_margin
    from support.surfaces import _data, _module, _trainer

    from dmpo_lightning.deploy.format import ArtefactError
    from dmpo_lightning.deploy.predictor import EarlyExitPredictor
    from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions

    run = make_run(tmp_path)
    report = tmp_path / "report"
    with registered_margin():
        options = EvaluationOptions(rule=MARGIN, budgets=(0.75,), report_dir=str(report))
        _trainer(tmp_path, callbacks=[DMPOEvaluator(options)]).test(
            _module(run), datamodule=_data(), ckpt_path=str(run["ckpt"]), weights_only=True
        )
        thresholds = json.loads((report / "thresholds.json").read_text())
        assert thresholds["rule"] == json.loads((report / "report.json").read_text())["exit_rule"] == MARGIN
        art = export_artefact(
            str(tmp_path / "art"), ckpt_path=str(run["ckpt"]), thresholds=str(report / "thresholds.json")
        )
        assert json.loads((tmp_path / "art" / "manifest.json").read_text())["exit_rule"] == MARGIN
        predictor = EarlyExitPredictor.load(art, budget=0.75)
        assert predictor.exit_rule == MARGIN
        x = torch.randn(16, 3, 32, 32)
        ours = predictor(x)
        module = _module(run)
        theirs = module.forward_early_exit(x, thresholds=predictor.thresholds, rule=MARGIN)
        assert torch.equal(ours.prediction, theirs.prediction)
        assert torch.equal(ours.exit, theirs.exit_index.cpu() + 1)  # the predictor numbers exits from 1
        assert len(set(ours.exit.tolist())) > 1  # the thresholds send samples out at several exits
    with pytest.raises(ArtefactError, match=rf"exit_rule is '{MARGIN}', not a registered exit rule"):
        EarlyExitPredictor.load(art, budget=0.75)
