"""Tiny model builders shared by the tests (random weights, CPU, milliseconds)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from dmpo_lightning import DMPOModule

TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
"""``tests/configs/tiny.yaml``: the tiny ViT on 4-class synthetic data, for runs of the real CLI."""

ONE_EPOCH = ["--trainer.max_epochs=1", "--model.init_args.schedule.switch_epoch=0"]
"""CLI options for a one-epoch fit of ``TINY_CONFIG`` (the loss-weight switch inside the epoch range)."""

TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)

SHALLOW_VIT_KWARGS = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
"""``backbone_kwargs`` of a depth-2 model of any ViT family (tests that only build a backbone)."""

TINY_MODULE = dict(
    num_classes=4,
    backbone="vit_tiny_patch16_224",
    img_size=32,
    backbone_kwargs={k: v for k, v in TINY_VIT_KWARGS.items() if k != "img_size"},
    exits={"blocks": [1, 2, 3, 4], "moment_dim": 32, "cov_dim": 8},
    peft={"adapter_dim": 8},
)
"""``DMPOModule(**TINY_MODULE)``: the tiny ViT with four exits and small heads (copy a group to change it)."""


def tiny_module(**overrides: object) -> DMPOModule:
    """``DMPOModule(**TINY_MODULE)`` with top-level options replaced by ``overrides`` (random weights)."""
    return DMPOModule(**{**TINY_MODULE, **overrides})


def make_tiny_vit(**overrides: object) -> torch.nn.Module:
    """A depth-4, dim-32 timm ViT at 32x32 with random weights and no classifier."""
    kwargs = {**TINY_VIT_KWARGS, **overrides}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)


def evaluator(**options: object):
    """``DMPOEvaluator`` for a test of the protocol machinery on random weights (``allow_untrained``)."""
    from dmpo_lightning.evaluation.evaluator import DMPOEvaluator, EvaluationOptions

    return DMPOEvaluator(EvaluationOptions(**{"allow_untrained": True, **options}))


def prediction_writer(**options: object):
    """``DMPOPredictionWriter`` for a test of predict on random weights (``allow_untrained``)."""
    from dmpo_lightning.evaluation.evaluator import EvaluationOptions
    from dmpo_lightning.evaluation.prediction_writer import DMPOPredictionWriter

    return DMPOPredictionWriter(EvaluationOptions(**{"allow_untrained": True, **options}))
