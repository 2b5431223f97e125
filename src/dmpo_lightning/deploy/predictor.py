"""EarlyExitPredictor: run an exported artefact with true early exits, without Lightning.

Imports torch, timm, torchvision, PIL and safetensors only (``onnxruntime`` for ``backend="onnx"``), so a
service can depend on the package without the training stack being imported.

Example:
    >>> predictor = EarlyExitPredictor.load("artefacts/quickstart", budget=0.5)  # doctest: +SKIP
    >>> for row in predictor.predict_paths("new_images/"):  # doctest: +SKIP
    ...     print(row.path, row.class_name, row.exit, f"{row.confidence:.3f}", row.gflops)

Rows are :class:`~dmpo_lightning.predictions.PredictionRow` objects: the same schema as the CSV of
``dmpo predict`` and ``python -m dmpo_lightning.deploy`` and the JSON of the server.

Throughput mode (``engine=True`` / :meth:`EarlyExitPredictor.predict_batches`): the samples that continue
after an exit are pooled across input batches, so every stage runs on full batches
(:class:`~dmpo_lightning.models.engine.EarlyExitEngine`); same predictions and exits, in input order (logits
and scores within float32 rounding: other batch compositions can change some kernels' summation order).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dmpo_lightning.deploy.build import build_model
from dmpo_lightning.deploy.format import (
    MANIFEST_FILE,
    ONNX_DIR,
    WEIGHTS_FILE,
    ArtefactError,
    decode_float,
    read_manifest,
)
from dmpo_lightning.deploy.merge import merge_peft
from dmpo_lightning.deploy.onnx_stages import OnnxStages
from dmpo_lightning.deploy.preprocess import build_eval_transform
from dmpo_lightning.files import file_sha256, tensors_sha256
from dmpo_lightning.images import DEFAULT_MAX_PIXELS, check_max_pixels, decode_image, list_images
from dmpo_lightning.models.engine import EarlyExitEngine
from dmpo_lightning.models.multi_exit import MultiExitViT, check_finite_inputs
from dmpo_lightning.predictions import PredictionRow, error_sentence

__all__ = ["BatchPrediction", "EarlyExitPredictor", "check_device"]

Backend = Literal["torch", "onnx"]


@dataclass
class BatchPrediction:
    """Per-sample results of one batch (all tensors of length B, on the CPU).

    Attributes:
        prediction: Class index.
        exit: Exit the sample left at, numbered from 1 as in the ``dmpo test`` report.
        confidence: Maximum softmax probability at that exit.
        score: The exit rule's score at that exit (equals ``confidence`` for the ``confidence`` rule).
        gflops: GFLOPs the sample cost (the counted cost ``C_k`` of its exit: embedding, blocks and the
            heads of every exit it passed).
        logits: Logits of the exit it left at ``[B, C]``.
    """

    prediction: torch.Tensor
    exit: torch.Tensor
    confidence: torch.Tensor
    score: torch.Tensor
    gflops: torch.Tensor
    logits: torch.Tensor


def check_device(device: str | torch.device, option: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine.

    Raises:
        ValueError: In one sentence naming ``option``, for a name torch does not know (``banana``) or a
            device this machine lacks (``cuda:7`` with fewer GPUs, ``cuda`` without CUDA, ``mps``).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{option} {device!r} is not a torch device; use cpu, cuda, cuda:<index> or mps"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {device!r}: this machine has no CUDA GPU that torch can use; use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"{option} {device!r}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {device!r}: MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{option} {device!r} is not supported here; use cpu, cuda, cuda:<index> or mps")
    return dev


def _check_budget_choice(manifest: Mapping[str, Any], budget: float) -> Mapping[str, Any]:
    points = manifest["operating_points"]
    for p in points:
        if abs(float(p["budget"]) - float(budget)) <= 1e-9 * max(1.0, abs(float(budget))):
            return p
    unit = manifest.get("budget_unit", "fraction")
    raise ValueError(
        f"the artefact has no thresholds for budget {budget} ({unit}); it has: "
        f"{[p['budget'] for p in points]} (calibrate more with `dmpo test "
        "--evaluation.budgets=[...]` and export again)"
    )


class EarlyExitPredictor:
    """Early-exit inference from a ``dmpo export`` artefact; always in eval mode, gradients off.

    Build it with :meth:`load`. ``predictor(images)`` takes a preprocessed batch ``[B, C, H, W]``;
    :meth:`predict_paths` reads image files and preprocesses them exactly like the evaluation images of
    training (:attr:`transform`).
    """

    def __init__(
        self,
        manifest: Mapping[str, Any],
        model: MultiExitViT | None,
        *,
        budget: float,
        device: str | torch.device = "cpu",
        onnx_stages: Any = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_pixels_option: str = "max_pixels",
    ) -> None:
        self.manifest = dict(manifest)
        self.max_pixels = check_max_pixels(max_pixels, max_pixels_option)
        self.max_pixels_option = max_pixels_option
        self.model = model
        self.onnx_stages = onnx_stages
        self.backend: Backend = "onnx" if onnx_stages is not None else "torch"
        self.device = torch.device(device)
        self.class_names: list[str] = list(manifest["class_names"])
        self.exit_rule: str = manifest["exit_rule"]
        self.exit_gflops: list[float] = [float(c) for c in manifest["costs"]["exit_gflops"]]
        self.transform = build_eval_transform(manifest["preprocessing"])
        self.input_size = tuple(int(s) for s in manifest["preprocessing"]["input_size"])
        self.image_mode = "L" if self.input_size[0] == 1 else "RGB"
        self._thresholds: list[float] = []
        self.temperatures: list[float] | None = _manifest_temperatures(manifest, len(self.exit_gflops))
        self.budget: float = float("nan")
        self.set_budget(budget)
        if (manifest.get("inputs") or {}).get("global_step") == 0:
            warnings.warn(
                "this artefact was exported from a checkpoint saved before any training step (global_step 0, "
                "dmpo export --allow-untrained): its exits and adapters hold their initial weights, so its "
                "predictions are not those of a trained model",
                UserWarning,
                stacklevel=3,
            )
        if self.model is not None:
            self.model.to(self.device).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        budget: float = 0.5,
        device: str | torch.device = "cpu",
        *,
        backend: Backend = "torch",
        backbone_weights: str | None = None,
        allow_download: bool = False,
        num_threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> EarlyExitPredictor:
        """Load an artefact.

        Args:
            path: The artefact directory written by ``dmpo export``.
            budget: Operating point (one of :attr:`budgets`, in the artefact's budget unit).
            device: Torch device of the model (the ONNX backend runs on onnxruntime's CPU provider).
            backend: ``torch`` (``MultiExitViT.forward_early_exit``) or ``onnx`` (the exported stage
                graphs on onnxruntime; needs ``dmpo export --onnx`` and the ``[export]`` extra).
            backbone_weights: Local timm weights file for an artefact that references (does not embed) the
                frozen backbone; checked against the artefact's checksum.
            allow_download: Let timm download the referenced pretrained backbone weights if no local file
                is available.
            num_threads: onnxruntime intra-op threads (default: ``OMP_NUM_THREADS``, else onnxruntime's
                choice); the torch backend uses ``torch.set_num_threads`` as set by the caller.
            max_pixels: Image files whose header gives more pixels are refused before they are decoded.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ArtefactError: If the artefact is corrupt, truncated, of a newer format, or its backbone
                weights cannot be found or do not match the checksum.
            ValueError: If the budget is not one the artefact was calibrated for (the available are listed),
                or ``device`` does not exist on this machine.
        """
        path = os.fspath(path)
        manifest = read_manifest(path)
        if os.path.basename(path) == MANIFEST_FILE:
            path = os.path.dirname(path) or "."
        _check_budget_choice(manifest, budget)
        check_max_pixels(max_pixels)
        check_device(device)
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        if backend == "onnx":
            stages = OnnxStages.load(os.path.join(path, ONNX_DIR), manifest, num_threads=num_threads)
            return cls(manifest, None, budget=budget, device="cpu", onnx_stages=stages, max_pixels=max_pixels)
        model = _load_model(path, manifest, backbone_weights=backbone_weights, allow_download=allow_download)
        return cls(manifest, model, budget=budget, device=device, max_pixels=max_pixels)

    # ------------------------------------------------------------------------------------------ budgets
    @property
    def budgets(self) -> list[float]:
        """The budgets the artefact holds thresholds for (unit: :attr:`budget_unit`)."""
        return [float(p["budget"]) for p in self.manifest["operating_points"]]

    @property
    def budget_unit(self) -> str:
        """``fraction`` (of the full model's cost) or ``gflops``."""
        return str(self.manifest.get("budget_unit", "fraction"))

    @property
    def thresholds(self) -> list[float]:
        """Per-exit thresholds of the current budget (the last exit takes every sample left)."""
        return list(self._thresholds)

    @property
    def operating_point(self) -> dict[str, Any]:
        """The calibrated operating point of the current budget (calibration and test accuracy and cost)."""
        return dict(_check_budget_choice(self.manifest, self.budget))

    def set_budget(self, budget: float) -> None:
        """Switch to another calibrated budget.

        Raises:
            ValueError: If the artefact has no thresholds for ``budget`` (the available ones are listed).
        """
        point = _check_budget_choice(self.manifest, budget)
        thresholds = [decode_float(t) for t in point["thresholds"]]
        if len(thresholds) != len(self.exit_gflops) or any(math.isnan(t) for t in thresholds):
            raise ArtefactError(
                f"operating point {budget} holds {thresholds}, not one threshold per exit "
                f"({len(self.exit_gflops)}); the artefact is corrupt"
            )
        self._thresholds = thresholds
        self.budget = float(point["budget"])

    # ------------------------------------------------------------------------------------------ inference
    @property
    def num_exits(self) -> int:
        """Number of exits."""
        return len(self.exit_gflops)

    def _run_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One early-exit batch: ``(prediction, 0-based exit, score, logits)``; the only backend switch."""
        if self.onnx_stages is not None:
            return self.onnx_stages.run(x, self._thresholds, self.exit_rule, temperatures=self.temperatures)
        assert self.model is not None
        out = self.model.forward_early_exit(
            x.to(self.device), self._thresholds, self.exit_rule, temperatures=self.temperatures
        )
        return out.prediction, out.exit_index, out.score, out.logits

    def _check_images(self, images: Any) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, C, H, W] = [B, {self.input_size}]; got {shape}")
        if tuple(images.shape[1:]) != self.input_size:
            raise ValueError(
                f"images have shape [B, C, H, W] = {tuple(images.shape)} but the model takes "
                f"[B, {', '.join(map(str, self.input_size))}]; preprocess with predictor.transform"
            )
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be float (normalised), got {images.dtype}; use predictor.transform"
            )
        check_finite_inputs(images)
        return images.float()

    def _result(
        self, pred: torch.Tensor, exit_index: torch.Tensor, score: torch.Tensor, logits: torch.Tensor
    ) -> BatchPrediction:
        pred, exit_index, score, logits = pred.cpu(), exit_index.cpu(), score.cpu(), logits.cpu()
        confidence = logits.float().softmax(dim=-1).max(dim=-1).values
        gflops = torch.tensor(self.exit_gflops, dtype=torch.float64)[exit_index]
        return BatchPrediction(pred, exit_index + 1, confidence, score, gflops, logits)

    def _as_prediction(self, out: Any) -> BatchPrediction:
        return self._result(out.prediction, out.exit_index, out.score, out.logits)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> BatchPrediction:
        """Early-exit predictions for a preprocessed batch ``[B, C, H, W]`` (see :attr:`transform`).

        Raises:
            ValueError: If the batch does not have the model's input shape or holds NaN or infinite values.
        """
        return self._result(*self._run_batch(self._check_images(images)))

    def engine(self, batch_size: int = 64) -> Any:
        """The batching engine of throughput mode (torch backend only).

        An :class:`~dmpo_lightning.models.engine.EarlyExitEngine` with this predictor's model, the current
        budget's thresholds, the exit rule and the temperatures.

        Raises:
            ValueError: For the ONNX backend or a bad ``batch_size``.
        """
        if self.model is None:
            raise ValueError(
                "throughput mode (engine) needs the torch backend; the ONNX backend runs batch by batch: "
                "load with backend='torch' or call the predictor per batch"
            )
        return EarlyExitEngine(
            self.model,
            self._thresholds,
            batch_size=batch_size,
            rule=self.exit_rule,  # type: ignore[arg-type]
            temperatures=self.temperatures,
        )

    def predict_batches(
        self, batches: Iterable[torch.Tensor], engine_batch_size: int | None = None
    ) -> Iterator[BatchPrediction]:
        """Throughput mode: one :class:`BatchPrediction` per preprocessed batch, in input order.

        The samples that continue after each exit are pooled across batches (per-stage queues), so every
        stage runs on ``engine_batch_size`` samples (default: the first batch's size) until the input ends.
        Predictions and exits equal those of calling the predictor on each batch (logits and scores within
        float32 rounding, tested to 1e-5). A batch is yielded once all its samples have left, so the
        generator runs ahead of the caller by a few batches.

        Raises:
            ValueError: For a batch the model cannot take (checked as it arrives), the ONNX backend or a bad
                ``engine_batch_size``.
        """
        if engine_batch_size is not None:
            self.engine(engine_batch_size)  # a bad size or backend fails before the first batch is read
        elif self.model is None:
            self.engine()
        session = None
        for images in batches:
            x = self._check_images(images).to(self.device)
            if session is None:
                session = self.engine(engine_batch_size or int(x.shape[0])).session()
            for out in session.push(x):
                yield self._as_prediction(out)
        if session is not None:
            for out in session.flush():
                yield self._as_prediction(out)

    def read_image(self, path: str | os.PathLike[str]) -> tuple[torch.Tensor, str]:
        """One image file decoded and preprocessed: ``(tensor [C, H, W], source_mode)``.

        ``source_mode`` is the file's own PIL mode when it was converted to the model's channels, else
        ``""``. Decoding is :func:`dmpo_lightning.images.decode_image` (16-bit and float images scaled,
        non-finite pixels and images over :attr:`max_pixels` refused), as for the training images.

        Raises:
            ValueError: With one sentence, if the image cannot be used.
        """
        image, mode = decode_image(path, max_pixels=self.max_pixels, option=self.max_pixels_option)
        return self.transform(image), ("" if mode == self.image_mode else mode)

    def preprocess(self, paths: Sequence[str]) -> torch.Tensor:
        """Read and preprocess image files into one batch (raises on the first unreadable file)."""
        return torch.stack([self.read_image(p)[0] for p in paths])

    def predict_paths(
        self,
        paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike],
        batch_size: int = 64,
        on_error: Literal["raise", "report"] = "raise",
        engine: bool = False,
    ) -> Iterator[PredictionRow]:
        """Predict image files: a folder (recursive), a ``.txt`` list of paths, or a list of files/folders.

        The file list is resolved before anything is yielded, so a missing path or an empty folder fails
        first. Images are read in batches.

        Args:
            paths_or_folder: What to predict.
            batch_size: Images per forward.
            on_error: ``raise`` (default) stops at an unreadable image or one the model cannot take, naming
                it; ``report`` yields a row with ``error`` set and continues.
            engine: Throughput mode (torch backend): pool the samples that continue after each exit across
                batches so every stage runs on ``batch_size`` samples; same results, same order, yielded
                a few batches later.

        Yields:
            One :class:`~dmpo_lightning.predictions.PredictionRow` per image, in the resolved order.

        Raises:
            FileNotFoundError: If a path does not exist.
            ValueError: If no image is found, ``batch_size`` is not positive, ``engine`` is asked of the
                ONNX backend, or (``raise``) an image cannot be read or preprocessed.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if on_error not in ("raise", "report"):
            raise ValueError(f"on_error must be 'raise' or 'report', got {on_error!r}")
        if engine:
            self.engine(batch_size)  # the ONNX backend is refused before any file is read
        files = list_images(paths_or_folder, what="images")
        chunks = self._read_chunks(files, batch_size, on_error)
        if engine:
            return self._predict_chunks_engine(chunks, batch_size)
        return self._predict_chunks(chunks)

    def _read_chunks(self, files: list[str], batch_size: int, on_error: str) -> Iterator[_Chunk]:
        """One :class:`_Chunk` per ``batch_size`` files."""
        for start in range(0, len(files), batch_size):
            chunk = _Chunk(files[start : start + batch_size], [], [], [])
            for p in chunk.paths:
                try:
                    tensor, mode = self.read_image(p)
                    error = None
                except Exception as err:  # an unusable file: its row carries the reason
                    if on_error == "raise":
                        raise ValueError(f"cannot use image {p}: {error_sentence(err)}") from err
                    tensor, mode, error = None, "", error_sentence(err)
                chunk.tensors.append(tensor)
                chunk.errors.append(error)
                chunk.modes.append(mode)
            yield chunk

    def _predict_chunks(self, chunks: Iterable[_Chunk]) -> Iterator[PredictionRow]:
        for chunk in chunks:
            good = [t for t in chunk.tensors if t is not None]
            result = self(torch.stack(good)) if good else None
            yield from self._rows(chunk, result)

    def _predict_chunks_engine(self, chunks: Iterable[_Chunk], batch_size: int) -> Iterator[PredictionRow]:
        """Throughput mode: chunks wait (in order) for their batch to come back from the engine."""
        session = self.engine(batch_size).session()
        waiting: list[tuple[_Chunk, bool]] = []  # (chunk, whether its images were pushed), in input order
        results: list[BatchPrediction] = []

        def ready() -> Iterator[PredictionRow]:
            while waiting and (not waiting[0][1] or results):
                chunk, pushed = waiting.pop(0)
                yield from self._rows(chunk, results.pop(0) if pushed else None)

        for item in chunks:
            good = [t for t in item.tensors if t is not None]
            waiting.append((item, bool(good)))
            if good:
                x = self._check_images(torch.stack(good)).to(self.device)
                results += [self._as_prediction(o) for o in session.push(x)]
            yield from ready()
        results += [self._as_prediction(o) for o in session.flush()]
        yield from ready()

    def _rows(self, chunk: _Chunk, result: BatchPrediction | None) -> Iterator[PredictionRow]:
        j = 0
        for p, t, err, mode in zip(chunk.paths, chunk.tensors, chunk.errors, chunk.modes, strict=True):
            if t is None or result is None:
                yield PredictionRow.failed(err or "the image could not be read", path=p)
                continue
            c = int(result.prediction[j])
            yield PredictionRow(
                class_index=c,
                class_name=self.class_names[c],
                exit=int(result.exit[j]),
                confidence=float(result.confidence[j]),
                score=float(result.score[j].float()),
                gflops=float(result.gflops[j]),
                path=p,
                source_mode=mode,
            )
            j += 1


@dataclass
class _Chunk:
    """Files read for one forward: their paths, tensors (``None``: unusable), errors and source modes."""

    paths: list[str]
    tensors: list[torch.Tensor | None]
    errors: list[str | None]
    modes: list[str]


def _manifest_temperatures(manifest: Mapping[str, Any], num_exits: int) -> list[float] | None:
    """The per-exit temperatures the thresholds were calibrated with (``None``: raw logits)."""
    temps = manifest.get("temperatures")
    if temps is None:
        return None
    try:
        values = [float(t) for t in temps]
    except (TypeError, ValueError) as err:
        raise ArtefactError(f"the manifest's temperatures {temps!r} are not numbers; it is corrupt") from err
    if len(values) != num_exits or not all(math.isfinite(t) and t > 0 for t in values):
        raise ArtefactError(
            f"the manifest holds temperatures {temps!r}; need {num_exits} finite values > 0 (one per exit)"
        )
    return None if all(t == 1.0 for t in values) else values


def _load_model(
    path: str, manifest: Mapping[str, Any], *, backbone_weights: str | None, allow_download: bool
) -> MultiExitViT:
    info = manifest["weights"]
    weights_path = os.path.join(path, info.get("file", WEIGHTS_FILE))
    if not os.path.isfile(weights_path):
        what = "a folder, not the weights file" if os.path.isdir(weights_path) else "missing"
        raise ArtefactError(f"artefact {path} is incomplete: {weights_path} is {what}; export it again")
    digest = file_sha256(weights_path)
    if digest != info.get("sha256"):
        raise ArtefactError(
            f"{weights_path} is corrupt or truncated: its sha256 {digest[:12]}... differs from the "
            f"manifest's {str(info.get('sha256'))[:12]}...; export the artefact again"
        )
    try:
        embedded = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtefactError(f"{weights_path} is not a readable safetensors file ({err})") from err
    options = manifest["model"]
    ref = info.get("reference")
    if ref is None:
        model = build_model(options)
    else:
        model = _build_with_reference(path, options, ref, backbone_weights, allow_download)
    _check_model_against_manifest(path, model, manifest)
    if info.get("merged"):
        merge_peft(model)
    state = model.state_dict()
    if ref is not None:
        keys = list(ref["keys"])
        absent = [k for k in keys if k not in state]
        if absent:
            raise ArtefactError(
                f"the rebuilt model lacks referenced tensors {absent[:5]}; is timm different?"
            )
        digest = tensors_sha256(state, keys)
        if digest != ref["sha256"]:
            raise ArtefactError(
                f"the backbone weights loaded from {_describe_source(options, backbone_weights)} do not "
                "match "
                f"the ones the model was trained with (sha256 {digest[:12]}... vs {ref['sha256'][:12]}...); "
                "give the right file with backbone_weights=..., or export with --embed-backbone"
            )
    missing, unexpected = model.load_state_dict(embedded, strict=False)
    expected_missing = set(ref["keys"]) if ref is not None else set()
    if unexpected or set(missing) != expected_missing:
        wrong = sorted(set(missing) - expected_missing)
        raise ArtefactError(
            f"weights in {weights_path} do not fit the model described by the manifest "
            f"(unexpected: {list(unexpected)[:5]}, not provided: {wrong[:5]})"
        )
    return model.eval()


def _check_model_against_manifest(path: str, model: MultiExitViT, manifest: Mapping[str, Any]) -> None:
    """The network the manifest's ``model`` options build has the exits, input and classes it lists."""
    pe: Any = model.backbone.patch_embed
    size = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else pe.img_size
    built = {
        "exit_blocks": list(model.exit_blocks),
        "preprocessing.input_size": [int(pe.proj.in_channels), int(size), int(size)],
        "class_names": int(model.num_classes),
    }
    listed = {
        "exit_blocks": list(manifest["exit_blocks"]),
        "preprocessing.input_size": list(manifest["preprocessing"]["input_size"]),
        "class_names": len(manifest["class_names"]),
    }
    for field, value in built.items():
        if listed[field] != value:
            what = "classes" if field == "class_names" else ""
            raise ArtefactError(
                f"artefact {path}: manifest field {field} is {listed[field]}{' ' + what if what else ''} but "
                f"the network its model options build has {value}{' ' + what if what else ''}; the artefact "
                "contradicts itself (edited or corrupt), so it is not used: export it again"
            )


def _describe_source(options: Mapping[str, Any], backbone_weights: str | None) -> str:
    if backbone_weights:
        return backbone_weights
    if options.get("checkpoint_path"):
        return str(options["checkpoint_path"])
    return f"timm's pretrained {options['backbone']!r}"


def _local_pretrained_file(name: str) -> bool:
    """Whether timm's pretrained weights of ``name`` are a local file that exists (no download needed).

    True for the packaged trunk ``dmpo_toy_vit_fmnist``.
    """
    try:
        cfg = timm.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        return False
    return bool(cfg is not None and cfg.file and os.path.isfile(cfg.file))


def _build_with_reference(
    path: str,
    options: Mapping[str, Any],
    ref: Mapping[str, Any],
    backbone_weights: str | None,
    allow_download: bool,
) -> MultiExitViT:
    if backbone_weights is not None:
        if not os.path.isfile(backbone_weights):
            raise FileNotFoundError(f"backbone_weights {backbone_weights} does not exist")
        return build_model(options, checkpoint_path=backbone_weights)
    # the absolute path recorded at export first: a relative checkpoint_path was relative to the training cwd
    local = ref.get("checkpoint_path") or options.get("checkpoint_path")
    if local and os.path.isfile(local):
        return build_model(options, checkpoint_path=local)
    if allow_download or _local_pretrained_file(options["backbone"]):
        return build_model(options, pretrained=True)
    where = (
        f"the local file {local!r} (not found here)"
        if local
        else f"timm's pretrained {options['backbone']!r}"
    )
    raise ArtefactError(
        f"artefact {path} embeds only the trained weights; its frozen backbone weights come from {where}. "
        "Pass backbone_weights=<local timm weights file> (checked against the artefact's sha256), "
        "allow_download=True to let timm fetch them, or export with --embed-backbone"
    )
