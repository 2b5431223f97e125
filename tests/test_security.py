"""Loading a file someone sent you never runs code from it (docs/security.md).

Every loader of the package and its scripts gets a crafted file: a pickle whose ``__reduce__`` creates a
marker file when unpickled. Each must refuse it with a clear message, and the marker must never appear.
``test_the_payload_is_live`` shows that the same files do create the marker when unpickled without
restrictions, so the other tests can fail.

``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set for every test: it turns torch's own ``weights_only`` default
back to ``False`` (as on torch < 2.6), so a loader that relies on torch's default instead of passing
``weights_only=True`` itself is caught here.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support.builders import TINY_MODULE
from support.fakes import write_cifar

from dmpo_lightning import DMPOModule, __version__
from dmpo_lightning.cli import main
from dmpo_lightning.errors import ConfigError
from dmpo_lightning.serialization import TRAINABLE_FORMAT, TRAINABLE_FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "tests" / "configs" / "tiny.yaml")
TINY = TINY_MODULE


class Payload:
    """Unpickling this object creates ``marker`` (a stand-in for any code an attacker wants to run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_instantiator(*args, **kwargs):
    """Named by a checkpoint's ``_instantiator``: Lightning must not call it."""
    Path("instantiator_ran").write_text("ran")
    raise RuntimeError("the checkpoint's instantiator ran")


@pytest.fixture(autouse=True)
def _torch_default_unsafe(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def torch_file(path: Path, marker: Path, kind: str) -> Path:
    """A crafted file: ``kind`` is a pickle-based export (format 1), a checkpoint or a bare pickle."""
    if kind == "export":
        hparams = {"x": Payload(marker)}
        torch.save({"format": "dmpo-trainable-v1", "hyper_parameters": hparams, "state_dict": {}}, path)
    elif kind == "checkpoint":
        payload = {
            "state_dict": {"loss_weights": torch.ones(4)},
            "hyper_parameters": {**TINY, "num_classes": Payload(marker)},
            "pytorch-lightning_version": "2.6.6",
        }
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))  # the protocol torch.save uses
    return path


def tiny_module(seed: int = 1) -> DMPOModule:
    torch.manual_seed(seed)
    module = DMPOModule(**TINY)
    for p in module.model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return module.eval()


def assert_same_outputs(a: DMPOModule, b: DMPOModule) -> None:
    x = torch.randn(2, 3, 32, 32)
    a.eval(), b.eval()
    for ya, yb in zip(a(x), b(x), strict=True):
        torch.testing.assert_close(ya, yb)


# ----------------------------------------------------------------------------------------- the payload
@pytest.mark.parametrize("kind", ["export", "checkpoint", "pickle"])
def test_the_payload_is_live(tmp_path, marker, kind):
    path = torch_file(tmp_path / "evil.bin", marker, kind)
    # what the old from_trainable and the benchmark did (a bare pickle then fails, after its code ran)
    with contextlib.suppress(RuntimeError):
        torch.load(path, weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------------------- from_trainable
@pytest.mark.parametrize("kind", ["export", "pickle"])
def test_from_trainable_refuses_a_pickle_renamed_to_safetensors(tmp_path, marker, kind):
    path = torch_file(tmp_path / "adapter.safetensors", marker, kind)
    content = r"named \.safetensors but its content is a (torch\.save archive|Python pickle)"
    with pytest.raises(ValueError, match=content):
        DMPOModule.from_trainable(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["export", "checkpoint", "pickle"])
def test_from_trainable_refuses_any_pickle_without_reading_it(tmp_path, marker, kind):
    path = torch_file(tmp_path / "adapter.pt", marker, kind)
    with pytest.raises(ValueError) as err:
        DMPOModule.from_trainable(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} is not a dmpo export of format version 2: it is a ")
    assert "the pickle-based .pt export of format version 1" in message and "\n" not in message
    assert "DMPOModule.load_from_checkpoint" in message
    assert "export_trainable('<name>.safetensors')" in message
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("weights_only", ["default", None, True])
def test_load_from_checkpoint_refuses_a_crafted_ckpt(tmp_path, marker, weights_only):
    path = torch_file(tmp_path / "evil.ckpt", marker, "checkpoint")
    kwargs = {} if weights_only == "default" else {"weights_only": weights_only}
    with pytest.raises(ValueError, match=r"checkpoint .*evil\.ckpt was not loaded: it holds Python objects"):
        DMPOModule.load_from_checkpoint(str(path), **kwargs)
    assert not marker.exists()


def test_load_from_checkpoint_does_not_run_a_named_instantiator(tmp_path):
    """weights_only=True is not enough on Lightning < 2.6.6: hparams could name a function to call."""
    path = tmp_path / "instantiator.ckpt"
    hparams = {**TINY, "_instantiator": "test_security.evil_instantiator"}
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"}, path)
    with pytest.raises(ValueError, match="not in the allowlist of trusted instantiators"):
        DMPOModule.load_from_checkpoint(str(path))
    assert not (tmp_path / "instantiator_ran").exists()


def test_load_from_checkpoint_refuses_unrestricted_unpickling_before_reading(tmp_path, marker, monkeypatch):
    path = torch_file(tmp_path / "evil.ckpt", marker, "checkpoint")
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(k) or real_load(*a, **k))
    with pytest.raises(ValueError, match=r"weights_only must be true: checkpoints are read only with torch"):
        DMPOModule.load_from_checkpoint(str(path), weights_only=False)
    assert reads == [] and not marker.exists()


def good_cli_checkpoint(path: Path) -> Path:
    """A genuine checkpoint of the tiny CLI config's model (tensors and plain values only)."""
    module = main(["-c", TINY_CONFIG], run=False).model
    module.train_steps.fill_(2)  # stands for two training steps
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}
    torch.save({**ckpt, "global_step": 2, "pytorch-lightning_version": "2.6.6"}, path)
    return path


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


def test_dmpo_test_ckpt_path_refuses_a_crafted_ckpt(tmp_path, marker):
    path = torch_file(tmp_path / "evil.ckpt", marker, "checkpoint")
    report = tmp_path / "report"
    with pytest.raises(ValueError, match=r"ckpt_path '.*evil\.ckpt' is not a readable Lightning checkpoint"):
        main(
            [
                "test",
                "-c",
                TINY_CONFIG,
                f"--ckpt_path={path}",
                f"--evaluation.report_dir={report}",
            ]
        )
    assert not marker.exists()
    assert not report.exists()


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


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_cli_reads_checkpoints_with_weights_only_by_default(subcommand, capsys):
    with pytest.raises(SystemExit):
        main([subcommand, "-c", TINY_CONFIG, "--print_config"])
    assert "\nweights_only: true\n" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["checkpoint", "pickle"])
def test_dmpo_predict_refuses_a_pickled_thresholds_file(tmp_path, marker, kind):
    path = torch_file(tmp_path / "thresholds.json", marker, kind)
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
    assert not marker.exists()
    assert not preds.exists()


def test_backbone_checkpoint_path_refuses_a_crafted_file(tmp_path, marker):
    """``checkpoint_path`` (a local timm checkpoint) goes through timm's loader with weights_only=True."""
    path = torch_file(tmp_path / "backbone.pth", marker, "checkpoint")
    # timm 1.0.31 words it "weights_only=True blocked loading"; older timm passes torch's error on
    with pytest.raises((RuntimeError, pickle.UnpicklingError), match=r"[Ww]eights.only"):
        DMPOModule(**TINY, checkpoint_path=str(path))
    assert not marker.exists()


@pytest.mark.slow
def test_benchmark_checkpoint_loader_refuses_a_crafted_ckpt(tmp_path, marker):
    path = torch_file(tmp_path / "evil.ckpt", marker, "checkpoint")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
    }
    script = str(ROOT / "benchmarks" / "early_exit_speed.py")
    proc = subprocess.run(
        [sys.executable, script, "--config", TINY_CONFIG, "--ckpt", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode != 0
    assert "evil.ckpt was not loaded: it holds Python objects" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- the export format
def test_export_is_safetensors_with_json_metadata(tmp_path):
    module = tiny_module()
    path = tmp_path / "adapter.safetensors"
    assert module.export_trainable(str(path)) == str(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == TRAINABLE_FORMAT == "dmpo-trainable"
    assert meta["format_version"] == str(TRAINABLE_FORMAT_VERSION) == "2"
    assert meta["dmpo_lightning_version"] == __version__
    assert json.loads(meta["hyper_parameters"])["exits"]["blocks"] == [1, 2, 3, 4]
    assert {"loss_weights", "exit_thresholds"} <= keys
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file left


def test_overrides_replace_saved_hparams(tmp_path):
    path = tmp_path / "adapter.safetensors"
    module = tiny_module()
    module.hparams.schedule["ramp_epochs"] = 2  # saved; not among the overrides
    module.export_trainable(str(path))
    torch.manual_seed(1)
    restored = DMPOModule.from_trainable(str(path), schedule={"switch_epoch": 7})
    assert restored.hparams.schedule["switch_epoch"] == 7
    assert restored.hparams.schedule["ramp_epochs"] == 2  # the group's other fields are kept
    assert_same_outputs(module, restored)


def test_export_never_overwrites_and_refuses_bad_paths_and_values(tmp_path):
    module = tiny_module()
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"someone's file")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        module.export_trainable(str(path))
    assert path.read_bytes() == b"someone's file"
    module.export_trainable(str(path), overwrite=True)
    assert path.read_bytes() != b"someone's file"

    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        module.export_trainable(str(tmp_path / "adapter.pt"))
    module.hparams.schedule["switch_epoch"] = object()  # not JSON
    with pytest.raises(TypeError, match=r"hyper-parameter 'schedule' cannot be stored \(cannot put a"):
        module.export_trainable(str(tmp_path / "other.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def _rewrite(src: Path, dst: Path, **meta_changes) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_corrupt_truncated_foreign_and_newer_exports_fail_clearly(tmp_path):
    good = tmp_path / "good.safetensors"
    tiny_module().export_trainable(str(good))
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="corrupt or truncated safetensors file"):
        DMPOModule.from_trainable(str(truncated))

    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ValueError, match="does not match the sha256 in its header"):
        DMPOModule.from_trainable(str(flipped))

    newer = _rewrite(good, tmp_path / "newer.safetensors", format_version="3", dmpo_lightning_version="9.0")
    newer_msg = r"written by dmpo-lightning 9\.0 in export format version 3; .*upgrade"
    with pytest.raises(ValueError, match=newer_msg):
        DMPOModule.from_trainable(str(newer))

    foreign = _rewrite(good, tmp_path / "foreign.safetensors", format="pt")
    with pytest.raises(ValueError, match=r"not a dmpo trainable-parameter export .*format tag 'pt'"):
        DMPOModule.from_trainable(str(foreign))

    bad_json = _rewrite(good, tmp_path / "bad_json.safetensors", hyper_parameters="{not json")
    with pytest.raises(ValueError, match="hyper_parameters metadata is missing or not JSON"):
        DMPOModule.from_trainable(str(bad_json))


# ----------------------------------------------------------------------------------------- the source itself
def _weights_only_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, innermost enclosing function) of every call passing weights_only other than the literal True."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call) and any(
                k.arg == "weights_only" and not (isinstance(k.value, ast.Constant) and k.value.value is True)
                for k in child.keywords
            ):
                found.append((child.lineno, function))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_no_unrestricted_torch_load_in_the_package_or_the_benchmarks():
    """No call in src or benchmarks passes a ``weights_only`` other than the literal True."""
    found = [
        f"{path.relative_to(ROOT)}:{line} in {function}"
        for folder in ("src", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, function in _weights_only_calls(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert found == []


# ------------------------------------------------------------------------------------------ CIFAR batch files
def test_a_crafted_cifar_batch_is_refused_without_running_code(tmp_path, marker):
    from dmpo_lightning.data.formats import load_cifar

    write_cifar(tmp_path, "cifar10")
    splits = load_cifar(tmp_path, "cifar10")  # the genuine layout (numpy arrays, lists, strings) still loads
    assert len(splits.test) == 4
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3 was not loaded: global .*open is not allowed"):
        load_cifar(tmp_path, "cifar10")
    assert not marker.exists()
