"""``dmpo serve``: an early-exit artefact behind LitServe, requests of many clients pooled per exit stage.

Endpoints: ``POST /predict`` (one image as the raw body, a multipart form with ``image`` files, or a JSON
batch of base64 images; ``?budget=`` or a ``budget`` field picks the operating point), ``GET /health``
(200 once every inference worker has loaded the model) and ``GET /info`` (the artefact's metadata: classes,
budgets, operating points, counted costs, preprocessing, versions, and the server's settings).

How a request travels:

1. In the HTTP process a FastAPI dependency (:func:`read_request`) checks the content type, the body size
   (before reading it past the limit), the JSON or form structure and the budget; a bad request is answered
   there with a 4xx and one sentence and never reaches the model.
2. The inference worker runs :class:`EngineLoop`, a LitServe loop: it collects requests for up to
   ``batch_timeout`` seconds or ``max_batch_size`` images, decodes each request's images on its own (a bad
   image fails only its own request, 4xx), and pushes them into the batch-filling engine
   (:class:`~dmpo_lightning.serve.batcher.RequestBatcher`), whose per-stage queues pool the samples that
   continue after each exit across requests, so later stages run full batches too. Unless a full window
   more is already waiting (a backlog), every queued sample runs out at the end of the window.
3. Each request is answered once all of its images have left: ``{"budget": ..., "predictions": [row, ...]}``
   with the package's prediction rows (class index and name, exit numbered from 1, confidence, GFLOPs).

SIGTERM drains: the HTTP processes stop accepting connections and finish the requests in flight (the
inference workers keep running until they are done), then the workers stop. Nothing is written to disk.

Needs the ``[serve]`` extra (``litserve``, ``python-multipart``).
"""

# No ``from __future__ import annotations``: LitServe builds the endpoint from the run-time annotation of
# ``EarlyExitAPI.decode_request`` (a FastAPI dependency); a string annotation would not resolve there.

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from queue import Empty
from typing import Annotated, Any

import litserve as ls
import torch
from fastapi import Depends, HTTPException, Request
from litserve.loops import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

from dmpo_lightning.deploy.format import read_manifest
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.serve.batcher import Completed, RequestBatcher, prediction_rows
from dmpo_lightning.serve.http import read_payload
from dmpo_lightning.serve.payload import FULL, BadRequest, Limits, Payload, decode_image
from dmpo_lightning.version import __version__

__all__ = ["EarlyExitAPI", "EngineLoop", "artefact_info", "build_server", "read_request", "run_server"]

logger = logging.getLogger(__name__)

STATE_KEY = "dmpo_serve"
"""``app.state`` entry holding the request limits and budgets the HTTP processes check requests against."""


def artefact_info(manifest: Mapping[str, Any], path: str) -> dict[str, Any]:
    """What ``GET /info`` shows of the artefact (all but weights, checksums and training options)."""
    return {
        "artefact": os.path.abspath(path),
        "format": manifest.get("format"),
        "format_version": manifest.get("format_version"),
        "package_version": manifest.get("package_version"),
        "served_by": f"dmpo-lightning {__version__}",
        "class_names": list(manifest["class_names"]),
        "num_classes": len(manifest["class_names"]),
        "exit_rule": manifest["exit_rule"],
        "exit_blocks": manifest.get("exit_blocks"),
        "budget_unit": manifest.get("budget_unit", "fraction"),
        "budgets": [float(p["budget"]) for p in manifest["operating_points"]],
        "operating_points": manifest["operating_points"],
        "costs": manifest["costs"],
        "preprocessing": manifest["preprocessing"],
        "backbone": manifest.get("model", {}).get("backbone"),
    }


async def read_request(request: Request) -> Payload:
    """FastAPI dependency of ``POST /predict``: a checked :class:`Payload`, or a 4xx with one sentence."""
    config = getattr(request.app.state, STATE_KEY)
    try:
        return await read_payload(request, config["limits"], config["budgets"])
    except BadRequest as err:
        raise HTTPException(status_code=err.status, detail=err.message) from None


@dataclass
class DecodedRequest:
    """A request's images as model inputs, in the inference worker."""

    images: torch.Tensor
    budget: float | str
    names: list[str | None] | None


class EarlyExitAPI(ls.LitAPI):
    """The LitServe API of an artefact (built by :func:`build_server`; one copy per inference worker).

    Args:
        artefact: Folder written by ``dmpo export``.
        budget: Default operating point (a calibrated budget of the artefact, or ``full``).
        backend: ``torch`` (requests pooled through the batch-filling engine) or ``onnx``.
        max_batch_size: Images per stage call, and the most images one batching window collects.
        batch_timeout: Seconds a window waits for more requests after its first one.
        limits: What one request may hold.
        threads: Intra-op threads of each worker (``None``: torch's and onnxruntime's default).
        backbone_weights: Local timm weights file of an artefact that references its frozen backbone.
    """

    def __init__(
        self,
        artefact: str,
        *,
        budget: float | str = 0.5,
        backend: str = "torch",
        max_batch_size: int = 16,
        batch_timeout: float = 0.01,
        limits: Limits | None = None,
        threads: int | None = None,
        backbone_weights: str | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, loop=EngineLoop())
        self.artefact = artefact
        self.default_budget = budget
        self.backend = backend
        self.limits = limits or Limits()
        self.threads = threads
        self.backbone_weights = backbone_weights
        self.predictor: EarlyExitPredictor | None = None
        self.batcher: RequestBatcher | None = None

    def setup(self, device: str) -> None:
        """Load the artefact in this worker (LitServe calls it once per worker process)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        first = next(p for p in read_manifest(self.artefact)["operating_points"])
        load_budget = float(first["budget"]) if self.default_budget == FULL else float(self.default_budget)
        self.predictor = EarlyExitPredictor.load(
            self.artefact,
            budget=load_budget,
            device=device if self.backend == "torch" else "cpu",
            backend=self.backend,  # type: ignore[arg-type]
            num_threads=self.threads,
            backbone_weights=self.backbone_weights,
        )
        self.batcher = RequestBatcher(self.predictor, self.max_batch_size)

    def decode_request(self, request: Annotated[Payload, Depends(read_request)]) -> DecodedRequest:  # type: ignore[override]
        """The request's images as one model-input batch (in the worker; raises :class:`BadRequest`)."""
        assert self.predictor is not None
        n = len(request.images)
        tensors = [
            decode_image(
                data,
                self.predictor.transform,
                max_pixels=self.limits.max_pixels,
                where="the image" if n == 1 else f"image {i} (of {n})",
            )
            for i, data in enumerate(request.images)
        ]
        budget = self.default_budget if request.budget is None else request.budget
        return DecodedRequest(torch.stack(tensors), budget, request.names)

    def predict(self, x: Sequence[DecodedRequest]) -> list[dict[str, Any]]:  # type: ignore[override]
        """Run decoded requests to completion at once (the serving loop pools them instead)."""
        assert self.batcher is not None
        done = self.batcher.run([(i, r.images, r.budget) for i, r in enumerate(x)], flush=True)
        by_key = {c.key: c for c in done}
        return [self.encode_response(self.response(by_key[i], x[i].names)) for i in range(len(x))]

    def response(self, done: Completed, names: Sequence[str | None] | None) -> dict[str, Any]:
        """The JSON answer of one completed request."""
        assert self.predictor is not None and self.batcher is not None
        rows = prediction_rows(self.predictor, done.output, self.batcher.exit_gflops(done.budget), names)
        return {"budget": done.budget, "predictions": [r.to_dict() for r in rows]}

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        """The answer as it is (already JSON-ready)."""
        return output


def _backlog(request_queue: Any) -> int:
    """Requests waiting in LitServe's queue (0 if the queue cannot tell)."""
    try:
        return int(request_queue.qsize())
    except (NotImplementedError, OSError, EOFError):
        return 0


@dataclass
class _Waiting:
    response_queue_id: int
    uid: str
    names: list[str | None] | None


class EngineLoop(LitLoop):
    """LitServe inference loop: batching windows of requests pooled through the batch-filling engine.

    A window opens with its first request and closes after ``batch_timeout`` seconds or once it holds
    ``max_batch_size`` images. Each request is decoded on its own (a bad one is answered 4xx alone), then
    all go to :meth:`RequestBatcher.run`. Samples that continue stay in the engine's stage queues only while
    there is a backlog (the window was full and a full window more is waiting in the queue); otherwise every
    queued sample runs out, so no request waits for traffic that is not there.
    """

    def __call__(  # type: ignore[override]
        self,
        lit_api: EarlyExitAPI,
        device: str,
        worker_id: int,
        request_queue: Any,
        transport: Any,
        workers_setup_status: Any,
        callback_runner: Any,
    ) -> None:
        """Serve until LitServe's stop value arrives (on shutdown)."""
        in_worker_process = multiprocessing.parent_process() is not None
        if in_worker_process and threading.current_thread() is threading.main_thread():
            # Ctrl-C reaches every process of the group: the server process drains (see _sigterm_drains) and
            # stops this worker once the requests in flight are answered, so the worker ignores SIGINT
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        waiting: dict[tuple[int, str], _Waiting] = {}
        while True:
            if not self.serve_window(lit_api, request_queue, transport, waiting):
                return

    def _answer(self, transport: Any, w: _Waiting, data: Any, ok: bool) -> None:
        status = LitAPIStatus.OK if ok else LitAPIStatus.ERROR
        self.put_response(transport, w.response_queue_id, w.uid, data, status, LoopResponseType.REGULAR)

    def _fail(self, transport: Any, w: _Waiting, status: int, message: str) -> None:
        error = PickleableHTTPException.from_exception(HTTPException(status_code=status, detail=message))
        self._answer(transport, w, error, ok=False)

    def _collect(self, lit_api: EarlyExitAPI, request_queue: Any, first_wait: float) -> list[Any] | None:
        """The requests of one window (``[]`` if none came in ``first_wait``; ``None``: stop serving)."""
        try:
            first = request_queue.get(timeout=first_wait)
        except Empty:
            return []
        if first == (None, None, None, None):  # LitServe's stop value
            return None
        window = [first]
        images = len(first[3].images) if isinstance(first[3], Payload) else 1
        deadline = time.monotonic() + lit_api.batch_timeout
        while images < lit_api.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                item = request_queue.get(timeout=left)
            except Empty:
                break
            if item == (None, None, None, None):
                request_queue.put(item)  # stop after this window
                break
            window.append(item)
            images += len(item[3].images) if isinstance(item[3], Payload) else 1
        return window

    def serve_window(
        self,
        lit_api: EarlyExitAPI,
        request_queue: Any,
        transport: Any,
        waiting: dict[tuple[int, str], _Waiting],
    ) -> bool:
        """Collect, decode and run one window; answer what completed. ``False`` once told to stop."""
        batcher = lit_api.batcher
        assert batcher is not None
        window = self._collect(lit_api, request_queue, lit_api.batch_timeout if waiting else 1.0)
        if window is None:
            self._run(lit_api, transport, waiting, [], flush=True)
            return False
        items = []
        images = 0
        timeout = lit_api.request_timeout
        for response_queue_id, uid, timestamp, payload in window:
            w = _Waiting(response_queue_id, uid, None)
            if timeout not in (None, False, -1) and time.monotonic() - timestamp > float(timeout):
                self._fail(transport, w, 504, f"the request waited more than {timeout} s for a worker")
                continue
            try:
                decoded = lit_api.decode_request(payload)
            except BadRequest as err:
                self._fail(transport, w, err.status, err.message)
                continue
            except Exception as err:  # a request must never take the worker down
                logger.exception("could not decode request %s", uid)
                self._fail(transport, w, 400, f"the request cannot be read ({type(err).__name__}: {err})")
                continue
            w.names = decoded.names
            waiting[(response_queue_id, uid)] = w
            items.append(((response_queue_id, uid), decoded.images, decoded.budget))
            images += int(decoded.images.shape[0])
        full = images >= lit_api.max_batch_size and _backlog(request_queue) >= lit_api.max_batch_size
        self._run(lit_api, transport, waiting, items, flush=not full)
        return True

    def _run(
        self,
        lit_api: EarlyExitAPI,
        transport: Any,
        waiting: dict[tuple[int, str], _Waiting],
        items: list[Any],
        flush: bool,
    ) -> None:
        batcher = lit_api.batcher
        assert batcher is not None
        if not items and not (flush and waiting):
            return
        try:
            done = batcher.run(items, flush=flush)
        except Exception as err:  # the model failed: answer everyone waiting, start from empty queues
            logger.exception("early-exit engine failed")
            lit_api.batcher = RequestBatcher(batcher.predictor, batcher.batch_size)
            for w in waiting.values():
                self._fail(transport, w, 500, f"the model failed on this batch ({type(err).__name__}: {err})")
            waiting.clear()
            return
        for completed in done:
            w = waiting.pop(completed.key)  # type: ignore[call-overload]
            self._answer(transport, w, lit_api.response(completed, w.names), ok=True)


def build_server(
    artefact: str,
    *,
    budget: float | str = 0.5,
    backend: str = "torch",
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    workers_per_device: int = 1,
    max_batch_size: int = 16,
    batch_timeout: float = 0.01,
    limits: Limits | None = None,
    threads: int | None = None,
    timeout: float = 30.0,
    drain_timeout: float = 30.0,
    backbone_weights: str | None = None,
) -> ls.LitServer:
    """A LitServer for ``artefact`` (not started: :func:`run_server` or ``server.run(...)``).

    The options are those of ``dmpo serve`` (``dmpo serve --help``); they are checked by its parser.
    """
    limits = limits or Limits()
    manifest = read_manifest(artefact)
    api = EarlyExitAPI(
        artefact,
        budget=budget,
        backend=backend,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
        limits=limits,
        threads=threads,
        backbone_weights=backbone_weights,
    )
    info = artefact_info(manifest, artefact)
    info["serving"] = {
        "backend": backend,
        "default_budget": budget,
        "max_batch_size": max_batch_size,
        "batch_timeout_s": batch_timeout,
        "threads_per_worker": threads,
        "limits": asdict(limits),
    }
    server = ls.LitServer(
        api,
        accelerator=accelerator,  # type: ignore[arg-type]
        devices=devices,  # type: ignore[arg-type]
        workers_per_device=workers_per_device,
        timeout=timeout,
        model_metadata=info,
    )
    server.uvicorn_graceful_timeout = drain_timeout  # how long SIGTERM waits for requests in flight
    setattr(server.app.state, STATE_KEY, {"limits": limits, "budgets": info["budgets"]})
    return server


@contextlib.contextmanager
def _sigterm_drains(server: ls.LitServer) -> Iterator[None]:
    """SIGTERM starts LitServe's graceful shutdown (as Ctrl-C does) for the duration of ``server.run``.

    LitServe's shutdown first stops the HTTP processes (uvicorn finishes the requests in flight while the
    inference workers still answer them), then the workers. It is started by setting the server's shutdown
    event, which LitServe keeps in ``_shutdown_event`` (no public setter in litserve 0.2); without it a
    KeyboardInterrupt starts the same shutdown.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        event = getattr(server, "_shutdown_event", None)
        if event is None:
            raise KeyboardInterrupt
        logger.info("%s: finishing the requests in flight, then stopping", signal.Signals(signum).name)
        # the main thread may be inside a call on the same manager connection (event.wait): set the event
        # from another thread, which has its own connection
        threading.Thread(target=event.set, name="dmpo-serve-sigterm", daemon=True).start()

    # Ctrl-C in a terminal sends SIGINT to the whole process group: LitServe's own KeyboardInterrupt path then
    # waits on a manager whose process was interrupted too and hangs, so SIGINT drains the same way
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_server(
    server: ls.LitServer, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve until SIGTERM or Ctrl-C (both drain the requests in flight); writes no file."""
    with _sigterm_drains(server):
        server.run(host=host, port=port, log_level=log_level, generate_client_file=False)


def default_threads(workers: int) -> int:
    """Intra-op threads per worker on a CPU: the cores shared out between the workers (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, math.floor(cores / max(workers, 1)))
