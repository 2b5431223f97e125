"""EarlyExitPredictor: run an exported artefact with true early exits, without Lightning.

Imports torch, timm, torchvision, PIL and safetensors only (``onnxruntime`` for ``backend="onnx"``), so a
service can depend on the package without the training stack being imported.

Example:
    >>> predictor = EarlyExitPredictor.load("artefacts/quickstart", budget=0.5)  # doctest: +SKIP
    >>> for row in predictor.predict_paths("new_images/"):  # doctest: +SKIP
    ...     print(row.path, row.class_name, row.exit, f"{row.confidence:.3f}", row.gflops)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from dmpo_lightning.deploy.format import (
    MANIFEST_FILE,
    ONNX_DIR,
    WEIGHTS_FILE,
    ArtefactError,
    decode_float,
    file_sha256,
    read_manifest,
    tensors_sha256,
)
from dmpo_lightning.deploy.preprocess import build_eval_transform, list_images, load_image

if TYPE_CHECKING:
    from dmpo_lightning.models.multi_exit import MultiExitViT

__all__ = ["BatchPrediction", "EarlyExitPredictor", "ImagePrediction"]

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


@dataclass
class ImagePrediction:
    """One image's result from :meth:`EarlyExitPredictor.predict_paths`.

    ``error`` is set (and the other fields are ``None``) when the image could not be read and
    ``on_error="report"`` was chosen.
    """

    path: str
    class_index: int | None
    class_name: str | None
    exit: int | None
    confidence: float | None
    gflops: float | None
    error: str | None = None


def _check_budget_choice(manifest: Mapping[str, Any], budget: float) -> Mapping[str, Any]:
    points = manifest["operating_points"]
    for p in points:
        if abs(float(p["budget"]) - float(budget)) <= 1e-9 * max(1.0, abs(float(budget))):
            return p
    unit = manifest.get("budget_unit", "fraction")
    raise ValueError(
        f"the artefact has no thresholds for budget {budget} ({unit}); it has: "
        f"{[p['budget'] for p in points]} (calibrate more with `dmpo test --model.init_args.budgets=[...]` "
        "and export again)"
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
    ) -> None:
        self.manifest = dict(manifest)
        self.model = model
        self.onnx_stages = onnx_stages
        self.backend: Backend = "onnx" if onnx_stages is not None else "torch"
        self.device = torch.device(device)
        self.class_names: list[str] = list(manifest["class_names"])
        self.exit_rule: str = manifest["exit_rule"]
        self.exit_gflops: list[float] = [float(c) for c in manifest["costs"]["exit_gflops"]]
        self.transform = build_eval_transform(manifest["preprocessing"])
        self.input_size = tuple(int(s) for s in manifest["preprocessing"]["input_size"])
        self._thresholds: list[float] = []
        self.budget: float = float("nan")
        self.set_budget(budget)
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

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ArtefactError: If the artefact is corrupt, truncated, of a newer format, or its backbone
                weights cannot be found or do not match the checksum.
            ValueError: If the budget is not one the artefact was calibrated for (the available are listed).
        """
        path = os.fspath(path)
        manifest = read_manifest(path)
        if os.path.basename(path) == MANIFEST_FILE:
            path = os.path.dirname(path) or "."
        _check_budget_choice(manifest, budget)
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        if backend == "onnx":
            from dmpo_lightning.deploy.onnx_stages import OnnxStages

            stages = OnnxStages.load(os.path.join(path, ONNX_DIR), manifest, num_threads=num_threads)
            return cls(manifest, None, budget=budget, device="cpu", onnx_stages=stages)
        model = _load_model(path, manifest, backbone_weights=backbone_weights, allow_download=allow_download)
        return cls(manifest, model, budget=budget, device=device)

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
            return self.onnx_stages.run(x, self._thresholds, self.exit_rule)
        assert self.model is not None
        out = self.model.forward_early_exit(x.to(self.device), self._thresholds, self.exit_rule)
        return out.prediction, out.exit_index, out.score, out.logits

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> BatchPrediction:
        """Early-exit predictions for a preprocessed batch ``[B, C, H, W]`` (see :attr:`transform`).

        Raises:
            ValueError: If the batch does not have the model's input shape.
        """
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
        pred, exit_index, score, logits = self._run_batch(images.float())
        pred, exit_index, score, logits = pred.cpu(), exit_index.cpu(), score.cpu(), logits.cpu()
        confidence = logits.float().softmax(dim=-1).max(dim=-1).values
        gflops = torch.tensor(self.exit_gflops, dtype=torch.float64)[exit_index]
        return BatchPrediction(pred, exit_index + 1, confidence, score, gflops, logits)

    def preprocess(self, paths: Sequence[str]) -> torch.Tensor:
        """Read and preprocess image files into one batch (raises on the first unreadable file)."""
        return torch.stack([self.transform(load_image(p)) for p in paths])

    def predict_paths(
        self,
        paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike],
        batch_size: int = 64,
        on_error: Literal["raise", "report"] = "raise",
    ) -> Iterator[ImagePrediction]:
        """Predict image files: a folder (recursive), a ``.txt`` list of paths, or a list of files/folders.

        The file list is resolved before anything is yielded, so a missing path or an empty folder fails
        first. Images are read in batches.

        Args:
            paths_or_folder: What to predict.
            batch_size: Images per forward.
            on_error: ``raise`` (default) stops at an unreadable image or one the model cannot take, naming
                it; ``report`` yields an :class:`ImagePrediction` with ``error`` set and continues.

        Yields:
            One :class:`ImagePrediction` per image, in the resolved order.

        Raises:
            FileNotFoundError: If a path does not exist.
            ValueError: If no image is found, ``batch_size`` is not positive, or (``raise``) an image cannot
                be read or preprocessed.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if on_error not in ("raise", "report"):
            raise ValueError(f"on_error must be 'raise' or 'report', got {on_error!r}")
        files = list_images(paths_or_folder)
        return self._predict_files(files, batch_size, on_error)

    def _predict_files(self, files: list[str], batch_size: int, on_error: str) -> Iterator[ImagePrediction]:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            tensors: list[torch.Tensor | None] = []
            errors: list[str | None] = []
            for p in chunk:
                try:
                    tensors.append(self.transform(load_image(p)))
                    errors.append(None)
                except Exception as err:  # an unreadable file: PIL raises many types
                    reason = f"{type(err).__name__}: {err}"
                    if on_error == "raise":
                        raise ValueError(f"cannot use image {p}: {reason}") from err
                    tensors.append(None)
                    errors.append(reason)
            good = [t for t in tensors if t is not None]
            result = self(torch.stack(good)) if good else None
            j = 0
            for p, t, error in zip(chunk, tensors, errors, strict=True):
                if t is None or result is None:
                    yield ImagePrediction(p, None, None, None, None, None, error=error)
                    continue
                c = int(result.prediction[j])
                yield ImagePrediction(
                    path=p,
                    class_index=c,
                    class_name=self.class_names[c],
                    exit=int(result.exit[j]),
                    confidence=float(result.confidence[j]),
                    gflops=float(result.gflops[j]),
                )
                j += 1


def _load_model(
    path: str, manifest: Mapping[str, Any], *, backbone_weights: str | None, allow_download: bool
) -> MultiExitViT:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dmpo_lightning.deploy.build import build_model
    from dmpo_lightning.deploy.merge import merge_lora

    info = manifest["weights"]
    weights_path = os.path.join(path, info.get("file", WEIGHTS_FILE))
    if not os.path.isfile(weights_path):
        raise ArtefactError(f"artefact {path} is incomplete: {weights_path} is missing")
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
    if info.get("merged_lora"):
        merge_lora(model)
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


def _describe_source(options: Mapping[str, Any], backbone_weights: str | None) -> str:
    if backbone_weights:
        return backbone_weights
    if options.get("checkpoint_path"):
        return str(options["checkpoint_path"])
    return f"timm's pretrained {options['backbone']!r}"


def _build_with_reference(
    path: str,
    options: Mapping[str, Any],
    ref: Mapping[str, Any],
    backbone_weights: str | None,
    allow_download: bool,
) -> MultiExitViT:
    from dmpo_lightning.deploy.build import build_model

    if backbone_weights is not None:
        if not os.path.isfile(backbone_weights):
            raise FileNotFoundError(f"backbone_weights {backbone_weights} does not exist")
        return build_model(options, checkpoint_path=backbone_weights)
    # the absolute path recorded at export first: a relative checkpoint_path was relative to the training cwd
    local = ref.get("checkpoint_path") or options.get("checkpoint_path")
    if local and os.path.isfile(local):
        return build_model(options, checkpoint_path=local)
    if allow_download:
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
