"""The artefact format (deploy/format.py): a manifest is validated whole, once, at load, naming the field.

Each corruption below is tried on every reader of an artefact (``READERS``: the Python API, the deploy
command); a new reader (the HTTP server) is one more entry. A manifest that contradicts itself must be
refused before any image is read, in one sentence that names the wrong field. A folder that is not an
artefact, a newer format version, a truncated manifest and corrupt or missing weights are refused too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support.runs import make_run

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtefactError,
    read_manifest,
)
from dmpo_lightning.deploy.predict_cli import main as deploy_main
from dmpo_lightning.deploy.predictor import EarlyExitPredictor


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("format")
    r = make_run(base)
    return Path(export_artefact(str(base / "art"), run=str(r["run"])))


def _set(manifest: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


CORRUPTIONS: dict[str, tuple[Callable[[dict], None], str]] = {
    "3 class names for 4 classes": (
        lambda m: _set(m, "class_names", ["a", "b", "c"]),
        "class_names holds 3 entries but model.num_classes is 4",
    ),
    "a class name twice": (lambda m: _set(m, "class_names", ["a", "b", "a", "c"]), "class_names names ['a']"),
    "input size of another model": (
        lambda m: _set(m, "preprocessing.input_size", [3, 48, 48]),
        "preprocessing.input_size is [3, 48, 48] but model.img_size is 32",
    ),
    "one mean for three channels": (
        lambda m: _set(m, "preprocessing.mean", [0.5]),
        "preprocessing.mean holds 1 entries but the input has 3 channels",
    ),
    "a cost list of another length": (
        lambda m: _set(m, "costs.exit_gflops", [0.1, 0.2]),
        "costs.exit_gflops holds 2 entries but exit_blocks lists 4 exits",
    ),
    "a negative cost": (
        lambda m: _set(m, "costs.exit_gflops.0", -1.0),
        "costs.exit_gflops[0] is -1.0, not > 0",
    ),
    "costs of another input": (
        lambda m: _set(m, "costs.input_shape", [3, 64, 64]),
        "costs.input_shape is [3, 64, 64] but preprocessing.input_size is [3, 32, 32]",
    ),
    "three thresholds for four exits": (
        lambda m: _set(m, "operating_points.0.thresholds", [0.5, 0.5, "-inf"]),
        "operating_points[0].thresholds holds 3 entries but the model has 4 exits",
    ),
    "a NaN threshold": (
        lambda m: _set(m, "operating_points.1.thresholds.0", "nan"),
        "operating_points[1].thresholds[0] is 'nan', not a number or 'inf'/'-inf'",
    ),
    "the same budget twice": (
        lambda m: _set(m, "operating_points.1.budget", m["operating_points"][0]["budget"]),
        "operating_points[1].budget 0.5 appears twice",
    ),
    "an exit rule nobody registered": (
        lambda m: _set(m, "exit_rule", "margin"),
        "exit_rule is 'margin', not a registered exit rule (confidence, entropy, patience",
    ),
    "exit blocks out of order": (
        lambda m: _set(m, "exit_blocks", [1, 3, 2, 4]),
        "exit_blocks is [1, 3, 2, 4], not increasing block numbers",
    ),
    "exit blocks of another network": (
        lambda m: _set(m, "exit_blocks", [1, 2, 3, 5]),
        "exit_blocks is [1, 2, 3, 5] but the network its model options build has [1, 2, 3, 4]",
    ),
    "temperatures of another length": (
        lambda m: _set(m, "temperatures", [1.0]),
        "temperatures holds 1 entries but the model has 4 exits",
    ),
    "a weights file outside the artefact": (
        lambda m: _set(m, "weights.file", "../../secret.safetensors"),
        "weights.file is '../../secret.safetensors', a path that leaves the artefact folder",
    ),
    "an absolute weights path": (
        lambda m: _set(m, "weights.file", "/etc/passwd"),
        "weights.file is '/etc/passwd', a path that leaves the artefact folder",
    ),
    "an ONNX stage outside the artefact": (
        lambda m: _set(
            m, "onnx", {"stages": [{"file": f"../../s{k}.onnx", "sha256": "0"} for k in range(4)]}
        ),
        "onnx.stages[0].file is 'onnx/../../s0.onnx', a path that leaves the artefact folder",
    ),
}


def _load_with_python(art: Path, capsys) -> str:
    with pytest.raises(ArtefactError) as err:
        EarlyExitPredictor.load(art, budget=0.5)
    return str(err.value)


def _load_with_command(art: Path, capsys) -> str:
    images = art.parent / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(images / "a.png")
    out = art.parent / "p.csv"
    with pytest.raises(SystemExit) as exc:
        deploy_main([str(art), str(images), "--output", str(out)])
    assert exc.value.code == 2 and not out.exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m dmpo_lightning.deploy: error: ")
    return line


READERS = {
    "EarlyExitPredictor.load": _load_with_python,
    "python -m dmpo_lightning.deploy": _load_with_command,
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_manifest_that_contradicts_itself_is_refused_naming_the_field(
    pristine, tmp_path, capsys, case, reader
):
    art = tmp_path / "art"
    art.mkdir()
    for name in os.listdir(pristine):
        (art / name).write_bytes((pristine / name).read_bytes())
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    corrupt, expected = CORRUPTIONS[case]
    corrupt(manifest)
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    message = READERS[reader](art, capsys)
    assert f"manifest field {expected}" in message, message
    assert "export it again" in message


def test_the_pristine_artefact_is_valid(pristine):
    assert read_manifest(str(pristine))["format_version"] >= 1
    assert EarlyExitPredictor.load(pristine, budget=0.5).num_exits == 4


def test_a_symbolic_link_out_of_the_artefact_is_refused(pristine, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    for name in os.listdir(pristine):
        (art / name).write_bytes((pristine / name).read_bytes())
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((art / "weights.safetensors").read_bytes())
    (art / "link.safetensors").symlink_to(outside)
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    manifest["weights"]["file"] = "link.safetensors"
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match=r"weights\.file is 'link\.safetensors', a path that leaves"):
        EarlyExitPredictor.load(art, budget=0.5)


def test_newer_format_version_is_refused(artefact):
    manifest_path = artefact["art"] / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match=f"format version {FORMAT_VERSION + 1}, newer than"):
        EarlyExitPredictor.load(artefact["art"])


def test_truncated_manifest_is_refused(artefact):
    manifest_path = artefact["art"] / MANIFEST_FILE
    manifest_path.write_bytes(manifest_path.read_bytes()[:300])
    with pytest.raises(ArtefactError, match="corrupt or truncated"):
        EarlyExitPredictor.load(artefact["art"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_or_missing_weights_are_refused(artefact, damage):
    weights = artefact["art"] / WEIGHTS_FILE
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        weights.unlink()
    match = "incomplete" if damage == "delete" else "corrupt or truncated"
    with pytest.raises(ArtefactError, match=match):
        EarlyExitPredictor.load(artefact["art"])


def test_not_an_artefact_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EarlyExitPredictor.load(tmp_path / "nowhere")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ArtefactError, match="not a dmpo artefact"):
        EarlyExitPredictor.load(tmp_path / "folder")


def test_onnx_backend_without_onnx_stages_says_how_to_get_them(artefact):
    with pytest.raises(ArtefactError, match="--onnx"):
        EarlyExitPredictor.load(artefact["art"], backend="onnx")
