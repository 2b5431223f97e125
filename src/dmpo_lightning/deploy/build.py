"""Rebuild a :class:`~dmpo_lightning.models.MultiExitViT` from an artefact's model options, offline.

The backbone is always constructed with ``pretrained=False``; its weights then come from the artefact
(embedded), from the local timm weights file the run was trained from (checksum verified), or, only if the
caller allows it, from timm's pretrained download.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dmpo_lightning.models.adapters import PeftOptions
from dmpo_lightning.models.backbone import build_backbone
from dmpo_lightning.models.multi_exit import ExitOptions, MultiExitViT
from dmpo_lightning.options import OptionGroup

__all__ = ["MODEL_KEYS", "build_model", "model_options"]

BACKBONE_KEYS = ("backbone", "pretrained", "checkpoint_path", "img_size", "in_chans", "backbone_kwargs")
MODEL_GROUPS: dict[str, type[OptionGroup]] = {"peft": PeftOptions, "exits": ExitOptions}
"""The option groups of ``DMPOModule`` that define the network (the others are training / evaluation)."""
MODEL_KEYS = ("num_classes", *BACKBONE_KEYS, *MODEL_GROUPS)
"""The network-defining options, as artefact manifests store them (the groups as mappings of all fields)."""


def model_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The network-defining subset of a checkpoint's ``hyper_parameters``, each group with all its fields.

    Raises:
        ValueError: A group holds an option its group does not have (the allowed ones are named).
        TypeError: A group is not a mapping.
    """
    options = {k: hparams[k] for k in MODEL_KEYS if k in hparams and k not in MODEL_GROUPS}
    for name, group in MODEL_GROUPS.items():
        options[name] = group.coerce(hparams.get(name), name=name).to_dict()
    return options


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
    model = MultiExitViT(backbone, int(options["num_classes"]), options.get("exits"), options.get("peft"))
    return model.eval()
