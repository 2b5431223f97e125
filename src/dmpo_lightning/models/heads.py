"""Exit heads: token-wise bypass modules and first/second-order predictors (METHOD.md §2).

Every predictor maps timm ``NLC`` tokens ``[B, N, D]`` (the first ``num_prefix_tokens`` are class,
register or VPT prompt tokens, the rest patch tokens) to logits ``[B, C]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmpo_lightning.models.checks import check_dropout, check_positive_int
from dmpo_lightning.models.registry import Registry


@dataclass(frozen=True)
class PredictorSpec:
    """A registered predictor: ``build(dim, num_classes, num_prefix_tokens, **{o: ... for o in options})``."""

    build: Callable[..., nn.Module]
    options: tuple[str, ...]


PREDICTOR_REGISTRY: Registry[PredictorSpec] = Registry("predictor kind")
"""Every predictor (exit head) by name; add one with :func:`register_predictor` in this file."""


def register_predictor(name: str, *, options: Sequence[str]) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a predictor as ``name``.

    The class is built as ``cls(dim, num_classes, num_prefix_tokens, **chosen)`` where ``chosen`` holds the
    :func:`build_predictor` keyword options named in ``options`` (the others do not apply to it).

    Raises:
        TypeError: If the class does not accept one of the named options.
    """

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        params = inspect.signature(cls).parameters
        missing = [o for o in options if o not in params]
        if missing:
            raise TypeError(f"predictor {name!r} ({cls.__name__}) does not accept the options {missing}")
        PREDICTOR_REGISTRY.register(name)(PredictorSpec(cls, tuple(options)))
        return cls

    return add


_TRACE_EPS = 1e-5

# The head options: each has one name, from the CLI (``exits.<name>``, :class:`~dmpo_lightning.models.
# multi_exit.ExitOptions`) down to the head classes' arguments, and one default, written here.
HEAD_POOL: Literal["token", "avg"] | None = None
"""Default ``head_pool``: ``None`` = pool as the backbone's own head does (``MultiExitViT`` decides from the
backbone; a head alone reads the class token when it has one, else the mean of the patch tokens)."""
HEAD_DROPOUT = 0.0
"""Default ``head_dropout``: no dropout before the classifiers."""
MOMENT_DIM = 512
"""Default ``moment_dim``: projection width of ``moment`` predictors (512 in Moment Probing)."""
MOMENT_GROUPS = 4
"""Default ``moment_groups``: channel groups of ``moment`` predictors (4 in Moment Probing)."""
COV_DIM = 64
"""Default ``cov_dim``: reduced width of ``isqrt_cov`` predictors (64-128 in iSQRT-COV)."""
COV_ITERATIONS = 5
"""Default ``cov_iterations``: Newton-Schulz iterations of ``isqrt_cov`` predictors."""


def check_head_options(
    *,
    head_pool: str | None = HEAD_POOL,
    head_dropout: float = HEAD_DROPOUT,
    moment_dim: int = MOMENT_DIM,
    moment_groups: int = MOMENT_GROUPS,
    cov_dim: int = COV_DIM,
    cov_iterations: int = COV_ITERATIONS,
    prefix: str = "",
) -> None:
    """Refuse invalid head options, naming each as ``prefix + name`` (``exits.moment_dim``).

    The head classes check the options they take with this function; ``ExitOptions`` checks all of them
    with ``prefix="exits."``, so a configuration error names the option as the user writes it.

    Raises:
        ValueError: The first invalid option, with what is allowed.

    Example:
        >>> check_head_options(moment_dim=30, prefix="exits.")
        Traceback (most recent call last):
        ...
        ValueError: exits.moment_dim must be a positive multiple of exits.moment_groups=4, got 30
    """
    if head_pool not in ("token", "avg", None):
        raise ValueError(f"{prefix}head_pool must be 'token' or 'avg', got {head_pool!r}")
    check_dropout(head_dropout, f"{prefix}head_dropout")
    if isinstance(moment_groups, bool) or not isinstance(moment_groups, int) or moment_groups < 2:
        raise ValueError(
            f"{prefix}moment_groups must be an integer >= 2 (adjacent-group covariances), "
            f"got {moment_groups!r}"
        )
    if (
        isinstance(moment_dim, bool)
        or not isinstance(moment_dim, int)
        or moment_dim <= 0
        or moment_dim % moment_groups
    ):
        raise ValueError(
            f"{prefix}moment_dim must be a positive multiple of {prefix}moment_groups={moment_groups}, "
            f"got {moment_dim!r}"
        )
    check_positive_int(cov_dim, f"{prefix}cov_dim")
    if isinstance(cov_iterations, bool) or not isinstance(cov_iterations, int) or cov_iterations < 1:
        raise ValueError(f"{prefix}cov_iterations must be an integer >= 1, got {cov_iterations!r}")


def _moment_dtype(t: Tensor) -> torch.dtype:
    """float32 for the covariance maths of low-precision inputs; float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_sizes(dim: int, num_classes: int, num_prefix_tokens: int) -> None:
    for name, value in (("dim", dim), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an integer >= 0, got {num_prefix_tokens!r}")


def _check_tokens(x: Tensor, dim: int, num_prefix_tokens: int, need_patches: bool) -> None:
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"expected tokens of shape [B, N, {dim}], got {tuple(x.shape)}")
    if need_patches and x.shape[1] <= num_prefix_tokens:
        raise ValueError(
            f"need at least one patch token after {num_prefix_tokens} prefix tokens, got N={x.shape[1]}"
        )


class Bypass(nn.Module):
    """Token-wise residual bottleneck ``x + up(gelu(down(norm(x))))`` feeding one early predictor.

    ``up`` is zero-initialised, so the bypass is the identity at step 0.

    Args:
        dim: Token width ``D``.
        bypass_dim: Bottleneck width; ``None`` for ``max(1, dim // 4)``.

    Raises:
        ValueError: If a width is not positive.
    """

    def __init__(self, dim: int, bypass_dim: int | None = None) -> None:
        super().__init__()
        bypass_dim = max(1, dim // 4) if bypass_dim is None else bypass_dim
        check_positive_int(dim, "dim")
        check_positive_int(bypass_dim, "bypass_dim")
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.down = nn.Linear(dim, bypass_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(bypass_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Add the bottleneck's output to the tokens."""
        return x + self.up(self.act(self.down(self.norm(x))))


@register_predictor("linear", options=("head_pool", "norm", "head_dropout", "class_token"))
class LinearHead(nn.Module):
    """LayerNorm, then the class token (``"token"``) or the mean patch token (``"avg"``), then Linear.

    Args:
        dim: Token width ``D``.
        num_classes: Number of classes ``C``.
        num_prefix_tokens: Leading non-patch tokens (class/register/prompt).
        head_pool: ``"token"`` (first token; needs a prefix token) or ``"avg"`` (mean of the patch tokens),
            as timm's ``global_pool``; ``None``: the class token if there is one, else the mean.
        norm: Apply a LayerNorm before pooling (as the backbone's final norm does).
        head_dropout: Dropout before the classifier.
        class_token: Whether the first prefix token is a class token (``False`` for timm models built with
            ``class_token=False``, whose prefix tokens are registers or prompts).
        norm_after_pool: ``"avg"`` only: pool first, then normalise the pooled token, as timm's ``fc_norm``
            does in models that average-pool (``*_gap_*``, ``class_token=False``, EVA02).

    Raises:
        ValueError: For bad sizes, an unknown ``head_pool``, or ``"token"`` pooling without a class token.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_prefix_tokens: int,
        head_pool: Literal["token", "avg"] | None = HEAD_POOL,
        norm: bool = True,
        head_dropout: float = HEAD_DROPOUT,
        class_token: bool = True,
        norm_after_pool: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_classes, num_prefix_tokens)
        check_head_options(head_pool=head_pool, head_dropout=head_dropout)
        if head_pool is None:  # no backbone to ask: the class token if there is one
            head_pool = "token" if class_token and num_prefix_tokens > 0 else "avg"
        if head_pool == "token" and num_prefix_tokens == 0:
            raise ValueError(
                "head_pool='token' needs a class token but num_prefix_tokens=0; use head_pool='avg'"
            )
        if head_pool == "token" and not class_token:
            raise ValueError(
                f"head_pool='token' needs a class token but the {num_prefix_tokens} prefix token(s) are "
                "registers/prompts (class_token=False); use head_pool='avg'"
            )
        self.dim = dim
        self.num_prefix_tokens = num_prefix_tokens
        self.pool = head_pool
        self.norm_after_pool = bool(norm_after_pool) and head_pool == "avg"
        self.norm: nn.Module = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.drop = nn.Dropout(head_dropout)
        self.fc = nn.Linear(dim, num_classes)

    @torch.no_grad()
    def init_norm_from(self, layer_norm: nn.Module) -> None:
        """Copy a LayerNorm's affine parameters (e.g. the backbone's final ``norm``) into this head.

        Raises:
            ValueError: If this head has no norm or the shapes differ.
        """
        if not isinstance(self.norm, nn.LayerNorm):
            raise ValueError("this LinearHead was built with norm=False; there is no norm to initialise")
        weight, bias = getattr(layer_norm, "weight", None), getattr(layer_norm, "bias", None)
        if weight is None or weight.shape != self.norm.weight.shape:
            raise ValueError(
                f"expected a LayerNorm with weight of shape {tuple(self.norm.weight.shape)}, "
                f"got {None if weight is None else tuple(weight.shape)}"
            )
        self.norm.weight.copy_(weight)
        if bias is not None and self.norm.bias is not None:
            self.norm.bias.copy_(bias)
        self.norm.eps = getattr(layer_norm, "eps", self.norm.eps)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` from tokens ``[B, N, D]``."""
        _check_tokens(x, self.dim, self.num_prefix_tokens, need_patches=self.pool == "avg")
        if self.norm_after_pool:
            return self.fc(self.drop(self.norm(x[:, self.num_prefix_tokens :].mean(dim=1))))
        x = self.norm(x)
        pooled = x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        return self.fc(self.drop(pooled))


class DistilledHead(LinearHead):
    """The head of timm's distilled DeiT: the mean of a class-token and a distillation-token classifier.

    Both read the tokens after the final LayerNorm; the distillation token is the second prefix token.

    This is what ``VisionTransformerDistilled.forward_head`` returns in eval mode and in training without
    ``set_distilled_training`` (``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``); there is no separate
    distillation-token loss.

    Args:
        dim: Token width ``D``.
        num_classes: Number of classes ``C``.
        num_prefix_tokens: Leading non-patch tokens (class, distillation, prompts); at least 2.
        head_dropout: Dropout before both classifiers.

    Raises:
        ValueError: For bad sizes or fewer than two prefix tokens.
    """

    def __init__(
        self, dim: int, num_classes: int, num_prefix_tokens: int, head_dropout: float = HEAD_DROPOUT
    ) -> None:
        super().__init__(dim, num_classes, num_prefix_tokens, head_pool="token", head_dropout=head_dropout)
        if num_prefix_tokens < 2:
            raise ValueError(
                f"a distilled head reads the class and distillation tokens, but num_prefix_tokens="
                f"{num_prefix_tokens}; it needs at least 2"
            )
        self.fc_dist = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]``: mean of the class-token and distillation-token classifiers."""
        _check_tokens(x, self.dim, self.num_prefix_tokens, need_patches=False)
        x = self.norm(x[:, :2])
        return 0.5 * (self.fc(self.drop(x[:, 0])) + self.fc_dist(self.drop(x[:, 1])))


class AttentionPoolHead(nn.Module):
    """The head of timm models with attention pooling (``global_pool='map'``, SigLIP).

    Final LayerNorm, the backbone's own attention pool (``attn_pool``, a latent query attending to the
    tokens), ``fc_norm``, then a Linear, as ``VisionTransformer.forward_features`` + ``forward_head``.

    Args:
        attn_pool: The backbone's attention-pool module (moved here with its weights).
        dim: Token width ``D``.
        num_classes: Number of classes ``C``.
        num_prefix_tokens: Leading non-patch tokens (registers, prompts); excluded from the pool unless
            ``include_prefix``.
        include_prefix: Pool over all tokens (timm's ``pool_include_prefix``).
        fc_norm: Apply a LayerNorm to the pooled token (timm's ``fc_norm``).
        head_dropout: Dropout before the classifier.

    Raises:
        ValueError: For bad sizes.
    """

    def __init__(
        self,
        attn_pool: nn.Module,
        dim: int,
        num_classes: int,
        num_prefix_tokens: int,
        *,
        include_prefix: bool = False,
        fc_norm: bool = False,
        head_dropout: float = HEAD_DROPOUT,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_classes, num_prefix_tokens)
        check_head_options(head_dropout=head_dropout)
        self.dim = dim
        self.num_prefix_tokens = num_prefix_tokens
        self.include_prefix = include_prefix
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn_pool = attn_pool
        self.fc_norm: nn.Module = nn.LayerNorm(dim, eps=1e-6) if fc_norm else nn.Identity()
        self.drop = nn.Dropout(head_dropout)
        self.fc = nn.Linear(dim, num_classes)

    init_norm_from = LinearHead.init_norm_from

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` from tokens ``[B, N, D]``."""
        _check_tokens(x, self.dim, self.num_prefix_tokens, need_patches=not self.include_prefix)
        x = self.norm(x)
        if not self.include_prefix:
            x = x[:, self.num_prefix_tokens :]
        return self.fc(self.drop(self.fc_norm(self.attn_pool(x))))


def _conv_out(size: int) -> int:
    """Spatial size after a 3x3, stride-2, padding-1 convolution."""
    return (size + 2 - 3) // 2 + 1


@register_predictor("moment", options=("moment_dim", "moment_groups", "head_dropout", "class_token"))
class MomentHead(nn.Module):
    """Moment Probing predictor (Tao et al., ICCV 2023): mean of first- and second-order logits.

    First order: LayerNorm + Linear on the class token (the mean patch token if there is no class token).
    Second order: patch tokens -> Linear ``D -> moment_dim`` -> ``moment_groups`` groups of
    ``moment_dim / moment_groups`` channels, each LayerNorm-ed on its own (one LayerNorm applied per group:
    per-group statistics, affine shared across groups, which keeps the head small), centred over tokens;
    cross-covariances of adjacent groups ``(1/N) P_g^T P_{g+1}`` (``moment_groups - 1`` matrices), rows
    L2-normalised, stacked as channels -> two 3x3 stride-2 convolutions (GELU between) -> Linear.
    The covariance maths runs in float32 with autocast off.

    Args:
        dim: Token width ``D``.
        num_classes: Number of classes ``C``.
        num_prefix_tokens: Leading non-patch tokens (class/register/prompt), excluded from the moments.
        moment_dim: Width of the projection before the covariances (512 in Moment Probing).
        moment_groups: Number of channel groups (>= 2; 4 in Moment Probing).
        head_dropout: Dropout before both classifiers.
        class_token: Whether the first prefix token is a class token; if not (registers/prompts only), the
            first-order branch reads the mean of the patch tokens.

    Raises:
        ValueError: For bad sizes, ``moment_groups < 2`` or ``moment_dim`` not divisible by it.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_prefix_tokens: int,
        moment_dim: int = MOMENT_DIM,
        moment_groups: int = MOMENT_GROUPS,
        head_dropout: float = HEAD_DROPOUT,
        class_token: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_classes, num_prefix_tokens)
        check_head_options(moment_dim=moment_dim, moment_groups=moment_groups, head_dropout=head_dropout)
        self.class_token = bool(class_token) and num_prefix_tokens > 0
        self.dim = dim
        self.num_prefix_tokens = num_prefix_tokens
        self.groups = moment_groups
        self.group_dim = moment_dim // moment_groups
        channels = moment_groups - 1
        side = _conv_out(_conv_out(self.group_dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc_first = nn.Linear(dim, num_classes)
        self.proj = nn.Linear(dim, moment_dim)
        self.group_norm = nn.LayerNorm(self.group_dim)
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1),
        )
        self.drop = nn.Dropout(head_dropout)
        self.fc_second = nn.Linear(channels * side * side, num_classes)

    def second_order(self, x: Tensor) -> Tensor:
        """Row-normalised adjacent-group cross-covariances ``[B, groups - 1, g, g]`` (float32)."""
        p = self.proj(x[:, self.num_prefix_tokens :])
        with torch.autocast(device_type=x.device.type, enabled=False):
            b, n, _ = p.shape
            dtype = _moment_dtype(p)
            p = p.to(dtype).reshape(b, n, self.groups, self.group_dim)
            gn = self.group_norm
            p = F.layer_norm(p, (self.group_dim,), gn.weight.to(dtype), gn.bias.to(dtype), gn.eps)
            p = p - p.mean(dim=1, keepdim=True)
            p = p.permute(0, 2, 1, 3)  # [B, G, N, g]
            # n * covariance [B, G-1, g, g]: the row normalisation removes the scale, so no division by n
            # (the eps of the normalisation is scaled to match)
            cov = p[:, :-1].transpose(-1, -2) @ p[:, 1:]
            return F.normalize(cov, dim=-1, eps=1e-12 * n)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` from tokens ``[B, N, D]``."""
        _check_tokens(x, self.dim, self.num_prefix_tokens, need_patches=True)
        # LayerNorm is per token: normalise only the class token, not all N (same values, 1/N of the work)
        if self.class_token:
            cls = self.norm(x[:, 0])
        else:
            cls = self.norm(x[:, self.num_prefix_tokens :]).mean(dim=1)
        first = self.fc_first(self.drop(cls))
        second = self.fc_second(self.drop(self.conv(self.second_order(x)).flatten(1)))
        return 0.5 * (first + second)


def newton_schulz_sqrt(a: Tensor, iterations: int = 5, eps: float = _TRACE_EPS) -> Tensor:
    """Matrix square root of symmetric positive semi-definite matrices by coupled Newton-Schulz iterations.

    As in iSQRT-COV (Li et al., CVPR 2018): pre-normalise by the trace, iterate
    ``T = (3I - Z Y) / 2; Y <- Y T; Z <- T Z`` from ``Y = A / tr(A), Z = I``, post-compensate by
    ``sqrt(tr(A))``. Converges for SPD input because the normalised spectrum lies in ``(0, 1]``.

    Args:
        a: Batch of symmetric PSD matrices ``[B, d, d]``.
        iterations: Number of Newton-Schulz iterations (>= 1).
        eps: Added to the trace so an all-zero matrix maps to zero instead of NaN.

    Returns:
        Approximate square roots ``[B, d, d]`` in ``a``'s dtype.

    Raises:
        ValueError: If ``a`` is not a batch of square matrices or ``iterations < 1``.
    """
    if a.ndim != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expected a batch of square matrices [B, d, d], got {tuple(a.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1) + eps
    y = a / trace
    z: Tensor | None = None  # Z = I: the products with it are skipped (exact), 3 -> 2 matmuls at step 1
    for i in range(iterations):
        t = 0.5 * (3.0 * eye - (y if z is None else z @ y))
        if i < iterations - 1:  # the last Z is never used
            z = t if z is None else t @ z
        y = y @ t
    return y * trace.sqrt()


@register_predictor("isqrt_cov", options=("cov_dim", "cov_iterations", "head_dropout"))
class ISqrtCovHead(nn.Module):
    """iSQRT-COV predictor (Li et al., CVPR 2018): matrix-square-root-normalised covariance of patch tokens.

    Patch tokens -> Linear ``D -> cov_dim`` + BatchNorm1d (over all tokens of the batch) + ReLU ->
    covariance ``(1/N) Z^T (I - 11^T/N) Z`` -> :func:`newton_schulz_sqrt` -> upper triangle (with the
    diagonal) -> dropout -> Linear. The covariance and square root run in float32 with autocast off.

    Args:
        dim: Token width ``D``.
        num_classes: Number of classes ``C``.
        num_prefix_tokens: Leading non-patch tokens (class/register/prompt), excluded from the covariance.
        cov_dim: Reduced width ``d`` (64-128 in the paper; features are ``d(d+1)/2``).
        cov_iterations: Newton-Schulz iterations ``T``.
        head_dropout: Dropout before the classifier.

    Raises:
        ValueError: For bad sizes.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_prefix_tokens: int,
        cov_dim: int = COV_DIM,
        cov_iterations: int = COV_ITERATIONS,
        head_dropout: float = HEAD_DROPOUT,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_classes, num_prefix_tokens)
        check_head_options(cov_dim=cov_dim, cov_iterations=cov_iterations, head_dropout=head_dropout)
        self.triu_index: Tensor
        self.dim = dim
        self.num_prefix_tokens = num_prefix_tokens
        self.iterations = cov_iterations
        self.reduce = nn.Linear(dim, cov_dim)
        self.bn = nn.BatchNorm1d(cov_dim)
        self.act = nn.ReLU()
        rows, cols = torch.triu_indices(cov_dim, cov_dim)
        self.register_buffer("triu_index", rows * cov_dim + cols, persistent=False)
        self.drop = nn.Dropout(head_dropout)
        self.fc = nn.Linear(cov_dim * (cov_dim + 1) // 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` from tokens ``[B, N, D]``."""
        _check_tokens(x, self.dim, self.num_prefix_tokens, need_patches=True)
        z = self.reduce(x[:, self.num_prefix_tokens :])
        b, n, d = z.shape
        z = self.act(self.bn(z.reshape(b * n, d))).reshape(b, n, d)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = z.to(_moment_dtype(z))
            z = z - z.mean(dim=1, keepdim=True)
            cov = z.transpose(1, 2) @ z / n
            root = newton_schulz_sqrt(cov, self.iterations)
            feats = root.flatten(1)[:, self.triu_index]
        return self.fc(self.drop(feats))


def build_predictor(
    kind: str,
    dim: int,
    num_classes: int,
    num_prefix_tokens: int,
    *,
    head_pool: Literal["token", "avg"] | None = HEAD_POOL,
    norm: bool = True,
    moment_dim: int = MOMENT_DIM,
    moment_groups: int = MOMENT_GROUPS,
    cov_dim: int = COV_DIM,
    cov_iterations: int = COV_ITERATIONS,
    head_dropout: float = HEAD_DROPOUT,
    class_token: bool = True,
) -> nn.Module:
    """Build a predictor by name; options that do not apply to ``kind`` are ignored.

    The options are the ``exits.*`` options of the same names
    (:class:`~dmpo_lightning.models.multi_exit.ExitOptions`), with the same defaults.

    Args:
        kind: A registered predictor: ``"linear"`` (:class:`LinearHead`), ``"moment"``
            (:class:`MomentHead`), ``"isqrt_cov"`` (:class:`ISqrtCovHead`), ...
        dim: Token width ``D``.
        num_classes: Number of classes ``C``.
        num_prefix_tokens: Leading non-patch tokens (class/register/VPT prompt).
        head_pool: ``linear`` only: ``"token"``, ``"avg"`` or ``None`` (the class token if there is one).
        norm: ``linear`` only: LayerNorm before pooling.
        moment_dim: ``moment`` only: projection width.
        moment_groups: ``moment`` only: channel groups.
        cov_dim: ``isqrt_cov`` only: reduced width.
        cov_iterations: ``isqrt_cov`` only: Newton-Schulz iterations.
        head_dropout: Dropout before the classifier(s), all kinds.
        class_token: ``linear`` and ``moment``: whether the first prefix token is a class token.

    Returns:
        The predictor module.

    Raises:
        ValueError: For an unknown ``kind`` or invalid options.

    Example:
        >>> head = build_predictor("moment", 32, 10, 1, moment_dim=32, moment_groups=4)
        >>> head(torch.randn(2, 5, 32)).shape
        torch.Size([2, 10])
        >>> build_predictor("mlp", 32, 10, 1)
        Traceback (most recent call last):
        ...
        ValueError: unknown predictor kind 'mlp'; allowed: linear, moment, isqrt_cov
    """
    spec = PREDICTOR_REGISTRY.get(kind)
    given = {
        "head_pool": head_pool,
        "norm": norm,
        "moment_dim": moment_dim,
        "moment_groups": moment_groups,
        "cov_dim": cov_dim,
        "cov_iterations": cov_iterations,
        "head_dropout": head_dropout,
        "class_token": class_token,
    }
    return spec.build(dim, num_classes, num_prefix_tokens, **{o: given[o] for o in spec.options})


class ExitHead(nn.Module):
    """One exit: an optional bypass followed by a predictor, ``predictor(bypass(tokens))``.

    Args:
        predictor: Maps tokens ``[B, N, D]`` to logits ``[B, C]``.
        bypass: Token-wise module in front of the predictor; ``None`` for identity.
        detach_input: Stop the head's gradients at its input, so they never reach the trunk (METHOD.md's
            ``detach_trunk`` ablation).
    """

    def __init__(
        self, predictor: nn.Module, bypass: nn.Module | None = None, detach_input: bool = False
    ) -> None:
        super().__init__()
        self.bypass: nn.Module = nn.Identity() if bypass is None else bypass
        self.predictor = predictor
        self.detach_input = detach_input

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, C]`` from trunk tokens ``[B, N, D]``."""
        return self.predictor(self.bypass(tokens.detach() if self.detach_input else tokens))


PREDICTOR_KINDS: tuple[str, ...] = PREDICTOR_REGISTRY.names()
"""The predictors registered in this file (the CLI's ``early_head`` / ``final_head`` choices)."""

if TYPE_CHECKING:
    PredictorKind = str
else:
    PredictorKind = PREDICTOR_REGISTRY.literal()
"""Predictor families: plain linear, Moment Probing (first + second order), iSQRT-COV, ... (``Literal`` of
the predictors registered above)."""

__all__ = [
    "COV_DIM",
    "COV_ITERATIONS",
    "HEAD_DROPOUT",
    "HEAD_POOL",
    "MOMENT_DIM",
    "MOMENT_GROUPS",
    "PREDICTOR_KINDS",
    "PREDICTOR_REGISTRY",
    "AttentionPoolHead",
    "Bypass",
    "DistilledHead",
    "ExitHead",
    "ISqrtCovHead",
    "LinearHead",
    "MomentHead",
    "PredictorKind",
    "PredictorSpec",
    "build_predictor",
    "check_head_options",
    "newton_schulz_sqrt",
    "register_predictor",
]
