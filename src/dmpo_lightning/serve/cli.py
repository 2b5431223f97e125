"""``dmpo serve ARTEFACT``: serve a ``dmpo export`` artefact over HTTP (LitServe), with true early exits.

Every option is checked, and the artefact loaded once, before any worker starts: a mistake gets one sentence
and exit status 2. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import socket
import sys
from collections.abc import Sequence
from typing import Any

import torch

from dmpo_lightning.deploy.format import read_manifest
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.images import DEFAULT_MAX_PIXELS
from dmpo_lightning.serve.payload import FULL, BadRequest, Limits, match_budget

__all__ = ["ServeOptionError", "build_parser", "main", "parse_device"]

HOSTS = ("127.0.0.1", "0.0.0.0", "::")
"""Addresses LitServe binds to: loopback only (default), every IPv4 interface, every IPv6 interface."""

DESCRIPTION = """\
Serve an early-exit artefact (written by `dmpo export`) over HTTP with LitServe. Requests of different
clients are batched (--max-batch-size, --batch-timeout) and pooled per exit stage, so every stage runs full
batches while requests keep coming.

  POST /predict   one image as the body (Content-Type image/png, image/jpeg, ...), a multipart form with
                  `image` files (curl -F image=@x.png), or JSON {"images": ["<base64>", ...]};
                  ?budget=0.5 (or a `budget` field) picks a calibrated operating point, `full` runs the
                  whole network
  GET  /health    200 once the model is loaded
  GET  /info      classes, budgets, operating points, counted costs, preprocessing, versions

SIGTERM (or Ctrl-C) finishes the requests in flight, then stops. Nothing is written to disk.
"""

EPILOG = """\
examples:
  dmpo serve artefacts/quickstart
  curl -F image=@shirt.png http://127.0.0.1:8000/predict
  curl --data-binary @shirt.png -H 'Content-Type: image/png' 'http://127.0.0.1:8000/predict?budget=0.75'
  dmpo serve artefacts/vit --device cuda --workers-per-device 2 --max-batch-size 64 --host 0.0.0.0
"""


class ServeOptionError(ValueError):
    """An option of ``dmpo serve`` that cannot work (one sentence, the option named)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not a positive number")
    return value


def build_parser(prog: str = "dmpo serve") -> argparse.ArgumentParser:
    """The ``dmpo serve`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artefact", help="artefact folder written by `dmpo export`")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--budget",
        default="0.5",
        help="default operating point: one of the artefact's calibrated budgets, or `full` (the whole "
        "network, no early exit); a request may ask for another (default 0.5)",
    )
    model.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch: requests pooled through the batch-filling engine; onnx: the exported stage graphs on "
        "onnxruntime's CPU provider, one batch per window (needs `dmpo export --onnx`)",
    )
    model.add_argument("--backbone-weights", help="local timm weights file of a referenced frozen backbone")
    workers = parser.add_argument_group("workers")
    workers.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU if there is one, else the CPU), cpu, cuda (every GPU), cuda:0,1 (those GPUs) or "
        "mps (default auto)",
    )
    workers.add_argument(
        "--workers-per-device",
        type=_positive_int,
        default=1,
        help="inference processes per device (default 1)",
    )
    workers.add_argument(
        "--threads",
        type=_positive_int,
        help="intra-op threads per worker (default on a CPU: the cores shared out between the workers)",
    )
    batching = parser.add_argument_group("batching")
    batching.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=16,
        help="images per stage call, and the most a batching window collects (default 16)",
    )
    batching.add_argument(
        "--batch-timeout",
        type=_non_negative_float,
        default=0.01,
        help="seconds a batching window waits for more requests after its first (default 0.01)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-body-mb", type=_positive_float, default=16.0, help="largest request body in MiB (default 16)"
    )
    limits.add_argument(
        "--max-images", type=_positive_int, default=64, help="most images in one request (default 64)"
    )
    limits.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest width x height of one image, checked before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    limits.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a request may wait for a worker before a 504 (default 30)",
    )
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host",
        default="127.0.0.1",
        help="127.0.0.1 (this machine only, default), 0.0.0.0 (every IPv4 interface) or :: (IPv6)",
    )
    net.add_argument("--port", type=int, default=8000, help="TCP port, 1024-65535 (default 8000)")
    net.add_argument(
        "--drain-timeout",
        type=_non_negative_float,
        default=30.0,
        help="seconds SIGTERM waits for the requests in flight (default 30)",
    )
    net.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    return parser


def parse_device(text: str) -> tuple[str, Any]:
    """``--device`` -> LitServe's ``(accelerator, devices)``.

    Raises:
        ServeOptionError: For a device this machine does not have.
    """
    value = text.strip().lower()
    if value == "auto":
        return "auto", "auto"
    if value == "cpu":
        return "cpu", 1
    if value == "mps":
        if not torch.backends.mps.is_available():
            raise ServeOptionError("--device mps: this machine has no MPS device; use --device cpu")
        return "mps", 1
    if value == "cuda" or value.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ServeOptionError(f"--device {text}: this machine has no CUDA GPU; use --device cpu")
        if value == "cuda":
            return "cuda", count
        try:
            ids = [int(i) for i in value[len("cuda:") :].split(",")]
        except ValueError:
            raise ServeOptionError(
                f"--device {text!r}: write GPUs as cuda:0 or cuda:0,1 (comma-separated indices)"
            ) from None
        bad = [i for i in ids if not 0 <= i < count]
        if bad or len(set(ids)) != len(ids):
            raise ServeOptionError(
                f"--device {text}: this machine has GPUs cuda:0 to cuda:{count - 1}; each index once"
            )
        return "cuda", ids
    raise ServeOptionError(f"--device {text!r}: use auto, cpu, cuda, cuda:0,1 or mps")


def _check_port(host: str, port: int) -> None:
    if not 1024 <= port <= 65535:
        raise ServeOptionError(f"--port {port}: use a port from 1024 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ServeOptionError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); is another server "
                "running there? choose another --port"
            ) from None


def check_options(args: argparse.Namespace) -> dict[str, Any]:
    """Check every option and load the artefact once; the keyword arguments of ``build_server``.

    Raises:
        ServeOptionError: For an option that cannot work.
        FileNotFoundError, ArtefactError (a ``ValueError``): For an artefact that cannot be used.
        ImportError: If the ``[serve]`` extra (or ``[export]`` for ``--backend onnx``) is missing.
    """
    missing = [m for m in ("litserve", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"dmpo serve needs {' and '.join(missing)}; "
            "install the extra: pip install 'dmpo-lightning[serve]'"
        )
    if args.host not in HOSTS:
        raise ServeOptionError(f"--host {args.host}: use one of {', '.join(HOSTS)}")
    _check_port(args.host, args.port)
    accelerator, devices = parse_device(args.device)
    if args.backend == "onnx" and accelerator not in ("cpu", "auto"):
        raise ServeOptionError(
            f"--backend onnx runs on onnxruntime's CPU provider; use --device cpu (not {args.device})"
        )
    if args.backend == "onnx":
        accelerator, devices = "cpu", 1

    manifest = read_manifest(args.artefact)
    budgets = [float(p["budget"]) for p in manifest["operating_points"]]
    try:
        budget = match_budget(args.budget, budgets)
    except BadRequest as err:
        raise ServeOptionError(f"--budget: {err.message}") from None
    load_budget = budgets[0] if budget == FULL else float(budget)
    predictor = EarlyExitPredictor.load(
        args.artefact,
        budget=load_budget,
        device="cpu",
        backend=args.backend,
        backbone_weights=args.backbone_weights,
        num_threads=1,
    )
    del predictor
    gc.collect()
    cpu = accelerator == "cpu" or (accelerator == "auto" and not _has_gpu())
    threads = args.threads
    if threads is None and cpu:
        from dmpo_lightning.serve.litserve_app import default_threads  # optional extra [serve], lazily

        threads = default_threads(args.workers_per_device)
    if args.batch_timeout >= args.timeout:
        raise ServeOptionError(
            f"--batch-timeout {args.batch_timeout} must be shorter than --timeout {args.timeout}"
        )
    return {
        "budget": budget,
        "backend": args.backend,
        "accelerator": accelerator,
        "devices": devices,
        "workers_per_device": args.workers_per_device,
        "max_batch_size": args.max_batch_size,
        "batch_timeout": args.batch_timeout,
        "limits": Limits(
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            max_images=args.max_images,
            max_pixels=args.max_pixels,
        ),
        "threads": threads,
        "timeout": args.timeout,
        "drain_timeout": args.drain_timeout,
        "backbone_weights": args.backbone_weights,
    }


def _has_gpu() -> bool:

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None, *, prog: str = "dmpo serve") -> int:
    """Run ``dmpo serve`` (``argv`` without the ``serve`` word); the exit status.

    0 after a clean shutdown (SIGTERM or Ctrl-C), 2 for a bad option or artefact (one line on stderr), 1 if
    the server could not start.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        options = check_options(args)
    except (ServeOptionError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    from dmpo_lightning.serve.litserve_app import build_server, run_server  # optional extra [serve]

    server = build_server(args.artefact, **options)
    try:
        run_server(server, host=args.host, port=args.port, log_level=args.log_level)
    except RuntimeError as err:  # LitServe: "One or more workers failed to start"
        print(f"{parser.prog}: error: {err} (see the log above)", file=sys.stderr)
        return 1
    return 0
