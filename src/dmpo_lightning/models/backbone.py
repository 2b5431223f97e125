"""timm ViT backbones: building by name or local checkpoint, exit indices, and token-level access.

This is the only module that touches timm internals (``_pos_embed`` and the embedding sub-modules of
``VisionTransformer``). ``tests/test_backbone.py`` pins the manual block loop to timm's own
``forward_features`` so a timm change that breaks it is caught at once.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import timm
import torch
from torch import nn

__all__ = [
    "backbone_depth",
    "build_backbone",
    "check_backbone_name",
    "embed_tokens",
    "explicit_attention",
    "num_prefix_tokens",
    "resolve_exit_blocks",
]


def check_backbone_name(name: str) -> None:
    """Check that timm knows ``name`` (architecture and, if given, pretrained tag) without building anything.

    Raises:
        ValueError: Naming the unknown architecture (with similar names) or tag (with the known tags).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a timm model name, got {name!r}")
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=6, cutoff=0.5)
        raise ValueError(
            f"unknown backbone {name!r}: timm has no model {architecture!r}. "
            f"Use a timm ViT/DeiT name such as 'vit_base_patch16_224.augreg_in21k' (similar: {close})"
        )
    if tag:
        known = timm.list_pretrained(f"{architecture}.*")
        if name not in known:
            tags = [k.partition(".")[2] for k in known]
            raise ValueError(
                f"unknown backbone {name!r}: timm has no pretrained tag {tag!r} for {architecture!r}; "
                f"allowed tags: {tags or 'none (use the bare name)'}"
            )


def _check_patch_divisibility(name: str, model: nn.Module) -> None:
    """Refuse an input size the patch size does not divide (timm would silently drop the border pixels)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "dynamic_img_pad", False) or getattr(pe, "img_size", None) is None:
        return
    size, patch = tuple(int(s) for s in pe.img_size), tuple(int(p) for p in pe.patch_size)
    for s, p in zip(size, patch, strict=False):
        if s % p:
            lower, upper = (s // p) * p, (s // p + 1) * p
            suggestion = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ValueError(
                f"img_size={size[0] if size[0] == size[1] else size} is not divisible by the patch size {p} "
                f"of backbone {name!r}: the border pixels would be silently dropped; allowed: multiples of "
                f"{p} (e.g. {suggestion})"
            )


def build_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Create a timm vision transformer without a classifier.

    Args:
        name: Any ``timm.create_model`` name of the ViT/DeiT family, with an optional pretrained tag
            (``vit_base_patch16_224.augreg_in21k``).
        pretrained: Load the pretrained weights of ``name`` (downloads through timm / the HF hub).
        checkpoint_path: A local timm checkpoint file (``.pth``/``.bin``/``.safetensors``/``.npz``) to load
            instead of downloading; implies ``pretrained``. The classifier is dropped and position embeddings
            are resampled to ``img_size`` by timm.
        img_size: Input resolution; ``None`` keeps the model's default.
        in_chans: Input channels; ``None`` keeps the model's default (3). timm adapts pretrained patch
            embeddings when this differs.
        model_kwargs: Further keyword arguments for the timm constructor (``depth``, ``embed_dim``,
            ``patch_size``, ``num_heads``, ``drop_path_rate``...), used for small models and tests.

    Returns:
        The timm model with ``num_classes=0`` (its ``head`` is an identity).

    Raises:
        ValueError: If the name is unknown to timm, the model is not a token-based ViT with ``blocks``, or
            ``img_size`` is not a multiple of the patch size.
        FileNotFoundError: If ``checkpoint_path`` does not exist.
    """
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    for reserved, instead in (
        ("num_classes", "the module's num_classes"),
        ("pretrained", "the module's pretrained flag"),
        ("pretrained_cfg_overlay", "checkpoint_path"),
        ("img_size", "img_size (the CLI links it to the data module)"),
        ("in_chans", "in_chans (the CLI links it to the data module)"),
    ):
        if reserved in kwargs:
            raise ValueError(f"backbone_kwargs may not set {reserved!r}; use {instead} instead")
    if img_size is not None:
        kwargs["img_size"] = img_size
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if checkpoint_path is not None:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(
                f"backbone checkpoint_path {checkpoint_path!r} does not exist; give the path of a timm "
                "checkpoint file (.pth, .bin, .safetensors or .npz) downloaded for this model"
            )
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": os.path.abspath(checkpoint_path)}
    check_backbone_name(name)
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed") or not hasattr(model, "_pos_embed"):
        raise ValueError(
            f"backbone {name!r} is a {type(model).__name__}, not a token-based vision transformer; "
            "supported are timm VisionTransformer models (ViT, DeiT, ...)"
        )
    _check_patch_divisibility(name, model)
    return model


def backbone_depth(backbone: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(backbone.blocks)


def num_prefix_tokens(backbone: nn.Module) -> int:
    """Class and register tokens the backbone puts in front of the patch tokens."""
    return int(getattr(backbone, "num_prefix_tokens", 0))


def embed_tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image ``[B, C, H, W]`` to the token sequence the first block sees ``[B, N, D]``.

    Mirrors the first lines of ``VisionTransformer.forward_features`` (timm 1.0).
    """
    x = backbone.patch_embed(x)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    return backbone.norm_pre(x)


def resolve_exit_blocks(
    exit_blocks: int | Sequence[int] | None,
    depth: int,
    *,
    require_last: bool = True,
) -> tuple[int, ...]:
    """Normalise exit positions to a sorted tuple of 1-based block numbers (exit after that block).

    Args:
        exit_blocks: ``None`` = four evenly spaced exits (``{3, 6, 9, 12}`` for 12 blocks; fewer if the
            model is shallower); an ``int`` n = the last n blocks (timm's convention for indices);
            a sequence = explicit 1-based block numbers, negative values counting from the end
            (``-1`` = the last block).
        depth: Number of blocks L of the backbone.
        require_last: Require the last exit to sit after block L (the full model).

    Returns:
        Sorted, unique block numbers in ``1..L``.

    Raises:
        ValueError: With the allowed range, if a block is out of range, duplicated, unsorted, or the
            last exit is not block L while ``require_last`` is set.

    Examples:
        >>> resolve_exit_blocks(None, 12)
        (3, 6, 9, 12)
        >>> resolve_exit_blocks([4, 8, -1], 12)
        (4, 8, 12)
        >>> resolve_exit_blocks(2, 12)
        (11, 12)
    """
    if depth < 1:
        raise ValueError(f"backbone has {depth} blocks; at least one is needed")
    if exit_blocks is None:
        n = min(4, depth)
        blocks = tuple(round(depth * (i + 1) / n) for i in range(n))
    elif isinstance(exit_blocks, bool):
        raise ValueError("exit_blocks must be an int, a list of block numbers or null, not a bool")
    elif isinstance(exit_blocks, int):
        if not 1 <= exit_blocks <= depth:
            raise ValueError(
                f"exit_blocks={exit_blocks} asks for the last {exit_blocks} blocks; allowed is 1..{depth} "
                f"for this {depth}-block backbone"
            )
        blocks = tuple(range(depth - exit_blocks + 1, depth + 1))
    else:
        raw = list(exit_blocks)
        if not raw:
            raise ValueError(f"exit_blocks is empty; give at least one block number in 1..{depth}")
        blocks_list = []
        for b in raw:
            if isinstance(b, bool) or not isinstance(b, int):
                raise ValueError(f"exit_blocks entries must be integers, got {b!r}")
            resolved = depth + 1 + b if b < 0 else b
            if not 1 <= resolved <= depth:
                raise ValueError(
                    f"exit block {b} is out of range: allowed are 1..{depth} (1-based, exit after that "
                    f"block) or -{depth}..-1 counting from the end, for this {depth}-block backbone"
                )
            blocks_list.append(resolved)
        if len(set(blocks_list)) != len(blocks_list):
            raise ValueError(f"exit_blocks {raw} contains duplicates; each block may hold one exit")
        if blocks_list != sorted(blocks_list):
            raise ValueError(f"exit_blocks {raw} must be sorted in increasing order (got {blocks_list})")
        blocks = tuple(blocks_list)
    if require_last and blocks[-1] != depth:
        raise ValueError(
            f"the last exit sits after block {blocks[-1]} but the backbone has {depth} blocks; add {depth} "
            "(or -1) to exit_blocks, or set require_last_exit=False to truncate the backbone"
        )
    return blocks


@contextlib.contextmanager
def explicit_attention(module: nn.Module) -> Iterator[None]:
    """Switch every timm attention layer in ``module`` to explicit (non-fused) attention for a while.

    ``FlopCounterMode`` does not count fused scaled-dot-product attention on CPU, so FLOPs are counted with
    the explicit ``q @ k^T`` / ``attn @ v`` path. The result is numerically the same computation.
    """
    switched = []
    for m in module.modules():
        if hasattr(m, "fused_attn") and isinstance(m.fused_attn, bool):
            switched.append((m, m.fused_attn))
            m.fused_attn = False
    try:
        yield
    finally:
        for m, value in switched:
            m.fused_attn = value
