"""Fold LoRA updates into the frozen linear layers, so the tuned trunk costs exactly the base model's FLOPs.

``LoRALinear(x) = W x + b + s * B (A x)`` equals ``Linear(W + s * B A, b)``: the merged layer is a plain
``nn.Linear`` (the update is computed in float64, then cast to the layer's dtype). AdaptFormer cannot be
folded: its bottleneck is a parallel branch with a ReLU between two projections, a non-linear function of
the input that no single weight matrix reproduces. VPT prompts are extra tokens, not weights either.
"""

from __future__ import annotations

import torch
from torch import nn

from dmpo_lightning.models.adapters import LoRALinear

__all__ = ["MERGEABLE_PEFT", "check_mergeable", "merge_lora"]

MERGEABLE_PEFT = ("lora",)


def check_mergeable(peft: str) -> None:
    """Raise with the reason if a PEFT method cannot be folded into the frozen weights.

    Raises:
        ValueError: For ``adaptformer``, ``vpt``, ``linear`` and ``full``.
    """
    if peft == "lora":
        return
    reasons = {
        "adaptformer": "AdaptFormer's adapter is a parallel non-linear branch (down-projection, ReLU, "
        "up-projection) beside each MLP, which no single weight matrix reproduces; it runs as trained",
        "vpt": "VPT prompts are extra tokens, not a weight update; they run as trained",
        "linear": "a linear probe has no trunk update to merge",
        "full": "full fine-tuning already changed the weights themselves; there is nothing to merge",
    }
    why = reasons.get(peft, f"unknown PEFT method {peft!r}")
    raise ValueError(f"--merge-lora applies to peft=lora only; this model has peft={peft!r}: {why}")


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Replace every :class:`~dmpo_lightning.models.adapters.LoRALinear` in ``model`` by its merged linear.

    Args:
        model: Any module (e.g. a :class:`~dmpo_lightning.models.MultiExitViT`), changed in place.

    Returns:
        Names of the merged layers (their parameters are now ``<name>.weight`` / ``<name>.bias``).
    """
    merged = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        base = module.base_layer
        delta = module.scaling * (module.peft_lora_b.weight.double() @ module.peft_lora_a.weight.double())
        layer = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        layer.weight.copy_((base.weight.double() + delta).to(base.weight.dtype))
        if base.bias is not None:
            layer.bias.copy_(base.bias)
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        merged.append(name)
    return merged
