"""``dmpo serve`` end to end: a real LitServe server in its own process, spoken to over HTTP on 127.0.0.1.

- predictions from concurrent clients (raw body, multipart, JSON batches, several budgets) equal
  ``EarlyExitPredictor.predict_paths`` on the same files: 0 class and 0 exit mismatches;
- every bad request (not an image, truncated, unsupported mode, non-finite pixels, oversized body, wrong
  content type, unknown budget, malformed JSON or form) gets a 4xx with one sentence, and the next request
  is served;
- SIGTERM, or Ctrl-C to the process group, with requests in flight: every one is answered, then the
  server exits with status 0, having written nothing to its working folder.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.runs import make_run

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.predictor import EarlyExitPredictor

pytest.importorskip("litserve", reason="dmpo serve needs the [serve] extra (litserve)")
pytest.importorskip("python_multipart", reason="dmpo serve needs the [serve] extra (python-multipart)")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def png(seed: int, size: int = SIZE, mode: str = "RGB") -> bytes:
    rng = np.random.RandomState(seed)
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    buffer = io.BytesIO()
    Image.fromarray((rng.rand(*shape) * 255).astype("uint8"), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m dmpo_lightning.serve`` in a subprocess, in an empty working folder."""

    def __init__(self, artefact: str, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir.parent / f"{workdir.name}.log", "w")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "dmpo_lightning.serve", artefact, "--port", str(self.port)]
        cmd += ["--device", "cpu", "--threads", "1", "--log-level", "warning", *extra]
        # its own process group, as a shell gives a command (Ctrl-C reaches all of it)
        self.proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not become healthy in 90 s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.workdir.parent / f"{self.workdir.name}.log").read_text()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, body: bytes, content_type: str | None, path: str = "/predict"):
        headers = {} if content_type is None else {"Content-Type": content_type}
        status, data = self.request("POST", path, body, headers)
        return status, json.loads(data)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def multipart(files: list[tuple[str, bytes]], fields: dict | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    for key, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("serve_http")
    r = make_run(tmp, quantiles=(0.4, 0.7))
    return export_artefact(str(tmp / "art"), run=str(r["run"]))


@pytest.mark.slow  # starts a LitServe server (a worker process importing torch) and sends ~60 requests
def test_served_predictions_equal_the_predictor_and_bad_requests_do_not_stop_the_server(artefact, tmp_path):
    images = {f"img_{i:02d}.png": png(i, mode="L" if i % 5 == 0 else "RGB") for i in range(24)}
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in images.items():
        (folder / name).write_bytes(data)
    predictor = EarlyExitPredictor.load(artefact, budget=0.5)
    expected = {}
    for budget in (0.5, 0.75):
        predictor.set_budget(budget)
        expected[budget] = {Path(r.path).name: r for r in predictor.predict_paths(str(folder))}

    server = Server(artefact, tmp_path / "cwd", "--max-batch-size", "8", "--batch-timeout", "0.02",
                    "--max-body-mb", "0.25")  # fmt: skip
    try:
        # concurrent clients, three body kinds, two budgets
        names = sorted(images)
        answers: dict[tuple[str, float], dict] = {}
        failures: list = []

        def client(i: int) -> None:
            budget = 0.5 if i % 2 == 0 else 0.75
            mine = names[i::4]
            try:
                if i % 4 == 0:  # one raw body per image
                    for n in mine:
                        status, body = server.post(images[n], "image/png", f"/predict?budget={budget}")
                        assert status == 200, body
                        answers[(n, budget)] = body["predictions"][0]
                elif i % 4 == 1:  # one multipart form with all its files
                    body, ctype = multipart([(n, images[n]) for n in mine], {"budget": budget})
                    status, out = server.post(body, ctype)
                    assert status == 200, out
                    for row in out["predictions"]:
                        answers[(row["path"], budget)] = row
                else:  # JSON batches
                    payload = {
                        "images": [base64.b64encode(images[n]).decode() for n in mine],
                        "budget": budget,
                    }
                    status, out = server.post(json.dumps(payload).encode(), "application/json")
                    assert status == 200, out
                    for n, row in zip(mine, out["predictions"], strict=True):
                        answers[(n, budget)] = row
            except Exception as err:  # reported below, with the server log
                failures.append(err)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, (failures, server.output()[-3000:])
        assert len(answers) == 24
        mismatches = 0
        for (name, budget), row in answers.items():
            ref = expected[budget][name]
            mismatches += row["class_index"] != ref.class_index
            mismatches += row["exit"] != ref.exit
            assert row["class_name"] == ref.class_name and row["gflops"] == ref.gflops
            assert abs(row["confidence"] - ref.confidence) < 1e-5 and abs(row["score"] - ref.score) < 1e-5
        assert mismatches == 0
        assert len({row["exit"] for row in answers.values()}) >= 2, "thresholds should spread the exits"

        # bad requests: a 4xx with one sentence each, and the server keeps serving
        nan_tiff, out_of_range = io.BytesIO(), io.BytesIO()
        Image.new("F", (SIZE, SIZE), float("nan")).save(nan_tiff, format="TIFF")
        Image.new("I", (SIZE, SIZE), -5).save(out_of_range, format="TIFF")  # 32-bit ints below 0
        good = images[names[0]]
        bad = [
            ("not an image", b"GIF89a but not really", "image/gif", 400),
            ("truncated", good[: len(good) // 2], "image/png", 422),
            ("non-finite pixels", nan_tiff.getvalue(), "image/tiff", 422),
            ("unsupported mode", out_of_range.getvalue(), "image/tiff", 422),
            ("wrong size", png(99, size=40), "image/png", 422),
            ("oversized body", b"\x89PNG" + os.urandom(300_000), "image/png", 413),
            ("wrong content type", good, "text/plain", 415),
            ("no content type", good, None, 415),
            ("unknown budget", good, "image/png?budget=0.6", 400),
            ("malformed JSON", b'{"images": [', "application/json", 400),
            ("JSON of the wrong shape", b"[1, 2]", "application/json", 400),
            ("bad base64", b'{"images": ["***"]}', "application/json", 400),
            ("empty body", b"", "image/png", 400),
        ]
        for name, body, ctype, status in bad:
            path = "/predict"
            if ctype and "?" in ctype:
                ctype, query = ctype.split("?")
                path += "?" + query
            got, out = server.post(body, ctype, path)
            assert got == status, (name, got, out)
            detail = out["detail"]
            assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, (
                name,
                detail,
            )
            again, out = server.post(good, "image/png")
            assert (
                again == 200 and out["predictions"][0]["class_index"] == expected[0.5][names[0]].class_index
            )
        form, ctype = multipart([("a.png", good)])
        got, out = server.post(form[: len(form) // 2], ctype)  # a form cut in the middle
        assert got == 400 and "\n" not in out["detail"], out
        assert server.post(good, "image/png")[0] == 200

        status, info = server.get("/info")
        info = json.loads(info)["model"]
        assert status == 200 and info["class_names"] == predictor.class_names
        assert info["budgets"] == [0.5, 0.75] and info["exit_rule"] == "confidence"
        assert info["costs"]["exit_gflops"] == predictor.exit_gflops
        assert info["preprocessing"]["input_size"] == [3, SIZE, SIZE] and info["package_version"]
        assert server.get("/health")[0] == 200
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    assert list((tmp_path / "cwd").iterdir()) == [], "the server wrote into its working folder"


@pytest.mark.slow  # starts a LitServe server
@pytest.mark.parametrize("stop", ["sigterm", "ctrl_c"])
def test_a_stop_signal_answers_every_request_in_flight_then_exits(artefact, tmp_path, stop):
    """SIGTERM to the server process, or SIGINT to its whole process group as Ctrl-C in a terminal sends."""
    server = Server(artefact, tmp_path / "cwd", "--max-batch-size", "16")
    payload = json.dumps({"images": [base64.b64encode(png(i)).decode() for i in range(48)]}).encode()
    results: list = []

    def client() -> None:
        try:
            status, out = server.post(payload, "application/json")
            results.append((status, len(out.get("predictions", []))))
        except Exception as err:
            results.append(err)

    try:
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # the requests are sent and being served
        if stop == "sigterm":
            server.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(server.proc.pid, signal.SIGINT)
        for t in threads:
            t.join()
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()
    assert results == [(200, 48)] * 8, (results, server.output()[-3000:])
    assert "Traceback" not in server.output(), server.output()[-3000:]
    with pytest.raises(OSError):
        server.get("/health")
    assert list((tmp_path / "cwd").iterdir()) == []
