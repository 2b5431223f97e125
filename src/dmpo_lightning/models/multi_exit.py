"""MultiExitViT: a frozen timm ViT with PEFT, and one exit head (bypass + predictor) per exit depth.

Pure ``nn.Module`` (no Lightning), so it can be used, exported and tested without a Trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dmpo_lightning.constants import EXITS_ATTR, PEFT_PREFIX
from dmpo_lightning.models.adapters import PeftOptions, inject_peft, num_prompt_tokens
from dmpo_lightning.models.backbone import (
    backbone_depth,
    default_head_pool,
    embed_tokens_and_rope,
    num_prefix_tokens,
    resolve_exit_blocks,
    rope_embedding,
    run_blocks,
)
from dmpo_lightning.models.checks import check_positive_int
from dmpo_lightning.models.exit_policy import ExitPolicy
from dmpo_lightning.models.exit_rules import ExitRule
from dmpo_lightning.models.heads import (
    COV_DIM,
    COV_ITERATIONS,
    HEAD_DROPOUT,
    HEAD_POOL,
    MOMENT_DIM,
    MOMENT_GROUPS,
    AttentionPoolHead,
    Bypass,
    DistilledHead,
    ExitHead,
    LinearHead,
    PredictorKind,
    build_predictor,
    check_head_options,
)
from dmpo_lightning.options import OptionGroup

__all__ = [
    "EarlyExitOutput",
    "ExitOptions",
    "ExitPolicy",
    "ExitRule",
    "MultiExitViT",
    "PeftOptions",
    "check_finite_inputs",
    "eval_mode",
]


@dataclass
class EarlyExitOutput:
    """Result of a true early-exit forward, one entry per input sample.

    Attributes:
        prediction: Predicted class ``[B]``.
        exit_index: 0-based index of the exit the sample left at ``[B]``.
        score: The exit rule's score at that exit ``[B]`` (max softmax probability for ``confidence``).
        logits: Logits of the exit each sample left at ``[B, C]``.
    """

    prediction: torch.Tensor
    exit_index: torch.Tensor
    score: torch.Tensor
    logits: torch.Tensor


def check_finite_inputs(x: torch.Tensor) -> None:
    """Refuse a batch with NaN or infinite values: they would come out as class 0 with a NaN score.

    Raises:
        ValueError: Naming how many images of the batch are affected and their indices.

    Example:
        >>> x = torch.zeros(3, 1, 2, 2)
        >>> x[1, 0, 0, 0] = float("nan")
        >>> check_finite_inputs(x)
        Traceback (most recent call last):
        ...
        ValueError: 1 of the 3 images in the batch (index 1) hold NaN or infinite values; ...
    """
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
    raise ValueError(
        f"{len(bad)} of the {x.shape[0]} images in the batch (index {shown}) hold NaN or infinite values; "
        "only finite inputs can be predicted"
    )


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a block with every sub-module in eval mode, then restore each one's own mode.

    Costs one pass over the sub-modules when all are already in eval mode (``module.eval()`` and
    ``module.train()`` walk the tree recursively, about 0.4 ms each for a small ViT: as much as a batch-1
    early exit itself).
    """
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


@dataclass(frozen=True)
class ExitOptions(OptionGroup):
    """Where the exits sit and what each one is: ``DMPOModule(exits=...)``, ``MultiExitViT(exits=...)``.

    In a config: ``model.init_args.exits.blocks: [3, 6, 9, 12]``; on the command line
    ``--model.init_args.exits.early_head linear``. Each DMPO component can be switched off for ablations:
    ``bypass: false``, ``early_head: linear``. The head options (``head_pool``, ``moment_dim``, ...) are the
    arguments of the same names of the predictors (:mod:`dmpo_lightning.models.heads`), with the same
    defaults.
    """

    blocks: int | tuple[int, ...] | None = None
    """Exit positions: 1-based block numbers, negative from the end; an int n = the last n blocks;
    ``None`` = 4 evenly spaced exits ({3, 6, 9, 12} for 12 blocks)."""
    require_last_exit: bool = True
    """Require the last exit after the last block."""
    bypass: bool = True
    """A bypass module in front of each early exit's predictor."""
    bypass_dim: int | None = None
    """Bypass bottleneck width (``None`` = D / 4)."""
    detach_trunk: bool = False
    """Early exits' gradients do not reach the trunk (ablation)."""
    early_head: PredictorKind = "moment"
    """Predictor of the early exits: ``moment`` (default), ``isqrt_cov`` or ``linear``."""
    final_head: PredictorKind = "linear"
    """Predictor of the last exit (``linear`` = the backbone's own head: its final norm, then SigLIP's
    attention pool, DeiT's class + distillation token classifiers, or the pooling of ``head_pool``, then a
    new Linear)."""
    head_pool: Literal["token", "avg"] | None = HEAD_POOL
    """Pooling of ``linear`` predictors: class token or mean of the patch tokens; ``None`` = as the backbone's
    own head pools (the mean for ``*_gap_*``, ``class_token=False`` and EVA02, the class token otherwise)."""
    moment_dim: int = MOMENT_DIM
    """Projection width of ``moment`` predictors (a multiple of ``moment_groups``)."""
    moment_groups: int = MOMENT_GROUPS
    """Channel groups of ``moment`` predictors (>= 2)."""
    cov_dim: int = COV_DIM
    """Reduced width d of ``isqrt_cov`` predictors."""
    cov_iterations: int = COV_ITERATIONS
    """Newton-Schulz iterations of ``isqrt_cov`` predictors."""
    head_dropout: float = HEAD_DROPOUT
    """Dropout before the classifier of every predictor."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_head_options(
            head_pool=self.head_pool,
            head_dropout=self.head_dropout,
            moment_dim=self.moment_dim,
            moment_groups=self.moment_groups,
            cov_dim=self.cov_dim,
            cov_iterations=self.cov_iterations,
            prefix="exits.",
        )
        if self.bypass_dim is not None:
            check_positive_int(self.bypass_dim, "exits.bypass_dim")


class MultiExitViT(nn.Module):
    """A timm vision transformer with parameter-efficient tuning and early-exit heads.

    The trunk (timm blocks, optionally adapted) runs once; after block ``e_k`` exit ``k`` reads the trunk
    tokens through its bypass module and predictor. Bypasses feed only their exit: the trunk continues
    from the unmodified tokens (the decoupling of DMPO).

    Args:
        backbone: A timm ``VisionTransformer`` or ``Eva`` built with ``num_classes=0``
            (:func:`~dmpo_lightning.models.backbone.build_backbone`; families in docs/backbones.md).
        num_classes: Classes of every exit.
        exits: The exits (:class:`ExitOptions`, or a mapping of its fields); ``None`` = the defaults.
        peft: How the trunk is tuned (:class:`~dmpo_lightning.models.adapters.PeftOptions`, a mapping of
            its fields, or a method name); ``None`` = AdaptFormer with the defaults.

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=2)
        >>> exits = ExitOptions(blocks=(2, 4), early_head="linear")
        >>> model = MultiExitViT(vit, 5, exits, PeftOptions("lora"))
        >>> model.exit_blocks, [tuple(z.shape) for z in model(torch.randn(3, 3, 16, 16))]
        ((2, 4), [(3, 5), (3, 5)])
    """

    exits: nn.ModuleList  # registered under EXITS_ATTR in __init__

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        exits: ExitOptions | Mapping[str, Any] | None = None,
        peft: PeftOptions | Mapping[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes must be an integer >= 2 (a classifier needs at least two classes), got "
                f"{num_classes!r}; set num_classes to the dataset's class count"
            )
        e = self.exit_options = ExitOptions.coerce(exits, name="exits")
        p = self.peft_options = (
            PeftOptions(method=peft) if isinstance(peft, str) else PeftOptions.coerce(peft, name="peft")
        )
        self.backbone = backbone
        vit: Any = backbone  # timm ViT / Eva: its attributes are not typed on nn.Module
        self.num_classes = num_classes
        self.exit_blocks = resolve_exit_blocks(
            e.blocks, backbone_depth(backbone), require_last=e.require_last_exit
        )
        self.peft_method = p.method
        try:
            self.peft_modules = inject_peft(backbone, p, num_prefix_tokens=num_prefix_tokens(backbone))
        except TypeError as err:  # a block or layer kind the method cannot wrap
            name = getattr(backbone, "pretrained_cfg", {}).get("architecture") or type(backbone).__name__
            raise ValueError(
                f"peft.method={p.method!r} is not supported on backbone {name!r} "
                f"({type(vit.blocks[0]).__name__} blocks): {err}; choose another peft method or backbone"
            ) from err
        dim = int(vit.embed_dim)
        # VPT prompt tokens travel with the class token; heads must treat them as prefix tokens.
        prefix = num_prefix_tokens(backbone) + num_prompt_tokens(backbone)
        self.num_prefix_tokens = prefix
        # Models without a class token (timm's *_gap_* models, e.g. with register tokens) have no token to
        # pool: their prefix tokens are registers or prompts. Heads pool the patch tokens there, as timm does.
        class_token = getattr(backbone, "cls_token", None) is not None
        # The final linear exit is the backbone's own head: attention pooling (SigLIP's attn_pool) and
        # DeiT's class + distillation token classifiers are kept; otherwise the final norm + a new Linear.
        head_pool = default_head_pool(backbone) if e.head_pool is None else e.head_pool
        attn_pool = getattr(backbone, "attn_pool", None) if e.final_head == "linear" else None
        distilled = getattr(backbone, "dist_token", None) is not None and head_pool == "token"
        token_pooled = e.early_head == "linear" or (e.final_head == "linear" and attn_pool is None)
        if head_pool == "token" and not class_token and token_pooled:
            raise ValueError(
                f"exits.head_pool='token' needs a class token, but the backbone has none (its "
                f"{num_prefix_tokens(backbone)} prefix token(s) are registers, and VPT prompts follow them); "
                "set exits.head_pool='avg' (mean of the patch tokens, as timm pools such models)"
            )
        predictor_options: dict[str, Any] = dict(
            class_token=class_token,
            head_pool=head_pool,
            moment_dim=e.moment_dim,
            moment_groups=e.moment_groups,
            cov_dim=e.cov_dim,
            cov_iterations=e.cov_iterations,
            head_dropout=e.head_dropout,
        )
        heads = []
        for k in range(len(self.exit_blocks)):
            last = k == len(self.exit_blocks) - 1
            kind = e.final_head if last else e.early_head
            if last and kind == "linear":
                predictor = self._final_linear_head(
                    backbone, attn_pool, distilled, dim, num_classes, prefix, head_pool, predictor_options
                )
            else:
                predictor = build_predictor(kind, dim, num_classes, prefix, **predictor_options)
            heads.append(
                ExitHead(
                    predictor,
                    bypass=Bypass(dim, e.bypass_dim) if e.bypass and not last else None,
                    detach_input=e.detach_trunk and not last,
                )
            )
        setattr(self, EXITS_ATTR, nn.ModuleList(heads))
        # The backbone's own final norm and head are replaced by the last exit head; keep them out of the
        # trainable set in every mode so "full" fine-tuning does not carry dead parameters.
        for param in (*vit.norm.parameters(), *vit.fc_norm.parameters()):
            param.requires_grad_(False)
        unused_pool: nn.Module | None = getattr(backbone, "attn_pool", None)
        if unused_pool is not None:  # still in the backbone: the final exit is not the linear head
            for param in unused_pool.parameters():
                param.requires_grad_(False)

    @staticmethod
    def _final_linear_head(
        backbone: nn.Module,
        attn_pool: nn.Module | None,
        distilled: bool,
        dim: int,
        num_classes: int,
        prefix: int,
        head_pool: str,
        options: dict,
    ) -> nn.Module:
        """The last exit's ``linear`` predictor: the backbone's own head (pre-trained norms, new Linear).

        - attention pooling (``global_pool='map'``, SigLIP): the final norm, the backbone's ``attn_pool``
          (moved out of the backbone into the head; it trains with the trunk: only for ``peft='full'``),
          ``fc_norm``, Linear;
        - distilled DeiT with ``head_pool='token'``: mean of the class- and distillation-token classifiers;
        - ``head_pool='avg'`` with timm's ``fc_norm`` (``*_gap_*``, ``class_token=False``, EVA02): mean of the
          patch tokens, then ``fc_norm``; otherwise the final norm, then the class token or the mean.
        """
        fc_norm: Any = backbone.fc_norm
        model: Any = backbone
        head: Any
        if attn_pool is not None:
            head = AttentionPoolHead(
                attn_pool,
                dim,
                num_classes,
                prefix,
                # timm's Eva pools over every token; VisionTransformer skips the prefix tokens by default
                include_prefix=bool(getattr(backbone, "pool_include_prefix", hasattr(backbone, "rope"))),
                fc_norm=not isinstance(fc_norm, nn.Identity),
                head_dropout=options["head_dropout"],
            )
            model.attn_pool = None  # one owner: the head (the backbone's forward_head is never used)
            if isinstance(fc_norm, nn.LayerNorm):
                head.fc_norm.load_state_dict(fc_norm.state_dict())
                head.fc_norm.eps = fc_norm.eps
            norm = backbone.norm
        elif distilled:
            head = DistilledHead(dim, num_classes, prefix, head_dropout=options["head_dropout"])
            norm = backbone.norm
        elif head_pool == "avg" and not isinstance(fc_norm, nn.Identity):
            head = LinearHead(
                dim,
                num_classes,
                prefix,
                head_pool="avg",
                head_dropout=options["head_dropout"],
                class_token=options["class_token"],
                norm_after_pool=True,
            )
            norm = fc_norm
        else:
            head, norm = build_predictor("linear", dim, num_classes, prefix, **options), backbone.norm
        if isinstance(norm, nn.LayerNorm):
            head.init_norm_from(norm)
        return head

    @property
    def num_exits(self) -> int:
        """Number of exits K."""
        return len(self.exit_blocks)

    def _trunk(
        self, tokens: torch.Tensor, start: int, stop: int, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        return run_blocks(self.backbone, tokens, start, stop, rope)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Logits of every exit (training and evaluation).

        Args:
            x: Images ``[B, C, H, W]``.
            upto: Stop after exit ``upto`` (0-based), running only the blocks and heads a sample that
                leaves there has run: what FLOPs counting truncates at.

        Returns:
            A list of logits ``[B, num_classes]``, one per exit up to ``upto``.
        """
        last = self.num_exits - 1 if upto is None else upto
        if not 0 <= last < self.num_exits:
            raise ValueError(f"upto={upto} is out of range: allowed are 0..{self.num_exits - 1} or None")
        tokens, rope = embed_tokens_and_rope(self.backbone, x)
        outputs = []
        start = 0
        for k in range(last + 1):
            tokens = self._trunk(tokens, start, self.exit_blocks[k], rope)
            start = self.exit_blocks[k]
            outputs.append(self.exits[k](tokens))
        return outputs

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """The full model without early exits: all blocks and the final head only (cost F_full)."""
        tokens, rope = embed_tokens_and_rope(self.backbone, x)
        tokens = self._trunk(tokens, 0, self.exit_blocks[-1], rope)
        return self.exits[-1](tokens)

    def run_stage(
        self, k: int, inputs: torch.Tensor, *, head: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage ``k`` of an early exit: the blocks from exit ``k - 1`` to exit ``k``, then head ``k``.

        Stage 0 starts from images (patch embedding included); later stages from the tokens stage ``k - 1``
        returned. A chain of stages 0..K-1 computes exactly what :meth:`forward` computes.

        Args:
            k: 0-based exit index.
            inputs: Images ``[B, C, H, W]`` for ``k == 0``, trunk tokens ``[B, N, D]`` otherwise.
            head: Run exit ``k``'s head; ``False`` returns ``None`` logits (an exit its threshold disables).

        Returns:
            ``(tokens after block e_k, logits of exit k or None)``.
        """
        if k == 0:
            tokens, rope = embed_tokens_and_rope(self.backbone, inputs)
        else:  # RoPE backbones: the embedding of the fixed patch grid (stages run in eval mode)
            tokens, rope = inputs, rope_embedding(self.backbone)
        start = 0 if k == 0 else self.exit_blocks[k - 1]
        tokens = self._trunk(tokens, start, self.exit_blocks[k], rope)
        return tokens, (self.exits[k](tokens) if head else None)

    def early_exit_policy(
        self,
        thresholds: Sequence[float] | torch.Tensor,
        rule: ExitRule = "confidence",
        *,
        last_score: bool = True,
        temperatures: Sequence[float] | torch.Tensor | None = None,
    ) -> ExitPolicy:
        """The exit decisions of :meth:`forward_early_exit` (and of the batching engine) as an object.

        Args: as :meth:`forward_early_exit`.

        Returns:
            An :class:`ExitPolicy` for this model's exits.
        """
        return ExitPolicy(
            thresholds,
            self.num_exits,
            rule=rule,
            last_score=last_score,
            temperatures=temperatures,
        )

    @torch.no_grad()
    def forward_early_exit(
        self,
        x: torch.Tensor,
        thresholds: Sequence[float] | torch.Tensor,
        rule: ExitRule = "confidence",
        *,
        last_score: bool = True,
        temperatures: Sequence[float] | torch.Tensor | None = None,
    ) -> EarlyExitOutput:
        """True early exit: later blocks run only on samples that have not left yet (batch compaction).

        A sample leaves at the first exit ``k`` whose score is ``>= thresholds[k]``; the last exit takes
        every sample left. Predictions equal those of the protocol simulated from :meth:`forward`'s outputs
        with the same thresholds and the same exit rule. The model runs in
        eval mode for the call (dropout off, BatchNorm statistics frozen); its previous mode is restored.

        Heads that cannot change the answer are not run: with a rule whose score at exit ``k`` depends
        only on exit ``k``'s logits (``confidence``, ``entropy``, a rule registered with ``local=True``), the
        head of an exit whose threshold is ``+inf`` is skipped. ``patience`` needs every earlier exit's
        prediction, so every head runs.

        Args:
            x: Images ``[B, C, H, W]``.
            thresholds: One threshold per exit (the last one is ignored); ``inf`` disables an exit.
            rule: A registered exit rule: ``confidence`` (max softmax), ``entropy`` (negative entropy),
                ``patience``, or one added with ``models.exit_rules.register_exit_rule``.
            last_score: Compute the score of samples that reach the last exit (``False``: ``NaN`` there,
                for the built-in rules; the prediction is unchanged).
            temperatures: One per exit: scores come from ``logits / T_k`` (float32), as ``dmpo test`` with
                ``calibration: temperature`` scores them; ``None`` = raw logits. Returned logits are raw.

        Returns:
            Per-sample prediction, exit index, score and logits.
        """
        check_finite_inputs(x)
        policy = self.early_exit_policy(
            thresholds,
            rule,
            last_score=last_score,
            temperatures=temperatures,
        )
        with eval_mode(self):
            return self._early_exit(x, policy)

    def _early_exit(self, x: torch.Tensor, policy: ExitPolicy) -> EarlyExitOutput:
        batch = x.shape[0]
        device = x.device
        buffers: list[torch.Tensor] | None = None  # allocated when the first samples leave, not all of them
        active: torch.Tensor | None = None  # None: every sample (no index bookkeeping until one leaves)
        carry: dict[str, torch.Tensor] = {}
        tokens = x
        for k in range(self.num_exits):
            tokens, logits = self.run_stage(k, tokens, head=policy.needs_head(k))
            if logits is None:
                continue
            leave, score, pred, carry = policy.decide(k, logits, carry)
            everyone = leave is None or bool(leave.all())
            if everyone and active is None:  # the whole batch leaves here: no indexing at all
                exit_index = torch.full((batch,), k, dtype=torch.long, device=device)
                return EarlyExitOutput(pred, exit_index, score.float(), logits.to(x.dtype))
            if not everyone and leave is not None and not bool(leave.any()):
                continue  # nobody leaves: no compaction
            if buffers is None:
                buffers = [
                    torch.empty(batch, dtype=torch.long, device=device),
                    torch.empty(batch, dtype=torch.long, device=device),
                    torch.empty(batch, dtype=torch.float32, device=device),
                    torch.empty(batch, self.num_classes, dtype=x.dtype, device=device),
                ]
            prediction, exit_index, score_out, logits_out = buffers
            if active is None:
                active = torch.arange(batch, device=device)
            if everyone:
                prediction[active], exit_index[active] = pred, k
                score_out[active], logits_out[active] = score.float(), logits.to(logits_out.dtype)
                break
            assert leave is not None
            idx = active[leave]
            prediction[idx] = pred[leave]
            exit_index[idx] = k
            score_out[idx] = score[leave].float()
            logits_out[idx] = logits[leave].to(logits_out.dtype)
            stay = ~leave
            active, tokens = active[stay], tokens[stay]
            carry = {name: value[stay] for name, value in carry.items()}
        assert buffers is not None  # the last exit takes every sample left
        return EarlyExitOutput(*buffers)

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by component: ``trunk`` (PEFT or full), ``bypass``, ``heads``."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"trunk": [], "bypass": [], "heads": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith(f"{EXITS_ATTR}."):
                groups["bypass" if ".bypass." in name else "heads"].append((name, p))
            else:
                groups["trunk"].append((name, p))
        return groups

    def no_weight_decay(self) -> set[str]:
        """Parameter names (``fnmatch`` patterns) trained without weight decay, besides 1-d ones and biases.

        The trunk's own list (timm's ``no_weight_decay()``: position embedding, class/register tokens) and the
        VPT prompts; read by :func:`dmpo_lightning.optim.param_groups` through timm's
        ``param_groups_weight_decay``.
        """
        trunk = getattr(self.backbone, "no_weight_decay", None)
        names = {f"backbone.{n}" for n in trunk()} if callable(trunk) else set()
        return names | {f"*.{PEFT_PREFIX}prompts"}

    def count_parameters(self) -> dict[str, int]:
        """Trainable parameter counts per component, plus ``trainable`` and ``total``."""
        counts = {k: sum(p.numel() for _, p in v) for k, v in self.parameter_groups().items()}
        counts["trainable"] = sum(counts.values())
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters this model trains (PEFT, bypasses, heads) plus their buffers.

        For ``full`` fine-tuning this is the whole trunk as well.
        """
        trainable = {n for group in self.parameter_groups().values() for n, _ in group}
        state = {}
        for name, tensor in self.state_dict().items():
            if (
                name in trainable
                or name.startswith(f"{EXITS_ATTR}.")
                or any(part.startswith(PEFT_PREFIX) for part in name.split("."))
            ):
                state[name] = tensor
        return state
