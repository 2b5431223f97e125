"""Crafted files for the tests of every loader: pickles that run code when unpickled.

A loader must refuse each with a clear message before its code runs; the code here only creates a marker
file (``pickle_marker`` in conftest), a stand-in for anything an attacker wants to run.
``tests/test_support_pickles.py`` shows that the same files do create the marker when unpickled without
restrictions, so the loader tests can fail.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from support.builders import TINY_MODULE


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


def torch_file(path: Path, marker: Path, kind: str) -> Path:
    """A crafted file: ``kind`` is a pickle-based export (format 1), a checkpoint or a bare pickle."""
    if kind == "export":
        hparams = {"x": Payload(marker)}
        torch.save({"format": "dmpo-trainable-v1", "hyper_parameters": hparams, "state_dict": {}}, path)
    elif kind == "checkpoint":
        payload = {
            "state_dict": {"loss_weights": torch.ones(4)},
            "hyper_parameters": {**TINY_MODULE, "num_classes": Payload(marker)},
            "pytorch-lightning_version": "2.6.6",
        }
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))  # the protocol torch.save uses
    return path
