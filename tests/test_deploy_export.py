"""``dmpo export`` (deploy/export.py, deploy/cli.py): the files it takes, what it refuses, what it merges.

It refuses thresholds of another checkpoint or architecture, a run without a `dmpo test` report, a report of
another model configuration and bad temperatures, never overwrites an output (not even an empty folder), and
says so in one line with exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from support.runs import make_run
from torch import nn

from dmpo_lightning.constants import REPORT_FORMAT, REPORT_FORMAT_VERSION
from dmpo_lightning.deploy.cli import console_main
from dmpo_lightning.deploy.cli import main as export_main
from dmpo_lightning.deploy.export import export_artefact, resolve_run
from dmpo_lightning.deploy.format import MANIFEST_FILE, WEIGHTS_FILE
from dmpo_lightning.deploy.merge import check_mergeable, is_mergeable
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.files import file_sha256
from dmpo_lightning.models import adapters


def _manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / MANIFEST_FILE).read_text())


def _retest(run: Path, folder: str, budgets: list[float], source: Path) -> Path:
    """A copy of ``source`` (a thresholds.json) keeping only ``budgets``, as a newer `dmpo test` report."""
    data = json.loads(source.read_text())
    data["budgets"] = [b for b in data["budgets"] if b["budget"] in budgets]
    target = run / folder / "thresholds.json" if "/" not in folder else Path(folder) / "thresholds.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))
    return target


# ------------------------------------------------------------------ --run finds the test of its checkpoint
def test_run_export_takes_the_newest_test_report_of_one_of_its_checkpoints(tmp_path, capsys):
    r = make_run(tmp_path, "x")
    run = r["run"]
    other = make_run(tmp_path, "other", seed=1)  # a report of weights that are not in this run
    time.sleep(0.01)
    _retest(run, "dmpo_test_1", [0.75], r["thresholds"])  # dmpo test --ckpt_path <run>/checkpoints/...
    time.sleep(0.01)
    newest_foreign = _retest(run, "dmpo_test_2", [0.5, 0.75], other["thresholds"])
    found = resolve_run(str(run))
    assert found.thresholds == str(run / "dmpo_test_1" / "thresholds.json")
    assert found.ckpt_path == str(r["ckpt"])
    assert found.found is not None and "dmpo_test_1" in found.found and "newest of 3" in found.found
    out = export_artefact(str(tmp_path / "art"), run=str(run))
    assert [p["budget"] for p in _manifest(out)["operating_points"]] == [0.75]
    assert _manifest(out)["inputs"]["found"] == found.found
    assert export_main(["--run", str(run), "--output", str(tmp_path / "art2")]) == 0
    said = capsys.readouterr().err
    assert f"using the dmpo test report in {run / 'dmpo_test_1'}" in said and said.startswith(
        "wrote artefact"
    )
    # the older layout: dmpo test wrote beside the run, into <run>_test*/dmpo_test
    newest_foreign.unlink()
    time.sleep(0.01)
    sibling = _retest(run, str(tmp_path / "x_test_1" / "dmpo_test"), [0.5], r["thresholds"])
    assert resolve_run(str(run)).thresholds == str(sibling)


def test_run_export_of_an_explicit_checkpoint_takes_its_test_report(tmp_path):
    r = make_run(tmp_path, "x")
    run = r["run"]
    best = run / "checkpoints" / "best.ckpt"
    payload = torch.load(r["ckpt"], weights_only=True)
    payload["global_step"] = 8
    torch.save(payload, best)
    th = json.loads(r["thresholds"].read_text())
    th["checkpoint_hash"] = f"file:{file_sha256(str(best))}"
    (run / "dmpo_test_1").mkdir()
    (run / "dmpo_test_1" / "thresholds.json").write_text(json.dumps(th))
    assert resolve_run(str(run), ckpt_path=str(r["ckpt"])).thresholds == str(r["thresholds"])
    assert resolve_run(str(run), ckpt_path=str(best)).thresholds == str(
        run / "dmpo_test_1" / "thresholds.json"
    )
    assert resolve_run(str(run)).ckpt_path == str(best)  # the newest report is of best.ckpt


# ------------------------------------------------------------------------ untrained weights are refused
def _untrained(tmp_path: Path) -> dict:
    r = make_run(tmp_path)
    payload = torch.load(r["ckpt"], weights_only=True)
    payload["global_step"] = 0
    torch.save(payload, r["ckpt"])
    th = json.loads(r["thresholds"].read_text())
    th["checkpoint_hash"] = f"file:{file_sha256(str(r['ckpt']))}"
    r["thresholds"].write_text(json.dumps(th))
    return r


def _by_python(r: dict, out: Path, allow: bool) -> int:
    export_artefact(str(out), run=str(r["run"]), allow_untrained=allow)
    return 0


def _by_command(r: dict, out: Path, allow: bool) -> int:
    return export_main(["--run", str(r["run"]), "--output", str(out), *(["--allow-untrained"] * allow)])


@pytest.mark.parametrize("surface", [_by_python, _by_command], ids=["export_artefact", "dmpo export"])
def test_a_checkpoint_that_never_trained_is_exported_only_on_request(tmp_path, capsys, surface):
    r = _untrained(tmp_path)
    out = tmp_path / "art"
    try:
        status = surface(r, out, False)
    except ValueError as err:
        message = str(err)
    else:
        assert status == 2
        (message,) = capsys.readouterr().err.strip().splitlines()
        assert message.startswith("dmpo export: error: ")
    assert "saved before any training step (global_step 0)" in message and "--allow-untrained" in message
    assert not out.exists()
    assert surface(r, out, True) == 0 and out.is_dir()
    assert _manifest(out)["inputs"]["global_step"] == 0
    with pytest.warns(UserWarning, match=r"before any training step \(global_step 0"):
        EarlyExitPredictor.load(out, budget=0.5)


# ------------------------------------------------------------------------------------------ class names
def test_duplicate_class_names_are_refused(tmp_path, capsys):
    r = make_run(tmp_path)
    with pytest.raises(ValueError, match=r"class name 'cat' is given twice \(classes 0 and 2\)"):
        export_artefact(str(tmp_path / "art"), run=str(r["run"]), class_names=["cat", "dog", "cat", "fox"])
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nowl\n dog \n")
    status = export_main(
        ["--run", str(r["run"]), "--output", str(tmp_path / "art"), "--class-names", str(names)]
    )
    assert status == 2 and "'dog' is given twice (classes 1 and 3)" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


# ------------------------------------------------------------------- merging is asked of the registry
class _ScaledLinear(nn.Module):
    """A toy mergeable PEFT module: ``(1 + s) * linear(x)``."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.peft_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.peft_scale) * self.base_layer(x)

    def merged(self) -> nn.Linear:
        layer = nn.Linear(self.base_layer.in_features, self.base_layer.out_features)
        with torch.no_grad():
            layer.weight.copy_(self.base_layer.weight * (1 + self.peft_scale))
            layer.bias.copy_(self.base_layer.bias * (1 + self.peft_scale))
        return layer.requires_grad_(False)


@pytest.fixture
def scaled_peft(scratch_registries):
    """A PEFT method ``scaled`` registered as mergeable, dropped again after the test."""

    @adapters.register_peft("scaled", mergeable=True)
    def inject(model, trunk, indices, options, npt):
        for i in indices:
            trunk[i].mlp.fc2 = _ScaledLinear(trunk[i].mlp.fc2)
        return [f"blocks.{i}.mlp.fc2" for i in indices]

    return "scaled"


def test_export_merges_what_the_registry_declares_mergeable(tmp_path, scaled_peft):
    assert is_mergeable("lora") and not is_mergeable("adaptformer") and is_mergeable(scaled_peft)
    check_mergeable(scaled_peft)
    r = make_run(tmp_path, peft={"method": scaled_peft})
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    manifest = _manifest(out)
    assert manifest["weights"]["merged"] is True and len(manifest["weights"]["merged_layers"]) == 4
    assert manifest["costs"]["form"].startswith("scaled merged into 4 frozen layers")
    predictor = EarlyExitPredictor.load(out, budget=0.5)
    assert not any(isinstance(m, _ScaledLinear) for m in predictor.model.modules())
    expected = r["module"].model.eval()
    with torch.no_grad():
        got = predictor.model(r["x"])
        want = expected(r["x"])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    shutil.rmtree(out)
    kept = export_artefact(str(tmp_path / "art"), run=str(r["run"]), merge=False)
    assert _manifest(kept)["weights"]["merged"] is False
    assert os.path.isdir(kept)


def test_export_refuses_bad_temperatures(tmp_path):
    r = make_run(tmp_path)
    data = json.loads(r["thresholds"].read_text())
    data["temperatures"] = [1.0, 0.0, 1.0, 1.0]
    r["thresholds"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match="finite values > 0"):
        export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    assert not (tmp_path / "art").exists()


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_thresholds_from_another_checkpoint_are_refused(tmp_path):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", seed=1)  # same architecture, other weights
    out = tmp_path / "art"
    with pytest.raises(ValueError, match="calibrated on another checkpoint"):
        export_artefact(str(out), ckpt_path=str(a["ckpt"]), thresholds=str(b["thresholds"]))
    assert not out.exists() and not any(p.name.startswith(".art") for p in tmp_path.iterdir())
    # a run whose checkpoints do not include the calibrated one
    (a["run"] / "dmpo_test" / "thresholds.json").write_text(b["thresholds"].read_text())
    with pytest.raises(ValueError, match=r"none of the dmpo test reports of .* one of its checkpoints"):
        export_artefact(str(out), run=str(a["run"]))
    # an explicit checkpoint with --run: a report of that checkpoint is searched for
    with pytest.raises(ValueError, match=r"none of the dmpo test reports of .* the checkpoint \(last"):
        export_artefact(str(out), run=str(a["run"]), ckpt_path=str(a["ckpt"]))
    export_artefact(str(out), run=str(a["run"]), ckpt_path=str(b["ckpt"]))
    assert out.is_dir()


def test_thresholds_of_another_architecture_are_refused(tmp_path):
    a = make_run(tmp_path, "a")
    th = json.loads(a["thresholds"].read_text())
    th["fingerprint"]["exits.early_head"] = "linear"
    a["thresholds"].write_text(json.dumps(th))
    wrong = r"calibrated for another model \(exits\.early_head: thresholds .linear. vs checkpoint"
    with pytest.raises(ValueError, match=wrong):
        export_artefact(str(tmp_path / "art"), run=str(a["run"]))


def test_run_without_dmpo_test_and_unreadable_checkpoint(tmp_path):
    r = make_run(tmp_path)
    (r["run"] / "dmpo_test" / "thresholds.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no `dmpo test` report of .* run `dmpo test --ckpt_path"):
        export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    with pytest.raises(FileNotFoundError, match=r"run folder .* does not exist"):
        export_artefact(str(tmp_path / "art"), run=str(tmp_path / "missing"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    r2 = make_run(tmp_path, "r2")
    with pytest.raises(ValueError, match="not a readable Lightning checkpoint"):
        export_artefact(str(tmp_path / "art"), ckpt_path=str(garbage), thresholds=str(r2["thresholds"]))
    assert not (tmp_path / "art").exists()


def test_existing_output_is_never_overwritten(artefact, tmp_path):
    before = {p: (artefact["art"] / p).read_bytes() for p in (MANIFEST_FILE, WEIGHTS_FILE)}
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_artefact(str(artefact["art"]), run=str(artefact["run"]))
    assert {p: (artefact["art"] / p).read_bytes() for p in before} == before
    (tmp_path / "empty").mkdir()  # even an empty folder is left alone
    with pytest.raises(FileExistsError):
        export_artefact(str(tmp_path / "empty"), run=str(artefact["run"]))
    assert _listing(tmp_path / "empty") == []


def test_console_reports_one_line_and_exit_status_2(artefact, capsys):
    with pytest.raises(SystemExit) as exc:
        console_main(["--run", str(artefact["run"]), "--output", str(artefact["art"])])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmpo export: error:") and "never overwritten" in err[0]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        console_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--run",
        "--ckpt_path",
        "--thresholds",
        "--output",
        "--embed-backbone",
        "--merge",
        "--allow-untrained",
        "--onnx",
    ):
        assert option in out


def test_missing_class_names_fall_back_with_a_warning(tmp_path):
    r = make_run(tmp_path, extra={})
    with pytest.warns(UserWarning, match="class_0..class_3"):
        out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    assert json.loads((Path(out) / MANIFEST_FILE).read_text())["class_names"][3] == "class_3"
    with pytest.raises(ValueError, match="2 class names given for a model with 4 classes"):
        export_artefact(str(tmp_path / "art2"), run=str(r["run"]), class_names=["a", "b"])
    assert not os.path.exists(tmp_path / "art2")


def test_report_of_another_model_configuration_is_refused(tmp_path):
    r = make_run(tmp_path, peft={"method": "lora"})
    hparams = json.loads(json.dumps(dict(r["module"].hparams), default=list))
    th = json.loads(r["thresholds"].read_text())
    header = {"format": REPORT_FORMAT, "format_version": REPORT_FORMAT_VERSION}
    report = {**header, "checkpoint_hash": th["checkpoint_hash"], "config": hparams, "budgets": []}
    (r["run"] / "dmpo_test" / "report.json").write_text(json.dumps(report))
    export_artefact(str(tmp_path / "ok"), run=str(r["run"]))  # the matching report is accepted
    report["config"]["peft"]["lora_alpha"] = 4.0  # changes the outputs, not the weights
    (r["run"] / "dmpo_test" / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"another model configuration \(peft\.lora_alpha: report 4\.0 vs"):
        export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    report["config"]["peft"]["lora_alpha"] = hparams["peft"]["lora_alpha"]
    report["checkpoint_hash"] = "file:0123"
    (r["run"] / "dmpo_test" / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="belongs to another checkpoint"):
        export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    assert not (tmp_path / "art").exists()
