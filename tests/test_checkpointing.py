"""checkpointing.py: the checkpoint-identity hashes, the architecture check and the safe checkpoint loader.

``DMPOModule.load_from_checkpoint`` reads a checkpoint with ``weights_only=True`` only: a crafted checkpoint
(Python objects, a named instantiator) is refused before any of its code runs, and a module trained from a
backbone weights file reloads without that file.
"""

import json
import pickle
import warnings
from pathlib import Path

import pytest
import timm
import torch
from support.builders import ONE_EPOCH, TINY_CONFIG, TINY_MODULE, make_tiny_vit
from support.pickles import torch_file

from dmpo_lightning import DMPOModule, checkpointing
from dmpo_lightning.cli import main
from dmpo_lightning.constants import THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
from dmpo_lightning.evaluation.thresholds import load_thresholds
from dmpo_lightning.models.adapters import PeftOptions
from dmpo_lightning.models.multi_exit import ExitOptions, MultiExitViT


def tiny_model() -> MultiExitViT:
    torch.manual_seed(0)
    return MultiExitViT(
        make_tiny_vit(),
        3,
        ExitOptions(blocks=(2, 4), moment_dim=16),
        PeftOptions("adaptformer", adapter_dim=4),
    )


def test_weights_hash_is_the_same_for_the_same_trained_weights_however_loaded():
    model = tiny_model()
    torch.manual_seed(1)
    other = MultiExitViT(
        make_tiny_vit(),
        3,
        ExitOptions(blocks=(2, 4), moment_dim=16),
        PeftOptions("adaptformer", adapter_dim=4),
    )
    assert checkpointing.weights_hash(other) != checkpointing.weights_hash(model)
    other.load_state_dict(model.trainable_state_dict(), strict=False)
    assert checkpointing.weights_hash(other) == checkpointing.weights_hash(model)


def test_weights_hash_follows_trained_weights_only():
    model = tiny_model()
    before = checkpointing.weights_hash(model)
    assert before.startswith("weights:")
    frozen = next(p for p in model.backbone.parameters() if not p.requires_grad)
    with torch.no_grad():
        frozen.add_(1.0)
    assert checkpointing.weights_hash(model) == before  # the frozen trunk is not part of what was trained
    trained = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        trained.add_(1.0)
    assert checkpointing.weights_hash(model) != before


def test_checkpoint_hash_is_the_file_hash_when_the_file_exists(tmp_path):
    model = tiny_model()
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"abc")
    file_hash = checkpointing.checkpoint_hash(model, str(path))
    assert (
        file_hash == "file:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )  # sha256("abc")
    assert checkpointing.checkpoint_hash(model, str(tmp_path / "missing.ckpt")) == checkpointing.weights_hash(
        model
    )
    assert checkpointing.weight_hashes(model, str(path)) == [checkpointing.weights_hash(model), file_hash]
    assert checkpointing.weight_hashes(model, None) == [checkpointing.weights_hash(model)]


def test_check_architecture_names_both_values():
    model = tiny_model()
    check = checkpointing.check_architecture
    with pytest.raises(
        ValueError, match=r"with exits.blocks=\[1, 4\] but this model has exits.blocks=\[2, 4\]"
    ):
        check({"exits": {"blocks": [1, 4]}}, {"exits.blocks": [2, 4]}, model.backbone)
    # a count is resolved against the trunk's depth before comparing: 2 = the last two blocks
    check({"exits": {"blocks": 2}}, {"exits.blocks": [3, 4]}, model.backbone)
    with pytest.raises(ValueError, match=r"with peft.method='lora' but this model has peft.method='vpt'"):
        check({"peft": {"method": "lora"}}, {"peft.method": "vpt"}, model.backbone)


def _lightning_file(tmp_path) -> str:
    """A file that passes the checkpoint pre-check (the loader under test is faked)."""
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, path)
    return str(path)


def test_load_checkpoint_safely_refuses_pickled_objects_in_one_sentence(tmp_path):
    def load(path, *args, **kwargs):
        assert kwargs["weights_only"] is True
        assert checkpointing.restoring_from_checkpoint()
        raise pickle.UnpicklingError("Weights only load failed. Unsupported global: GLOBAL os.system")

    with pytest.raises(ValueError, match="holds Python objects other than tensors and plain values"):
        checkpointing.load_checkpoint_safely(load, [_lightning_file(tmp_path)], {})
    assert not checkpointing.restoring_from_checkpoint()


def test_load_checkpoint_safely_checks_the_file_before_loading(tmp_path):
    def load(path, *args, **kwargs):
        raise AssertionError("not reached")

    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*missing\.ckpt' does not exist"):
        checkpointing.load_checkpoint_safely(load, [str(tmp_path / "missing.ckpt")], {})
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*' is a folder, not a checkpoint file"):
        checkpointing.load_checkpoint_safely(load, [str(tmp_path)], {})


def test_load_checkpoint_safely_applies_the_backbone_checkpoint_path_override(tmp_path):
    class Loaded:
        def __init__(self) -> None:
            self.hparams = {"checkpoint_path": "old.pth"}

    loaded = checkpointing.load_checkpoint_safely(
        lambda path, **kw: Loaded(), [_lightning_file(tmp_path)], {"checkpoint_path": None}
    )
    assert loaded.hparams["checkpoint_path"] is None


def test_thresholds_of_another_architecture_name_the_option_as_users_write_it(tmp_path):
    path = tmp_path / "thresholds.json"
    header = {"format": THRESHOLDS_FORMAT, "format_version": THRESHOLDS_FORMAT_VERSION}
    path.write_text(json.dumps({**header, "fingerprint": {"exits.blocks": [1, 4]}}))
    with pytest.raises(ValueError, match=r"another model \(exits\.blocks: file \[1, 4\] vs model \[2, 4\]\)"):
        load_thresholds(str(path), 0.5, {"exits.blocks": [2, 4]})


@pytest.mark.parametrize("weights_only", ["default", None, True])
def test_load_from_checkpoint_refuses_a_crafted_ckpt(tmp_path, pickle_marker, weights_only):
    path = torch_file(tmp_path / "evil.ckpt", pickle_marker, "checkpoint")
    kwargs = {} if weights_only == "default" else {"weights_only": weights_only}
    with pytest.raises(ValueError, match=r"checkpoint .*evil\.ckpt was not loaded: it holds Python objects"):
        DMPOModule.load_from_checkpoint(str(path), **kwargs)
    assert not pickle_marker.exists()


@pytest.mark.usefixtures("unsafe_torch_default")
def test_load_from_checkpoint_does_not_run_a_named_instantiator(tmp_path):
    """weights_only=True is not enough on Lightning < 2.6.6: hparams could name a function to call."""
    path = tmp_path / "instantiator.ckpt"
    hparams = {**TINY_MODULE, "_instantiator": "support.pickles.evil_instantiator"}
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"}, path)
    with pytest.raises(ValueError, match="not in the allowlist of trusted instantiators"):
        DMPOModule.load_from_checkpoint(str(path))
    assert not (tmp_path / "instantiator_ran").exists()


def test_load_from_checkpoint_refuses_unrestricted_unpickling_before_reading(
    tmp_path, pickle_marker, monkeypatch
):
    path = torch_file(tmp_path / "evil.ckpt", pickle_marker, "checkpoint")
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(k) or real_load(*a, **k))
    with pytest.raises(ValueError, match=r"weights_only must be true: checkpoints are read only with torch"):
        DMPOModule.load_from_checkpoint(str(path), weights_only=False)
    assert reads == [] and not pickle_marker.exists()


@pytest.mark.slow
def test_a_checkpoint_trained_from_a_weights_file_is_tested_offline_after_the_file_moved(tmp_path, capsys):
    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, embed_dim=32,
        depth=4, num_heads=2, mlp_ratio=2.0,
    )  # fmt: skip
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    cli = main(["fit", "-c", TINY_CONFIG, *ONE_EPOCH, f"--model.init_args.checkpoint_path={weights}"])
    (ckpt,) = (Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert trained["model.backbone.patch_embed.proj.weight"].equal(backbone.patch_embed.proj.weight)
    weights.unlink()  # moved, and no network (HF_HUB_OFFLINE=1)

    for module in (
        DMPOModule.load_from_checkpoint(ckpt),
        DMPOModule.load_from_checkpoint(ckpt, checkpoint_path=None),
        DMPOModule.load_from_checkpoint(checkpoint_path=ckpt, map_location="cpu"),
    ):
        state = module.state_dict()
        assert all(state[k].equal(v) for k, v in trained.items())
    assert DMPOModule.load_from_checkpoint(ckpt, checkpoint_path=None).hparams.checkpoint_path is None
    assert DMPOModule.load_from_checkpoint(ckpt).hparams.checkpoint_path == str(weights)

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [
                "test",
                "-c",
                TINY_CONFIG,
                f"--ckpt_path={ckpt}",
                f"--evaluation.report_dir={tmp_path / 'r'}",
            ]
        )
    assert (tmp_path / "r" / "report.json").is_file()
    # test needs neither the fit-only callbacks' states (no warning asking for them) ...
    assert not [w for w in caught if "Please add the following callbacks" in str(w.message)]
    # ... and dmpo test prints its own report, not Lightning's table of repeated per-loader columns
    out = capsys.readouterr().out
    assert "DataLoader 0" not in out and "DataLoader 1" not in out
    assert "Anytime prediction" in out
