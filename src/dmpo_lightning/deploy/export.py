"""``dmpo export``: one self-contained artefact from a trained checkpoint and its calibrated thresholds.

Every check runs before anything is written; the artefact is assembled in a hidden temporary folder next to
the output and renamed into place at the end, so an interrupted or refused export leaves nothing behind and
an existing artefact is never overwritten.
"""

from __future__ import annotations

import errno
import glob
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dmpo_lightning.checkpointing import check_checkpoint_file, weights_hash
from dmpo_lightning.constants import MODEL_FINGERPRINT_KEYS
from dmpo_lightning.data.fashion_mnist import FASHION_MNIST_CLASSES
from dmpo_lightning.data.formats import image_folder_classes
from dmpo_lightning.data.registry import get_spec
from dmpo_lightning.data.transforms import is_native_small, resolve_data_config
from dmpo_lightning.deploy.build import build_model, model_options
from dmpo_lightning.deploy.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ONNX_DIR,
    WEIGHTS_FILE,
    decode_float,
    encode_float,
)
from dmpo_lightning.deploy.merge import check_mergeable, merge_peft
from dmpo_lightning.deploy.onnx_stages import EXPORTER, OPSET, export_stages, require_onnx
from dmpo_lightning.deploy.preprocess import resize_for
from dmpo_lightning.evaluation.flops import ExitCosts, count_exit_costs
from dmpo_lightning.evaluation.report import read_report
from dmpo_lightning.evaluation.thresholds import read_thresholds
from dmpo_lightning.files import (
    check_writable,
    file_sha256,
    read_json,
    tensors_sha256,
    to_jsonable,
    write_json,
)
from dmpo_lightning.models.adapters import PEFT_REGISTRY
from dmpo_lightning.models.multi_exit import MultiExitViT
from dmpo_lightning.options import dotted_options
from dmpo_lightning.version import __version__

__all__ = ["ExportInputs", "export_artefact", "resolve_run"]

FINGERPRINT_KEYS = MODEL_FINGERPRINT_KEYS


@dataclass(frozen=True)
class ExportInputs:
    """The input files of an export.

    Attributes:
        ckpt_path: The checkpoint to export.
        thresholds: The ``thresholds.json`` of a ``dmpo test`` of that checkpoint.
        report: The ``report.json`` beside it, or ``None``.
        found: How ``--run`` chose the files (one sentence), ``None`` when they were given.
    """

    ckpt_path: str
    thresholds: str
    report: str | None
    found: str | None = None


def _read_candidate(path: str) -> dict[str, Any]:
    """A thresholds.json found in a run, read for its hashes only (it is checked whole once chosen)."""
    data = read_json(path, "thresholds file", filename="thresholds.json", writer="`dmpo test`")
    if not isinstance(data, dict):
        raise ValueError(f"thresholds file {path} does not hold a JSON object")
    return data


def _test_reports(run: str) -> list[str]:
    """Every ``thresholds.json`` a ``dmpo test`` of the run's checkpoints may have written, newest first.

    ``dmpo test --ckpt_path <run>/checkpoints/x.ckpt`` writes ``<run>/dmpo_test``, ``<run>/dmpo_test_1``, ...;
    older versions wrote beside the run, into ``<run>_test``, ``<run>_test_1``, ... (``.../dmpo_test*``).
    """
    run = os.path.normpath(run)
    patterns = [
        os.path.join(glob.escape(run), "dmpo_test*", "thresholds.json"),
        os.path.join(glob.escape(run) + "_test*", "dmpo_test*", "thresholds.json"),
    ]
    found = {os.path.abspath(p) for pattern in patterns for p in glob.glob(pattern)}
    return sorted(found, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def _stored_hashes(thresholds: Mapping[str, Any]) -> set[str]:
    return {str(h) for h in (thresholds.get("checkpoint_hash"), thresholds.get("weights_hash")) if h}


class _CheckpointHashes:
    """The hashes ``dmpo test`` may have stored for a checkpoint (file, then weights), computed on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: str | None = None
        self._weights: str | None = None

    def matches(self, wanted: set[str]) -> bool:
        if self._file is None:
            self._file = f"file:{file_sha256(self.path)}"
        if self._file in wanted:
            return True
        if not any(h.startswith("weights:") for h in wanted):
            return False
        if self._weights is None:
            try:
                self._weights = weights_hash(_load_trained(self.path).model)
            except ValueError:  # a checkpoint that is not a DMPOModule's: nothing to match
                self._weights = ""
        return self._weights in wanted


def resolve_run(
    run: str, thresholds: str | None = None, report: str | None = None, ckpt_path: str | None = None
) -> ExportInputs:
    """Find the checkpoint, thresholds and report of a run folder ``runs/<name>/version_N``.

    Without ``thresholds``, the newest ``dmpo test`` report of the run (see :func:`_test_reports`) whose
    ``checkpoint_hash`` is one of the run's checkpoints (or ``ckpt_path``) is taken; with it, the checkpoint
    under ``<run>/checkpoints`` whose hash is the thresholds' is. So ``last.ckpt`` and the best checkpoint
    cannot be confused, and :attr:`ExportInputs.found` says which files were chosen.

    Raises:
        FileNotFoundError: If the run, a test report or the checkpoints are missing.
        ValueError: If no test report of the run belongs to one of its checkpoints.
    """
    if not os.path.isdir(run):
        raise FileNotFoundError(
            f"run folder {run} does not exist; give runs/<name>/version_N of a `dmpo fit`"
        )
    ckpts = (
        [ckpt_path]
        if ckpt_path is not None
        else sorted(glob.glob(os.path.join(run, "checkpoints", "*.ckpt")))
    )
    if not ckpts:
        raise FileNotFoundError(f"{run}/checkpoints holds no .ckpt file; give --ckpt_path")
    hashes = [_CheckpointHashes(c) for c in ckpts]
    candidates = [thresholds] if thresholds is not None else _test_reports(run)
    if not candidates:
        raise FileNotFoundError(
            f"no `dmpo test` report of {run} was found ({os.path.join(run, 'dmpo_test*')}/thresholds.json): "
            "run `dmpo test --ckpt_path <checkpoint of this run>` first (it calibrates the thresholds), or "
            "pass --thresholds"
        )
    for candidate in candidates:
        wanted = _stored_hashes(_read_candidate(candidate))
        chosen = next((h.path for h in hashes if h.matches(wanted)), None)
        if chosen is None:
            continue
        beside = os.path.join(os.path.dirname(candidate), "report.json")
        report_path = report if report is not None else (beside if os.path.isfile(beside) else None)
        found = None
        if thresholds is None:
            others = len(candidates) - 1
            found = (
                f"using the dmpo test report in {os.path.dirname(candidate)} (the newest of "
                f"{others + 1} in {run}) and checkpoint {chosen}, whose hash it was calibrated on"
            )
        return ExportInputs(ckpt_path=chosen, thresholds=candidate, report=report_path, found=found)
    names = ", ".join(os.path.basename(c) for c in ckpts)
    if thresholds is not None and ckpt_path is not None:  # both given: the caller names the mismatch
        return ExportInputs(ckpt_path=ckpt_path, thresholds=thresholds, report=report)
    raise ValueError(
        f"none of the dmpo test reports of {run} ({len(candidates)}: "
        f"{', '.join(os.path.dirname(c) for c in candidates[:3])}{' ...' if len(candidates) > 3 else ''}) "
        f"was calibrated on {'the checkpoint' if ckpt_path else 'one of its checkpoints'} ({names}); run "
        "`dmpo test --ckpt_path` on the checkpoint to deploy, or pass --ckpt_path and --thresholds explicitly"
    )


@dataclass
class _Trained:
    """A checkpoint and the network rebuilt from it (eval mode, its weights loaded)."""

    path: str
    ckpt: dict[str, Any]
    hparams: dict[str, Any]
    options: dict[str, Any]
    model: MultiExitViT

    @property
    def peft(self) -> str:
        return str(self.options["peft"]["method"])


def _load_trained(path: str) -> _Trained:
    """Read a ``dmpo fit`` checkpoint (weights only, no pickle) and rebuild its network.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is not a readable DMPOModule checkpoint or its weights do not fit its options.
    """
    check_checkpoint_file(path, option="--ckpt_path")  # missing, a folder, damaged or no checkpoint
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a DMPOModule checkpoint (no state_dict / hyper_parameters)")
    hparams = dict(ckpt["hyper_parameters"])
    options = model_options(hparams)
    model = build_model(options)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit the model its hyper_parameters describe: {err}") from err
    return _Trained(path, ckpt, hparams, options, model.eval())


def _check_trained(trained: _Trained, allow_untrained: bool) -> None:
    """Refuse a checkpoint saved before any optimisation step, unless ``allow_untrained``."""
    step = trained.ckpt.get("global_step")
    if allow_untrained or (isinstance(step, int) and step > 0):
        return
    what = "global_step 0" if step == 0 else "no global_step (not a checkpoint of `dmpo fit`)"
    raise ValueError(
        f"checkpoint {trained.path} was saved before any training step ({what}): its exits and adapters hold "
        "their initial weights, so the artefact would predict at random; export a trained checkpoint, or "
        "pass "
        "--allow-untrained to export it on purpose"
    )


def _check_inputs(
    trained: _Trained, inputs: ExportInputs, th: Mapping[str, Any], rep: Mapping[str, Any] | None
) -> str:
    """The thresholds and report belong to this checkpoint and model; returns the calibrated hash.

    Raises:
        ValueError: Naming the file and what differs.
    """
    wanted = str(th.get("checkpoint_hash", ""))
    actual = (
        f"file:{file_sha256(inputs.ckpt_path)}" if wanted.startswith("file:") else weights_hash(trained.model)
    )
    if wanted != actual:
        raise ValueError(
            f"{inputs.thresholds} was calibrated on another checkpoint (checkpoint_hash {wanted[:17]}...) "
            f"than {inputs.ckpt_path} ({actual[:17]}...); its thresholds would not fit these weights. Run "
            "`dmpo test "
            "--ckpt_path` on this checkpoint, or pass the matching --thresholds"
        )
    if rep is not None and rep.get("checkpoint_hash") not in (None, wanted):
        raise ValueError(
            f"{inputs.report} belongs to another checkpoint than {inputs.thresholds}; pass the matching "
            "report"
        )
    if rep is not None and isinstance(rep.get("config"), Mapping):
        # the report's config is the tested model's: options that change outputs without changing weights
        # (adapter_scale, lora_alpha, ...) are only caught here
        mine = dotted_options(to_jsonable(trained.options, default=repr))
        theirs = dotted_options(to_jsonable(model_options(rep["config"]), default=repr))
        differ = {k: (theirs[k], v) for k, v in mine.items() if k in theirs and theirs[k] != v}
        if differ:
            details = "; ".join(f"{k}: report {a!r} vs checkpoint {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"{inputs.report} was made with another model configuration ({details})")
    fingerprint = th.get("fingerprint") or {}
    options = dotted_options(trained.options)
    ours = {
        **{k: options.get(k) for k in FINGERPRINT_KEYS},
        "exits.blocks": list(trained.model.exit_blocks),
    }
    diff = {k: (fingerprint.get(k), v) for k, v in ours.items() if k in fingerprint and fingerprint[k] != v}
    if diff:
        details = "; ".join(f"{k}: thresholds {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{inputs.thresholds} was calibrated for another model ({details})")
    return wanted


def _preprocessing(ckpt: Mapping[str, Any], options: Mapping[str, Any], model: Any) -> dict[str, Any]:
    """The evaluation transform of the data module the model was trained with, as plain values."""
    pe = model.backbone.patch_embed
    in_chans, size = int(pe.proj.in_channels), int(pe.img_size[0])
    dm = ckpt.get("datamodule_hyper_parameters")
    if isinstance(dm, Mapping) and "dataset" in dm:
        spec = get_spec(dm["dataset"])
        cfg = resolve_data_config(
            in_chans=int(dm.get("in_chans", in_chans)),
            default_image_size=spec.default_image_size,
            timm_model=dm.get("timm_model"),
            image_size=dm.get("image_size"),
            mean=dm.get("mean"),
            std=dm.get("std"),
            interpolation=dm.get("interpolation"),
            crop_pct=dm.get("crop_pct"),
        )
        native = cfg.image_size if dm["dataset"] == "synthetic" else spec.native_size
        resize_mode = dm.get("resize_mode") or spec.default_resize_mode  # VTAB-1k squashes, no crop
        source = f"data module of the run ({dm['dataset']})"
        dm_chans = int(dm.get("in_chans", in_chans))
    else:
        warnings.warn(
            "the checkpoint holds no data-module settings; the preprocessing is taken from the backbone's "
            "timm config (resize + centre crop). Check it matches how the model was trained.",
            UserWarning,
            stacklevel=3,
        )
        try:
            cfg = resolve_data_config(
                in_chans=in_chans, default_image_size=size, timm_model=options["backbone"], image_size=size
            )
        except ValueError:
            cfg = resolve_data_config(in_chans=in_chans, default_image_size=size, image_size=size)
        native, source, dm_chans, resize_mode = None, "backbone's timm config", in_chans, "center_crop"
    if cfg.image_size != size or dm_chans != in_chans:
        raise ValueError(
            f"the data module fed {dm_chans}x{cfg.image_size}x{cfg.image_size} images but the model takes "
            f"{in_chans}x{size}x{size}; the checkpoint is inconsistent"
        )
    crop = "none" if is_native_small(cfg, native) else "squash" if resize_mode == "squash" else "center"

    return {
        "input_size": [in_chans, size, size],
        "channels": "L" if in_chans == 1 else "RGB",
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "interpolation": cfg.interpolation,
        "crop_pct": cfg.crop_pct,
        "crop_mode": crop,
        "resize": resize_for(size, cfg.crop_pct)
        if crop == "center"
        else [size, size]
        if crop == "squash"
        else None,
        "source": source,
        "steps": (
            f"convert to {'grey (L)' if in_chans == 1 else 'RGB'}; "
            + (
                f"resize shorter side to {resize_for(size, cfg.crop_pct)} ({cfg.interpolation}); "
                f"centre crop {size}; "
                if crop == "center"
                else f"resize to {size}x{size} ({cfg.interpolation}; aspect ratio not kept); "
                if crop == "squash"
                else f"images must be {size}x{size} (used as they are, like the training images); "
            )
            + "to tensor in [0, 1]; normalise with mean/std"
        ),
    }


def _class_names(ckpt: Mapping[str, Any], num_classes: int, given: Sequence[str] | None) -> list[str]:
    names: Sequence[str] | None = given if given is not None else ckpt.get("class_names")
    if names is None:
        dm = ckpt.get("datamodule_hyper_parameters") or {}
        dataset = dm.get("dataset") if isinstance(dm, Mapping) else None
        if dataset in ("fashion_mnist", "fashion_mnist_subset"):
            names = FASHION_MNIST_CLASSES
        elif (
            dataset == "image_folder" and dm.get("root") and os.path.isdir(os.path.join(dm["root"], "train"))
        ):
            names = image_folder_classes(dm["root"])
    if names is None:
        warnings.warn(
            "the checkpoint holds no class names and they cannot be read cheaply from the data module; "
            f"the artefact names them class_0..class_{num_classes - 1} (pass --class-names to set them)",
            UserWarning,
            stacklevel=3,
        )
        names = [f"class_{i}" for i in range(num_classes)]
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for a model with {num_classes} classes")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(
                f"class name {name!r} is given twice (classes {seen[name]} and {i}); every class needs its "
                "own name, or the predictions of two classes could not be told apart (fix --class-names)"
            )
        seen[name] = i
    return names


def _temperatures(th: Mapping[str, Any], path: str, num_exits: int) -> list[float]:
    """The thresholds file's per-exit temperatures (all 1.0 without calibration), checked."""
    temps = th.get("temperatures")
    if temps is None:
        return [1.0] * num_exits
    try:
        values = [float(t) for t in temps]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} holds temperatures {temps!r} that are not numbers") from err
    if len(values) != num_exits or not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"{path} holds temperatures {temps!r}; need {num_exits} finite values > 0")
    return values


def _operating_points(
    thresholds: Mapping[str, Any], report: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    entries = thresholds.get("budgets") or []
    if not entries:
        raise ValueError("the thresholds file holds no calibrated budget; run `dmpo test` with budgets")
    by_budget = {}
    if report is not None:
        for b in report.get("budgets") or []:
            by_budget[(round(float(b["budget"]), 12), b.get("budget_unit"))] = b
    points = []
    for e in entries:
        unit = e.get("unit", "fraction")
        r = by_budget.get((round(float(e["budget"]), 12), unit), {})
        thresholds_list = [encode_float(decode_float(t)) for t in e["thresholds"]]
        if r and [encode_float(decode_float(t)) for t in r["thresholds"]] != thresholds_list:
            raise ValueError(f"report and thresholds file disagree on the thresholds of budget {e['budget']}")
        points.append(
            {
                "budget": float(e["budget"]),
                "unit": unit,
                "thresholds": thresholds_list,
                "q": r.get("q"),
                "calibration": {
                    "accuracy": r.get("cal_accuracy"),
                    "gflops": r.get("cal_cost"),
                    "cost_fraction": e.get("cal_cost_fraction"),
                    "exit_histogram": r.get("cal_histogram"),
                },
                "test": {
                    "accuracy": e.get("test_accuracy", r.get("test_accuracy")),
                    "gflops": r.get("test_cost"),
                    "cost_fraction": r.get("test_cost_fraction"),
                    "exit_histogram": r.get("test_histogram"),
                },
            }
        )
    return points


@dataclass
class _ExportedForm:
    """The network as the artefact holds it: merged or not, what is embedded, what is referenced."""

    costs: ExitCosts
    costs_as_trained: ExitCosts
    merged_layers: list[str]
    state: dict[str, torch.Tensor]
    embedded_keys: list[str]
    contents: str
    reference: dict[str, Any] | None
    form: str


def _exported_form(
    trained: _Trained, input_shape: tuple[int, ...], *, merge: bool, embed_backbone: bool
) -> _ExportedForm:
    """Merge the PEFT method if asked, count the costs of the exported form, split embedded / referenced."""
    model, options = trained.model, trained.options
    spec = PEFT_REGISTRY.get(trained.peft)
    costs_as_trained = count_exit_costs(model, input_shape)
    merged_layers = merge_peft(model) if merge else []
    costs = count_exit_costs(model, input_shape) if merge else costs_as_trained
    state = model.state_dict()
    reproducible = bool(options.get("pretrained")) or bool(options.get("checkpoint_path"))
    if embed_backbone or spec.trains == "all" or not reproducible:
        embedded, contents = set(state), "all"
    else:
        embedded = set(model.trainable_state_dict())
        for name in merged_layers:
            embedded |= {k for k in state if k.startswith(f"{name}.")}
        contents = "trained" + (f" + {trained.peft} merged into the frozen layers" if merged_layers else "")
    reference_keys = sorted(set(state) - embedded)
    reference = None
    if reference_keys:
        local = options.get("checkpoint_path")
        reference = {
            "keys": reference_keys,
            "sha256": tensors_sha256(state, reference_keys),
            "timm_name": options["backbone"],
            "pretrained": bool(options.get("pretrained")),
            "checkpoint_path": os.path.abspath(local) if local else None,
            "checkpoint_file_sha256": file_sha256(local) if local and os.path.isfile(local) else None,
        }
    if merged_layers:
        form = (
            f"{trained.peft} merged into {len(merged_layers)} frozen layers: every block costs exactly the "
            "base model's FLOPs"
        )
    else:
        added = ", its added modules counted" if spec.trains == "peft" else ""
        form = f"as trained (peft.method={trained.peft}{added})"
    return _ExportedForm(
        costs, costs_as_trained, merged_layers, state, sorted(embedded), contents, reference, form
    )


def _manifest(
    trained: _Trained,
    exported: _ExportedForm,
    *,
    inputs: ExportInputs,
    checkpoint_hash: str,
    th: Mapping[str, Any],
    thresholds_path: str,
    rep: Mapping[str, Any] | None,
    class_names: list[str],
    preprocessing: dict[str, Any],
) -> dict[str, Any]:
    """Everything of the artefact that is not a tensor (``manifest.json``; see docs/deploy.md)."""
    model = trained.model
    exit_rule = th.get("rule") or (rep or {}).get("exit_rule")  # thresholds.json names its rule
    points = _operating_points(th, rep)
    units = {p["unit"] for p in points}
    costs, as_trained = exported.costs, exported.costs_as_trained
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_hash": checkpoint_hash,
        "checkpoint_file": os.path.basename(trained.path),
        "inputs": {
            "checkpoint": os.path.abspath(inputs.ckpt_path),
            "thresholds": os.path.abspath(inputs.thresholds),
            "report": os.path.abspath(inputs.report) if inputs.report else None,
            "found": inputs.found,
            "global_step": trained.ckpt.get("global_step"),  # 0: exported with allow_untrained
        },
        "model": to_jsonable(trained.options, default=repr),
        "training_hparams": to_jsonable(trained.hparams, default=repr),
        "num_exits": model.num_exits,
        "exit_blocks": list(model.exit_blocks),
        "exit_rule": exit_rule,
        # the thresholds score logits / T_k (calibration: temperature); the predictor applies them
        "temperatures": _temperatures(th, thresholds_path, model.num_exits),
        "budget_unit": "gflops" if units == {"absolute"} else "fraction",
        "class_names": class_names,
        "preprocessing": preprocessing,
        "operating_points": points,
        "costs": {
            "form": exported.form,
            "unit": "GFLOPs (10^9 multiply-accumulates)",
            "input_shape": list(preprocessing["input_size"]),
            "exit_gflops": list(costs.exit_gflops),
            "full_gflops": costs.full_gflops,
            "fractions": list(costs.fractions),
            "as_trained": {
                "exit_gflops": list(as_trained.exit_gflops),
                "full_gflops": as_trained.full_gflops,
            },
            "counted_with": "torch.utils.flop_counter.FlopCounterMode (dmpo_lightning.evaluation.flops)",
        },
        "weights": {
            "file": WEIGHTS_FILE,
            "contents": exported.contents,
            "merged": bool(exported.merged_layers),
            "merged_layers": exported.merged_layers,
            "num_tensors": len(exported.embedded_keys),
            "reference": exported.reference,
        },
        "report_costs": (rep or {}).get("cost_counting"),
    }


def _write_artefact(
    output: str,
    manifest: dict[str, Any],
    exported: _ExportedForm,
    model: MultiExitViT,
    *,
    onnx: bool,
) -> None:
    """Write the artefact into a hidden sibling folder, then rename it to ``output`` (never over it)."""
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=parent)
    try:
        weights_path = os.path.join(tmp, WEIGHTS_FILE)
        try:
            save_file(
                {k: exported.state[k].detach().cpu().contiguous().clone() for k in exported.embedded_keys},
                weights_path,
                metadata={"format": FORMAT_NAME, "checkpoint_hash": manifest["checkpoint_hash"]},
            )
        except SafetensorError as err:  # its writer reports an I/O error as text: "... (os error 28)"
            code = re.search(r"os error (\d+)", str(err))
            number = int(code.group(1)) if code else errno.EIO
            raise OSError(number, os.strerror(number), os.path.join(output, WEIGHTS_FILE)) from err
        manifest["weights"]["sha256"] = file_sha256(weights_path)
        if onnx:
            os.makedirs(os.path.join(tmp, ONNX_DIR))
            input_shape = tuple(manifest["preprocessing"]["input_size"])
            files = export_stages(model, os.path.join(tmp, ONNX_DIR), input_shape)
            manifest["onnx"] = {
                "opset": OPSET,
                "exporter": EXPORTER,
                "stages": [{"file": f, "sha256": file_sha256(os.path.join(tmp, ONNX_DIR, f))} for f in files],
                "weights": "each graph holds its stage's weights (all of them, frozen backbone included)",
            }
        write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for root, _, files_in in os.walk(tmp):
            for name in files_in:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        if os.path.exists(output):
            raise FileExistsError(f"{output} appeared while exporting; it is left as it is")
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve_inputs(
    run: str | None, ckpt_path: str | None, thresholds: str | None, report: str | None
) -> ExportInputs:
    if run is not None:
        return resolve_run(run, thresholds, report, ckpt_path)
    if ckpt_path is None or thresholds is None:
        raise ValueError("give --run runs/<name>/version_N, or both --ckpt_path and --thresholds")
    if report is None:
        beside = os.path.join(os.path.dirname(thresholds), "report.json")
        report = beside if os.path.isfile(beside) else None
    return ExportInputs(ckpt_path=ckpt_path, thresholds=thresholds, report=report)


def export_artefact(
    output: str,
    *,
    run: str | None = None,
    ckpt_path: str | None = None,
    thresholds: str | None = None,
    report: str | None = None,
    embed_backbone: bool = False,
    merge: bool | None = None,
    onnx: bool = False,
    class_names: Sequence[str] | None = None,
    allow_untrained: bool = False,
) -> str:
    """Write a deployable artefact directory (see :mod:`dmpo_lightning.deploy.format`).

    Every check runs before anything is written: the inputs are found and read, checked against each other,
    the network is put in its exported form, the manifest is assembled, and only then is the artefact
    written (into a temporary folder renamed at the end).

    Args:
        output: The artefact directory to create (must not exist).
        run: A run folder ``runs/<name>/version_N``: the newest ``dmpo test`` report of one of its
            checkpoints is used (with ``ckpt_path``: of that checkpoint), and said which.
        ckpt_path: The checkpoint (instead of, or to choose among, the run's).
        thresholds: ``thresholds.json`` of ``dmpo test`` (required without ``run``).
        report: ``report.json`` of the same ``dmpo test`` (adds calibration accuracy and costs per budget).
        embed_backbone: Embed every weight; by default the frozen backbone weights are referenced by
            timm name / local file and sha256 when they can be reproduced (a pretrained backbone).
        merge: Fold the PEFT method into the frozen weights (``None``: yes for methods registered as
            mergeable, such as LoRA).
        onnx: Also write one ONNX graph per stage (needs the ``[export]`` extra).
        class_names: Class names in label order (default: from the checkpoint or the dataset).
        allow_untrained: Export a checkpoint saved before any training step (refused otherwise).

    Returns:
        The artefact path.

    Raises:
        FileExistsError: If ``output`` exists.
        FileNotFoundError: If an input file is missing.
        ValueError: If the inputs disagree (thresholds from another checkpoint or model), are unreadable, or
            the checkpoint never trained.
    """
    output = os.path.abspath(output)
    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; an artefact is never overwritten: choose another --output")
    check_writable(os.path.dirname(output), f"--output {output}", "--output")
    inputs = _resolve_inputs(run, ckpt_path, thresholds, report)
    if onnx:
        require_onnx("--onnx")
    th = read_thresholds(inputs.thresholds)
    rep = read_report(inputs.report) if inputs.report else None
    trained = _load_trained(inputs.ckpt_path)
    _check_trained(trained, allow_untrained)
    mergeable = PEFT_REGISTRY.get(trained.peft).mergeable
    if merge:
        check_mergeable(trained.peft)
    checkpoint_hash = _check_inputs(trained, inputs, th, rep)
    names = _class_names(trained.ckpt, int(trained.options["num_classes"]), class_names)
    preprocessing = _preprocessing(trained.ckpt, trained.options, trained.model)
    exported = _exported_form(
        trained,
        tuple(preprocessing["input_size"]),
        merge=mergeable if merge is None else merge,
        embed_backbone=embed_backbone,
    )
    manifest = _manifest(
        trained,
        exported,
        inputs=inputs,
        checkpoint_hash=checkpoint_hash,
        th=th,
        thresholds_path=inputs.thresholds,
        rep=rep,
        class_names=names,
        preprocessing=preprocessing,
    )
    _write_artefact(output, manifest, exported, trained.model, onnx=onnx)
    return output
