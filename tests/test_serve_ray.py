"""Ray Serve scale-out: the replica plan, the application's arguments, and the application on local Ray.

The plan gives each exit stage replicas in proportion to (share of samples reaching it) x (its cost); the
application answers like ``EarlyExitPredictor`` (0 class and exit mismatches) at two budgets and ``full``,
refuses bad requests with the same sentences as ``dmpo serve`` and keeps serving.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.runs import make_run

from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.serve.replicas import plan_replicas, stage_costs

SIZE = 32
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray's own pydantic fields


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    rgb = (np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype("uint8")
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ the plan
def test_the_stages_most_samples_reach_get_the_most_replicas():
    costs = [1.0, 2.0, 3.0, 4.0]  # cumulative: every stage costs 1
    assert stage_costs(costs) == [1.0, 1.0, 1.0, 1.0]
    plan = plan_replicas(costs, [50, 25, 15, 10], total=8)
    assert plan.reach == pytest.approx([1.0, 0.5, 0.25, 0.1])
    assert plan.replicas == [3, 2, 2, 1] and sum(plan.replicas) == 8
    # a costly last stage that few samples reach still gets its share of the work
    plan = plan_replicas([1.0, 2.0, 3.0, 13.0], [50, 25, 15, 10], total=10)
    assert plan.load == pytest.approx([1.0, 0.5, 0.25, 1.0])
    assert plan.replicas[0] == plan.replicas[3] > plan.replicas[2]
    # everyone at the last exit (the full model): replicas by cost alone
    assert plan_replicas([1.0, 2.0, 3.0, 4.0], [0, 0, 0, 1], total=8).replicas == [2, 2, 2, 2]
    assert plan_replicas(costs, [50, 25, 15, 10], total=2).replicas == [1, 1, 1, 1]  # at least one each
    for hist, total in (([1, 2], 4), ([-1, 1, 1, 1], 4), ([0, 0, 0, 0], 4), ([1, 1, 1, 1], 0)):
        with pytest.raises(ValueError):
            plan_replicas(costs, hist, total)


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("serve_ray")
    r = make_run(tmp, quantiles=(0.4, 0.7), exits={"blocks": [2, 4], "moment_dim": 32, "cov_dim": 8})
    return export_artefact(str(tmp / "art"), run=str(r["run"]))


def test_application_arguments_are_checked_in_one_sentence(artefact):
    pytest.importorskip("ray", reason="the Ray Serve application needs the [ray] extra")
    from dmpo_lightning.serve.ray_app import parse_args

    opts = parse_args(
        {"artefact": artefact, "budget": "0.75", "stage_replicas": "[2, 1]", "autoscale": "true"}
    )
    assert opts.budget == 0.75 and opts.stage_replicas == [2, 1] and opts.autoscale
    assert opts.plan["source"] == "set by hand (stage_replicas)"
    opts = parse_args({"artefact": artefact})
    assert opts.stage_replicas == [1, 1] and "no exit histogram" in opts.plan["source"]
    cases = [
        ({"budget": "0.6"}, "budget: the artefact has no thresholds for budget '0.6'"),
        ({"stage_replicas": "1,2,3"}, "one count per stage (2)"),
        ({"stage_replicas": "0,1"}, "must be >= 1"),
        ({"replicas": "4"}, "no exit histogram"),
        ({"max_batch_size": "many"}, "max_batch_size='many' is not a int"),
        ({"autoscale": "perhaps"}, "autoscale='perhaps' is not true or false"),
        ({"bugdet": "0.5"}, "unknown argument(s) ['bugdet']"),
    ]
    for extra, text in cases:
        with pytest.raises(ValueError) as err:
            parse_args({"artefact": artefact, **extra})
        assert text in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="give the artefact"):
        parse_args({})


# ------------------------------------------------------------------------------------------ local Ray
def _post(port: int, body: bytes, content_type: str, path: str = "/predict"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.slow  # starts a local Ray instance and three replica processes (~40 s on 2 busy cores)
def test_the_stage_pipeline_on_local_ray_answers_like_the_predictor(artefact, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="the Ray Serve application needs the [ray] extra")
    from ray import serve

    from dmpo_lightning.serve.ray_app import build_app

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    images = [png(i) for i in range(12)]
    predictor = EarlyExitPredictor.load(artefact, budget=0.5)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i:02d}.png").write_bytes(data)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"artefact": artefact, "num_cpus": "0.5", "max_batch_size": "8"})
        serve.run(app, route_prefix="/")
        mismatches = 0
        exits = set()
        for budget in (0.5, 0.75):
            predictor.set_budget(budget)
            expected = list(predictor.predict_paths(str(folder)))
            body = json.dumps({"images": [base64.b64encode(d).decode() for d in images], "budget": budget})
            status, out = _post(port, body.encode(), "application/json")
            assert status == 200, out
            assert out["budget"] == budget and len(out["predictions"]) == len(images)
            for row, ref in zip(out["predictions"], expected, strict=True):
                mismatches += (row["class_index"] != ref.class_index) + (row["exit"] != ref.exit)
                assert row["gflops"] == ref.gflops and abs(row["confidence"] - ref.confidence) < 1e-5
                exits.add(row["exit"])
        assert mismatches == 0 and exits == {1, 2}
        boundary = uuid.uuid4().hex
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()
            + images[0]
            + f"\r\n--{boundary}--\r\n".encode()
        )
        status, out = _post(port, form, f"multipart/form-data; boundary={boundary}", "/predict?budget=full")
        assert (
            status == 200 and out["predictions"][0]["exit"] == 2 and out["predictions"][0]["path"] == "a.png"
        )
        for body, ctype, code, text in (
            (b"not an image", "image/png", 400, "not an image file"),
            (images[0], "text/plain", 415, "Content-Type 'text/plain'"),
            (json.dumps({"images": ["%%"]}).encode(), "application/json", 400, "not valid base64"),
        ):
            status, out = _post(port, body, ctype)
            assert status == code and text in out["detail"], out
            assert _post(port, images[1], "image/png")[0] == 200
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/info")
        info = json.loads(conn.getresponse().read())["model"]
        assert info["serving"]["stage_replicas"] == [1, 1] and info["budgets"] == [0.5, 0.75]
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_the_config_file_is_a_valid_ray_serve_config_for_the_builder(artefact):
    pytest.importorskip("ray", reason="the Ray Serve application needs the [ray] extra")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from dmpo_lightning.serve.ray_app import parse_args

    path = Path(__file__).resolve().parents[1] / "configs" / "serve" / "ray_serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "dmpo_lightning.serve.ray_app:build_app"
    assert config.http_options.host == "127.0.0.1"
    opts = parse_args({**app.args, "artefact": artefact, "replicas": None})  # every argument is known
    assert opts.max_batch_size == app.args["max_batch_size"] and opts.budget == app.args["budget"]
