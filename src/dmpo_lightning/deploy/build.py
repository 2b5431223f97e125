"""Rebuild a :class:`~dmpo_lightning.models.MultiExitViT` from an artefact's model options, offline.

The backbone is always constructed with ``pretrained=False``; its weights then come from the artefact
(embedded), from the local timm weights file the run was trained from (checksum verified), or, only if the
caller allows it, from timm's pretrained download.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.models.multi_exit import MultiExitViT

__all__ = ["MODEL_KEYS", "build_model", "model_options"]

BACKBONE_KEYS = ("backbone", "pretrained", "checkpoint_path", "img_size", "in_chans", "backbone_kwargs")
MODEL_KEYS = (
    "num_classes",
    "exit_blocks",
    *BACKBONE_KEYS,
    *(
        n
        for n in inspect.signature(MultiExitViT).parameters
        if n not in ("backbone", "num_classes", "exit_blocks")
    ),
)
"""The hyperparameters of ``DMPOModule`` that define the network (the rest are training/evaluation)."""


def model_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The network-defining subset of a checkpoint's ``hyper_parameters``."""
    return {k: hparams[k] for k in MODEL_KEYS if k in hparams}


def build_model(
    options: Mapping[str, Any],
    *,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
) -> MultiExitViT:
    """Construct the network as ``DMPOModule.build_model`` does, with explicit control of the weights.

    Args:
        options: :func:`model_options` of the trained module.
        pretrained: Load timm's pretrained weights for ``options["backbone"]`` (may download).
        checkpoint_path: A local timm weights file for the backbone (implies pretrained, no download).

    Returns:
        The model in eval mode.
    """
    backbone = build_backbone(
        options["backbone"],
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        img_size=options.get("img_size"),
        in_chans=options.get("in_chans"),
        model_kwargs=options.get("backbone_kwargs"),
    )
    extra = {
        k: options[k]
        for k in inspect.signature(MultiExitViT).parameters
        if k not in ("backbone", "num_classes", "exit_blocks") and k in options
    }
    model = MultiExitViT(backbone, int(options["num_classes"]), options.get("exit_blocks"), **extra)
    return model.eval()
