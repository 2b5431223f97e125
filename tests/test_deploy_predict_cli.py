"""``python -m dmpo_lightning.deploy`` and ``EarlyExitPredictor.load``: a device that does not exist.

A misspelt device or one the machine lacks is refused at load, in one sentence naming the option as each
surface writes it (exit status 2 for the command), before any image is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from support.runs import make_run

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.predict_cli import main as deploy_main
from dmpo_lightning.deploy.predictor import EarlyExitPredictor


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    base = tmp_path_factory.mktemp("device")
    r = make_run(base)
    out = Path(export_artefact(str(base / "art"), run=str(r["run"])))
    (base / "images").mkdir()
    Image.new("RGB", (32, 32)).save(base / "images" / "a.png")
    return out


def _by_python(art: Path, device: str, capsys) -> str:
    with pytest.raises(ValueError) as err:
        EarlyExitPredictor.load(art, budget=0.5, device=device)
    return f"device {str(err.value).split('device ', 1)[1]}"


def _by_command(art: Path, device: str, capsys) -> str:
    out = art.parent / "p.csv"
    with pytest.raises(SystemExit) as exc:
        deploy_main([str(art), str(art.parent / "images"), "--output", str(out), "--device", device])
    assert exc.value.code == 2 and not out.exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m dmpo_lightning.deploy: error: --device ")
    return line.split("error: --", 1)[1]


def _missing_gpu_says() -> str:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "this machine has no CUDA GPU that torch can use; use cpu"
    return f"this machine has {count} CUDA GPU"


@pytest.mark.parametrize(
    "surface", [_by_python, _by_command], ids=["EarlyExitPredictor.load", "deploy command"]
)
@pytest.mark.parametrize(
    ("device", "says"),
    [
        ("banana", "'banana' is not a torch device; use cpu, cuda, cuda:<index> or mps"),
        ("cuda:7", None),
        ("cuda:x", "'cuda:x' is not a torch device"),
    ],
)
def test_a_device_that_does_not_exist_is_refused_in_one_sentence(art, capsys, surface, device, says):
    if torch.cuda.device_count() > 7 and device == "cuda:7":
        pytest.skip("this machine has a cuda:7")
    message = surface(art, device, capsys)
    assert message.startswith(f"device {device!r}")
    assert (says or _missing_gpu_says()) in message


def test_the_onnx_backend_refuses_a_device(art, capsys):
    pytest.importorskip("onnxruntime")
    out = art.parent / "q.csv"
    argv = [str(art), str(art.parent / "images"), "-o", str(out), "--backend", "onnx", "--device", "cuda"]
    with pytest.raises(SystemExit) as exc:
        deploy_main(argv)
    assert exc.value.code == 2 and "the onnx backend runs on the CPU" in capsys.readouterr().err
