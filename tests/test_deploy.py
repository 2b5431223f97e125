"""Deploy: export artefact, EarlyExitPredictor, LoRA merge and ONNX stages on tiny models.

The deploy path end to end too: dmpo fit + test (tiny Fashion-MNIST model) -> dmpo export -> predict a folder
of 200 PNGs; the predictor's classes and exits must equal the simulated protocol (all-exit forward, exit
scores, first exit whose score passes the calibrated threshold) on the same images, and the outputs `dmpo
test` cached, on both the PyTorch and the ONNX path.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.builders import TINY_CONFIG
from support.runs import SYNTHETIC_DM, TINY_HP, make_run, simulated, tiny_hparams

from dmpo_lightning.checkpointing import checkpoint_hash
from dmpo_lightning.cli import main
from dmpo_lightning.console import console_main
from dmpo_lightning.constants import IMAGE_KEY
from dmpo_lightning.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_subset
from dmpo_lightning.deploy.build import build_model, model_options
from dmpo_lightning.deploy.export import export_artefact, resolve_run
from dmpo_lightning.deploy.format import MANIFEST_FILE, WEIGHTS_FILE, ArtefactError
from dmpo_lightning.deploy.merge import merge_peft
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.evaluation.flops import count_exit_costs
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.files import file_sha256
from dmpo_lightning.models.exit_rules import exit_scores
from dmpo_lightning.module import DMPOModule
from dmpo_lightning.predictions import read_predictions

ROOT = Path(__file__).resolve().parents[1]


def test_export_then_predict_equals_the_simulated_protocol(tmp_path):
    r = make_run(tmp_path)
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    assert sorted(os.listdir(out)) == [MANIFEST_FILE, WEIGHTS_FILE]
    manifest = json.loads((Path(out) / MANIFEST_FILE).read_text())
    assert manifest["checkpoint_hash"] == f"file:{file_sha256(str(r['ckpt']))}"
    assert manifest["exit_rule"] == "confidence" and manifest["num_exits"] == 4
    costs = count_exit_costs(r["module"].model, (3, 32, 32))
    assert manifest["costs"]["exit_gflops"] == pytest.approx(list(costs.exit_gflops), rel=1e-12)

    predictor = EarlyExitPredictor.load(out, budget=0.5)
    assert predictor.budgets == [0.5, 0.75] and predictor.budget_unit == "fraction"
    assert predictor.model is not None and not predictor.model.training
    for budget in (0.5, 0.75):
        predictor.set_budget(budget)
        thresholds = json.loads(r["thresholds"].read_text())["budgets"][predictor.budgets.index(budget)]
        t = [float(v) for v in thresholds["thresholds"]]
        assert predictor.thresholds == t
        got = predictor(r["x"])
        pred, exits, logits = simulated(r["module"].model, r["x"], t)
        assert torch.equal(got.prediction, pred)
        assert torch.equal(got.exit, exits + 1)  # numbered from 1, as in the report
        assert len(set(got.exit.tolist())) >= 2, "thresholds should spread samples over exits"
        torch.testing.assert_close(got.logits, logits, atol=1e-5, rtol=1e-5)
        assert got.gflops.tolist() == pytest.approx([costs.exit_gflops[e] for e in exits.tolist()])
        torch.testing.assert_close(got.confidence, logits.softmax(-1).max(-1).values, atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # a fresh interpreter importing torch and timm
def test_predictor_loads_without_lightning_torchmetrics_or_jsonargparse(tmp_path):
    r = make_run(tmp_path)
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    code = (
        "import sys, torch\n"
        "from dmpo_lightning.deploy.predictor import EarlyExitPredictor\n"
        f"p = EarlyExitPredictor.load({out!r}, budget=0.75)\n"
        "p(torch.zeros(2, 3, 32, 32))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'torchmetrics', 'jsonargparse'))\n"
        "print('IMPORTED', bad)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "IMPORTED []" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("dataset", "crop"), [("synthetic", "none"), ("image_folder", "center"), ("cifar10", "none")]
)
def test_preprocessing_equals_the_data_modules_eval_transform(tmp_path, dataset, crop):
    from dmpo_lightning.data.registry import get_spec
    from dmpo_lightning.data.transforms import build_transform, resolve_data_config
    from dmpo_lightning.deploy.preprocess import build_eval_transform
    from dmpo_lightning.images import decode_image

    dm = {**SYNTHETIC_DM, "dataset": dataset}
    r = make_run(tmp_path, dm=dm)
    manifest = json.loads(
        (Path(export_artefact(str(tmp_path / "art"), run=str(r["run"]))) / MANIFEST_FILE).read_text()
    )
    pre = manifest["preprocessing"]
    assert pre["crop_mode"] == crop
    spec = get_spec(dataset)
    cfg = resolve_data_config(
        in_chans=3, default_image_size=spec.default_image_size, timm_model=dm["timm_model"], image_size=32
    )
    native = 32 if dataset == "synthetic" else spec.native_size
    reference = build_transform(cfg, in_chans=3, train=False, native_size=native)
    ours = build_eval_transform(pre)
    gen = torch.Generator().manual_seed(0)
    sizes = [(32, 32)] if crop == "none" else [(32, 32), (50, 41), (17, 90)]
    for i, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        image = decode_image(path).image
        assert torch.equal(ours(image), reference(image))
        grey = Image.fromarray(pixels[..., 0])  # a grey image for an RGB model: replicated like training
        assert torch.equal(ours(grey), reference(grey))


def test_lora_merge_is_exact_and_costs_the_base_model():
    torch.manual_seed(0)
    module = DMPOModule(
        **tiny_hparams(peft={"method": "lora", "lora_rank": 4, "lora_targets": ["qkv", "mlp.fc1"]})
    )
    model = module.model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "peft_lora" in name:
                p.normal_(0, 0.3)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    costs_lora = count_exit_costs(model, (3, 32, 32))
    merged = merge_peft(model)
    assert len(merged) == 8 and not any("peft_" in n for n in model.state_dict())
    with torch.no_grad():
        after = model(x)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    base = DMPOModule(**tiny_hparams(peft={"method": "linear"})).model
    costs_base = count_exit_costs(base, (3, 32, 32))
    assert count_exit_costs(model, (3, 32, 32)).exit_macs == costs_base.exit_macs
    assert all(a > b for a, b in zip(costs_lora.exit_macs, costs_base.exit_macs, strict=True))


def test_lora_artefact_is_merged_by_default_and_predicts_like_the_unmerged_model(tmp_path):
    r = make_run(tmp_path, peft={"method": "lora"})
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    manifest = json.loads((Path(out) / MANIFEST_FILE).read_text())
    assert manifest["weights"]["merged"] is True
    assert "lora merged into 4 frozen layers" in manifest["costs"]["form"]  # qkv of 4 blocks
    assert manifest["costs"]["exit_gflops"][0] < manifest["costs"]["as_trained"]["exit_gflops"][0]
    predictor = EarlyExitPredictor.load(out, budget=0.5)
    got = predictor(r["x"])
    pred, exits, logits = simulated(r["module"].model, r["x"], predictor.thresholds)
    assert torch.equal(got.prediction, pred) and torch.equal(got.exit, exits + 1)
    torch.testing.assert_close(got.logits, logits, atol=1e-5, rtol=0)
    unmerged = export_artefact(str(tmp_path / "unmerged"), run=str(r["run"]), merge=False)
    m2 = json.loads((Path(unmerged) / MANIFEST_FILE).read_text())
    assert m2["weights"]["merged"] is False and "its added modules counted" in m2["costs"]["form"]


@pytest.mark.parametrize("peft", ["adaptformer", "vpt"])
def test_merge_refused_for_adapters_that_cannot_be_folded(tmp_path, peft):
    r = make_run(tmp_path, peft={"method": peft, "vpt_prompts": 2})
    with pytest.raises(ValueError, match=rf"registered as mergeable can do \(lora\); .*peft.method='{peft}'"):
        export_artefact(str(tmp_path / "art"), run=str(r["run"]), merge=True)
    assert not any(p.name.startswith((".art", "art")) for p in tmp_path.iterdir())


def _timm_weights_file(path: Path, seed: int) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, **TINY_HP["backbone_kwargs"]
    )
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("peft", ["adaptformer", "lora"])
def test_frozen_backbone_is_referenced_with_a_checksum(tmp_path, peft):
    weights = _timm_weights_file(tmp_path / "vit.safetensors", seed=1)
    r = make_run(tmp_path, peft={"method": peft}, checkpoint_path=str(weights))
    out = Path(export_artefact(str(tmp_path / "art"), run=str(r["run"])))
    full = Path(export_artefact(str(tmp_path / "full"), run=str(r["run"]), embed_backbone=True))
    ref = json.loads((out / MANIFEST_FILE).read_text())["weights"]["reference"]
    assert ref["checkpoint_path"] == str(weights) and ref["checkpoint_file_sha256"] == file_sha256(
        str(weights)
    )
    assert (out / WEIGHTS_FILE).stat().st_size < (full / WEIGHTS_FILE).stat().st_size / 2
    expected = EarlyExitPredictor.load(full, budget=0.5)(r["x"])
    got = EarlyExitPredictor.load(out, budget=0.5)(r["x"])
    assert torch.equal(got.prediction, expected.prediction) and torch.equal(got.exit, expected.exit)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=0)

    # other weights under the same name are refused; an explicit file is checked too
    other = _timm_weights_file(tmp_path / "other.safetensors", seed=2)
    with pytest.raises(ArtefactError, match="do not match"):
        EarlyExitPredictor.load(out, budget=0.5, backbone_weights=str(other))
    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)
    with pytest.raises(ArtefactError, match="backbone_weights=<local timm weights file>"):
        EarlyExitPredictor.load(out, budget=0.5)
    again = EarlyExitPredictor.load(out, budget=0.5, backbone_weights=str(moved))(r["x"])
    assert torch.equal(again.prediction, expected.prediction)
    EarlyExitPredictor.load(full, budget=0.5)  # the embedded artefact needs no file at all


ONNX_CASES = {
    "adaptformer-confidence": dict(peft={"method": "adaptformer"}, evaluation={"rule": "confidence"}),
    "adaptformer-patience": dict(peft={"method": "adaptformer"}, evaluation={"rule": "patience"}),
    "vpt-patience": dict(peft={"method": "vpt", "vpt_prompts": 2}, evaluation={"rule": "patience"}),
    "lora_merged-isqrt_cov-entropy-avg": dict(
        peft={"method": "lora"},
        exits={"early_head": "isqrt_cov", "head_pool": "avg"},
        evaluation={"rule": "entropy"},
    ),
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_stages_agree_with_pytorch(tmp_path, case):
    pytest.importorskip("onnxruntime")
    options = ONNX_CASES[case]
    rule = options["evaluation"]["rule"]
    # patience scores are counts (1 at exit 1): leave once 2 exits in a row agree, or at exit 2
    fixed = [[math.inf, 2.0, 2.0], [math.inf, 1.0, 1.0]] if rule == "patience" else None
    r = make_run(tmp_path, quantiles=(0.3, 0.6), fixed=fixed, **options)
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]), onnx=True)
    manifest = json.loads((Path(out) / MANIFEST_FILE).read_text())
    assert [s["file"] for s in manifest["onnx"]["stages"]] == [f"stage_{k}.onnx" for k in range(4)]
    assert manifest["onnx"]["exporter"] == "torch.onnx.export(dynamo=True)"
    assert manifest["onnx"]["opset"] == 18
    assert sorted(os.listdir(Path(out) / "onnx")) == [f"stage_{k}.onnx" for k in range(4)]  # no external data
    torch_p = EarlyExitPredictor.load(out, budget=0.5)
    onnx_p = EarlyExitPredictor.load(out, budget=0.5, backend="onnx", num_threads=1)
    assert onnx_p.backend == "onnx" and onnx_p.model is None
    seen = set()
    for budget in (0.5, 0.75):
        torch_p.set_budget(budget)
        onnx_p.set_budget(budget)
        for batch in (r["x"], r["x"][:1], r["x"][:7]):  # dynamic batch size
            a, b = torch_p(batch), onnx_p(batch)
            seen |= set(a.exit.tolist())
            assert int((a.prediction != b.prediction).sum()) == 0
            assert int((a.exit != b.exit).sum()) == 0
            torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=0)
    assert len(seen) >= 2, "thresholds should spread samples over exits"


def test_build_model_rebuilds_the_modules_network():
    module = DMPOModule(**tiny_hparams(peft={"method": "vpt", "vpt_prompts": 2}))
    rebuilt = build_model(model_options(dict(module.hparams)))
    assert rebuilt.state_dict().keys() == module.model.state_dict().keys()
    assert math.isclose(rebuilt.num_exits, module.model.num_exits)


def test_thresholds_hashed_from_in_memory_weights_are_matched_against_the_checkpoint(tmp_path):
    r = make_run(tmp_path)
    th = json.loads(r["thresholds"].read_text())
    th["checkpoint_hash"] = checkpoint_hash(r["module"].model, None)  # `dmpo test` without a checkpoint file
    assert th["checkpoint_hash"].startswith("weights:")
    r["thresholds"].write_text(json.dumps(th))
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    assert json.loads((Path(out) / MANIFEST_FILE).read_text())["checkpoint_hash"] == th["checkpoint_hash"]
    other = make_run(tmp_path, "other", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="calibrated on another checkpoint"):
        export_artefact(str(tmp_path / "art2"), ckpt_path=str(other["ckpt"]), thresholds=str(r["thresholds"]))


def test_a_relative_backbone_checkpoint_path_is_found_from_another_working_directory(tmp_path, monkeypatch):
    _timm_weights_file(tmp_path / "vit.safetensors", seed=1)
    r = make_run(tmp_path, checkpoint_path="vit.safetensors")  # relative to the training cwd (tmp_path)
    out = export_artefact(str(tmp_path / "art"), run=str(r["run"]))
    elsewhere = tmp_path / "service"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = EarlyExitPredictor.load(out, budget=0.5)(r["x"])
    pred, exits, _ = simulated(r["module"].model, r["x"], EarlyExitPredictor.load(out).thresholds)
    assert torch.equal(got.prediction, pred) and torch.equal(got.exit, exits + 1)


NUM_IMAGES = 200


FIT_ARGS = [
    "fit",
    "-c",
    TINY_CONFIG,
    "--data.init_args.dataset=fashion_mnist_subset",
    "--data.init_args.calibration_size=300",
    "--data.init_args.train_subset=512",
    "--data.init_args.batch_size=64",
    "--data.init_args.eval_batch_size=500",
    "--data.init_args.train_augment=false",
    "--model.init_args.img_size=28",
    "--model.init_args.in_chans=1",
    "--model.init_args.backbone_kwargs={patch_size: 7, embed_dim: 32, depth: 4, num_heads: 2}",
    "--model.init_args.peft.method=full",
    "--evaluation.budgets=[0.5, 0.75, 1.0]",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=8",
    "--test_after_fit=true",
]


@pytest.mark.slow
def test_fit_test_export_predict_a_folder_of_pngs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    cli = main(FIT_ARGS)
    run = Path(cli.trainer.log_dir)
    art = tmp_path / "artefact"
    monkeypatch.setattr(sys, "argv", ["dmpo", "export", "--run", str(run), "--output", str(art), "--onnx"])
    console_main()
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    assert manifest["class_names"] == list(FASHION_MNIST_CLASSES)
    assert manifest["preprocessing"]["input_size"] == [1, 28, 28]

    # 200 test images as PNG files in nested folders
    images = load_fashion_mnist_subset().test_images[:NUM_IMAGES]
    folder = tmp_path / "new_images"
    for i, pixels in enumerate(images):
        sub = folder / f"part{i // 50}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(sub / f"img_{i:03d}.png")

    # the simulated protocol on the data module's own test images, with the same checkpoint and thresholds
    found = resolve_run(str(run))
    module = DMPOModule.load_from_checkpoint(found.ckpt_path, map_location="cpu").eval()
    view = cli.datamodule.split_dataset("test")
    x = torch.stack([view[i][IMAGE_KEY] for i in range(NUM_IMAGES)])
    with torch.no_grad():
        scores, preds = exit_scores(module(x), manifest["exit_rule"])
    cached = torch.load(run / "dmpo_test" / "exit_outputs.pt", weights_only=True)["test"]
    order = torch.argsort(cached["index"])[:NUM_IMAGES]
    torch.testing.assert_close(scores, cached["scores"][order], atol=1e-5, rtol=0)  # = what dmpo test saw
    thresholds = json.loads(Path(found.thresholds).read_text())["budgets"]

    spread = set()
    for backend in ("torch", "onnx"):
        predictor = EarlyExitPredictor.load(art, budget=0.5, backend=backend)
        for entry in thresholds:
            predictor.set_budget(entry["budget"])
            t = torch.tensor([float(v) for v in entry["thresholds"]], dtype=scores.dtype)
            exits = assign_exits(scores, t)
            expected = preds[torch.arange(NUM_IMAGES), exits]
            rows = list(predictor.predict_paths(folder, batch_size=64))
            assert len(rows) == NUM_IMAGES
            index = [int(Path(r.path).stem.split("_")[1]) for r in rows]
            assert sorted(index) == list(range(NUM_IMAGES))
            got_class = torch.tensor([r.class_index for r in rows])
            got_exit = torch.tensor([r.exit for r in rows])
            assert int((got_class != expected[index]).sum()) == 0, (backend, entry["budget"])
            assert int((got_exit != exits[index] + 1).sum()) == 0, (backend, entry["budget"])
            assert [r.class_name for r in rows] == [FASHION_MNIST_CLASSES[c] for c in got_class]
            costs = manifest["costs"]["exit_gflops"]
            assert [r.gflops for r in rows] == pytest.approx([costs[e - 1] for e in got_exit.tolist()])
            spread |= set(got_exit.tolist())
    assert len(spread) >= 2, "the calibrated budgets should use more than one exit"

    # the CSV command gives the same rows (budget 0.5)
    from dmpo_lightning.deploy.predict_cli import main as predict_main

    csv_path = tmp_path / "predictions.csv"
    assert predict_main([str(art), str(folder), "--output", str(csv_path), "--budget", "0.5"]) == 0
    predictor = EarlyExitPredictor.load(art, budget=0.5)
    expected_rows = list(predictor.predict_paths(folder))
    got_rows = read_predictions(str(csv_path))
    assert len(got_rows) == NUM_IMAGES and all(r.error is None for r in got_rows)
    assert got_rows == expected_rows
