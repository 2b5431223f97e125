"""Serving without a running server: request checks, the engine over requests, LitServe's loop, the CLI.

The server's predictions must equal ``EarlyExitPredictor``'s for the same images (0 mismatches), requests at
different budgets must not mix, and every bad request must be refused with its status and one sentence
without disturbing the other requests of its batching window. The end-to-end runs of a real server (HTTP,
SIGTERM) are in tests/test_serve_http.py.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
from pathlib import Path
from queue import Queue

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from support.early_exit import record_stage_calls
from support.runs import make_run

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.images import decode_image as decode
from dmpo_lightning.predictions import PREDICTION_COLUMNS
from dmpo_lightning.serve.batcher import RequestBatcher, prediction_rows
from dmpo_lightning.serve.payload import (
    FULL,
    BadRequest,
    Limits,
    Payload,
    decode_image,
    images_from_json,
    match_budget,
)

SIZE = 32  # the tiny test model takes 32x32 images as they are (no resize step)


def png(seed: int, size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> bytes:
    rng = np.random.RandomState(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    image = Image.fromarray((rng.rand(*shape) * 255).astype("uint8"), mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("serve")
    r = make_run(tmp, quantiles=(0.4, 0.7))
    return export_artefact(str(tmp / "art"), run=str(r["run"]), onnx=True)


@pytest.fixture(scope="module")
def predictor(artefact) -> EarlyExitPredictor:
    return EarlyExitPredictor.load(artefact, budget=0.5)


def expected(predictor: EarlyExitPredictor, images: list[bytes], budget: float):
    """What the predictor answers for these files at ``budget`` (its own decoding and preprocessing)."""
    predictor.set_budget(budget)
    x = torch.stack([predictor.transform(decode(b).image) for b in images])
    return predictor(x)


# ------------------------------------------------------------------------------------------- payload
def test_budget_must_be_one_the_artefact_was_calibrated_for():
    assert match_budget("0.5", [0.5, 0.75]) == 0.5
    assert match_budget(0.75, [0.5, 0.75]) == 0.75
    assert match_budget(" Full ", [0.5]) == FULL
    for bad, status in (("0.6", 400), ("cheap", 400), (True, 400), ("nan", 400), (None, 400)):
        with pytest.raises(BadRequest) as err:
            match_budget(bad, [0.5, 0.75])
        assert err.value.status == status and "\n" not in err.value.message
    with pytest.raises(BadRequest, match=r"one of \[0.5, 0.75\] or 'full'"):
        match_budget(0.6, [0.5, 0.75])


def test_json_batches_are_checked_before_any_image_is_decoded():
    limits = Limits(max_images=2)
    one = base64.b64encode(b"abc").decode()
    assert images_from_json({"images": [one], "budget": 0.5}, limits) == ([b"abc"], 0.5)
    assert images_from_json({"image": one}, limits) == ([b"abc"], None)
    cases = {
        "list": ([one], 400, "must be an object"),
        "no images": ({"budget": 0.5}, 400, 'no "images"'),
        "empty": ({"images": []}, 400, "non-empty list"),
        "not a list": ({"images": one}, 400, "non-empty list"),
        "number": ({"images": [3]}, 400, "image 0 is a JSON int"),
        "not base64": ({"images": ["%%%"]}, 400, "not valid base64"),
        "too many": ({"images": [one] * 3}, 413, "at most 2"),
        "unknown": ({"images": [one], "threshold": 0.1}, 400, "unknown JSON field"),
        "both": ({"images": [one], "image": one}, 400, "not both"),
    }
    for name, (body, status, text) in cases.items():
        with pytest.raises(BadRequest, match=text) as err:
            images_from_json(body, limits)
        assert err.value.status == status, name


def test_image_decoding_refuses_each_bad_file_with_its_status(predictor):
    t = predictor.transform
    good = decode_image(png(0), t, max_pixels=10_000)
    assert good.shape == (3, SIZE, SIZE) and torch.isfinite(good).all()
    grey = decode_image(png(1, mode="L"), t, max_pixels=10_000)
    assert grey.shape == (3, SIZE, SIZE)  # replicated to the model's 3 channels, as in training

    def tiff(mode, value):
        buffer = io.BytesIO()
        Image.new(mode, (SIZE, SIZE), value).save(buffer, format="TIFF")
        return buffer.getvalue()

    sixteen = decode_image(tiff("I;16", 65535), t, max_pixels=10_000)  # scaled to white, not clipped
    assert torch.equal(sixteen, decode_image(tiff("L", 255), t, max_pixels=10_000))
    cases = {
        "empty": (b"", 400, "the image is empty"),
        "text": (b"hello, I am not an image", 400, "not an image file"),
        "truncated": (png(0)[:200], 422, "truncated"),
        "NaN pixels": (tiff("F", float("nan")), 422, "not finite numbers"),
        "float out of range": (tiff("F", 3.0), 422, r"float images must hold values in \[0, 1\]"),
        "other size": (png(0, size=(40, 30)), 422, r"the image is 40x30 px .* resize it to 32x32"),
        "too many pixels": (png(0, size=(200, 100)), 413, r"200x100 = 20,000 pixels; at most 10,000"),
    }
    for name, (data, status, text) in cases.items():
        with pytest.raises(BadRequest, match=text) as err:
            decode_image(data, t, max_pixels=10_000)
        assert err.value.status == status, name
        assert "\n" not in err.value.message and "Traceback" not in err.value.message


def test_the_pixel_limit_is_checked_from_the_header_before_decoding(predictor, monkeypatch):
    big = png(0, size=(3000, 2000))

    def no_decoding(self):
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(BadRequest, match="3000x2000") as err:
        decode_image(big, predictor.transform, max_pixels=1_000_000)
    assert err.value.status == 413


def test_non_finite_model_inputs_are_refused(predictor):
    def nan_transform(image):
        x = predictor.transform(image)
        x[0, 0, 0] = math.nan
        return x

    with pytest.raises(BadRequest, match="non-finite model inputs") as err:
        decode_image(png(0), nan_transform, max_pixels=10_000)
    assert err.value.status == 422


# ------------------------------------------------------------------------------------------- batcher
def _requests(sizes, budgets, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (i, torch.randn(n, 3, SIZE, SIZE, generator=g), b)
        for i, (n, b) in enumerate(zip(sizes, budgets, strict=True))
    ]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_batcher_answers_every_request_like_the_predictor(artefact, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime", reason="the ONNX backend needs the [export] extra")
    p = EarlyExitPredictor.load(artefact, budget=0.5, backend=backend, num_threads=1)
    batcher = RequestBatcher(p, batch_size=4)
    requests = _requests([1, 3, 2, 5, 1, 4, 2], [0.5, 0.75, 0.5, FULL, 0.75, 0.5, FULL])
    done = batcher.run(requests[:4]) + batcher.run(requests[4:], flush=True)
    assert sorted(c.key for c in done) == list(range(7)) and batcher.waiting == 0
    mismatches = 0
    seen_exits = set()
    for c in done:
        _, x, budget = requests[c.key]
        assert c.budget == budget
        thresholds = batcher.thresholds(budget)
        if budget == FULL:
            assert thresholds[:-1] == [math.inf] * (p.num_exits - 1)
            assert (c.output.exit_index == p.num_exits - 1).all()
        if p.model is not None:
            ref = p.model.forward_early_exit(x, thresholds, p.exit_rule)
        else:
            ref_pred, ref_exit, _, _ = p.onnx_stages.run(x, thresholds, p.exit_rule)
            ref = type(c.output)(ref_pred, ref_exit, ref_exit, ref_exit)
        mismatches += int((c.output.prediction != ref.prediction).sum())
        mismatches += int((c.output.exit_index != ref.exit_index).sum())
        seen_exits |= set(c.output.exit_index.tolist())
    assert mismatches == 0
    assert len(seen_exits) >= 2


def test_the_batcher_pools_continuing_samples_across_requests(artefact, monkeypatch):
    p = EarlyExitPredictor.load(artefact, budget=0.5)
    calls = record_stage_calls(monkeypatch)
    batcher = RequestBatcher(p, batch_size=8)
    requests = _requests([2] * 64, [0.5] * 64)
    done = []
    for i in range(0, 64, 4):  # windows of 4 requests = 8 images: full windows, no flush
        done += batcher.run(requests[i : i + 4])
    assert batcher.waiting > 0, "samples that continue should wait for a full stage batch"
    done += batcher.run([], flush=True)
    assert sorted(c.key for c in done) == list(range(64))
    assert [n for k, n in calls if k == 0] == [8] * 16
    for k in range(1, p.num_exits):
        sizes = [n for j, n in calls if j == k]
        # every call of a later stage is full except the one flush at the end
        assert sizes and sizes.count(8) >= len(sizes) - 1, (k, sizes)
    assert any(n == 8 for j, n in calls if j > 0), "later stages should run on pooled, full batches"


def test_rows_use_the_predictions_schema(predictor):
    batcher = RequestBatcher(predictor, batch_size=4)
    (done,) = batcher.run([("r", torch.randn(2, 3, SIZE, SIZE), 0.5)], flush=True)
    rows = prediction_rows(predictor, done.output, batcher.exit_gflops(0.5), ["a.png", None])
    assert list(rows[0].to_dict()) == ["path", *PREDICTION_COLUMNS]
    assert list(rows[1].to_dict()) == list(PREDICTION_COLUMNS)  # no file name: no path column
    assert rows[0].path == "a.png" and rows[0].error is None
    for row in rows:
        assert (
            1 <= row.exit <= predictor.num_exits and row.class_name == predictor.class_names[row.class_index]
        )
        assert row.gflops == predictor.exit_gflops[row.exit - 1] and 0 < row.confidence <= 1
        assert row.score == row.confidence  # the confidence rule
    full = batcher.exit_gflops(FULL)
    assert full[-1] == pytest.approx(predictor.manifest["costs"]["full_gflops"])
    assert full[-1] < predictor.exit_gflops[-1], "full skips the early heads (confidence is a local rule)"


# ------------------------------------------------------------------------------------- LitServe loop
class Transport:
    """Collects what the inference loop sends back, as LitServe's transport would."""

    def __init__(self):
        self.sent = {}

    def send(self, item, consumer_id):
        uid, (data, status, _kind, _worker) = item
        self.sent[uid] = (data, status)


@pytest.fixture(scope="module")
def api(artefact):
    pytest.importorskip("litserve", reason="the LitServe server needs the [serve] extra")
    from dmpo_lightning.serve.litserve_app import EarlyExitAPI

    api = EarlyExitAPI(artefact, budget=0.5, max_batch_size=8, batch_timeout=0.0, threads=1)
    api.request_timeout = 30
    api.setup("cpu")
    return api


def test_one_bad_request_does_not_fail_the_others_of_its_window(api, predictor):
    from litserve.utils import LitAPIStatus

    queue: Queue = Queue()
    good = [png(i) for i in range(6)]
    requests = {
        "a": Payload([good[0], good[1]], 0.5, ["x.png", "y.png"]),
        "bad-image": Payload([good[2], b"not an image"], None),
        "b": Payload([good[2]], 0.75),
        "wrong-size": Payload([png(7, size=(20, 20))], None),
        "c": Payload([good[3], good[4], good[5]], None),
        "full": Payload([good[0]], FULL),
    }
    import time

    for uid, payload in requests.items():
        queue.put((0, uid, time.monotonic(), payload))
    transport = Transport()
    waiting: dict = {}
    loop = api.loop
    while len(transport.sent) < len(requests):
        assert loop.serve_window(api, queue, transport, waiting)
    assert not waiting
    for uid in ("bad-image", "wrong-size"):
        error, status = transport.sent[uid]
        assert status == LitAPIStatus.ERROR and error.status_code in (400, 422)
    assert "image 1 (of 2) is not an image file" in transport.sent["bad-image"][0].detail
    assert all("score" in r for r in transport.sent["a"][0]["predictions"])
    for uid, budget in (("a", 0.5), ("b", 0.75), ("c", 0.5)):
        answer, status = transport.sent[uid]
        assert status == LitAPIStatus.OK and answer["budget"] == budget
        ref = expected(predictor, requests[uid].images, budget)
        got = answer["predictions"]
        assert [r["class_index"] for r in got] == ref.prediction.tolist()
        assert [r["exit"] for r in got] == ref.exit.tolist()
        assert [r["gflops"] for r in got] == ref.gflops.tolist()
    assert [r["path"] for r in transport.sent["a"][0]["predictions"]] == ["x.png", "y.png"]
    full = transport.sent["full"][0]["predictions"][0]
    assert full["exit"] == predictor.num_exits and json.dumps(transport.sent["full"][0])


def test_a_request_that_waited_past_the_timeout_gets_504(api):
    queue: Queue = Queue()
    queue.put((0, "old", -1e9, Payload([png(0)], None)))
    transport = Transport()
    assert api.loop.serve_window(api, queue, transport, {})
    error, _ = transport.sent["old"]
    assert error.status_code == 504


def test_the_loop_stops_on_litserves_stop_value_after_answering_everyone(api):
    queue: Queue = Queue()
    import time

    queue.put((0, "last", time.monotonic(), Payload([png(1)], None)))
    queue.put((None, None, None, None))
    transport = Transport()
    waiting: dict = {}
    while api.loop.serve_window(api, queue, transport, waiting):
        pass
    assert "last" in transport.sent and not waiting


# --------------------------------------------------------------------------------- HTTP request reader
@pytest.fixture(scope="module")
def client():
    pytest.importorskip("litserve", reason="the LitServe server needs the [serve] extra")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from dmpo_lightning.serve.http import read_payload

    limits = Limits(max_body_bytes=16384, max_images=3)

    async def endpoint(request):
        try:
            p = await read_payload(request, limits, [0.5, 0.75])
        except BadRequest as err:
            return JSONResponse({"detail": err.message}, status_code=err.status)
        return JSONResponse({"n": len(p.images), "sizes": [len(i) for i in p.images], "budget": p.budget})

    return TestClient(Starlette(routes=[Route("/predict", endpoint, methods=["POST"])]))


def test_every_accepted_body_reaches_the_worker_as_image_bytes(client):
    img = png(0)
    r = client.post("/predict", content=img, headers={"Content-Type": "image/png"})
    assert r.json() == {"n": 1, "sizes": [len(img)], "budget": None}
    r = client.post("/predict?budget=0.75", content=img, headers={"Content-Type": "application/octet-stream"})
    assert r.json()["budget"] == 0.75
    r = client.post(
        "/predict", files=[("image", ("a.png", img)), ("image", ("b.png", img))], data={"budget": "full"}
    )
    assert r.json() == {"n": 2, "sizes": [len(img)] * 2, "budget": "full"}
    b64 = base64.b64encode(img).decode()
    r = client.post("/predict", json={"images": [b64, b64], "budget": 0.5})
    assert r.json() == {"n": 2, "sizes": [len(img)] * 2, "budget": 0.5}


def test_bad_bodies_are_refused_with_their_status_and_one_sentence(client):
    img = png(0)
    cases = [
        ({"content": img, "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type 'text/plain'"),
        ({"content": img}, 415, "no Content-Type"),
        (
            {"content": b"x" * 20000, "headers": {"Content-Type": "image/png"}},
            413,
            "20,000 bytes; at most 16,384",
        ),
        ({"content": b"{", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {"images": "x"}}, 400, "non-empty list"),
        ({"files": [("photo", ("a.png", img))]}, 400, "unknown form field"),
        ({"files": [("image", ("a.png", img))] * 4}, 400, "Too many files"),
        ({"data": {"image": "text"}, "files": [("other", ("a", b""))]}, 400, "unknown form field"),
        (
            {"content": img, "headers": {"Content-Type": "image/png"}, "params": {"budget": "0.6"}},
            400,
            "no thresholds",
        ),
        (
            {"content": img, "headers": {"Content-Type": "image/png"}, "params": {"bugdet": "0.5"}},
            400,
            "unknown query",
        ),
        (
            {
                "json": {"images": [base64.b64encode(img).decode()], "budget": 0.5},
                "params": {"budget": "0.75"},
            },
            400,
            "twice",
        ),
    ]
    for kwargs, status, text in cases:
        r = client.post("/predict", **kwargs)
        assert r.status_code == status, (kwargs.keys(), r.text)
        detail = r.json()["detail"]
        assert text in detail and "\n" not in detail, detail
    r = client.post("/predict", content=img, headers={"Content-Type": "image/png"})  # still served
    assert r.status_code == 200


def test_a_body_without_content_length_is_cut_at_the_limit(client):
    def chunks():
        for _ in range(20):
            yield b"x" * 1000

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "over 16,384 bytes" in r.json()["detail"]


# ------------------------------------------------------------------------------------------------ CLI
def _main(argv, capsys):
    pytest.importorskip("litserve", reason="dmpo serve needs the [serve] extra")
    from dmpo_lightning.serve.cli import main

    status = main(argv)
    return status, capsys.readouterr().err


def test_cli_refuses_bad_options_in_one_line_before_starting(artefact, capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (["--budget", "0.6"], "--budget: the artefact has no thresholds for budget '0.6'"),
            (["--device", "banana"], "--device 'banana': use auto, cpu, cuda, cuda:0,1 or mps"),
            (["--device", "cuda:7"], "--device cuda:7"),
            (["--host", "example.com"], "--host example.com: use one of 127.0.0.1, 0.0.0.0, ::"),
            (["--port", "80"], "--port 80: use a port from 1024 to 65535"),
            (["--port", str(port)], f"--port {port}: cannot listen on 127.0.0.1:{port}"),
            (["--batch-timeout", "40", "--timeout", "30"], "--batch-timeout 40.0 must be shorter"),
        ]
        for extra, text in cases:
            status, err = _main([artefact, *extra], capsys)
            assert status == 2, extra
            assert text in err and err.count("\n") == 1 and "Traceback" not in err, err
    status, err = _main([str(tmp_path / "missing")], capsys)
    assert status == 2 and err.count("\n") == 1
    assert list(Path(tmp_path).iterdir()) == [], "nothing may be written"


@pytest.mark.parametrize("flag", ["--max-batch-size", "--workers-per-device", "--max-images"])
def test_cli_counts_must_be_positive(artefact, flag, capsys):
    pytest.importorskip("litserve", reason="dmpo serve needs the [serve] extra")
    from dmpo_lightning.serve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([artefact, flag, "0"])
    assert exit_.value.code == 2 and "0 is not a positive whole number" in capsys.readouterr().err
