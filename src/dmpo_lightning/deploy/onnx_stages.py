"""One ONNX graph per exit stage, and a small onnxruntime chain with batch compaction.

Stage ``k`` runs the blocks between exit ``k-1`` and exit ``k`` plus head ``k`` (stage 0 also the patch
embedding): ``stage_0(images) -> (tokens, logits)``, ``stage_k(tokens) -> (tokens, logits)``, the last stage
returns logits only. Every graph has a dynamic batch dimension. The runtime scores each stage's logits with
the same incremental rule as ``MultiExitViT.forward_early_exit`` and feeds only the samples that stay to the
next graph, so it takes the same decisions (tested: 0 mismatches, logits within 1e-4).

The graphs are written by torch's current exporter, ``torch.onnx.export(..., dynamo=True)`` (``torch.export``
+ onnxscript), with the batch dimension declared dynamic through ``dynamic_shapes``; fused attention
(``scaled_dot_product_attention``) and the RoPE of EVA02 export as they are.

Needs the ``[export]`` extra (``onnx``, ``onnxruntime``, ``onnxscript``).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dmpo_lightning.deploy.format import ArtefactError
from dmpo_lightning.files import file_sha256
from dmpo_lightning.models.exit_rules import exit_score_step
from dmpo_lightning.models.multi_exit import MultiExitViT

__all__ = ["EXPORTER", "OPSET", "OnnxStages", "export_stages", "require_onnx", "stage_file"]

OPSET = 18
"""ONNX opset of the stage graphs (the dynamo exporter's own; onnxruntime >= 1.14 runs it)."""

EXPORTER = "torch.onnx.export(dynamo=True)"
"""How the stage graphs are written (recorded in the artefact's manifest)."""


def stage_file(k: int) -> str:
    """File name of stage ``k`` (0-based)."""
    return f"stage_{k}.onnx"


class _Stage(nn.Module):
    def __init__(self, model: MultiExitViT, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k
        self.start = 0 if k == 0 else model.exit_blocks[k - 1]
        self.stop = model.exit_blocks[k]
        self.last = k == model.num_exits - 1

    def forward(self, x: torch.Tensor) -> Any:
        # the model's own stage: RoPE backbones (EVA02) need their rotary embedding passed to every block
        tokens, logits = self.model.run_stage(self.k, x)
        return logits if self.last else (tokens, logits)


def require_onnx(what: str, modules: Sequence[str] = ("onnx", "onnxruntime", "onnxscript")) -> None:
    """Raise an ``ImportError`` naming the ``[export]`` extra if one of ``modules`` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{what} needs {' and '.join(missing)}; install the extra: pip install 'dmpo-lightning[export]'"
        )


@torch.no_grad()
def export_stages(model: MultiExitViT, directory: str, input_shape: Sequence[int]) -> list[str]:
    """Write one ONNX graph per stage of a :class:`~dmpo_lightning.models.MultiExitViT` into ``directory``.

    Args:
        model: The model (eval mode is set for the export).
        directory: An existing, empty folder.
        input_shape: ``(C, H, W)`` of one image.

    Returns:
        The written file names.
    """
    require_onnx("ONNX export")
    import onnx  # optional extra [export], imported lazily when stages are exported

    was_training = model.training
    model.eval()
    files = []
    x = torch.zeros((2, *(int(s) for s in input_shape)))
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            for k in range(model.num_exits):
                stage = _Stage(model, k).eval()
                last = k == model.num_exits - 1
                in_name = "images" if k == 0 else "tokens_in"
                out_names = ["logits"] if last else ["tokens", "logits"]
                path = os.path.join(directory, stage_file(k))
                torch.onnx.export(
                    stage,
                    (x,),
                    path,
                    input_names=[in_name],
                    output_names=out_names,
                    dynamic_shapes=({0: batch},),
                    opset_version=OPSET,
                    dynamo=True,
                    external_data=False,  # one file per stage, weights inside (checksummed by the manifest)
                    verbose=False,
                )
                onnx.checker.check_model(path)
                files.append(stage_file(k))
                if not last:
                    x = stage(x)[0]
    finally:
        model.train(was_training)
    return files


class OnnxStages:
    """The exported stage graphs on onnxruntime (CPU), chained with batch compaction.

    Args:
        sessions: One ``onnxruntime.InferenceSession`` per stage.
        num_classes: Classes of every exit.
    """

    def __init__(self, sessions: Sequence[Any], num_classes: int) -> None:
        self.sessions = list(sessions)
        self.num_classes = num_classes

    @classmethod
    def load(cls, directory: str, manifest: Mapping[str, Any], num_threads: int | None = None) -> OnnxStages:
        """Open the stage graphs listed in the manifest.

        Raises:
            ArtefactError: If the artefact has no ONNX stages or one is missing or unreadable.
            ImportError: If onnxruntime is not installed.
        """
        info = manifest.get("onnx")
        if not info:
            raise ArtefactError(
                "this artefact has no ONNX stages; export it with `dmpo export ... --onnx` for backend='onnx'"
            )
        require_onnx("backend='onnx'", ("onnxruntime",))
        import onnxruntime as ort  # optional extra [export], imported lazily for backend='onnx'

        options = ort.SessionOptions()
        threads = num_threads if num_threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        options.intra_op_num_threads = max(threads, 0)
        options.inter_op_num_threads = 1
        sessions = []
        for entry in info["stages"]:
            path = os.path.join(directory, entry["file"])
            if not os.path.isfile(path):
                raise ArtefactError(f"ONNX stage {path} is missing; the artefact is incomplete")
            if file_sha256(path) != entry["sha256"]:
                raise ArtefactError(
                    f"ONNX stage {path} is corrupt or truncated (sha256 differs); export again"
                )
            try:
                sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
            except Exception as err:  # onnxruntime raises its own exception types
                raise ArtefactError(f"ONNX stage {path} cannot be loaded ({err})") from err
        return cls(sessions, int(manifest["model"]["num_classes"]))

    def stage_outputs(self, k: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Run stage ``k`` on ``x`` and return its outputs as tensors."""
        session = self.sessions[k]
        name = session.get_inputs()[0].name
        outs = session.run(None, {name: x.detach().cpu().float().contiguous().numpy()})
        return [torch.from_numpy(o) for o in outs]

    def run(
        self,
        x: torch.Tensor,
        thresholds: Sequence[float],
        rule: str,
        temperatures: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Early exit on ``x``: ``(prediction, 0-based exit, score, logits)`` per sample.

        ``temperatures`` (one per exit): exit k is scored on ``logits / T_k``; the logits returned are raw.
        """
        k_total = len(self.sessions)
        if len(thresholds) != k_total:
            raise ValueError(f"got {len(thresholds)} thresholds for {k_total} stages")
        batch = x.shape[0]
        prediction = torch.empty(batch, dtype=torch.long)
        exit_index = torch.empty(batch, dtype=torch.long)
        score_out = torch.empty(batch, dtype=torch.float32)
        logits_out = torch.empty(batch, self.num_classes, dtype=torch.float32)
        active = torch.arange(batch)
        current = x
        prev_pred: torch.Tensor | None = None
        prev_run: torch.Tensor | None = None
        for k in range(k_total):
            outs = self.stage_outputs(k, current)
            tokens, logits = (None, outs[0]) if k == k_total - 1 else (outs[0], outs[1])
            scaled = logits if temperatures is None else logits.float() / float(temperatures[k])
            score, pred, run = exit_score_step(scaled, rule, prev_pred, prev_run)  # type: ignore[arg-type]
            leave = torch.ones_like(pred, dtype=torch.bool) if k == k_total - 1 else score >= thresholds[k]
            idx = active[leave]
            prediction[idx] = pred[leave]
            exit_index[idx] = k
            score_out[idx] = score[leave].float()
            logits_out[idx] = logits[leave].float()
            stay = ~leave
            if not bool(stay.any()):
                break
            assert tokens is not None
            active, current, prev_pred, prev_run = active[stay], tokens[stay], pred[stay], run[stay]
        return prediction, exit_index, score_out, logits_out
