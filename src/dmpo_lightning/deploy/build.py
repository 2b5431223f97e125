"""Rebuild a :class:`~dmpo_lightning.models.MultiExitViT` from an artefact's model options, offline.

The backbone is always constructed with ``pretrained=False``; its weights then come from the artefact
(embedded), from the local timm weights file the run was trained from (checksum verified), or, only if the
caller allows it, from timm's pretrained download.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.models.multi_exit import MultiExitViT
from dmpo_lightning.options import LEGACY_FLAT_OPTIONS, flat_options, group_legacy_hparams

__all__ = ["MODEL_KEYS", "build_model", "model_options"]

BACKBONE_KEYS = ("backbone", "pretrained", "checkpoint_path", "img_size", "in_chans", "backbone_kwargs")
MODEL_GROUPS = ("peft", "exits")
"""The option groups of ``DMPOModule`` that define the network (the others are training / evaluation)."""
MODEL_KEYS = (
    "num_classes",
    *BACKBONE_KEYS,
    *(old for old, (group, _) in LEGACY_FLAT_OPTIONS.items() if group in MODEL_GROUPS),
)
"""The network-defining options under their flat names, as artefact manifests store them."""


def model_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The network-defining subset of a checkpoint's ``hyper_parameters`` (grouped or flat), flat."""
    flat = flat_options(hparams)
    return {k: flat[k] for k in MODEL_KEYS if k in flat}


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
    grouped = group_legacy_hparams(options)
    model = MultiExitViT(backbone, int(options["num_classes"]), grouped.get("exits"), grouped.get("peft"))
    return model.eval()
