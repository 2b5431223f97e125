"""Served throughput and latency: the full network vs early exit at each budget, on one server, over HTTP.

A bounded, local load generator: ``--clients`` threads on 127.0.0.1 each keep one connection open and send
one image per request (``POST /predict?budget=...``, the raw PNG as the body) until ``--requests`` requests
of a phase are done; then it stops by itself. Every phase uses the same server with the same settings; only
the per-request budget changes (``full`` = every block, last exit only). Phases are interleaved
(full, b1, b2, ..., full, b1, ...) for ``--repeats`` rounds after an unmeasured warm-up, so background load
hits all of them.

Reported per server and budget: images/s (median over rounds), latency p50 / p95 / p99 (all rounds), the
exit histogram and mean counted GFLOPs of the served rows, the FLOPs speed-up ``GFLOPs(full) / GFLOPs(b)``,
the measured speed-up ``images/s(b) / images/s(full)`` and their ratio (issue 29's target: >= 0.8 at budget
0.5 for ViT-S/16@224 on a CPU), plus the accuracy when the images have labels and the number of predictions
that differ from ``EarlyExitPredictor`` on the same files (0 expected).

Servers: ``litserve`` (``python -m dmpo_lightning.serve`` in a subprocess: one worker, requests pooled per
exit stage) and ``ray`` (``dmpo_lightning.serve.ray_app`` on a local Ray instance: one deployment per stage).

Trained quickstart artefact, its 2,000 packaged Fashion-MNIST test images (labels known)::

    python benchmarks/serve_load.py --artefact artefacts/quickstart --fashion-mnist-test 2000 \\
        --server litserve ray --threads 1 --out benchmarks/results/serve_load_quickstart

ViT-S/16 at 224 with random weights, thresholds chosen on the sent images so that the exit histogram is the
stated one (``--histogram``, per budget; as benchmarks/early_exit_speed.py does)::

    python benchmarks/serve_load.py --synthetic vit_small_patch16_224 --histogram 0.5=50,25,15,10 \\
        --server litserve ray --threads 1 --out benchmarks/results/serve_load_vits

On a CPU shared with other jobs use ``--threads 1``. ``--out PATH`` writes ``PATH.json`` and ``PATH.md``
(an existing file is never overwritten); nothing else is written outside a temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.8
"""Issue 29's target: served images/s at budget 0.5 >= 0.8 x the FLOPs speed-up over the full network."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model and images")
    src.add_argument("--artefact", help="artefact folder written by `dmpo export`")
    src.add_argument("--synthetic", help="timm ViT name: random weights, thresholds set by --histogram")
    src.add_argument(
        "--histogram",
        nargs="+",
        default=["0.5=50,25,15,10"],
        help="with --synthetic: BUDGET=share,... (percent per exit), per budget (default 0.5=50,25,15,10)",
    )
    src.add_argument("--images", help="folder of image files to send (default: see --fashion-mnist-test)")
    src.add_argument(
        "--fashion-mnist-test",
        type=int,
        default=0,
        help="send the first N packaged Fashion-MNIST test images (labels known: accuracy is reported)",
    )
    src.add_argument(
        "--num-images", type=int, default=64, help="random images to send otherwise (default 64)"
    )
    src.add_argument(
        "--budgets", nargs="+", type=float, help="budgets to measure (default: all of the artefact's)"
    )
    load = p.add_argument_group("load")
    load.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    load.add_argument("--requests", type=int, default=200, help="requests per phase (default 200)")
    load.add_argument("--repeats", type=int, default=2, help="measured rounds (default 2)")
    load.add_argument(
        "--warmup", type=int, default=32, help="unmeasured requests per budget first (default 32)"
    )
    server = p.add_argument_group("server")
    server.add_argument("--server", nargs="+", choices=("litserve", "ray"), default=["litserve"])
    server.add_argument("--threads", type=int, default=1, help="intra-op threads per worker / stage replica")
    server.add_argument("--max-batch-size", type=int, default=16)
    server.add_argument("--batch-timeout", type=float, default=0.01)
    server.add_argument("--workers", type=int, default=1, help="LitServe workers (default 1)")
    server.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="LitServe backend")
    server.add_argument(
        "--ray-stage-replicas",
        help="Ray: replicas per stage, e.g. 2,1,1,1 (default: --ray-replicas shared out by the exit "
        "histogram of budget 0.5 x stage cost, ray_app's plan)",
    )
    server.add_argument(
        "--ray-replicas", type=int, help="Ray: stage replicas in total for the plan (default: stages + 1)"
    )
    server.add_argument(
        "--ray-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray instance"
    )
    server.add_argument(
        "--ray-cpus-per-replica",
        type=float,
        default=0.25,
        help="CPUs Ray reserves per stage replica (default 0.25)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the comparison with EarlyExitPredictor")
    p.add_argument("--out", help="write PATH.json and PATH.md (never overwritten)")
    args = p.parse_args(argv)
    if bool(args.artefact) == bool(args.synthetic):
        p.error("give --artefact DIR or --synthetic TIMM_NAME")
    for name in ("clients", "requests", "repeats", "threads", "max_batch_size", "workers", "num_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.out:
        for suffix in (".json", ".md"):
            if Path(args.out + suffix).exists():
                p.error(f"{args.out}{suffix} exists; choose another --out (results are never overwritten)")
    return args


# ------------------------------------------------------------------------------------------ images
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fashion_mnist_test(n: int) -> tuple[list[bytes], list[int]]:
    path = REPO_ROOT / "src" / "dmpo_lightning" / "data" / "assets" / "fashion_mnist_subset.npz"
    data = np.load(path)
    images, labels = data["test_images"][:n], data["test_labels"][:n]
    return [png_bytes(Image.fromarray(a, mode="L")) for a in images], [int(v) for v in labels]


def random_images(n: int, size: int, channels: int, seed: int = 0) -> list[bytes]:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        if channels == 1:
            out.append(png_bytes(Image.fromarray((rng.rand(size, size) * 255).astype("uint8"), mode="L")))
        else:
            out.append(
                png_bytes(Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"), mode="RGB"))
            )
    return out


def folder_images(folder: str) -> list[bytes]:
    from dmpo_lightning.images import list_images

    return [Path(p).read_bytes() for p in list_images(folder, what="--images")]


# ------------------------------------------------------------------------------------------ synthetic
def parse_histograms(items: Sequence[str]) -> dict[float, list[float]]:
    out = {}
    for item in items:
        budget, _, shares = item.partition("=")
        out[float(budget)] = [float(s) for s in shares.split(",")]
    return out


def synthetic_artefact(
    arch: str, histograms: dict[float, list[float]], images: list[bytes], work: Path
) -> str:
    """Export a random-weight model whose thresholds give ``histograms`` on ``images`` (export run twice)."""
    from early_exit_speed import SYNTHETIC_DEFAULTS, thresholds_for_histogram

    from dmpo_lightning.constants import THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
    from dmpo_lightning.deploy.export import export_artefact
    from dmpo_lightning.deploy.predictor import EarlyExitPredictor
    from dmpo_lightning.files import file_sha256
    from dmpo_lightning.images import decode_image
    from dmpo_lightning.models.exit_rules import exit_scores
    from dmpo_lightning.module import DMPOModule

    torch.manual_seed(0)
    module = DMPOModule(**{**SYNTHETIC_DEFAULTS, "backbone": arch}).eval()
    ckpt = work / "synthetic.ckpt"
    size = int(SYNTHETIC_DEFAULTS["img_size"])
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": {"dataset": "synthetic", "image_size": size, "in_chans": 3},
            "class_names": [f"class_{i}" for i in range(module.model.num_classes)],
        },
        ckpt,
    )

    def write_thresholds(per_budget: dict[float, list[float]], path: Path) -> None:
        entries = [
            {"budget": b, "unit": "fraction", "thresholds": [t if math.isfinite(t) else str(t) for t in ts]}
            for b, ts in sorted(per_budget.items())
        ]
        doc = {
            "format": THRESHOLDS_FORMAT,
            "format_version": THRESHOLDS_FORMAT_VERSION,
            "fingerprint": module.model_fingerprint(),
            "checkpoint_hash": f"file:{file_sha256(str(ckpt))}",
            "budgets": entries,
        }
        path.write_text(json.dumps(doc))

    k = module.model.num_exits
    first = work / "thresholds_first.json"
    write_thresholds({b: [math.inf] * (k - 1) + [-math.inf] for b in histograms}, first)
    draft = export_artefact(
        str(work / "draft"), ckpt_path=str(ckpt), thresholds=str(first), allow_untrained=True
    )
    predictor = EarlyExitPredictor.load(draft, budget=next(iter(histograms)))
    x = torch.stack([predictor.transform(decode_image(b).image) for b in images])
    with torch.inference_mode():
        chunks = [predictor.model(c) for c in x.split(16)]  # per chunk: one logits tensor per exit
        logits = torch.stack([torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0]))], dim=1)
    scores, _ = exit_scores(logits, predictor.exit_rule)
    chosen = {b: thresholds_for_histogram(scores, shares) for b, shares in histograms.items()}
    final = work / "thresholds.json"
    write_thresholds(chosen, final)
    shutil.rmtree(draft)
    return export_artefact(
        str(work / "artefact"), ckpt_path=str(ckpt), thresholds=str(final), allow_untrained=True
    )


# ------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen | None, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not become healthy in {seconds:.0f} s")


class LitServeServer:
    name = "litserve"

    def __init__(self, artefact: str, args: argparse.Namespace, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "dmpo_lightning.serve", artefact, "--port", str(self.port)]
        cmd += ["--device", "cpu", "--threads", str(args.threads), "--workers-per-device", str(args.workers)]
        cmd += ["--max-batch-size", str(args.max_batch_size), "--batch-timeout", str(args.batch_timeout)]
        cmd += ["--backend", args.backend, "--log-level", "warning", "--timeout", "600"]
        self.command = " ".join(cmd[1:])
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=log.parent)
        try:
            wait_healthy(self.port, self.proc)
        except RuntimeError as err:
            self.stop()
            raise RuntimeError(f"{err}; its log ends:\n{log.read_text()[-2000:]}") from None
        self.settings = {
            "workers": args.workers,
            "threads_per_worker": args.threads,
            "max_batch_size": args.max_batch_size,
            "batch_timeout_s": args.batch_timeout,
            "backend": args.backend,
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class RayServer:
    name = "ray"

    def __init__(self, artefact: str, args: argparse.Namespace, log: Path) -> None:
        import ray
        from ray import serve

        from dmpo_lightning.serve.ray_app import build_app

        self.port = free_port()
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=self.temp)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        from dmpo_lightning.deploy.format import read_manifest

        replicas = args.ray_stage_replicas or ",".join(map(str, self.plan(read_manifest(artefact), args)))
        self.settings = {
            "stage_replicas": replicas,
            "threads_per_replica": args.threads,
            "cpus_per_replica": args.ray_cpus_per_replica,
            "ray_cpus": args.ray_cpus,
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_timeout,
        }
        app = build_app(
            {
                "artefact": artefact,
                "stage_replicas": replicas,
                "threads": args.threads,
                "num_cpus": args.ray_cpus_per_replica,
                "max_batch_size": args.max_batch_size,
                "batch_wait_timeout_s": args.batch_timeout,
            }
        )
        serve.run(app, route_prefix="/")
        wait_healthy(self.port, None)
        self.command = f"ray_app.build_app({self.settings})"

    @staticmethod
    def plan(manifest: dict, args: argparse.Namespace) -> list[int]:
        """ray_app's default plan for budget 0.5: the artefact's exit histogram, else the stated one."""
        from dmpo_lightning.serve.replicas import exit_histogram, plan_replicas

        costs = manifest["costs"]["exit_gflops"]
        hist, source = exit_histogram(manifest, 0.5)
        if hist is None:
            hist, source = parse_histograms(args.histogram)[0.5], "--histogram of budget 0.5"
        plan = plan_replicas(costs, hist, args.ray_replicas or len(costs) + 1, source)
        print(f"ray: stage replicas {plan.replicas} from the {plan.source}", file=sys.stderr)
        return plan.replicas

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ load
def run_phase(port: int, images: list[bytes], budget: Any, requests: int, clients: int) -> dict[str, Any]:
    """``requests`` single-image requests from ``clients`` threads; per-request latency and answer."""
    lock = threading.Lock()
    next_index = [0]
    results: list[tuple[int, float, dict]] = []
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= requests or errors:
                break
            body = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                conn.request(
                    "POST", f"/predict?budget={budget}", body=body, headers={"Content-Type": "image/png"}
                )
                r = conn.getresponse()
                data = r.read()
            except OSError as err:
                errors.append(f"request {i}: {err}")
                break
            latency = time.perf_counter() - t0
            if r.status != 200:
                errors.append(f"request {i}: HTTP {r.status} {data[:200]!r}")
                break
            with lock:
                results.append((i, latency, json.loads(data)["predictions"][0]))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"phase at budget {budget} failed: {errors[0]}")
    return {"wall_s": wall, "images_per_s": requests / wall, "results": sorted(results, key=lambda r: r[0])}


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(
    server: Any, images: list[bytes], labels: list[int] | None, budgets: list[Any], num_exits: int, args
) -> dict:
    for b in budgets:  # warm-up: every budget, unmeasured
        run_phase(server.port, images, b, args.warmup, args.clients)
    rounds: dict[Any, list[dict]] = {b: [] for b in budgets}
    for _ in range(args.repeats):
        for b in budgets:
            rounds[b].append(run_phase(server.port, images, b, args.requests, args.clients))
    out = {}
    for b in budgets:
        phases = rounds[b]
        latencies = [lat for ph in phases for _, lat, _ in ph["results"]]
        rows = {i % len(images): row for ph in phases for i, _, row in ph["results"]}
        all_rows = [row for ph in phases for _, _, row in ph["results"]]
        exits = [row["exit"] for row in all_rows]
        entry = {
            "images_per_s": statistics.median(ph["images_per_s"] for ph in phases),
            "images_per_s_rounds": [ph["images_per_s"] for ph in phases],
            "latency_ms": {f"p{q}": 1000 * percentile(latencies, q) for q in (50, 95, 99)},
            "mean_gflops": statistics.fmean(row["gflops"] for row in all_rows),
            "exit_histogram": [exits.count(e) for e in range(1, num_exits + 1)],
            "rows_by_image": rows,
        }
        if labels is not None:
            hits = [rows[i]["class_index"] == labels[i] for i in rows]
            entry["accuracy"] = sum(hits) / len(hits)
        out[str(b)] = entry
    return out


def check_against_predictor(artefact: str, images: list[bytes], budgets: list[Any], measured: dict) -> int:
    """Predictions and exits of the served rows that differ from EarlyExitPredictor's (0 expected)."""
    from dmpo_lightning.deploy.predictor import EarlyExitPredictor
    from dmpo_lightning.images import decode_image

    predictor = EarlyExitPredictor.load(artefact, budget=next(b for b in budgets if b != "full"))
    x = torch.stack([predictor.transform(decode_image(b).image) for b in images])
    mismatches = 0
    for b in budgets:
        if b == "full":
            continue
        predictor.set_budget(float(b))
        outs = [predictor(c) for c in x.split(32)]
        pred = torch.cat([o.prediction for o in outs]).tolist()
        exits = torch.cat([o.exit for o in outs]).tolist()
        for i, row in measured[str(b)]["rows_by_image"].items():
            mismatches += (row["class_index"] != pred[i]) + (row["exit"] != exits[i])
    return mismatches


# ------------------------------------------------------------------------------------------ report
def summarise(server: str, measured: dict, budgets: list[Any]) -> list[dict[str, Any]]:
    full = measured["full"]
    rows = []
    for b in budgets:
        m = measured[str(b)]
        flops_speedup = full["mean_gflops"] / m["mean_gflops"]
        measured_speedup = m["images_per_s"] / full["images_per_s"]
        rows.append(
            {
                "server": server,
                "budget": b,
                "images_per_s": m["images_per_s"],
                **m["latency_ms"],
                "mean_gflops": m["mean_gflops"],
                "exit_histogram": m["exit_histogram"],
                "flops_speedup": flops_speedup,
                "measured_speedup": measured_speedup,
                "ratio": measured_speedup / flops_speedup,
                "accuracy": m.get("accuracy"),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| server | budget | images/s | p50 ms | p95 ms | p99 ms | GFLOPs/image | exits | FLOPs speed-up | "
        "measured speed-up | measured / FLOPs | accuracy |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f} %"
        lines.append(
            f"| {r['server']} | {r['budget']} | {r['images_per_s']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | "
            f"{r['p99']:.0f} | {r['mean_gflops']:.4g} | {'/'.join(map(str, r['exit_histogram']))} | "
            f"{r['flops_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {r['ratio']:.2f} | {acc} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    labels = None
    try:
        if args.synthetic:
            histograms = parse_histograms(args.histogram)
            images = random_images(args.num_images, 224, 3)
            artefact = synthetic_artefact(args.synthetic, histograms, images, work)
            source = (
                f"{args.synthetic}, random weights, thresholds set to the exit histograms {histograms} (%)"
            )
        else:
            artefact = os.path.abspath(args.artefact)
            from dmpo_lightning.deploy.format import read_manifest

            size = read_manifest(artefact)["preprocessing"]["input_size"]
            if args.images:
                images = folder_images(args.images)
            elif args.fashion_mnist_test:
                images, labels = fashion_mnist_test(args.fashion_mnist_test)
            else:
                images = random_images(args.num_images, int(size[-1]), int(size[0]))
            source = f"artefact {artefact}"
        from dmpo_lightning.deploy.format import read_manifest

        manifest = read_manifest(artefact)
        budgets: list[Any] = [
            "full",
            *(args.budgets or [float(p["budget"]) for p in manifest["operating_points"]]),
        ]
        report: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "model": source,
            "images": len(images),
            "clients": args.clients,
            "requests_per_phase": args.requests,
            "repeats": args.repeats,
            "warmup_requests": args.warmup,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "servers": {},
        }
        all_rows = []
        for name in args.server:
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            server = (LitServeServer if name == "litserve" else RayServer)(
                artefact, args, work / f"{name}.log"
            )
            startup = time.perf_counter() - t0
            try:
                measured = measure(
                    server, images, labels, budgets, len(manifest["costs"]["exit_gflops"]), args
                )
            finally:
                server.stop()
            mismatches = (
                None if args.no_check else check_against_predictor(artefact, images, budgets, measured)
            )
            rows = summarise(name, measured, budgets)
            all_rows += rows
            for m in measured.values():
                m.pop("rows_by_image")
            report["servers"][name] = {
                "settings": server.settings,
                "startup_s": startup,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "predictor_mismatches": mismatches,
                "phases": measured,
                "rows": rows,
            }
            print(f"{name}: started in {startup:.0f} s, predictor mismatches: {mismatches}", file=sys.stderr)
            print(markdown(rows), flush=True)
        for r in all_rows:
            if r["budget"] == 0.5:
                verdict = "met" if r["ratio"] >= TARGET_RATIO else "NOT met"
                print(
                    f"target measured/FLOPs >= {TARGET_RATIO} at budget 0.5 ({r['server']}): "
                    f"{r['ratio']:.2f} {verdict}"
                )
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out + ".json", "x") as f:
                json.dump(report, f, indent=1)
            with open(args.out + ".md", "x") as f:
                f.write(f"`{report['command']}`\n\n{markdown(all_rows)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
