"""The crafted pickles of tests/support/pickles.py are live: unpickled without restrictions, they run."""

from __future__ import annotations

import contextlib

import pytest
import torch
from support.pickles import torch_file


@pytest.mark.parametrize("kind", ["export", "checkpoint", "pickle"])
def test_the_payload_is_live(tmp_path, pickle_marker, kind):
    path = torch_file(tmp_path / "evil.bin", pickle_marker, kind)
    # unrestricted unpickling (a bare pickle then fails to be a torch archive, after its code ran)
    with contextlib.suppress(RuntimeError):
        torch.load(path, weights_only=False)
    assert pickle_marker.exists()
