"""The packaged toy trunk ``dmpo_toy_vit_fmnist`` and the quickstart that tunes it.

Checks: the fp16 weights ship inside the package and load, bit for bit, through ``pretrained: true``
(alone and inside ``DMPOModule``); a module rebuilt from its own checkpoint never reads the file; the
pre-training images exclude the embedded subset exactly, by index; the pre-training normalisation equals
the data module's; ``configs/quickstart.yaml`` builds a frozen trunk whose only trainable parameters are
adapters, bypasses and exit heads; ``dmpo test``'s printed summary puts each budget's accuracy next to the
full model's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dmpo_lightning.cli import main
from dmpo_lightning.data import fashion_mnist
from dmpo_lightning.data.transforms import build_transform, resolve_data_config
from dmpo_lightning.evaluation.report import build_report, format_report_table
from dmpo_lightning.models import toy_backbone
from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.module import DMPOModule, weights_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
WEIGHTS = Path(toy_backbone.toy_trunk_file())


def _script():
    """Import benchmarks/make_toy_trunk.py (not a package)."""
    if "make_toy_trunk" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "make_toy_trunk", ROOT / "benchmarks" / "make_toy_trunk.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["make_toy_trunk"] = module
    return sys.modules["make_toy_trunk"]


def _meta() -> dict:
    with safe_open(str(WEIGHTS), framework="pt") as f:
        return json.loads(f.metadata()["dmpo_toy_trunk"])


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone state with PEFT wrappers' ``base_layer`` path segments removed (timm's own names)."""
    return {k.replace(".base_layer", ""): v for k, v in state.items()}


def test_packaged_weights_are_small_fp16_and_documented():
    assert WEIGHTS.is_file(), "run benchmarks/make_toy_trunk.py"
    assert WEIGHTS.stat().st_size < 4 * 1024 * 1024
    state = load_file(str(WEIGHTS))
    assert {v.dtype for v in state.values()} == {torch.float16}
    arch = timm.create_model(toy_backbone.TOY_TRUNK_NAME, pretrained=False, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in arch.items()}
    meta = _meta()
    assert meta["command"].startswith("python benchmarks/make_toy_trunk.py")
    assert meta["arch"] == toy_backbone.TOY_TRUNK_ARCH
    notice = (WEIGHTS.parent / "TOY_TRUNK_NOTICE.txt").read_text()
    assert meta["command"] in notice and "MIT" in notice


def test_timm_name_resolves_to_the_packaged_file_and_its_data_config():
    assert f"{toy_backbone.TOY_TRUNK_NAME}.{toy_backbone.TOY_TRUNK_TAG}" in timm.list_pretrained("dmpo_toy*")
    cfg = timm.get_pretrained_cfg(toy_backbone.TOY_TRUNK_NAME)
    assert Path(cfg.file).resolve() == WEIGHTS.resolve()
    data = resolve_data_config(in_chans=1, default_image_size=28, timm_model=toy_backbone.TOY_TRUNK_NAME)
    assert (data.image_size, data.mean, data.std, data.crop_pct) == (
        28,
        toy_backbone.TOY_TRUNK_MEAN,
        toy_backbone.TOY_TRUNK_STD,
        1.0,
    )


def test_pretrained_backbone_equals_the_packaged_weights():
    stored = load_file(str(WEIGHTS))
    for name in (toy_backbone.TOY_TRUNK_NAME, f"{toy_backbone.TOY_TRUNK_NAME}.{toy_backbone.TOY_TRUNK_TAG}"):
        loaded = build_backbone(name, pretrained=True, img_size=28, in_chans=1).state_dict()
        assert set(loaded) == set(stored)
        assert all(torch.equal(loaded[k], v.float()) for k, v in stored.items())
    random = build_backbone(toy_backbone.TOY_TRUNK_NAME, pretrained=False, img_size=28, in_chans=1)
    assert not torch.equal(
        random.state_dict()["blocks.0.attn.qkv.weight"], stored["blocks.0.attn.qkv.weight"].float()
    )


def test_normalisation_of_pre_training_equals_the_data_module_transform():
    from PIL import Image

    images = fashion_mnist.load_fashion_mnist_subset().test_images[:4]
    cfg = resolve_data_config(in_chans=1, default_image_size=28, timm_model=toy_backbone.TOY_TRUNK_NAME)
    transform = build_transform(cfg, in_chans=1, train=False, native_size=28)
    expected = torch.stack([transform(Image.fromarray(np.asarray(im))) for im in images])
    torch.testing.assert_close(_script().normalise(images), expected, rtol=0, atol=1e-6)


def test_pre_training_indices_exclude_the_embedded_subset_exactly():
    blob = np.load(ROOT / "src/dmpo_lightning/data" / fashion_mnist.SUBSET_ASSET)
    for split, total in (("train", 60000), ("test", 10000)):
        taken = blob[f"{split}_source_indices"].astype(np.int64)
        outside = fashion_mnist.indices_outside_subset(split, total)
        assert len(outside) == total - len(taken) == total - len(np.unique(taken))
        assert np.intersect1d(outside, taken).size == 0
        assert np.array_equal(np.union1d(outside, taken), np.arange(total))
    with pytest.raises(ValueError, match="outside a train split of 100"):
        fashion_mnist.indices_outside_subset("train", 100)
    # the shipped weights were trained on exactly these indices
    digest = hashlib.sha256(
        fashion_mnist.indices_outside_subset("train", 60000).tobytes()
        + fashion_mnist.indices_outside_subset("test", 10000).tobytes()
    ).hexdigest()
    meta = _meta()
    assert (meta["num_train"], meta["num_test"], meta["indices_sha256"]) == (50000, 8000, digest)


@pytest.mark.skipif(
    fashion_mnist.default_root() is None, reason="needs the Debian package dataset-fashion-mnist"
)
def test_subset_indices_are_those_of_the_full_files():
    full = fashion_mnist.load_fashion_mnist(fashion_mnist.DEBIAN_FASHION_MNIST_DIR)
    subset = fashion_mnist.load_fashion_mnist_subset()
    outside = fashion_mnist.indices_outside_subset("train", len(full.train_labels))
    inside = np.setdiff1d(np.arange(len(full.train_labels)), outside)
    assert np.array_equal(full.train_images[inside], subset.train_images)
    assert np.array_equal(full.train_labels[inside], subset.train_labels)


def test_quickstart_builds_a_frozen_pretrained_trunk_with_adapters_and_heads():
    cli = main(["-c", str(QUICKSTART)], run=False)
    h = cli.model.hparams
    assert (h.backbone, h.pretrained, h.checkpoint_path, h.peft["method"]) == (
        toy_backbone.TOY_TRUNK_NAME,
        True,
        None,
        "adaptformer",
    )
    assert h.exits["bypass"] and h.exits["early_head"] == "moment"
    assert h.schedule["weight_phase1"] != h.schedule["weight_phase2"]
    assert cli.model.exit_options.bypass and cli.model.peft_options.method == "adaptformer"
    assert cli.datamodule.hparams.dataset == "fashion_mnist_subset"
    assert cli.datamodule.data_config.mean == toy_backbone.TOY_TRUNK_MEAN
    model = cli.model.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("exits.") or ".peft_" in n for n in trainable), trainable
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if ".peft_" not in n)
    stored = load_file(str(WEIGHTS))
    trunk = _unwrapped({k: v for k, v in model.backbone.state_dict().items() if ".peft_" not in k})
    assert set(trunk) == set(stored)
    assert all(torch.equal(trunk[k], v.float()) for k, v in stored.items())


def test_checkpoint_rebuild_does_not_read_the_weights_file(monkeypatch, tmp_path):
    kwargs = dict(
        backbone=toy_backbone.TOY_TRUNK_NAME, pretrained=True, img_size=28, in_chans=1,
        exits={"blocks": [4, 8], "moment_dim": 16}, peft={"adapter_dim": 4},
    )  # fmt: skip
    module = DMPOModule(**kwargs)
    ckpt = tmp_path / "toy.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "pytorch-lightning_version": "2.5.0"},
        ckpt,
    )  # fmt: skip

    def refuse(*args, **kwargs):
        raise AssertionError("the packaged weights file was read")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    with pytest.raises(AssertionError, match="was read"):
        DMPOModule(**kwargs)  # the guard works: a fresh module does read the file
    with weights_from_checkpoint():
        DMPOModule(**kwargs)
    loaded = DMPOModule.load_from_checkpoint(ckpt)
    assert loaded.hparams.pretrained is True
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in module.state_dict().items())


def test_printed_summary_puts_each_budget_next_to_the_full_model():
    from dmpo_lightning.evaluation.protocol import budgeted_curve, operating_points, search_qs

    g = torch.Generator().manual_seed(0)
    scores, correct = torch.rand(200, 3, generator=g), torch.rand(200, 3, generator=g) < 0.7
    costs, full = [1.0, 2.0, 4.1], 4.0
    points = operating_points(scores, correct, scores, correct, costs, full, [0.5, 1.0], qs=search_qs(50))
    report = build_report(
        costs=costs,
        full_cost=full,
        anytime_top1=correct.double().mean(0),
        curve=budgeted_curve(scores, correct, scores, correct, costs, full),
        operating_points=points,
        full_accuracy=0.75,
    )
    table = format_report_table(report)
    assert "What early exit buys" in table
    for p in points:
        row = next(
            line
            for line in table.splitlines()
            if "FLOPs saved" not in line and f"{100 * p.test_accuracy:.2f}" in line and "75.00" in line
        )
        assert f"{100 * (p.test_accuracy - 0.75):+.2f}" in row
        assert f"{100 * (1 - p.test_cost / full):.1f}" in row
    no_full = build_report(costs=costs, full_cost=full, anytime_top1=[0.5, 0.6, 0.7], operating_points=points)
    assert "What early exit buys" not in format_report_table(no_full)


def test_an_artefact_of_the_toy_trunk_loads_offline_without_embedding_the_trunk(tmp_path):
    from dmpo_lightning.constants import THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
    from dmpo_lightning.deploy.export import export_artefact
    from dmpo_lightning.deploy.format import MANIFEST_FILE
    from dmpo_lightning.deploy.predictor import EarlyExitPredictor
    from dmpo_lightning.files import file_sha256

    torch.manual_seed(0)
    module = DMPOModule(
        backbone=toy_backbone.TOY_TRUNK_NAME, pretrained=True, img_size=28, in_chans=1,
        exits={"blocks": [4, 8], "moment_dim": 16}, peft={"adapter_dim": 4},
    )  # fmt: skip
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "dmpo_test").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    dm = {
        "dataset": "fashion_mnist_subset",
        "image_size": 28,
        "in_chans": 1,
        "timm_model": module.hparams.backbone,
    }
    module.train_steps.fill_(3)  # stands for a tuned run
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "datamodule_hyper_parameters": dm, "global_step": 4, "pytorch-lightning_version": "2.6.6"},
        ckpt,
    )  # fmt: skip
    (run / "dmpo_test" / "thresholds.json").write_text(
        json.dumps(
            {
                "format": THRESHOLDS_FORMAT,
                "format_version": THRESHOLDS_FORMAT_VERSION,
                "rule": "confidence",
                "fingerprint": module.model_fingerprint(),
                "checkpoint_hash": f"file:{file_sha256(str(ckpt))}",
                "budgets": [
                    {
                        "budget": 0.75,
                        "unit": "fraction",
                        "thresholds": [0.5, "-inf"],
                        "cal_cost_fraction": 0.7,
                    }
                ],
            }
        )
    )
    out = Path(export_artefact(str(tmp_path / "art"), run=str(run)))
    reference = json.loads((out / MANIFEST_FILE).read_text())["weights"]["reference"]
    assert reference["timm_name"] == toy_backbone.TOY_TRUNK_NAME and reference["pretrained"]
    x = torch.randn(8, 1, 28, 28)
    got = EarlyExitPredictor.load(out, budget=0.75)(x)  # the packaged file, not a download
    module.eval()
    with torch.no_grad():
        expected = module.model(x)[-1]
    late = got.exit == 1
    torch.testing.assert_close(got.logits[late], expected[late], atol=1e-5, rtol=0)
