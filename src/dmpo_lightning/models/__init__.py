"""Pure-torch model parts: timm backbone wrapper, PEFT adapters, exit heads, the multi-exit model."""

from dmpo_lightning.models.adapters import PeftMethod, count_parameters, inject_peft, num_prompt_tokens
from dmpo_lightning.models.backbone import build_backbone, resolve_exit_blocks
from dmpo_lightning.models.heads import (
    Bypass,
    ExitHead,
    ISqrtCovHead,
    LinearHead,
    MomentHead,
    build_predictor,
    newton_schulz_sqrt,
)
from dmpo_lightning.models.multi_exit import EarlyExitOutput, MultiExitViT
from dmpo_lightning.models.toy_backbone import TOY_TRUNK_NAME, toy_trunk_file  # registers it with timm

__all__ = [
    "TOY_TRUNK_NAME",
    "Bypass",
    "EarlyExitOutput",
    "ExitHead",
    "ISqrtCovHead",
    "LinearHead",
    "MomentHead",
    "MultiExitViT",
    "PeftMethod",
    "build_backbone",
    "build_predictor",
    "count_parameters",
    "inject_peft",
    "newton_schulz_sqrt",
    "num_prompt_tokens",
    "resolve_exit_blocks",
    "toy_trunk_file",
]
