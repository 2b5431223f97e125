"""timm ViT backbones: building by name or local checkpoint, exit indices, and token-level access.

This is the only module that touches timm internals (``_pos_embed`` and the embedding sub-modules of
``VisionTransformer`` and ``Eva``, and the rotary embedding Eva blocks take). ``tests/test_backbone.py`` and
``tests/test_backbone_families.py`` pin the manual block loop to timm's own ``forward_features`` /
``forward_intermediates`` so a timm change that breaks it is caught at once.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from timm.models import parse_model_name
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = [
    "backbone_depth",
    "build_backbone",
    "check_backbone_name",
    "default_head_pool",
    "describe_checkpoint",
    "embed_tokens",
    "embed_tokens_and_rope",
    "explicit_attention",
    "num_prefix_tokens",
    "resolve_backbone_name",
    "resolve_exit_blocks",
    "rope_embedding",
    "run_blocks",
    "uses_rope",
    "warn_if_frozen_random_trunk",
]


HUB_PREFIX = "hf-hub:"
"""timm's prefix of Hugging Face Hub model names (``hf-hub:timm/vit_base_patch16_224.augreg_in21k``)."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_registry_name(name: str, shown: str | None = None) -> str:
    """The architecture of a timm registry name (``arch`` or ``arch.tag``); refuses unknown names and tags."""
    shown = shown or name
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=6, cutoff=0.5)
        raise ValueError(
            f"unknown backbone {shown!r}: timm has no model {architecture!r}. "
            f"Use a timm ViT/DeiT name such as 'vit_base_patch16_224.augreg_in21k' (similar: {close})"
        )
    if tag:
        known = timm.list_pretrained(f"{architecture}.*")
        if name not in known:
            tags = [k.partition(".")[2] for k in known]
            raise ValueError(
                f"unknown backbone {shown!r}: timm has no pretrained tag {tag!r} for {architecture!r}; "
                f"allowed tags: {tags or 'none (use the bare name)'}"
            )
    return architecture


def _cached_hub_config(repo: str, revision: str | None) -> dict[str, Any] | None:
    """The repo's ``config.json`` from the local Hugging Face cache, if it is there (nothing downloads)."""
    path = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(path, str):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def resolve_backbone_name(name: str) -> str:
    """The timm architecture a backbone name builds, without building or downloading anything.

    Accepts a timm registry name (``vit_base_patch16_224`` or with a pretrained tag,
    ``vit_base_patch16_224.augreg_in21k``), a Hugging Face Hub name ``hf-hub:<owner>/<repo>[@revision]`` and
    timm's ``local-dir:<folder>`` (a folder with timm's ``config.json`` and weights). A Hub name is resolved
    from the repo's ``config.json`` in the local Hugging Face cache if it is there; otherwise a ``timm/``
    repo is looked up in timm's registry of pretrained weights (its repos are named after them). Other
    owners' repos not in the cache cannot be checked offline: their name is returned unchecked when the Hub
    can be reached (timm fetches the config when the model is built) and refused with ``HF_HUB_OFFLINE=1``.

    Returns:
        The architecture (``vit_base_patch16_224``); for unchecked Hub repos, the Hub name itself.

    Raises:
        ValueError: Naming the unknown architecture (with similar names), tag (with the known tags), source
            prefix, missing ``local-dir`` folder or uncached repo (offline).

    Examples:
        >>> resolve_backbone_name("hf-hub:timm/vit_small_patch16_224.augreg_in21k")
        'vit_small_patch16_224'
        >>> resolve_backbone_name("deit_tiny_patch16_224")
        'deit_tiny_patch16_224'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a timm model name, got {name!r}")
    try:
        source, model_id = parse_model_name(name)
    except ValueError as err:
        raise ValueError(
            f"backbone {name!r}: {err} (a timm name such as 'vit_base_patch16_224.augreg_in21k', "
            "'hf-hub:timm/<name>' or 'local-dir:<folder>')"
        ) from None
    if source is None:
        return _check_registry_name(name)
    if source == "local-dir":
        config_file = Path(model_id).expanduser() / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"backbone {name!r}: {config_file} does not exist; a local-dir: backbone is a folder holding "
                "timm's config.json and the weights (model.safetensors or pytorch_model.bin), as "
                "timm.models.save_for_hf writes it"
            )
        with open(config_file, encoding="utf-8") as f:
            architecture = json.load(f).get("architecture")
        return _check_registry_name(str(architecture), f"{name} (architecture {architecture!r})")
    repo, _, revision = model_id.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(
            f"backbone {name!r}: a Hugging Face Hub backbone is 'hf-hub:<owner>/<repo>', e.g. "
            "'hf-hub:timm/vit_base_patch16_224.augreg_in21k'"
        )
    config = _cached_hub_config(repo, revision or None)
    if config is not None:
        architecture = config.get("architecture")
        return _check_registry_name(
            str(architecture), f"{name} (architecture {architecture!r} in its config.json)"
        )
    owner, _, model = repo.partition("/")
    if owner == "timm":  # timm's own repos are named after its registry's pretrained names
        return _check_registry_name(model, name)
    if _offline():
        raise ValueError(
            f"backbone {name!r}: its config.json is not in the local Hugging Face cache and HF_HUB_OFFLINE "
            f"is set, so the model cannot be built; download it first (hf download {repo}) or unset "
            "HF_HUB_OFFLINE"
        )
    return name


def check_backbone_name(name: str) -> None:
    """Check that timm knows ``name`` (architecture and, if given, pretrained tag) without building anything.

    Registry names, ``hf-hub:<owner>/<repo>`` and ``local-dir:<folder>`` (see :func:`resolve_backbone_name`).

    Raises:
        ValueError: Naming the unknown architecture (with similar names) or tag (with the known tags).
    """
    resolve_backbone_name(name)


def _hub_error(name: str, err: Exception) -> ValueError:
    """One sentence for weights the Hugging Face Hub could not deliver (offline, not cached, no access)."""
    offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
    reason = str(err).splitlines()[0] if str(err) else ""
    return ValueError(
        f"the pretrained weights of backbone {name!r} could not be fetched from the Hugging Face "
        f"Hub{offline}: {type(err).__name__}: {reason}; without network they must be in the local cache "
        "(HF_HOME / HF_HUB_CACHE), or give a local weights file as checkpoint_path"
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


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes of a timm checkpoint file without keeping its tensors (``None`` if not readable)."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if path.endswith(".npz"):
        return None  # JAX checkpoints: timm maps them itself
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # not ours to judge: timm reports unreadable files itself
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        return None
    return {
        str(k).removeprefix("module."): tuple(v.shape)
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def describe_checkpoint(path: str) -> dict[str, Any] | None:
    """Architecture of a timm ViT checkpoint file: ``depth``, ``embed_dim``, ``patch_size``, ``in_chans``.

    Read from the parameter names and shapes (``blocks.<i>.*``, ``patch_embed.proj.weight``); ``None`` if
    the file does not look like a timm ViT state dict (then timm's loader has the last word).
    """
    shapes = _checkpoint_shapes(path)
    if not shapes or len(shapes.get("patch_embed.proj.weight", ())) != 4:
        return None
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not blocks:
        return None
    out, cin, ph, pw = shapes["patch_embed.proj.weight"]
    return {
        "depth": max(blocks) + 1,
        "embed_dim": int(out),
        "patch_size": int(ph) if ph == pw else (int(ph), int(pw)),
        "in_chans": int(cin),
    }


def _architecture(module: nn.Module) -> dict[str, Any]:
    model: Any = module
    patch = tuple(int(p) for p in model.patch_embed.patch_size)
    return {
        "depth": len(model.blocks),
        "embed_dim": int(model.embed_dim),
        "patch_size": patch[0] if patch[0] == patch[1] else patch,
    }


_TIMM_LOAD_LOGGER = "timm.models._builder"
"""The logger timm reports a pretrained load's missing and unexpected keys to (its ``load_pretrained``)."""

_LOAD_REPORT = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading", re.S)

HF_TRANSFORMERS_EQUIVALENTS: dict[int, tuple[tuple[str, str], ...]] = {
    192: (("facebook/deit-tiny-patch16-224", "deit_tiny_patch16_224.fb_in1k"),),
    384: (
        ("facebook/deit-small-patch16-224", "deit_small_patch16_224.fb_in1k"),
        ("facebook/dino-vits16", "vit_small_patch16_224.dino"),
    ),
    768: (
        ("google/vit-base-patch16-224-in21k", "vit_base_patch16_224.orig_in21k"),
        ("google/vit-base-patch16-224", "vit_base_patch16_224.orig_in21k_ft_in1k"),
        ("google/vit-base-patch32-224-in21k", "vit_base_patch32_224.orig_in21k"),
        ("facebook/dino-vitb16", "vit_base_patch16_224.dino"),
        ("facebook/vit-mae-base", "vit_base_patch16_224.mae"),
        ("facebook/deit-base-patch16-224", "deit_base_patch16_224.fb_in1k"),
    ),
    1024: (
        ("google/vit-large-patch16-224-in21k", "vit_large_patch16_224.orig_in21k"),
        ("facebook/vit-mae-large", "vit_large_patch16_224.mae"),
    ),
    1280: (
        ("google/vit-huge-patch14-224-in21k", "vit_huge_patch14_224.orig_in21k"),
        ("facebook/vit-mae-huge", "vit_huge_patch14_224.mae"),
    ),
}
"""Hugging Face ``transformers`` ViT checkpoints and the timm names of the same weights, by width (timm
does not read ``transformers`` state dicts; these load with ``pretrained: true`` instead)."""


class _LoadReport(logging.Handler):
    """Collects the keys timm's ``load_pretrained`` reports as missing or unexpected.

    timm loads non-strictly whenever the classifier is dropped (always here) and only logs those keys.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the key lists of a load report."""
        match = _LOAD_REPORT.match(record.getMessage())
        if match:
            keys = [k for k in match.group(2).split(", ") if k]
            (self.missing if match.group(1) == "Missing" else self.unexpected).extend(keys)


@contextlib.contextmanager
def _load_report() -> Iterator[_LoadReport]:
    """Collect timm's missing / unexpected key reports while a model is built with weights."""
    logger = logging.getLogger(_TIMM_LOAD_LOGGER)
    report, level = _LoadReport(), logger.level
    logger.addHandler(report)
    if not logger.isEnabledFor(logging.INFO):  # the missing keys are reported at INFO
        logger.setLevel(logging.INFO)
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)


def _short(keys: Sequence[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _conversion_hint(unexpected: Sequence[str], missing: Sequence[str], path: str | None) -> str:
    """Which name to use instead, when the unexpected keys show what the file is."""
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in unexpected) or any(
        ".attention.attention.query." in k for k in unexpected
    ):
        width = None
        shapes = _checkpoint_shapes(path) if path is not None else None
        for key, shape in (shapes or {}).items():
            if key.endswith("embeddings.patch_embeddings.projection.weight") and len(shape) == 4:
                width = int(shape[0])
        known = HF_TRANSFORMERS_EQUIVALENTS.get(width or 0) or tuple(
            pair for pairs in HF_TRANSFORMERS_EQUIVALENTS.values() for pair in pairs
        )
        names = "; ".join(f"{hf} -> {name}" for hf, name in known)
        return (
            "; these are Hugging Face transformers ViT keys, which timm does not convert: set backbone to "
            f"the timm name of the same weights with pretrained: true and no checkpoint_path ({names})"
        )
    missing_set = set(missing)
    for key in unexpected:
        parts = key.split(".")
        for cut in range(1, len(parts)):
            prefix = ".".join(parts[:cut]) + "."
            if ".".join(parts[cut:]) in missing_set:
                return (
                    f"; the file's keys carry the prefix {prefix!r} (a whole-model or Lightning "
                    "checkpoint?): save the backbone's own state dict (keys like "
                    "'blocks.0.attn.qkv.weight'), or give a dmpo checkpoint as --ckpt_path"
                )
    return ""


def _quoted_keys(message: str, heading: str) -> list[str]:
    """The ``"key"`` names torch's ``load_state_dict`` error lists after ``heading``."""
    start = message.find(heading)
    if start < 0:
        return []
    section = message[start:].split(". ", 1)[0]
    return re.findall(r'"([^"]+)"', section)


def _weights_source(name: str, checkpoint_path: str | None) -> str:
    return (
        f"checkpoint_path {checkpoint_path!r}" if checkpoint_path else f"the pretrained weights of {name!r}"
    )


def _check_loaded(name: str, model: nn.Module, report: _LoadReport, source: str, path: str | None) -> None:
    """Refuse weights that fill less than the whole trunk, naming the missing and unexpected keys."""
    model_keys = list(model.state_dict())
    missing = [k for k in report.missing if k in set(model_keys)]
    if not missing:
        if report.unexpected:
            warnings.warn(
                f"{source} for backbone {name!r} holds {len(report.unexpected)} tensor(s) the model does not "
                f"use ({_short(report.unexpected)}); all {len(model_keys)} backbone tensors were loaded",
                UserWarning,
                stacklevel=4,
            )
        return
    loaded = len(model_keys) - len(missing)
    raise ValueError(
        f"{source} filled only {loaded} of the {len(model_keys)} tensors of backbone {name!r}, so the rest "
        f"would stay random: missing {len(missing)} ({_short(missing)}); unexpected {len(report.unexpected)} "
        f"({_short(report.unexpected) or 'none'}){_conversion_hint(report.unexpected, missing, path)}"
    )


def _checkpoint_mismatch(
    name: str, path: str, holds: dict[str, Any], builds: dict[str, Any] | None, detail: str = ""
) -> ValueError:
    file_arch = ", ".join(f"{k} {v}" for k, v in holds.items() if k != "in_chans")
    model_arch = ", ".join(f"{k} {v}" for k, v in builds.items()) if builds else "another shape"
    fix = ", ".join(f"{k}: {holds[k]}" for k in ("depth", "embed_dim", "patch_size"))
    return ValueError(
        f"checkpoint_path {path!r} holds a ViT with {file_arch}, but backbone {name!r} with these "
        f"backbone_kwargs builds {model_arch}{detail}; set model backbone_kwargs {{{fix}}} (and a num_heads "
        "that divides embed_dim), or give the checkpoint of this architecture"
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
        name: A ``timm.create_model`` name of a ``VisionTransformer`` (ViT, DeiT incl. distilled, DINOv2
            with or without registers, SigLIP, ``*_gap_*``, ``class_token=False``) or ``Eva`` (EVA02, RoPE
            ViTs) model, with an optional pretrained tag (``vit_base_patch16_224.augreg_in21k``); see
            docs/backbones.md.
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
        ValueError: If the name is unknown to timm, the model is not one of the supported classes
            (hierarchical Swin, NaFlexViT and CNNs are refused), or ``img_size`` is not a multiple of the
            patch size.
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
        if os.path.isdir(checkpoint_path):
            raise FileNotFoundError(
                f"backbone checkpoint_path {checkpoint_path!r} is a folder; give the timm weights file in "
                "it (.pth, .bin, .safetensors or .npz), or name the folder as backbone 'local-dir:<folder>' "
                "if it holds timm's config.json and weights"
            )
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(
                f"backbone checkpoint_path {checkpoint_path!r} does not exist; give the path of a timm "
                "checkpoint file (.pth, .bin, .safetensors or .npz) downloaded for this model"
            )
        pretrained = True
        # custom_load is timm's JAX .npz reader; default configs of some tags set it, and timm < 1.0.31 then
        # reads a PyTorch .pth/.safetensors file as .npz too.
        kwargs["pretrained_cfg_overlay"] = {
            "file": os.path.abspath(checkpoint_path),
            "custom_load": checkpoint_path.endswith(".npz"),
        }
    check_backbone_name(name)
    if checkpoint_path is not None and parse_model_name(name)[0] is not None:
        raise ValueError(
            f"backbone {name!r} names its weights (Hub or local-dir) and checkpoint_path {checkpoint_path!r} "
            "names other ones; give one: the timm architecture name with checkpoint_path, or the "
            f"{name.partition(':')[0]}: name with pretrained=true"
        )
    holds = describe_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    report = _LoadReport()
    try:
        with _load_report() as report:
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        given = sorted(k for k in kwargs if k != "pretrained_cfg_overlay")
        raise ValueError(
            f"backbone {name!r} does not accept {given} ({err}); it is not a timm VisionTransformer, and "
            "only those (ViT, DeiT, ...) are supported: choose one, or drop the img_size/backbone_kwargs it "
            "does not take"
        ) from err
    except RuntimeError as err:
        text = str(err)
        if "size mismatch" not in text and ("Missing key(s)" in text or "Unexpected key(s)" in text):
            # a strict load (weights whose config keeps the classifier as it is): torch lists the keys
            report.missing = _quoted_keys(text, "Missing key(s)")
            report.unexpected = _quoted_keys(text, "Unexpected key(s)")
            plain = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
            empty = timm.create_model(name, pretrained=False, num_classes=0, **plain)
            _check_loaded(name, empty, report, _weights_source(name, checkpoint_path), checkpoint_path)
        if holds is None or "size mismatch" not in text:
            raise
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        plain = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
        builds = _architecture(timm.create_model(name, pretrained=False, num_classes=0, **plain))
        raise _checkpoint_mismatch(name, str(checkpoint_path), holds, builds, f" (timm: {first})") from None
    except Exception as err:
        if type(err).__module__.startswith("huggingface_hub"):  # offline, not cached, gated, no such repo
            raise _hub_error(name, err) from err
        raise
    if holds is not None and checkpoint_path is not None:
        builds = _architecture(model)
        if (holds["depth"], holds["embed_dim"]) != (builds["depth"], builds["embed_dim"]):
            raise _checkpoint_mismatch(name, checkpoint_path, holds, builds)
    if pretrained:
        _check_loaded(name, model, report, _weights_source(name, checkpoint_path), checkpoint_path)
    _check_supported_class(name, model)
    _check_patch_divisibility(name, model)
    return model


def _check_supported_class(name: str, model: nn.Module) -> None:
    """Refuse timm models whose token path the manual block loop does not reproduce."""
    kind = type(model).__name__
    if isinstance(model, (VisionTransformer, Eva)):
        if isinstance(model, Eva) and model.rope is not None and getattr(model, "dynamic_img_size", False):
            raise ValueError(
                f"backbone {name!r} with dynamic_img_size=True is not supported: its rotary position "
                "embedding depends on each input's grid, which the later early-exit stages do not see; drop "
                "dynamic_img_size from backbone_kwargs (images are resized to img_size anyway)"
            )
        return
    if not hasattr(model, "patch_embed") and not hasattr(model, "blocks"):
        why = "it is not a vision transformer (no patch tokens; a CNN works on feature maps)"
    elif hasattr(model, "layers") or "Swin" in kind:
        why = "it is hierarchical (stages of shrinking token grids, no one token sequence for exits to read)"
    else:
        why = "its token path differs from VisionTransformer's and Eva's, which MultiExitViT reproduces"
    raise ValueError(
        f"backbone {name!r} is a {kind}, not a token-based vision transformer MultiExitViT supports: {why}; "
        "supported are timm VisionTransformer (ViT, DeiT, DINOv2, SigLIP, *_gap_*, ...) and Eva (EVA02)"
    )


def _is_eva(backbone: nn.Module) -> bool:

    return isinstance(backbone, Eva)


def uses_rope(backbone: nn.Module) -> bool:
    """Whether the backbone's blocks take a rotary position embedding (timm ``Eva`` with ``rope``)."""
    return getattr(backbone, "rope", None) is not None


def rope_embedding(backbone: nn.Module) -> torch.Tensor | None:
    """The rotary position embedding every block of a RoPE backbone takes, for its fixed patch grid.

    What timm's ``Eva._pos_embed`` returns without patch dropout (eval mode); ``None`` without RoPE.
    """
    rope: Any = getattr(backbone, "rope", None)
    if rope is None:
        return None
    if hasattr(rope, "feat_shape"):
        return rope.get_embed()
    model: Any = backbone
    return rope.get_embed(shape=model.patch_embed.grid_size)


def embed_tokens_and_rope(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image ``[B, C, H, W]`` to the tokens the first block sees ``[B, N, D]`` and the RoPE embedding.

    Mirrors the first lines of ``VisionTransformer.forward_features`` and ``Eva.forward_features``
    (timm 1.0): the rotary embedding is ``None`` for backbones without RoPE.
    """
    if _is_eva(backbone):
        model: Any = backbone
        x = model.patch_embed(x)
        x, rope = model._pos_embed(x)  # Eva: patch dropout is applied inside, to tokens and rope
        return model.norm_pre(x), rope
    return embed_tokens(backbone, x), None


def run_blocks(
    backbone: nn.Module, tokens: torch.Tensor, start: int, stop: int, rope: torch.Tensor | None = None
) -> torch.Tensor:
    """Run blocks ``start..stop-1`` (0-based) on tokens, passing the RoPE embedding where blocks take it.

    Reproduces the block loop of timm's ``forward_features`` (``rope_mixed`` Eva models: one embedding
    per block, ``rope[i]``).
    """
    blocks: Any = backbone.blocks
    if rope is None:
        for block in blocks[start:stop]:
            tokens = block(tokens)
        return tokens
    mixed = bool(getattr(backbone, "rope_mixed", False))
    for i in range(start, stop):
        tokens = blocks[i](tokens, rope=rope[i] if mixed else rope)
    return tokens


def default_head_pool(backbone: nn.Module) -> str:
    """How the backbone's own head pools the tokens: ``"avg"`` (mean of the patch tokens) or ``"token"``.

    ``"avg"`` for backbones without a class token (``*_gap_*``, ``class_token=False``, SigLIP) and for those
    whose timm ``global_pool`` averages (EVA02: ``avg``; ``max`` / ``avgmax`` are read as the mean, the
    nearest pooling a head supports); ``"token"`` (the class token) otherwise.
    """
    if getattr(backbone, "cls_token", None) is None:
        return "avg"
    return "avg" if getattr(backbone, "global_pool", "token") in ("avg", "max", "avgmax") else "token"


def backbone_depth(backbone: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(cast(nn.Sequential, backbone.blocks))


def num_prefix_tokens(backbone: nn.Module) -> int:
    """Class and register tokens the backbone puts in front of the patch tokens."""
    return int(getattr(backbone, "num_prefix_tokens", 0))


def embed_tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image ``[B, C, H, W]`` to the token sequence the first block sees ``[B, N, D]``.

    Mirrors the first lines of ``VisionTransformer.forward_features`` (timm 1.0); for RoPE backbones use
    :func:`embed_tokens_and_rope`, whose embedding the blocks need too.
    """
    if _is_eva(backbone):
        return embed_tokens_and_rope(backbone, x)[0]
    model: Any = backbone
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


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
        raise ValueError("exits.blocks must be an int, a list of block numbers or null, not a bool")
    elif isinstance(exit_blocks, int):
        if not 1 <= exit_blocks <= depth:
            raise ValueError(
                f"exits.blocks={exit_blocks} asks for the last {exit_blocks} blocks; allowed is 1..{depth} "
                f"for this {depth}-block backbone"
            )
        blocks = tuple(range(depth - exit_blocks + 1, depth + 1))
    else:
        raw = list(exit_blocks)
        if not raw:
            raise ValueError(f"exits.blocks is empty; give at least one block number in 1..{depth}")
        blocks_list = []
        for b in raw:
            if isinstance(b, bool) or not isinstance(b, int):
                raise ValueError(f"exits.blocks entries must be integers, got {b!r}")
            resolved = depth + 1 + b if b < 0 else b
            if not 1 <= resolved <= depth:
                raise ValueError(
                    f"exit block {b} is out of range: allowed are 1..{depth} (1-based, exit after that "
                    f"block) or -{depth}..-1 counting from the end, for this {depth}-block backbone"
                )
            blocks_list.append(resolved)
        if len(set(blocks_list)) != len(blocks_list):
            raise ValueError(f"exits.blocks {raw} contains duplicates; each block may hold one exit")
        if blocks_list != sorted(blocks_list):
            raise ValueError(f"exits.blocks {raw} must be sorted in increasing order (got {blocks_list})")
        blocks = tuple(blocks_list)
    if require_last and blocks[-1] != depth:
        raise ValueError(
            f"the last exit sits after block {blocks[-1]} but the backbone has {depth} blocks; add {depth} "
            "(or -1) to exits.blocks, or set exits.require_last_exit=false to truncate the backbone"
        )
    return blocks


@contextlib.contextmanager
def explicit_attention(module: nn.Module) -> Iterator[None]:
    """Switch every timm attention layer in ``module`` to explicit (non-fused) attention for a while.

    ``FlopCounterMode`` does not count fused scaled-dot-product attention on CPU, so FLOPs are counted with
    the explicit ``q @ k^T`` / ``attn @ v`` path. The result is numerically the same computation.
    """
    switched: list[tuple[Any, bool]] = []
    for m in module.modules():
        if hasattr(m, "fused_attn") and isinstance(m.fused_attn, bool):
            switched.append((m, m.fused_attn))
            m.fused_attn = False
    try:
        yield
    finally:
        for layer, value in switched:
            layer.fused_attn = value


def warn_if_frozen_random_trunk(
    name: str, pretrained: bool, checkpoint_path: str | None, peft_method: str
) -> None:
    """Warn that a PEFT method other than ``full`` freezes a trunk that has no pre-trained weights."""
    if pretrained or checkpoint_path is not None or peft_method == "full":
        return
    warnings.warn(
        f"peft.method={peft_method!r} freezes the trunk of backbone {name!r}, but pretrained=false and no "
        "checkpoint_path is set: the frozen trunk keeps its random initial weights. Set pretrained=true (or "
        "checkpoint_path=<timm weights file>), or use peft.method='full' to train from scratch",
        UserWarning,
        stacklevel=3,
    )
