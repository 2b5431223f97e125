"""``dmpo export``: one self-contained artefact from a trained checkpoint and its calibrated thresholds.

Every check runs before anything is written; the artefact is assembled in a hidden temporary folder next to
the output and renamed into place at the end, so an interrupted or refused export leaves nothing behind and
an existing artefact is never overwritten.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from dmpo_lightning.checkpointing import weights_hash
from dmpo_lightning.constants import MODEL_FINGERPRINT_KEYS, THRESHOLDS_FORMAT
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
from dmpo_lightning.files import file_sha256, tensors_sha256, to_jsonable, write_json
from dmpo_lightning.options import flat_options, option_name

__all__ = ["ExportInputs", "export_artefact", "resolve_run"]

FINGERPRINT_KEYS = MODEL_FINGERPRINT_KEYS


class ExportInputs(dict):
    """Resolved input files of an export: ``ckpt_path``, ``thresholds``, ``report`` (may be ``None``)."""


def _read_json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} does not hold a JSON object")
    return data


def resolve_run(
    run: str, thresholds: str | None = None, report: str | None = None, ckpt_path: str | None = None
) -> ExportInputs:
    """Find the checkpoint, thresholds and report of a run folder ``runs/<name>/version_N``.

    The thresholds come from ``<run>/dmpo_test/thresholds.json`` (or ``thresholds``); the checkpoint is the
    file under ``<run>/checkpoints`` whose sha256 equals the thresholds' ``checkpoint_hash`` (the one
    ``dmpo test`` evaluated), so ``last.ckpt`` and the best checkpoint cannot be confused.

    Raises:
        FileNotFoundError: If the run, its thresholds or its checkpoints are missing.
        ValueError: If no checkpoint of the run is the one the thresholds were calibrated on.
    """
    if not os.path.isdir(run):
        raise FileNotFoundError(
            f"run folder {run} does not exist; give runs/<name>/version_N of a `dmpo fit`"
        )
    thresholds = thresholds or os.path.join(run, "dmpo_test", "thresholds.json")
    if not os.path.isfile(thresholds):
        raise FileNotFoundError(
            f"{thresholds} does not exist: run `dmpo test` on this run first (it calibrates the thresholds), "
            "or pass --thresholds"
        )
    if report is None:
        candidate = os.path.join(os.path.dirname(thresholds), "report.json")
        report = candidate if os.path.isfile(candidate) else None
    if ckpt_path is not None:  # given explicitly: its hash is checked against the thresholds by the caller
        return ExportInputs(ckpt_path=ckpt_path, thresholds=thresholds, report=report)
    wanted = str(_read_json(thresholds, "thresholds file").get("checkpoint_hash", ""))
    ckpts = sorted(glob.glob(os.path.join(run, "checkpoints", "*.ckpt")))
    if not ckpts:
        raise FileNotFoundError(f"{run}/checkpoints holds no .ckpt file")
    if wanted.startswith("file:"):
        for c in ckpts:
            if f"file:{file_sha256(c)}" == wanted:
                return ExportInputs(ckpt_path=c, thresholds=thresholds, report=report)
        raise ValueError(
            f"none of the checkpoints of {run} ({', '.join(os.path.basename(c) for c in ckpts)}) is the one "
            f"{thresholds} was calibrated on (checkpoint_hash {wanted[:17]}...); re-run `dmpo test` on the "
            "checkpoint to deploy, or pass --ckpt_path and --thresholds explicitly"
        )
    # thresholds made from in-memory weights: the hash is checked against each checkpoint's weights later
    preferred = [c for c in ckpts if os.path.basename(c) != "last.ckpt"] or ckpts
    return ExportInputs(ckpt_path=preferred[-1], thresholds=thresholds, report=report)


def _load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; give a .ckpt file written by `dmpo fit`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise ValueError(
            f"{path} is not a readable Lightning checkpoint (torch.load(weights_only=True) failed: "
            f"{type(err).__name__}: {err})"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a DMPOModule checkpoint (no state_dict / hyper_parameters)")
    return ckpt


def _preprocessing(ckpt: Mapping[str, Any], options: Mapping[str, Any], model: Any) -> dict[str, Any]:
    """The evaluation transform of the data module the model was trained with, as plain values."""
    from dmpo_lightning.data.registry import get_spec
    from dmpo_lightning.data.transforms import is_native_small, resolve_data_config

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
        native, source, dm_chans = None, "backbone's timm config", in_chans
    if cfg.image_size != size or dm_chans != in_chans:
        raise ValueError(
            f"the data module fed {dm_chans}x{cfg.image_size}x{cfg.image_size} images but the model takes "
            f"{in_chans}x{size}x{size}; the checkpoint is inconsistent"
        )
    crop = "none" if is_native_small(cfg, native) else "center"
    from dmpo_lightning.deploy.preprocess import resize_for

    return {
        "input_size": [in_chans, size, size],
        "channels": "L" if in_chans == 1 else "RGB",
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "interpolation": cfg.interpolation,
        "crop_pct": cfg.crop_pct,
        "crop_mode": crop,
        "resize": resize_for(size, cfg.crop_pct) if crop == "center" else None,
        "source": source,
        "steps": (
            f"convert to {'grey (L)' if in_chans == 1 else 'RGB'}; "
            + (
                f"resize shorter side to {resize_for(size, cfg.crop_pct)} ({cfg.interpolation}); "
                f"centre crop {size}; "
                if crop == "center"
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
            from dmpo_lightning.data.fashion_mnist import FASHION_MNIST_CLASSES

            names = FASHION_MNIST_CLASSES
        elif (
            dataset == "image_folder" and dm.get("root") and os.path.isdir(os.path.join(dm["root"], "train"))
        ):
            from dmpo_lightning.data.formats import image_folder_classes

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


def export_artefact(
    output: str,
    *,
    run: str | None = None,
    ckpt_path: str | None = None,
    thresholds: str | None = None,
    report: str | None = None,
    embed_backbone: bool = False,
    merge_lora: bool | None = None,
    onnx: bool = False,
    class_names: Sequence[str] | None = None,
) -> str:
    """Write a deployable artefact directory (see :mod:`dmpo_lightning.deploy.format`).

    Args:
        output: The artefact directory to create (must not exist).
        run: A run folder ``runs/<name>/version_N`` (finds checkpoint, thresholds and report).
        ckpt_path: The checkpoint (instead of, or to override, the run's).
        thresholds: ``thresholds.json`` of ``dmpo test`` (required without ``run``).
        report: ``report.json`` of the same ``dmpo test`` (adds calibration accuracy and costs per budget).
        embed_backbone: Embed every weight; by default the frozen backbone weights are referenced by
            timm name / local file and sha256 when they can be reproduced (a pretrained backbone).
        merge_lora: Fold LoRA into the frozen weights (``None`` = yes for ``peft: lora``).
        onnx: Also write one ONNX graph per stage (needs the ``[export]`` extra).
        class_names: Class names in label order (default: from the checkpoint or the dataset).

    Returns:
        The artefact path.

    Raises:
        FileExistsError: If ``output`` exists.
        FileNotFoundError: If an input file is missing.
        ValueError: If the inputs disagree (thresholds from another checkpoint or model) or are unreadable.
    """
    from safetensors.torch import save_file

    import dmpo_lightning
    from dmpo_lightning.deploy.merge import check_mergeable
    from dmpo_lightning.deploy.merge import merge_lora as fold_lora
    from dmpo_lightning.evaluation.flops import count_exit_costs

    output = os.path.abspath(output)
    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; an artefact is never overwritten: choose another --output")
    if run is None and (ckpt_path is None or thresholds is None):
        raise ValueError("give --run runs/<name>/version_N, or both --ckpt_path and --thresholds")
    if run is not None:
        found = resolve_run(run, thresholds, report, ckpt_path)
        ckpt_path = found["ckpt_path"]
        thresholds, report = found["thresholds"], found["report"]
    assert ckpt_path is not None and thresholds is not None
    if onnx:
        from dmpo_lightning.deploy.onnx_stages import _require_onnx

        _require_onnx("--onnx")
    th = _read_json(thresholds, "thresholds file")
    if th.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"{thresholds} is not a dmpo thresholds file (format {THRESHOLDS_FORMAT})")
    rep = _read_json(report, "report") if report else None
    ckpt = _load_checkpoint(ckpt_path)
    hparams = dict(ckpt["hyper_parameters"])
    options = model_options(hparams)
    peft = options.get("peft", "adaptformer")
    merge = (peft == "lora") if merge_lora is None else bool(merge_lora)
    if merge:
        check_mergeable(peft)

    # ---- the checkpoint the thresholds were calibrated on
    wanted = str(th.get("checkpoint_hash", ""))
    actual_file = f"file:{file_sha256(ckpt_path)}"
    model = build_model(options)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{ckpt_path} does not fit the model its hyper_parameters describe: {err}") from err
    model.eval()
    actual = actual_file if wanted.startswith("file:") else weights_hash(model)
    if wanted != actual:
        raise ValueError(
            f"{thresholds} was calibrated on another checkpoint (checkpoint_hash {wanted[:17]}...) than "
            f"{ckpt_path} ({actual[:17]}...); its thresholds would not fit these weights. Run `dmpo test "
            "--ckpt_path` on this checkpoint, or pass the matching --thresholds"
        )
    if rep is not None and rep.get("checkpoint_hash") not in (None, wanted):
        raise ValueError(
            f"{report} belongs to another checkpoint than {thresholds}; pass the matching report"
        )
    if rep is not None and isinstance(rep.get("config"), Mapping):
        # the report's config is the tested model's: options that change outputs without changing weights
        # (adapter_scale, lora_alpha, ...) are only caught here
        mine = to_jsonable(options, default=repr)
        theirs = to_jsonable(flat_options(dict(rep["config"])), default=repr)
        differ = {k: (theirs[k], v) for k, v in mine.items() if k in theirs and theirs[k] != v}
        if differ:
            details = "; ".join(
                f"{option_name(k)}: report {a!r} vs checkpoint {b!r}" for k, (a, b) in differ.items()
            )
            raise ValueError(f"{report} was made with another model configuration ({details})")
    fingerprint = th.get("fingerprint") or {}
    ours = {**{k: options.get(k) for k in FINGERPRINT_KEYS}, "exit_blocks": list(model.exit_blocks)}
    diff = {k: (fingerprint.get(k), v) for k, v in ours.items() if k in fingerprint and fingerprint[k] != v}
    if diff:
        details = "; ".join(
            f"{option_name(k)}: thresholds {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items()
        )
        raise ValueError(f"{thresholds} was calibrated for another model ({details})")
    exit_rule = (
        fingerprint.get("exit_rule") or (rep or {}).get("exit_rule") or flat_options(hparams).get("exit_rule")
    )
    points = _operating_points(th, rep)
    temperatures = _temperatures(th, thresholds, model.num_exits)
    units = {p["unit"] for p in points}
    budget_unit = "gflops" if units == {"absolute"} else "fraction"
    names = _class_names(ckpt, int(options["num_classes"]), class_names)
    preprocessing = _preprocessing(ckpt, options, model)
    input_shape = tuple(preprocessing["input_size"])

    # ---- the exported form
    costs_as_trained = count_exit_costs(model, input_shape)
    merged_layers = fold_lora(model) if merge else []
    costs = count_exit_costs(model, input_shape) if merge else costs_as_trained
    full_state = model.state_dict()
    reproducible = bool(options.get("pretrained")) or bool(options.get("checkpoint_path"))
    if embed_backbone or peft == "full" or not reproducible:
        embedded_keys = set(full_state)
        contents = "all"
    else:
        embedded_keys = set(model.trainable_state_dict())
        for name in merged_layers:
            embedded_keys |= {k for k in full_state if k.startswith(f"{name}.")}
        contents = "trained" + (" + merged LoRA layers" if merged_layers else "")
    reference_keys = sorted(set(full_state) - embedded_keys)
    reference = None
    if reference_keys:
        local = options.get("checkpoint_path")
        reference = {
            "keys": reference_keys,
            "sha256": tensors_sha256(full_state, reference_keys),
            "timm_name": options["backbone"],
            "pretrained": bool(options.get("pretrained")),
            "checkpoint_path": os.path.abspath(local) if local else None,
            "checkpoint_file_sha256": file_sha256(local) if local and os.path.isfile(local) else None,
        }
    branches = ", adapter branches counted" if peft in ("lora", "adaptformer") else ""
    form = (
        f"LoRA merged into {len(merged_layers)} frozen linear layers: every block costs exactly the base "
        "model's FLOPs"
        if merged_layers
        else f"as trained (peft={peft}{branches})"
    )
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": dmpo_lightning.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_hash": wanted,
        "checkpoint_file": os.path.basename(ckpt_path),
        "model": to_jsonable(options, default=repr),
        "training_hparams": to_jsonable(hparams, default=repr),
        "num_exits": model.num_exits,
        "exit_blocks": list(model.exit_blocks),
        "exit_rule": exit_rule,
        # the thresholds score logits / T_k (calibration: temperature); the predictor applies them
        "temperatures": temperatures,
        "budget_unit": budget_unit,
        "class_names": names,
        "preprocessing": preprocessing,
        "operating_points": points,
        "costs": {
            "form": form,
            "unit": "GFLOPs (10^9 multiply-accumulates)",
            "input_shape": list(input_shape),
            "exit_gflops": list(costs.exit_gflops),
            "full_gflops": costs.full_gflops,
            "fractions": list(costs.fractions),
            "as_trained": {
                "exit_gflops": list(costs_as_trained.exit_gflops),
                "full_gflops": costs_as_trained.full_gflops,
            },
            "counted_with": "torch.utils.flop_counter.FlopCounterMode (dmpo_lightning.evaluation.flops)",
        },
        "weights": {
            "file": WEIGHTS_FILE,
            "contents": contents,
            "merged_lora": bool(merged_layers),
            "merged_layers": merged_layers,
            "num_tensors": len(embedded_keys),
            "reference": reference,
        },
        "report_costs": (rep or {}).get("cost_counting"),
    }

    # ---- write into a temporary sibling folder, rename at the end
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=parent)
    try:
        weights_path = os.path.join(tmp, WEIGHTS_FILE)
        save_file(
            {k: full_state[k].detach().cpu().contiguous().clone() for k in sorted(embedded_keys)},
            weights_path,
            metadata={"format": FORMAT_NAME, "checkpoint_hash": wanted},
        )
        manifest["weights"]["sha256"] = file_sha256(weights_path)
        if onnx:
            from dmpo_lightning.deploy.onnx_stages import OPSET, export_stages

            os.makedirs(os.path.join(tmp, ONNX_DIR))
            files = export_stages(model, os.path.join(tmp, ONNX_DIR), input_shape)
            manifest["onnx"] = {
                "opset": OPSET,
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
    return output
