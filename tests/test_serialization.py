"""serialization.py: the trainable-parameter export (``export_trainable`` / ``from_trainable``).

A safetensors file with JSON metadata: it round-trips, never overwrites, and any other file (a pickle renamed
to ``.safetensors``, the pickle-based format 1, a corrupt, truncated, foreign or newer export) is refused in
one sentence without being unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support.builders import TINY_MODULE
from support.pickles import torch_file

from dmpo_lightning import DMPOModule, __version__
from dmpo_lightning.serialization import TRAINABLE_FORMAT, TRAINABLE_FORMAT_VERSION

TINY = TINY_MODULE


@pytest.mark.parametrize("kind", ["export", "pickle"])
def test_from_trainable_refuses_a_pickle_renamed_to_safetensors(tmp_path, pickle_marker, kind):
    path = torch_file(tmp_path / "adapter.safetensors", pickle_marker, kind)
    content = r"named \.safetensors but its content is a (torch\.save archive|Python pickle)"
    with pytest.raises(ValueError, match=content):
        DMPOModule.from_trainable(str(path))
    assert not pickle_marker.exists()


@pytest.mark.parametrize("kind", ["export", "checkpoint", "pickle"])
def test_from_trainable_refuses_any_pickle_without_reading_it(tmp_path, pickle_marker, kind):
    path = torch_file(tmp_path / "adapter.pt", pickle_marker, kind)
    with pytest.raises(ValueError) as err:
        DMPOModule.from_trainable(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} is not a dmpo export of format version 2: it is a ")
    assert "the pickle-based .pt export of format version 1" in message and "\n" not in message
    assert "DMPOModule.load_from_checkpoint" in message
    assert "export_trainable('<name>.safetensors')" in message
    assert not pickle_marker.exists()


def randomised_module(seed: int = 1) -> DMPOModule:
    """The tiny module with its trainable parameters drawn at random (none left at their zero init)."""
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


@pytest.mark.usefixtures("unsafe_torch_default")
def test_export_is_safetensors_with_json_metadata(tmp_path):
    module = randomised_module()
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


@pytest.mark.usefixtures("unsafe_torch_default")
def test_overrides_replace_saved_hparams(tmp_path):
    path = tmp_path / "adapter.safetensors"
    module = randomised_module()
    module.hparams.schedule["ramp_epochs"] = 2  # saved; not among the overrides
    module.export_trainable(str(path))
    torch.manual_seed(1)
    restored = DMPOModule.from_trainable(str(path), schedule={"switch_epoch": 7})
    assert restored.hparams.schedule["switch_epoch"] == 7
    assert restored.hparams.schedule["ramp_epochs"] == 2  # the group's other fields are kept
    assert_same_outputs(module, restored)


@pytest.mark.usefixtures("unsafe_torch_default")
def test_export_never_overwrites_and_refuses_bad_paths_and_values(tmp_path):
    module = randomised_module()
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


@pytest.mark.usefixtures("unsafe_torch_default")
def test_corrupt_truncated_foreign_and_newer_exports_fail_clearly(tmp_path):
    good = tmp_path / "good.safetensors"
    randomised_module().export_trainable(str(good))
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


def test_export_trainable_round_trip_and_no_overwrite(tmp_path):
    torch.manual_seed(1)
    module = DMPOModule(**TINY)
    for p in module.model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    path = tmp_path / "dmpo.safetensors"
    module.export_trainable(str(path))
    size = path.stat().st_size
    full = sum(t.numel() for t in module.state_dict().values())
    saved = safetensors.torch.load_file(path)
    assert sum(t.numel() for t in saved.values()) < full
    assert all(
        ".peft_" in k or k.startswith(("model.exits.", "loss_weights", "exit_thresholds")) for k in saved
    )
    with pytest.raises(FileExistsError, match="exists"):
        module.export_trainable(str(path))
    assert path.stat().st_size == size
    torch.manual_seed(1)  # the random "pre-trained" trunk is rebuilt from the same seed
    restored = DMPOModule.from_trainable(str(path))
    x = torch.randn(2, 3, 32, 32)
    module.eval(), restored.eval()
    for a, b in zip(module(x), restored(x), strict=False):
        torch.testing.assert_close(a, b)


def test_from_trainable_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(ValueError, match=r"not a dmpo export of format version 2: it is a torch\.save"):
        DMPOModule.from_trainable(str(bad))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable dmpo export"):
        DMPOModule.from_trainable(str(junk))
    weights = tmp_path / "model.safetensors"  # a plain weights file, not an export
    safetensors.torch.save_file({"w": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match="not a dmpo trainable-parameter export"):
        DMPOModule.from_trainable(str(weights))
