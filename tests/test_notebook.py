"""The quickstart notebook runs end to end (nbclient), offline, in quick mode (a few training batches)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _outputs(nb, output_type: str | None = None) -> list[dict]:
    return [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if output_type is None or out.get("output_type") == output_type
    ]


def _text(nb) -> str:
    parts = []
    for out in _outputs(nb):
        if "text" in out:
            parts.append(out["text"])
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_committed_notebook_has_cleared_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cell"
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quickstart_notebook_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DMPO_NOTEBOOK_QUICK", "1")  # a few training batches instead of 4 epochs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp() lands here
    # one intra-op thread in the kernel: the model is tiny, and on a shared CI machine two threads on two busy
    # cores wait on each other (several times slower, measured)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    errors = _outputs(nb, "error")
    assert not errors, errors
    text = _text(nb)
    assert "quick mode: True" in text
    assert "thresholds for budget 0.5" in text
    assert "test accuracy with real early exit" in text
    # the report plot and the matplotlib grid are both displayed as PNG
    pngs = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2, f"expected the accuracy-vs-FLOPs plot and the image grid, got {len(pngs)} images"
    reports = list(tmp_path.glob("dmpo_quickstart_*/report/thresholds.json"))
    assert len(reports) == 1, "the report was not written under the test's temporary folder"
    print(f"notebook executed in {elapsed:.1f} s")
