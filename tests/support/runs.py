"""Runs as `dmpo fit` + `dmpo test` leave them (checkpoint + thresholds.json), with or without training.

``make_run`` (no training; the deploy, serving and backbone tests) builds a tiny module, perturbs its
trainable parameters, writes the checkpoint and a thresholds file fitted on random images. ``fit_runs``
trains tiny runs through the real CLI (``tests/configs/tiny.yaml``), for tests of what the commands do with
their files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning
import pytest
import torch

from dmpo_lightning.cli import main
from dmpo_lightning.constants import THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION
from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.evaluation.protocol import assign_exits
from dmpo_lightning.files import file_sha256
from dmpo_lightning.models.exit_rules import exit_scores
from dmpo_lightning.module import DMPOModule
from support.builders import TINY_CONFIG, TINY_MODULE

TINY_HP = {**TINY_MODULE, "pretrained": False, "in_chans": 3, "peft": {**TINY_MODULE["peft"], "lora_rank": 4}}
"""``support.builders.TINY_MODULE`` with every option a run's hparams record written out, LoRA rank 4."""


def tiny_hparams(**overrides) -> dict:
    """``TINY_HP`` with ``overrides``: top-level options, or groups whose fields replace ``TINY_HP``'s.

    ``tiny_hparams(peft={"method": "lora"})`` keeps ``TINY_HP``'s other ``peft`` fields.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY_HP.items()}
    for name, value in overrides.items():
        group = out.get(name)
        out[name] = {**group, **value} if isinstance(group, dict) and isinstance(value, dict) else value
    return out


SYNTHETIC_DM = {"dataset": "synthetic", "image_size": 32, "in_chans": 3, "timm_model": "vit_tiny_patch16_224"}


def make_run(
    tmp_path: Path,
    name: str = "run",
    *,
    dm: dict | None = None,
    quantiles: tuple[float, float] = (0.5, 0.8),
    fixed: list[list[float]] | None = None,
    seed: int = 0,
    extra: dict | None = None,
    **overrides,
) -> dict:
    """A checkpoint as `dmpo fit` writes it and a thresholds.json as `dmpo test` writes it, for one model.

    Trainable parameters are perturbed so that zero-initialised parts (LoRA B, adapter up, bypass up) are
    not trivially zero; thresholds are score quantiles on random images, so several exits are used.
    """
    torch.manual_seed(seed)
    # the rule `dmpo test` fitted the thresholds for (recorded in thresholds.json, not a model option)
    rule = (overrides.pop("evaluation", None) or {}).get("rule", overrides.pop("exit_rule", "confidence"))
    module = DMPOModule(**tiny_hparams(**overrides))
    module.exit_rule = rule
    module.train_steps.fill_(4)  # stands for the training steps a real run had
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    module.eval()
    folder = tmp_path / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "dmpo_test").mkdir()
    ckpt = folder / "checkpoints" / "last.ckpt"
    payload = {
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 4,  # as after a few training steps (a checkpoint of step 0 is untrained)
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": dict(dm if dm is not None else SYNTHETIC_DM),
        **({"class_names": ["cat", "dog", "owl", "fox"]} if extra is None else extra),
    }
    torch.save(payload, ckpt)
    x = torch.randn(64, module.hparams.in_chans, 32, 32)
    with torch.no_grad():
        scores, _ = exit_scores(module.model(x), rule)
    budgets = []
    for i, (budget, q) in enumerate(zip((0.5, 0.75), quantiles, strict=True)):
        t = (
            [float(scores[:, k].quantile(q)) for k in range(scores.shape[1] - 1)]
            if fixed is None
            else fixed[i]
        )
        budgets.append(
            {
                "budget": budget,
                "unit": "fraction",
                "thresholds": [*(v if math.isfinite(v) else str(v) for v in t), "-inf"],
                "cal_cost_fraction": 0.4,
                "test_accuracy": 0.5,
            }
        )
    thresholds = folder / "dmpo_test" / "thresholds.json"
    thresholds.write_text(
        json.dumps(
            {
                "format": THRESHOLDS_FORMAT,
                "format_version": THRESHOLDS_FORMAT_VERSION,
                "rule": rule,
                "fingerprint": module.model_fingerprint(),
                "checkpoint_hash": f"file:{file_sha256(str(ckpt))}",
                "budgets": budgets,
            }
        )
    )
    return {"run": folder, "ckpt": ckpt, "thresholds": thresholds, "module": module, "x": x}


def make_artefact(base: Path, name: str = "run", **run_options) -> dict:
    """``make_run`` exported by ``dmpo export`` with its defaults: the run's dict plus ``art``."""
    r = make_run(base, name, **run_options)
    r["art"] = Path(export_artefact(str(base / "art"), run=str(r["run"])))
    return r


def simulated(model, x, thresholds, rule="confidence"):
    """The simulated protocol: all-exit forward, exit scores, first exit whose score passes."""
    with torch.no_grad():
        logits = torch.stack(model(x), dim=1)
    scores, preds = exit_scores(logits, rule)
    exits = assign_exits(scores, torch.tensor(thresholds, dtype=scores.dtype))
    rows = torch.arange(x.shape[0])
    return preds[rows, exits], exits, logits[rows, exits]


def fit_runs(base: Path, seeds: tuple[int, ...] = (0, 1)) -> dict[str, Path]:
    """One tiny one-epoch ``dmpo fit`` per seed, run in ``base``: their checkpoints as ``a``, ``b``, ...

    The first run also ran ``dmpo test`` (``test_after_fit``): its ``thresholds.json`` is ``thresholds``.
    """
    out = {"base": base}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        for i, seed in enumerate(seeds):
            name = "abcdefgh"[i]
            cli = main(
                [
                    "fit",
                    "-c",
                    TINY_CONFIG,
                    f"--seed_everything={seed}",
                    "--trainer.max_epochs=1",
                    "--model.init_args.schedule.switch_epoch=0",
                    f"--test_after_fit={i == 0}",
                    f"--evaluation.report_dir={base / ('report_' + name)}",
                ]
            )
            (out[name],) = (base / cli.trainer.log_dir / "checkpoints").glob("*.ckpt")
    out["thresholds"] = base / "report_a" / "thresholds.json"
    assert out["thresholds"].is_file()
    return out
