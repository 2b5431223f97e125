"""Stage-wise scale-out on Ray Serve: one deployment per exit stage, pooling samples with ``@serve.batch``.

::

    HTTP -> Ingress --(one call per image)--> stage_1 --(samples that continue)--> stage_2 -> ... -> stage_K

- ``Ingress`` checks and decodes requests exactly as ``dmpo serve`` does (same limits, same refusals,
  same prediction rows) and sends each image to ``stage_1``.
- ``stage_k`` (one deployment per exit, ``Stage`` bound K times) runs the blocks from exit ``k - 1`` to
  exit ``k`` and head ``k`` on a batch pooled by ``@serve.batch`` from every request in flight, decides
  with the artefact's exit rule and thresholds who leaves, and hands each remaining sample to
  ``stage_{k+1}`` through its deployment handle. Samples at different budgets share the stage's compute
  (the blocks do not depend on the budget) and are decided with their own budget's thresholds.
- Replicas per stage default to the budget's exit histogram x stage cost
  (:func:`dmpo_lightning.serve.replicas.plan_replicas`): the stages most samples reach get the most
  replicas. ``stage_replicas`` sets them by hand; ``autoscale`` lets Ray Serve scale each stage between 1
  and its planned count by queue length.

Run it::

    serve run dmpo_lightning.serve.ray_app:build_app artefact=artefacts/quickstart budget=0.5 replicas=6

or deploy ``configs/serve/ray_serve.yaml`` (docs/serve.md: a multi-node cluster). Needs the ``[ray]`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from dmpo_lightning.deploy.format import read_manifest
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.deploy.preprocess import build_eval_transform
from dmpo_lightning.models.exit_policy import ExitPolicy
from dmpo_lightning.models.exit_rules import is_local_rule
from dmpo_lightning.predictions import PredictionRow
from dmpo_lightning.serve.batcher import RequestBatcher
from dmpo_lightning.serve.http import read_payload
from dmpo_lightning.serve.payload import FULL, BadRequest, Limits, decode_image, match_budget
from dmpo_lightning.serve.replicas import ReplicaPlan, exit_histogram, plan_replicas

__all__ = ["Ingress", "IngressReplica", "RayServeOptions", "Stage", "StageReplica", "build_app", "parse_args"]

logger = logging.getLogger(__name__)

MAX_ONGOING = 1024
"""Requests one replica may hold at once: every sample in flight waits in a stage replica for the next
stage, so this must be far above the batch size for batches to fill."""


@dataclass
class RayServeOptions:
    """The application's arguments (``serve run ... key=value`` or ``args:`` in the config file).

    Attributes:
        artefact: Folder written by ``dmpo export`` (on every node, same path).
        budget: Operating point the replica plan is made for, and the default of requests.
        replicas: Total stage replicas shared out by exit histogram x stage cost (>= the number of stages).
        stage_replicas: Replicas of each stage by hand (overrides ``replicas``), e.g. ``[3, 2, 1, 1]``.
        autoscale: Let Ray Serve scale each stage between 1 and its planned replicas.
        ingress_replicas: Replicas of the HTTP ingress (decoding and preprocessing).
        max_batch_size: Samples per stage call (``@serve.batch``).
        batch_wait_timeout_s: How long a stage waits to fill a batch.
        threads: Torch intra-op threads per stage replica.
        num_cpus: CPUs Ray reserves per stage replica (default: ``threads``).
        num_gpus: GPUs per stage replica (0: CPU).
        max_body_mb, max_images, max_pixels: Request limits, as for ``dmpo serve``.
        backbone_weights: Local timm weights file of an artefact that references its frozen backbone.
    """

    artefact: str
    budget: float | str = 0.5
    replicas: int | None = None
    stage_replicas: list[int] | None = None
    autoscale: bool = False
    ingress_replicas: int = 1
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    threads: int = 1
    num_cpus: float | None = None
    num_gpus: float = 0.0
    max_body_mb: float = 16.0
    max_images: int = 64
    max_pixels: int = Limits().max_pixels
    backbone_weights: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)

    def limits(self) -> Limits:
        """The request limits."""
        return Limits(int(self.max_body_mb * 1024 * 1024), self.max_images, self.max_pixels)


def _number(name: str, value: Any, kind: type, minimum: float) -> Any:
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from None
    if (isinstance(out, float) and not math.isfinite(out)) or out < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return out


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} is not true or false")


def parse_args(args: Mapping[str, Any]) -> RayServeOptions:
    """Check the application arguments (strings from ``serve run`` or typed values from a config file).

    Raises:
        ValueError: Naming the argument that is wrong (one sentence).
    """
    known = {f for f in RayServeOptions.__dataclass_fields__ if f != "plan"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; the arguments are {sorted(known)}")
    if "artefact" not in args:
        raise ValueError("give the artefact: serve run dmpo_lightning.serve.ray_app:build_app artefact=DIR")
    # absolute: the replicas may start in another working folder (on a cluster: the same path on every node)
    opts = RayServeOptions(artefact=os.path.abspath(str(args["artefact"])))
    manifest = read_manifest(opts.artefact)
    budgets = [float(p["budget"]) for p in manifest["operating_points"]]
    try:
        opts.budget = match_budget(args.get("budget", 0.5), budgets)
    except BadRequest as err:
        raise ValueError(f"budget: {err.message}") from None
    ints = {"ingress_replicas": 1, "max_batch_size": 1, "threads": 1, "max_images": 1, "max_pixels": 1}
    for name, low in ints.items():
        if name in args:
            setattr(opts, name, _number(name, args[name], int, low))
    for name in ("batch_wait_timeout_s", "num_gpus"):
        if name in args:
            setattr(opts, name, _number(name, args[name], float, 0.0))
    if "max_body_mb" in args:
        opts.max_body_mb = _number("max_body_mb", args["max_body_mb"], float, 1e-6)
    if args.get("num_cpus") is not None:
        opts.num_cpus = _number("num_cpus", args["num_cpus"], float, 0.0)
    if "autoscale" in args:
        opts.autoscale = _boolean("autoscale", args["autoscale"])
    if args.get("backbone_weights"):
        opts.backbone_weights = str(args["backbone_weights"])
    k = len(manifest["costs"]["exit_gflops"])
    if args.get("stage_replicas") is not None:
        given = args["stage_replicas"]
        if isinstance(given, str):
            given = [g for g in given.replace("[", "").replace("]", "").split(",") if g.strip()]
        counts = [_number("stage_replicas", g, int, 1) for g in given]
        if len(counts) != k:
            raise ValueError(f"stage_replicas={list(given)} must give one count per stage ({k})")
        opts.stage_replicas = counts
    if args.get("replicas") is not None:
        opts.replicas = _number("replicas", args["replicas"], int, 1)
    if opts.stage_replicas is None:
        hist, source = exit_histogram(manifest, opts.budget)
        if hist is None and opts.replicas is not None:
            raise ValueError(f"replicas={opts.replicas}: {source}; set stage_replicas=... by hand")
        if hist is None:  # one replica per stage, and the plan says why
            hist, source = [1.0] * k, f"{source}: one replica per stage"
        plan = plan_replicas(manifest["costs"]["exit_gflops"], hist, opts.replicas or k, source)
        opts.stage_replicas = plan.replicas
        opts.plan = asdict(plan)
    else:
        opts.plan = asdict(ReplicaPlan(list(opts.stage_replicas), [], [], [], "set by hand (stage_replicas)"))
    return opts


# ------------------------------------------------------------------------------------------ stages
@dataclass
class _Sample:
    x: torch.Tensor  # images [C, H, W] at stage 1, tokens [N, D] later
    budget: float | str
    carry: dict[str, torch.Tensor]  # the exit rule's per-sample state (patience: last prediction, run)


def _policies(predictor: EarlyExitPredictor, budgets: Sequence[float | str]) -> dict[Any, ExitPolicy]:
    assert predictor.model is not None
    batcher = RequestBatcher(predictor, 1)
    return {
        b: predictor.model.early_exit_policy(
            batcher.thresholds(b),
            predictor.exit_rule,  # type: ignore[arg-type]
            temperatures=predictor.temperatures,
        )
        for b in budgets
    }


class StageReplica:
    """Exit stage ``k`` (0-based): blocks up to exit ``k``, head ``k``, the exit decision.

    Each replica loads the artefact and runs only its stage. Calls carry one sample; ``@serve.batch``
    pools the samples of every request in flight into batches of up to ``max_batch_size``.
    """

    def __init__(self, options: RayServeOptions, k: int, next_stage: DeploymentHandle | None) -> None:
        torch.set_num_threads(options.threads)
        device = "cuda" if options.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        manifest = read_manifest(options.artefact)
        budgets: list[float | str] = [float(p["budget"]) for p in manifest["operating_points"]]
        self.predictor = EarlyExitPredictor.load(
            options.artefact,
            budget=float(budgets[0]),
            device=device,
            backbone_weights=options.backbone_weights,
        )
        self.model = self.predictor.model
        assert self.model is not None
        self.device = self.predictor.device
        self.k = k
        self.last = k == self.model.num_exits - 1
        self.policies = _policies(self.predictor, [*budgets, FULL])
        self.next_stage = next_stage
        self.run_batch.set_max_batch_size(options.max_batch_size)  # type: ignore[attr-defined]
        self.run_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run_batch(self, samples: list[_Sample]) -> list[Any]:
        """One stage call on the pooled samples: a result dict for those that leave, else a ``_Sample``."""
        assert self.model is not None
        k = self.k
        x = torch.stack([s.x for s in samples]).to(self.device)
        budgets = sorted({s.budget for s in samples}, key=str)
        head = any(self.policies[b].needs_head(k) for b in budgets)
        with torch.no_grad():
            tokens, logits = self.model.run_stage(k, x, head=head)
        out: list[Any] = [None] * len(samples)
        for b in budgets:
            idx = [i for i, s in enumerate(samples) if s.budget == b]
            if logits is None:  # a disabled exit of a local rule: everyone continues, state unchanged
                for i in idx:
                    out[i] = _Sample(tokens[i].cpu(), b, samples[i].carry)
                continue
            carry = {key: torch.stack([samples[i].carry[key] for i in idx]) for key in samples[idx[0]].carry}
            leave, score, pred, carry = self.policies[b].decide(k, logits[idx], carry)
            confidence = logits[idx].float().softmax(dim=-1).max(dim=-1).values
            for j, i in enumerate(idx):
                if leave is None or bool(leave[j]):
                    s = float(score[j])
                    out[i] = {
                        "class_index": int(pred[j]),
                        "exit": k + 1,
                        "confidence": float(confidence[j]),
                        "score": s if math.isfinite(s) else None,
                    }
                else:
                    out[i] = _Sample(tokens[i].cpu(), b, {key: v[j].cpu() for key, v in carry.items()})
        return out

    async def __call__(self, sample: _Sample) -> dict[str, Any]:
        """Run this stage on one sample, then the next stages if it does not leave here."""
        result = await self.run_batch(sample)
        if isinstance(result, dict):
            return result
        assert self.next_stage is not None, "the last stage must take every sample"
        return await self.next_stage.remote(result)


# ------------------------------------------------------------------------------------------ ingress
class IngressReplica:
    """HTTP: ``POST /predict``, ``GET /health``, ``GET /info`` (as ``dmpo serve``)."""

    def __init__(self, options: RayServeOptions, first_stage: DeploymentHandle) -> None:
        torch.set_num_threads(1)
        self.opts = options
        self.limits = options.limits()
        self.manifest = read_manifest(options.artefact)
        self.budgets = [float(p["budget"]) for p in self.manifest["operating_points"]]
        self.transform = build_eval_transform(self.manifest["preprocessing"])
        self.class_names = list(self.manifest["class_names"])
        self.exit_gflops = [float(c) for c in self.manifest["costs"]["exit_gflops"]]
        self.full_gflops = float(self.manifest["costs"].get("full_gflops", self.exit_gflops[-1]))
        self.first_stage = first_stage

    def _gflops(self, budget: float | str, exit_number: int) -> float:

        last = exit_number == len(self.exit_gflops)
        if budget == FULL and last and is_local_rule(self.manifest["exit_rule"]):
            return self.full_gflops  # the heads of the disabled exits are skipped
        return self.exit_gflops[exit_number - 1]

    def info(self) -> dict[str, Any]:
        """What ``GET /info`` shows."""
        from dmpo_lightning.serve.litserve_app import artefact_info  # optional extra [serve], lazily

        info = artefact_info(self.manifest, self.opts.artefact)
        info["serving"] = {
            "server": "ray serve",
            "default_budget": self.opts.budget,
            "stage_replicas": self.opts.stage_replicas,
            "autoscale": self.opts.autoscale,
            "replica_plan": self.opts.plan,
            "max_batch_size": self.opts.max_batch_size,
            "batch_wait_timeout_s": self.opts.batch_wait_timeout_s,
            "limits": asdict(self.limits),
        }
        return {"model": info}

    async def __call__(self, request: Request) -> Response:
        """Route by path."""
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path == "/health":
            return PlainTextResponse("ok")
        if request.method == "GET" and path == "/info":
            return JSONResponse(self.info())
        if path != "/predict" or request.method != "POST":
            return JSONResponse({"detail": "use POST /predict, GET /health or GET /info"}, status_code=404)
        try:
            payload = await read_payload(request, self.limits, self.budgets)
            n = len(payload.images)
            xs = [
                decode_image(
                    data,
                    self.transform,
                    max_pixels=self.limits.max_pixels,
                    where="the image" if n == 1 else f"image {i} (of {n})",
                )
                for i, data in enumerate(payload.images)
            ]
        except BadRequest as err:
            return JSONResponse({"detail": err.message}, status_code=err.status)
        budget = self.opts.budget if payload.budget is None else payload.budget
        results = await asyncio.gather(*(self.first_stage.remote(_Sample(x, budget, {})) for x in xs))
        rows = []
        for i, r in enumerate(results):
            rows.append(
                PredictionRow(
                    class_index=r["class_index"],
                    class_name=self.class_names[r["class_index"]],
                    exit=r["exit"],
                    confidence=r["confidence"],
                    score=r["score"],
                    gflops=self._gflops(budget, r["exit"]),
                    path=payload.names[i] if payload.names else None,
                ).to_dict()
            )
        return JSONResponse({"budget": budget, "predictions": rows})


def _warn_if_too_large(cpus: float, gpus_per_replica: float) -> None:
    """Say so when the replicas ask for more CPUs than the running cluster has (Ray would wait for them)."""
    import ray  # optional extra [ray], imported lazily

    if not ray.is_initialized():
        return
    have = float(ray.cluster_resources().get("CPU", 0.0))
    if cpus > have:
        logger.warning(
            "the stage replicas and the ingress reserve %.2f CPUs but the cluster has %.2f: Ray waits until "
            "nodes join; lower replicas= or num_cpus= (CPUs per stage replica) to fit",
            cpus,
            have,
        )


Stage = serve.deployment(max_ongoing_requests=MAX_ONGOING)(StageReplica)
"""The exit-stage deployment (bound once per stage by :func:`build_app`)."""

Ingress = serve.deployment(max_ongoing_requests=MAX_ONGOING)(IngressReplica)
"""The HTTP ingress deployment."""


def build_app(args: Mapping[str, Any]) -> Any:
    """The Ray Serve application (``serve run dmpo_lightning.serve.ray_app:build_app artefact=DIR ...``).

    Raises:
        ValueError: For a wrong argument (see :class:`RayServeOptions`).
    """
    opts = parse_args(args)
    assert opts.stage_replicas is not None
    k_total = len(opts.stage_replicas)
    cpus = opts.threads if opts.num_cpus is None else opts.num_cpus
    actor = {"num_cpus": cpus, "num_gpus": opts.num_gpus}
    nxt = None
    for k in reversed(range(k_total)):
        n = opts.stage_replicas[k]
        scaling: dict[str, Any] = (
            {"autoscaling_config": {"min_replicas": 1, "max_replicas": n, "initial_replicas": n}}
            if opts.autoscale
            else {"num_replicas": n}
        )
        nxt = Stage.options(name=f"stage_{k + 1}", ray_actor_options=actor, **scaling).bind(opts, k, nxt)
    ingress_cpus = min(1.0, cpus) if cpus else 0
    _warn_if_too_large(sum(opts.stage_replicas) * cpus + opts.ingress_replicas * ingress_cpus, opts.num_gpus)
    return Ingress.options(
        num_replicas=opts.ingress_replicas, ray_actor_options={"num_cpus": ingress_cpus}
    ).bind(opts, nxt)
