"""Deploy bad input: each case one clear message, nothing partial written, nothing overwritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.runs import SYNTHETIC_DM, make_run

from dmpo_lightning.constants import REPORT_FORMAT, REPORT_FORMAT_VERSION
from dmpo_lightning.deploy.cli import console_main
from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.format import FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE, ArtefactError
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.deploy.preprocess import ImageSizeError


@pytest.fixture
def artefact(tmp_path):
    r = make_run(tmp_path)
    r["art"] = Path(export_artefact(str(tmp_path / "art"), run=str(r["run"])))
    return r


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


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


def test_budget_without_thresholds_lists_the_available_ones(artefact):
    with pytest.raises(ValueError, match=r"no thresholds for budget 0\.33 .*it has: \[0\.5, 0\.75\]"):
        EarlyExitPredictor.load(artefact["art"], budget=0.33)
    predictor = EarlyExitPredictor.load(artefact["art"], budget=0.75)
    with pytest.raises(ValueError, match=r"it has: \[0\.5, 0\.75\]"):
        predictor.set_budget(0.9)
    assert predictor.budget == 0.75  # unchanged after the refusal


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


def test_folder_without_images_and_missing_paths(artefact, tmp_path):
    predictor = EarlyExitPredictor.load(artefact["art"])
    (tmp_path / "empty_dir" / "sub").mkdir(parents=True)
    (tmp_path / "empty_dir" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"folder .*empty_dir' holds no image files"):
        predictor.predict_paths(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError, match=r"missing\.png' does not exist"):
        predictor.predict_paths([tmp_path / "missing.png"])
    listing = tmp_path / "list.txt"
    listing.write_text("nothere.png\n")
    with pytest.raises(FileNotFoundError, match=r"names 1 of 1 files that do not exist.*nothere\.png"):
        predictor.predict_paths(listing)


def test_image_of_another_size_for_a_native_size_model_is_refused_with_the_reason(artefact, tmp_path):
    predictor = EarlyExitPredictor.load(artefact["art"])  # synthetic 32 px: images used as they are
    Image.new("RGB", (40, 32), (10, 20, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"wide\.png: image is 40x32 px .*32x32"):
        list(predictor.predict_paths(tmp_path))
    rows = list(predictor.predict_paths(tmp_path, on_error="report"))
    assert [Path(r.path).name for r in rows] == ["ok.png", "wide.png"]
    assert rows[0].error is None and rows[0].exit in (1, 2, 3, 4) and rows[0].class_name is not None
    assert rows[1].class_index is None and rows[1].error.startswith("image is 40x32 px")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = list(predictor.predict_paths(tmp_path, on_error="report", batch_size=1))
    assert [r.error is not None for r in rows] == [True, False, True]
    with pytest.raises(ImageSizeError):
        predictor.transform(Image.new("L", (28, 28)))


def test_other_channel_counts_are_converted_like_training_images(tmp_path):
    from dmpo_lightning.data.transforms import build_transform, resolve_data_config

    dm = {**SYNTHETIC_DM, "dataset": "image_folder", "in_chans": 1}
    r = make_run(tmp_path, dm=dm, in_chans=1)
    predictor = EarlyExitPredictor.load(export_artefact(str(tmp_path / "art"), run=str(r["run"])))
    cfg = resolve_data_config(in_chans=1, default_image_size=224, timm_model=dm["timm_model"], image_size=32)
    reference = build_transform(cfg, in_chans=1, train=False)
    rgba = Image.new("RGBA", (45, 60), (200, 30, 90, 128))
    rgba.save(tmp_path / "rgba.png")
    x = predictor.preprocess([str(tmp_path / "rgba.png")])
    assert x.shape == (1, 1, 32, 32)
    assert torch.equal(x[0], reference(Image.open(tmp_path / "rgba.png").convert("RGB")))
    row = next(iter(predictor.predict_paths(tmp_path / "rgba.png")))
    assert row.error is None and row.exit == int(predictor(x).exit[0])


def test_wrong_tensor_shape_is_refused(artefact):
    predictor = EarlyExitPredictor.load(artefact["art"])
    with pytest.raises(ValueError, match=r"the model takes \[B, 3, 32, 32\]"):
        predictor(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="must be float"):
        predictor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_onnx_backend_without_onnx_stages_says_how_to_get_them(artefact):
    with pytest.raises(ArtefactError, match="--onnx"):
        EarlyExitPredictor.load(artefact["art"], backend="onnx")


def test_missing_class_names_fall_back_with_a_warning(tmp_path):
    r = make_run(tmp_path, extra={})
    with pytest.warns(UserWarning, match="class_0..class_3"):
        out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    assert json.loads((Path(out) / MANIFEST_FILE).read_text())["class_names"][3] == "class_3"
    with pytest.raises(ValueError, match="2 class names given for a model with 4 classes"):
        export_artefact(str(tmp_path / "art2"), run=str(r["run"]), class_names=["a", "b"])
    assert not os.path.exists(tmp_path / "art2")


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
