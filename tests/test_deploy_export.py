"""``dmpo export`` (deploy/export.py, deploy/cli.py): the files it takes, what it refuses, what it merges."""

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

from dmpo_lightning.deploy.cli import main as export_main
from dmpo_lightning.deploy.export import export_artefact, resolve_run
from dmpo_lightning.deploy.format import MANIFEST_FILE
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
def scaled_peft(monkeypatch):
    """A PEFT method ``scaled`` registered as mergeable, in a scratch copy of the registry."""
    monkeypatch.setattr(adapters.PEFT_REGISTRY, "_entries", dict(adapters.PEFT_REGISTRY._entries))

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
