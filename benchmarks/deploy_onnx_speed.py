"""onnxruntime vs PyTorch speed of an exported early-exit artefact (quickstart architecture).

Builds the model of ``configs/quickstart.yaml`` (8 blocks, dim 96, patch 7, 28x28 grey, exits after blocks
2/4/6/8) with random weights, or takes ``--artefact`` (exported with ``--onnx``), exports it with its ONNX
stages, and times ``EarlyExitPredictor`` with ``backend="torch"`` and ``backend="onnx"`` on the embedded
Fashion-MNIST test images (preprocessed once), interleaved, median of repeats. With random weights the
thresholds are score quantiles of the same model on calibration images (``--quantile``), so the exits are
spread the way a calibrated budget spreads them; the timings are real, accuracies meaningless.

Every run checks that both backends give the same predictions and exits (0 mismatches) and logits within
1e-4. ``--threads 1`` (default) pins both runtimes to one thread; ``/proc/loadavg`` is recorded because a
shared machine slows whichever pass it hits.

    python benchmarks/deploy_onnx_speed.py --threads 1 --out benchmarks/results/deploy_onnx_speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def _fake_run(folder: Path, quantile: float) -> Path:
    """A quickstart-architecture checkpoint with random weights and a thresholds file at score quantiles."""
    from dmpo_lightning.constants import THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
    from dmpo_lightning.data.fashion_mnist import load_fashion_mnist_subset
    from dmpo_lightning.files import file_sha256
    from dmpo_lightning.models.exit_rules import exit_scores
    from dmpo_lightning.module import DMPOModule

    config = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    init = {k: v for k, v in config["model"]["init_args"].items() if k != "optimizer"}
    torch.manual_seed(0)
    module = DMPOModule(num_classes=10, **init).eval()
    with torch.no_grad():  # random heads would be near-uniform; scale them so confidences vary
        for name, p in module.model.named_parameters():
            if name.startswith("exits."):
                p.mul_(4.0)
    (folder / "checkpoints").mkdir(parents=True)
    ckpt = folder / "checkpoints" / "last.ckpt"
    dm = {k: v for k, v in config["data"]["init_args"].items()}
    dm.update(image_size=28, in_chans=1, timm_model=init["backbone"])
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": dm,
        },
        ckpt,
    )
    images = torch.from_numpy(load_fashion_mnist_subset().train_images[:512].copy()).float() / 255
    x = ((images - 0.5) / 0.5)[:, None]
    with torch.no_grad():
        scores, _ = exit_scores(module.model(x), "confidence")
    t = [float(scores[:, k].quantile(quantile)) for k in range(scores.shape[1] - 1)]
    (folder / "thresholds.json").write_text(
        json.dumps(
            {
                "format": THRESHOLDS_FORMAT,
                "format_version": THRESHOLDS_FORMAT_VERSION,
                "fingerprint": module.model_fingerprint(),
                "checkpoint_hash": f"file:{file_sha256(str(ckpt))}",
                "budgets": [{"budget": 0.5, "unit": "fraction", "thresholds": [*t, "-inf"]}],
            }
        )
    )
    return ckpt


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artefact", help="an artefact exported with --onnx (default: build one)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quantile", type=float, default=0.5, help="threshold quantile for random weights")
    parser.add_argument("--out", help="write OUT.json (never overwritten)")
    args = parser.parse_args(argv)
    if args.out and os.path.exists(f"{args.out}.json"):
        parser.error(f"{args.out}.json exists; choose another --out")
    with open("/proc/loadavg") as f:
        load_before = f.read().strip()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    from dmpo_lightning.data.fashion_mnist import load_fashion_mnist_subset
    from dmpo_lightning.deploy.export import export_artefact
    from dmpo_lightning.deploy.predictor import EarlyExitPredictor

    with tempfile.TemporaryDirectory() as tmp:
        art = args.artefact
        if art is None:
            ckpt = _fake_run(Path(tmp) / "run", args.quantile)
            art = export_artefact(
                str(Path(tmp) / "artefact"),
                ckpt_path=str(ckpt),
                thresholds=str(Path(tmp) / "run" / "thresholds.json"),
                onnx=True,
            )
        pt = EarlyExitPredictor.load(art, budget=args.budget)
        ox = EarlyExitPredictor.load(art, budget=args.budget, backend="onnx")
        from PIL import Image

        pixels = load_fashion_mnist_subset().test_images[: args.images]
        x = torch.stack([pt.transform(Image.fromarray(p)) for p in pixels])

        a, b = pt(x), ox(x)
        mismatches = {
            "prediction": int((a.prediction != b.prediction).sum()),
            "exit": int((a.exit != b.exit).sum()),
            "max_abs_logit_diff": float((a.logits - b.logits).abs().max()),
        }
        histogram = torch.bincount(a.exit - 1, minlength=pt.num_exits).tolist()
        results = []
        for bs in args.batch_sizes:
            batches = [x[i : i + bs] for i in range(0, len(x), bs)]
            times: dict[str, list[float]] = {"torch": [], "onnx": []}
            for predictor in (pt, ox):  # warm-up
                predictor(batches[0])
            for _ in range(args.repeats):
                for name, predictor in (("torch", pt), ("onnx", ox)):
                    start = time.perf_counter()
                    for batch in batches:
                        predictor(batch)
                    times[name].append((time.perf_counter() - start) / len(x))
            row = {
                "batch_size": bs,
                "torch_ms_per_image": 1e3 * statistics.median(times["torch"]),
                "onnx_ms_per_image": 1e3 * statistics.median(times["onnx"]),
            }
            row["onnx_speedup"] = row["torch_ms_per_image"] / row["onnx_ms_per_image"]
            results.append(row)
        with open("/proc/loadavg") as f:
            load = f.read().strip()
        report = {
            "threads": args.threads,
            "images": len(x),
            "budget": args.budget,
            "exit_histogram": histogram,
            "mean_gflops": float(a.gflops.mean()),
            "agreement": mismatches,
            "results": results,
            "loadavg_before": load_before,
            "loadavg_after": load,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "python": sys.version.split()[0],
        }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{args.out}.json", "x") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
