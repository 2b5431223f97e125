"""Parameter-efficient fine-tuning (PEFT) of a timm ViT trunk by wrap-and-replace injection.

Each wrapper keeps the original module as ``base_layer`` (as HF PEFT does) and names every parameter it
adds with a component starting with :data:`~dmpo_lightning.constants.PEFT_PREFIX`, so "train only what we
added" is a single name rule. AdaptFormer and LoRA are initialised so that the adapted trunk equals the
pre-trained one at step 0; VPT prompts change the output from the start (they are extra tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn import functional as F

from dmpo_lightning.constants import PEFT_PREFIX
from dmpo_lightning.models.checks import check_dropout as _check_dropout
from dmpo_lightning.models.checks import check_positive_int as _check_positive_int
from dmpo_lightning.models.registry import Registry
from dmpo_lightning.options import OptionGroup

_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_EVA_BLOCK_ATTRS = ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2")


@dataclass(frozen=True)
class PeftOptions(OptionGroup):
    """How the trunk is tuned: ``DMPOModule(peft=...)``, ``MultiExitViT(peft=...)``, :func:`inject_peft`.

    In a config: ``model.init_args.peft.method: lora``; on the command line
    ``--model.init_args.peft.lora_rank 4``.
    """

    method: PeftMethod = "adaptformer"
    """Trunk tuning: ``adaptformer``, ``lora``, ``vpt``, ``linear`` (frozen trunk) or ``full``."""
    adapter_dim: int = 64
    """AdaptFormer bottleneck width r."""
    adapter_scale: float = 0.1
    """AdaptFormer branch scale s."""
    adapter_dropout: float = 0.0
    """Dropout inside the adapter branch (AdaptFormer after ReLU, LoRA on its input, VPT on the prompts)."""
    lora_rank: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA alpha (the update is scaled by ``lora_alpha / lora_rank``)."""
    lora_targets: tuple[str, ...] = ("qkv",)
    """Names (or dotted suffixes) of the linear layers LoRA wraps (``qkv``, ``attn.proj``, ``mlp.fc1``)."""
    vpt_prompts: int = 10
    """VPT prompt tokens per prompted block."""
    vpt_deep: bool = True
    """Deep VPT (own prompts in every block) instead of shallow (first block only)."""


PeftInjector = Callable[
    [nn.Module, "nn.Sequential | nn.ModuleList", list[int], "PeftOptions", "int | None"], list[str]
]
"""``inject(model, trunk, block_indices, options, num_prefix_tokens) -> replaced module names``.

Wraps modules in place; ``num_prefix_tokens`` counts the class/register tokens ahead of the patch tokens
(for methods that add tokens, as VPT does)."""


@dataclass(frozen=True)
class PeftSpec:
    """A registered PEFT method.

    Attributes:
        inject: See :data:`PeftInjector`.
        trains: Which trunk parameters train: ``"peft"`` (those whose name has a ``peft_`` component),
            ``"all"`` or ``"none"``.
        mergeable: Whether the trained modules fold into the frozen weights after training: every module
            the method adds then has ``merged() -> nn.Module``, a plain module computing the same function
            (LoRA: ``Linear(W + s B A)``). ``dmpo export`` merges exactly these methods.
    """

    inject: PeftInjector
    trains: Literal["peft", "all", "none"] = "peft"
    mergeable: bool = False


PEFT_REGISTRY: Registry[PeftSpec] = Registry("PEFT method")
"""Every PEFT method by name; add one with :func:`register_peft` in this file."""


def register_peft(
    name: str, *, trains: Literal["peft", "all", "none"] = "peft", mergeable: bool = False
) -> Callable[[PeftInjector], PeftInjector]:
    """Decorator registering ``inject(model, trunk, indices, options, num_prefix_tokens)`` as PEFT ``name``.

    The injector wraps modules of ``trunk`` (the model's ``blocks``) at the selected block ``indices`` in
    place and returns the replaced modules' names relative to ``model``; parameters it adds must have a
    name component starting with ``peft_`` (:data:`~dmpo_lightning.constants.PEFT_PREFIX`), so
    ``trains="peft"`` trains exactly them. ``mergeable=True`` declares that each module it adds has a
    ``merged()`` method (see :class:`PeftSpec`).
    """
    if trains not in ("peft", "all", "none"):
        raise ValueError(f"trains must be 'peft', 'all' or 'none', got {trains!r}")

    def add(inject: PeftInjector) -> PeftInjector:
        PEFT_REGISTRY.register(name)(PeftSpec(inject, trains, mergeable))
        return inject

    return add


class AdaptFormerBlock(nn.Module):
    """A timm ViT block with an AdaptFormer bottleneck in parallel to its MLP.

    ``x <- x + drop_path1(ls1(attn(norm1(x))))`` then
    ``x <- x + drop_path2(ls2(mlp(norm2(x)))) + scale * peft_up(dropout(relu(peft_down(x))))``.
    The adapter reads the residual stream (not ``norm2(x)``), as in AdaptFormer (Chen et al., NeurIPS 2022).
    ``peft_down`` keeps ``nn.Linear``'s Kaiming-uniform init with a zero bias and ``peft_up`` is all zeros,
    exactly AdaptFormer's "lora" init, so the wrapped block equals the base block at step 0. timm's
    ``EvaBlock`` (EVA02: layer scale ``gamma_1``/``gamma_2``, rotary embedding ``rope``) is wrapped the same
    way.

    Args:
        base_layer: The timm :class:`~timm.models.vision_transformer.Block` or ``EvaBlock`` to wrap (kept,
            frozen by :func:`inject_peft`).
        rank: Bottleneck width ``r``.
        scale: Multiplier ``s`` of the adapter branch.
        dropout: Dropout after the ReLU (AdaptFormer's placement).

    Raises:
        TypeError: If ``base_layer`` is not a plain timm ``Block``.
        ValueError: If ``rank``, ``scale`` or ``dropout`` are out of range.
    """

    def __init__(
        self, base_layer: nn.Module, rank: int = 64, scale: float = 0.1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        # A parallel branch needs the residual stream between the attention and MLP halves, which a
        # wrapper can only reach by re-running the block's own submodules; that is only correct for blocks
        # whose forward is exactly timm's Block.forward (pinned by the identity test).
        self.eva = isinstance(base_layer, EvaBlock) and type(base_layer).forward is EvaBlock.forward
        plain = isinstance(base_layer, Block) and type(base_layer).forward is Block.forward
        if not self.eva and not plain:
            raise TypeError(
                "AdaptFormerBlock wraps the pre-norm blocks timm.models.vision_transformer.Block and "
                f"timm.models.eva.EvaBlock only, got {type(base_layer).__name__}"
            )
        missing = [a for a in (_EVA_BLOCK_ATTRS if self.eva else _BLOCK_ATTRS) if not hasattr(base_layer, a)]
        if missing:
            raise TypeError(f"block lacks the submodules AdaptFormer needs: {missing}")
        _check_positive_int(rank, "rank")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        _check_dropout(dropout)
        norm1: nn.LayerNorm = base_layer.norm1  # type: ignore[assignment]
        dim = int(norm1.weight.shape[0])
        factory: dict[str, Any] = {"device": norm1.weight.device, "dtype": norm1.weight.dtype}
        self.base_layer = base_layer
        self.rank = rank
        self.scale = float(scale)
        self.peft_down = nn.Linear(dim, rank, **factory)
        self.peft_up = nn.Linear(rank, dim, **factory)
        self.peft_dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.peft_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.peft_down.bias)
        nn.init.zeros_(self.peft_up.weight)
        nn.init.zeros_(self.peft_up.bias)

    def adapter(self, x: Tensor) -> Tensor:
        """The scaled bottleneck branch ``s * up(dropout(relu(down(x))))``."""
        return self.scale * self.peft_up(self.peft_dropout(F.relu(self.peft_down(x))))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Run the block with the adapter beside its MLP (same arguments as timm's ``Block.forward``)."""
        b: Any = self.base_layer
        if self.eva:
            return self._eva_forward(x, None, attn_mask, is_causal)
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.adapter(x)
        return x

    def _eva_forward(
        self, x: Tensor, rope: Tensor | None, attn_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """``EvaBlock.forward`` with the adapter beside the MLP (layer scales ``gamma_1``/``gamma_2``)."""
        b: Any = self.base_layer
        x_attn = b.attn(b.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        x = x + b.drop_path1(x_attn if b.gamma_1 is None else b.gamma_1 * x_attn)
        x_mlp = b.mlp(b.norm2(x))
        return x + b.drop_path2(x_mlp if b.gamma_2 is None else b.gamma_2 * x_mlp) + self.adapter(x)


class EvaAdaptFormerBlock(AdaptFormerBlock):
    """:class:`AdaptFormerBlock` around timm's ``EvaBlock`` (EVA02), with its arguments (``rope`` first).

    Raises:
        TypeError: If ``base_layer`` is not a plain timm ``EvaBlock``.
    """

    def __init__(
        self, base_layer: nn.Module, rank: int = 64, scale: float = 0.1, dropout: float = 0.0
    ) -> None:
        if not isinstance(base_layer, EvaBlock) or type(base_layer).forward is not EvaBlock.forward:
            raise TypeError(
                f"EvaAdaptFormerBlock wraps timm.models.eva.EvaBlock only, got {type(base_layer).__name__}"
            )
        super().__init__(base_layer, rank=rank, scale=scale, dropout=dropout)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        rope: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Run the block with the adapter beside its MLP (same arguments as timm's ``EvaBlock.forward``)."""
        return self._eva_forward(x, rope, attn_mask, is_causal)


class LoRALinear(nn.Module):
    """LoRA around an ``nn.Linear``: ``base_layer(x) + (alpha / r) * B(A(dropout(x)))``.

    ``peft_lora_a`` uses ``nn.Linear``'s Kaiming-uniform init, ``peft_lora_b`` is zero (identity at step 0),
    as in LoRA/HF PEFT. On timm's fused ``attn.qkv`` one low-rank update covers q, k and v together.

    Args:
        base_layer: The linear layer to adapt.
        rank: LoRA rank ``r`` (default 8, the common choice for ViT-B).
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / rank``.
        dropout: Dropout on the LoRA branch input.

    Raises:
        TypeError: If ``base_layer`` is not an ``nn.Linear``.
        ValueError: If ``rank``, ``alpha`` or ``dropout`` are out of range.
    """

    def __init__(
        self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear layers only, got {type(base_layer).__name__}")
        _check_positive_int(rank, "lora_rank")
        if not math.isfinite(alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {alpha!r}")
        _check_dropout(dropout)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = float(alpha) / rank
        self.peft_dropout = nn.Dropout(dropout)
        self.peft_lora_a = nn.Linear(base_layer.in_features, rank, bias=False, **factory)
        self.peft_lora_b = nn.Linear(rank, base_layer.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.peft_lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.peft_lora_b.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Base projection plus the scaled low-rank update."""
        return self.base_layer(x) + self.scaling * self.peft_lora_b(self.peft_lora_a(self.peft_dropout(x)))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The frozen ``nn.Linear(W + (alpha / r) B A, b)`` computing the same function (eval mode).

        The update is computed in float64, then cast to the layer's dtype.
        """
        base = self.base_layer
        delta = self.scaling * (self.peft_lora_b.weight.double() @ self.peft_lora_a.weight.double())
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
        return layer.requires_grad_(False)


class PromptedBlock(nn.Module):
    """A ViT block with VPT prompt tokens (Jia et al., ECCV 2022).

    The first prompted block *inserts* ``P`` prompts right after the model's prefix tokens
    (``[prefix, prompts, patches]``, sequence grows by ``P``); later blocks of deep VPT *replace* the
    prompt slots with their own prompts. The prompts then travel through the rest of the trunk, so heads
    must count them as prefix tokens (see :func:`num_prompt_tokens`).

    Prompts are initialised uniformly in ``[-init_bound, init_bound]``; :func:`inject_peft` uses VPT's
    bound ``sqrt(6 / (in_chans * patch_h * patch_w + D))``.

    Args:
        base_layer: The block to wrap (any module mapping ``[B, N, D]`` to ``[B, N, D]``).
        dim: Token width ``D``.
        num_prompts: Number of prompt tokens ``P``.
        num_prefix_tokens: Prefix (class/register) tokens of the base model, before the prompts.
        insert: ``True`` to insert the prompts (first prompted block), ``False`` to replace the prompt
            slots that an earlier block inserted.
        init_bound: Half-width of the uniform prompt init.
        dropout: Dropout applied to the prompts (VPT uses 0.1).

    Raises:
        ValueError: If a size is out of range.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        dim: int,
        num_prompts: int = 10,
        num_prefix_tokens: int = 1,
        insert: bool = True,
        init_bound: float = 0.02,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive_int(dim, "dim")
        _check_positive_int(num_prompts, "num_prompts")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if not (math.isfinite(init_bound) and init_bound > 0):
            raise ValueError(f"init_bound must be a positive finite number, got {init_bound!r}")
        _check_dropout(dropout)
        ref = next(base_layer.parameters(), None)
        factory: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        self.base_layer = base_layer
        self.num_prompts = num_prompts
        self.num_prefix_tokens = num_prefix_tokens
        self.insert = insert
        self.peft_prompts = nn.Parameter(torch.empty(num_prompts, dim, **factory))
        self.peft_dropout = nn.Dropout(dropout)
        nn.init.uniform_(self.peft_prompts, -init_bound, init_bound)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        rope: Tensor | None = None,
    ) -> Tensor:
        """Insert or replace the prompts after the prefix tokens, then run the wrapped block.

        ``rope`` (RoPE backbones, EVA02) is passed on to the wrapped block; it covers the patch tokens only,
        and :func:`inject_peft` counts the prompts among the attention's prefix tokens, which RoPE skips.

        Raises:
            ValueError: If the sequence is too short to hold the prompts (replace mode), or an attention
                mask is given to the inserting block (its size would not cover the prompts).
        """
        npt, p = self.num_prefix_tokens, self.num_prompts
        prompts = self.peft_dropout(self.peft_prompts).to(x.dtype).expand(x.shape[0], -1, -1)
        if self.insert:
            if attn_mask is not None:
                raise ValueError("VPT cannot insert prompts when an attn_mask is given (it excludes them)")
            x = torch.cat([x[:, :npt], prompts, x[:, npt:]], dim=1)
        else:
            if x.shape[1] < npt + p:
                raise ValueError(
                    f"replacing {p} prompts after {npt} prefix tokens needs >= {npt + p} tokens, "
                    f"got {x.shape[1]}; was an inserting PromptedBlock run before this one?"
                )
            x = torch.cat([x[:, :npt], prompts, x[:, npt + p :]], dim=1)
        if rope is not None:
            return self.base_layer(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is None and not is_causal:
            return self.base_layer(x)
        return self.base_layer(x, attn_mask=attn_mask, is_causal=is_causal)


_WRAPPERS = (AdaptFormerBlock, LoRALinear, PromptedBlock)


def _get_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(
            f"inject_peft needs a model with a `blocks` nn.Sequential/nn.ModuleList (a timm "
            f"VisionTransformer), got {type(model).__name__} with blocks={type(blocks).__name__}"
        )
    return blocks


def _normalise_block_indices(blocks: Sequence[int] | None, depth: int) -> list[int]:
    if blocks is None:
        return list(range(depth))
    out: list[int] = []
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(
                f"block index {i!r} out of range for a trunk of {depth} blocks "
                f"(allowed: integers in -{depth}..{depth - 1})"
            )
        out.append(i % depth)
    if not out:
        raise ValueError("blocks is empty; pass None for all blocks")
    if len(set(out)) != len(out):
        raise ValueError(f"block indices must be unique, got {list(blocks)}")
    return sorted(out)


def _name_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _vpt_init_bound(model: nn.Module, dim: int) -> float:
    """VPT's uniform bound ``sqrt(6 / (in_chans * patch_area + D))``, assuming 3x16x16 patches if unknown."""
    patch_area, in_chans = 16 * 16, 3
    patch_embed = getattr(model, "patch_embed", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    if patch_size is not None:
        patch_area = math.prod(patch_size) if isinstance(patch_size, Sequence) else int(patch_size) ** 2
    proj = getattr(patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        in_chans = proj.in_channels
    return math.sqrt(6.0 / (in_chans * patch_area + dim))


def _token_dim(model: nn.Module, block: nn.Module) -> int:
    dim = getattr(model, "embed_dim", None)
    if isinstance(dim, int):
        return dim
    norm1 = getattr(block, "norm1", None)
    if norm1 is not None and getattr(norm1, "weight", None) is not None:
        return int(norm1.weight.shape[0])
    raise TypeError("cannot infer the token width: the model has no int `embed_dim` and blocks have no norm1")


def mark_trainable(model: nn.Module, method: PeftMethod) -> None:
    """Set ``requires_grad`` for a PEFT method: all for ``full``, none for ``linear``, else PEFT params only.

    Args:
        model: The (possibly already injected) trunk.
        method: One of :data:`PeftMethod`.

    Raises:
        ValueError: If ``method`` is unknown.
    """
    trains = PEFT_REGISTRY.get(method).trains
    for name, param in model.named_parameters():
        param.requires_grad_(trains == "all" or (trains == "peft" and _is_peft_name(name)))


def _is_peft_name(name: str) -> bool:
    return any(part.startswith(PEFT_PREFIX) for part in name.split("."))


def inject_peft(
    model: nn.Module,
    options: PeftOptions | str = "adaptformer",
    *,
    num_prefix_tokens: int | None = None,
    blocks: Sequence[int] | None = None,
) -> list[str]:
    """Wrap the trunk's modules for a PEFT method in place and set which parameters train.

    Only modules inside ``model.blocks`` are considered. ``adaptformer`` wraps each selected block in an
    :class:`AdaptFormerBlock`; ``lora`` wraps each ``nn.Linear`` inside the selected blocks whose name
    equals or ends with ``"." + target`` for a target in ``lora_targets`` (e.g. ``"qkv"``, ``"attn.proj"``,
    ``"mlp.fc1"``); ``vpt`` wraps the first selected block as the inserting :class:`PromptedBlock` and, if
    ``vpt_deep``, every later selected block as a replacing one. ``linear`` and ``full`` wrap nothing.
    Load pre-trained weights *before* injecting: wrapping moves weights under ``base_layer``.

    Args:
        model: A timm ``VisionTransformer`` or any module with a ``blocks`` Sequential/ModuleList.
        options: The :class:`PeftOptions` (or a mapping of them), or just a method name with the defaults.
        num_prefix_tokens: Prefix tokens ahead of the prompts; defaults to ``model.num_prefix_tokens``.
        blocks: Block indices to adapt (negative from the end); ``None`` for all.

    Returns:
        The names (relative to ``model``) of the replaced modules; empty for ``linear`` and ``full``.

    Raises:
        ValueError: For an unknown method, out-of-range options, a model that already carries PEFT
            wrappers, or targets that match nothing.
        TypeError: If the model has no ``blocks`` or a matched module cannot be wrapped.

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        >>> inject_peft(vit, PeftOptions(method="lora", lora_rank=4))
        ['blocks.0.attn.qkv', 'blocks.1.attn.qkv']
        >>> sorted({n.split(".", 2)[2] for n, p in vit.named_parameters() if p.requires_grad})
        ['attn.qkv.peft_lora_a.weight', 'attn.qkv.peft_lora_b.weight']
    """
    o = PeftOptions(method=options) if isinstance(options, str) else PeftOptions.coerce(options, name="peft")
    spec = PEFT_REGISTRY.get(o.method)
    _check_positive_int(o.adapter_dim, "adapter_dim")
    _check_positive_int(o.lora_rank, "lora_rank")
    _check_positive_int(o.vpt_prompts, "vpt_prompts")
    if not math.isfinite(o.adapter_scale):
        raise ValueError(f"adapter_scale must be a finite number, got {o.adapter_scale!r}")
    _check_dropout(o.adapter_dropout, "adapter_dropout")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, _WRAPPERS)] or peft_parameter_names(model)
    if wrapped:
        raise ValueError(f"model already has PEFT wrappers (e.g. {wrapped[0]!r}); inject_peft must run once")
    trunk = _get_blocks(model)
    indices = _normalise_block_indices(blocks, len(trunk))
    npt = getattr(model, "num_prefix_tokens", None) if num_prefix_tokens is None else num_prefix_tokens
    replaced = spec.inject(model, trunk, indices, o, npt)
    mark_trainable(model, o.method)
    return replaced


@register_peft("adaptformer")
def _inject_adaptformer(
    model: nn.Module,
    trunk: nn.Sequential | nn.ModuleList,
    indices: list[int],
    o: PeftOptions,
    npt: int | None,
) -> list[str]:
    """Wrap each selected block in an :class:`AdaptFormerBlock`."""
    for i in indices:
        kind = EvaAdaptFormerBlock if isinstance(trunk[i], EvaBlock) else AdaptFormerBlock
        trunk[i] = kind(trunk[i], rank=o.adapter_dim, scale=o.adapter_scale, dropout=o.adapter_dropout)
    return [f"blocks.{i}" for i in indices]


@register_peft("lora", mergeable=True)
def _inject_lora(
    model: nn.Module,
    trunk: nn.Sequential | nn.ModuleList,
    indices: list[int],
    o: PeftOptions,
    npt: int | None,
) -> list[str]:
    """Wrap each matching ``nn.Linear`` of the selected blocks in a :class:`LoRALinear`."""
    lora_targets = o.lora_targets
    if isinstance(lora_targets, str) or not lora_targets:
        raise ValueError(f"lora_targets must be a non-empty sequence of names, got {lora_targets!r}")
    replaced: list[str] = []
    for i in indices:
        for sub_name, sub in list(trunk[i].named_modules()):
            if sub_name and any(_name_matches(sub_name, t) for t in lora_targets):
                full_name = f"blocks.{i}.{sub_name}"
                if not isinstance(sub, nn.Linear):
                    raise TypeError(
                        f"LoRA target {full_name!r} is a {type(sub).__name__}, not nn.Linear; "
                        "choose linear layers (e.g. 'qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')"
                    )
                _set_submodule(
                    model, full_name, LoRALinear(sub, o.lora_rank, o.lora_alpha, o.adapter_dropout)
                )
                replaced.append(full_name)
                parent: Any = model.get_submodule(full_name.rpartition(".")[0])
                if sub_name.rpartition(".")[2] == "qkv" and getattr(parent, "q_bias", None) is not None:
                    # timm's EvaAttention calls F.linear(x, qkv.weight, q/k/v bias), bypassing the qkv
                    # module (and LoRA's update); its separate-bias path calls qkv(x) and adds the same
                    # bias after, which equals the fused path exactly.
                    parent.qkv_bias_separate = True
    if not replaced:
        linears = sorted({n for n, m in trunk[indices[0]].named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA targets {list(lora_targets)} matched no module in blocks {indices}; "
            f"linear layers in block {indices[0]}: {linears}"
        )
    return replaced


@register_peft("vpt")
def _inject_vpt(
    model: nn.Module,
    trunk: nn.Sequential | nn.ModuleList,
    indices: list[int],
    o: PeftOptions,
    npt: int | None,
) -> list[str]:
    """Wrap the first selected block as the inserting :class:`PromptedBlock` (and later ones, if deep)."""
    if not isinstance(npt, int) or npt < 0:
        raise ValueError(
            f"num_prefix_tokens must be an int >= 0 (the model has no `num_prefix_tokens`), got {npt!r}"
        )
    dim = _token_dim(model, trunk[indices[0]])
    bound = _vpt_init_bound(model, dim)
    chosen = indices if o.vpt_deep else indices[:1]
    # Attention layers that count prefix tokens themselves (timm's EvaAttention: RoPE rotates only the
    # tokens after them) must count the prompts too, from the inserting block on.
    for i in range(chosen[0], len(trunk)):
        for sub in trunk[i].modules():
            if isinstance(getattr(sub, "num_prefix_tokens", None), int) and sub is not trunk[i]:
                sub.num_prefix_tokens = npt + o.vpt_prompts  # type: ignore[assignment]
    for j, i in enumerate(chosen):
        trunk[i] = PromptedBlock(
            trunk[i], dim, o.vpt_prompts, npt, insert=j == 0, init_bound=bound, dropout=o.adapter_dropout
        )
    return [f"blocks.{i}" for i in chosen]


@register_peft("linear", trains="none")
def _inject_nothing_frozen(
    model: nn.Module,
    trunk: nn.Sequential | nn.ModuleList,
    indices: list[int],
    o: PeftOptions,
    npt: int | None,
) -> list[str]:
    """``linear``: a frozen trunk (only the exit heads train)."""
    return []


@register_peft("full", trains="all")
def _inject_nothing_all_trained(
    model: nn.Module,
    trunk: nn.Sequential | nn.ModuleList,
    indices: list[int],
    o: PeftOptions,
    npt: int | None,
) -> list[str]:
    """``full``: full fine-tuning of the trunk."""
    return []


def num_prompt_tokens(model: nn.Module, after_block: int | None = None) -> int:
    """How many VPT prompt tokens the token sequence carries after a block.

    Heads must add this to the model's ``num_prefix_tokens`` (prompts sit between prefix and patch tokens).

    Args:
        model: A model with ``blocks`` (possibly injected with ``vpt``).
        after_block: Block index (negative from the end) whose output is meant; ``None`` for the last.

    Returns:
        ``P`` if an inserting :class:`PromptedBlock` ran at or before ``after_block``, else 0.
    """
    trunk = _get_blocks(model)
    last = _normalise_block_indices(None if after_block is None else [after_block], len(trunk))[-1]
    for i in range(last + 1):
        block = trunk[i]
        if isinstance(block, PromptedBlock) and block.insert:
            return block.num_prompts
    return 0


def peft_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters PEFT added (any name component starting with ``PEFT_PREFIX``)."""
    return [name for name, _ in model.named_parameters() if _is_peft_name(name)]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) scalar parameters in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


PEFT_METHODS: tuple[str, ...] = PEFT_REGISTRY.names()
"""The PEFT methods registered in this file (the CLI's ``peft`` choices)."""

if TYPE_CHECKING:
    PeftMethod = str
else:
    PeftMethod = PEFT_REGISTRY.literal()
"""PEFT methods: three adapter kinds, a frozen trunk (``linear``) and full fine-tuning (``full``), ...
(``Literal`` of the methods registered above)."""
# The CLI reads PeftOptions.method's type from this file, where the string annotation would resolve to the
# TYPE_CHECKING alias (str): give it the registered methods' Literal itself.
PeftOptions.__annotations__["method"] = PeftMethod

__all__ = [
    "PEFT_METHODS",
    "PEFT_REGISTRY",
    "AdaptFormerBlock",
    "EvaAdaptFormerBlock",
    "LoRALinear",
    "PeftMethod",
    "PeftOptions",
    "PeftSpec",
    "PromptedBlock",
    "count_parameters",
    "inject_peft",
    "mark_trainable",
    "num_prompt_tokens",
    "peft_parameter_names",
    "register_peft",
]
