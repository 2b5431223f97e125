"""deploy/predict_cli.py: ``python -m dmpo_lightning.deploy``, the command that predicts image files.

It writes one CSV row per image (an unreadable one gets its reason, not a traceback), never overwrites the
output, writes the same rows with ``--engine``, and refuses a device that does not exist: a misspelt device
or one the machine lacks is refused at load, in one sentence naming the option as each surface writes it
(exit status 2 for the command, ``EarlyExitPredictor.load`` too), before any image is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from support.compare import assert_same_csv
from support.fakes import write_random_pngs
from support.runs import make_run

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.predict_cli import main as deploy_main
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.models.engine import EngineSession


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


def test_csv_command_reports_unreadable_images_and_never_overwrites(artefact, tmp_path, capsys):
    from dmpo_lightning.deploy.predict_cli import main as predict_main

    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(images / "a.png")
    (images / "b.png").write_bytes(b"garbage")
    out = tmp_path / "pred.csv"
    assert predict_main([str(artefact["art"]), str(images), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "path,class_index,class_name,exit,confidence,score,gflops,error"
    assert lines[2].startswith(str(images / "b.png")) and "not a readable image" in lines[2]
    assert "Error" not in lines[2]  # one sentence, no exception type name
    printed = capsys.readouterr().out
    assert "for 2 images written to" in printed and "1 not predicted" in printed
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exc:
        predict_main([str(artefact["art"]), str(images), "--output", str(out)])
    assert exc.value.code == 2 and out.read_bytes() == before
    with pytest.raises(SystemExit):
        predict_main([str(artefact["art"]), str(tmp_path / "none"), "--output", str(tmp_path / "x.csv")])
    with pytest.raises(SystemExit):
        predict_main(
            [str(artefact["art"]), str(images), "--output", str(tmp_path / "y.csv"), "--budget", "0.1"]
        )
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "y.csv").exists()
    assert "it has: [0.5, 0.75]" in capsys.readouterr().err


def test_predict_command_engine_flag_writes_the_same_csv(shared_artefact, tmp_path, monkeypatch):
    from dmpo_lightning.deploy.predict_cli import main as predict_main

    out = str(shared_artefact["art"])
    paths = write_random_pngs(tmp_path / "images", 11)
    Path(paths[3]).write_bytes(b"broken")
    predict_main([out, str(tmp_path / "images"), "--output", str(tmp_path / "a.csv"), "--batch-size", "4"])
    pushes: list[int] = []
    original = EngineSession.push
    monkeypatch.setattr(EngineSession, "push", lambda s, b: pushes.append(len(b)) or original(s, b))
    args = [out, str(tmp_path / "images"), "--output", str(tmp_path / "b.csv"), "--batch-size", "4"]
    predict_main([*args, "--engine"])
    assert pushes == [3, 4, 3]
    assert_same_csv((tmp_path / "b.csv").read_text(), (tmp_path / "a.csv").read_text())
