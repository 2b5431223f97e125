"""``dmpo_toy_vit_fmnist``: a small pre-trained ViT shipped inside the package, registered with timm.

The quickstart needs a *pre-trained* trunk to tune the way a user tunes ViT-B (frozen trunk, AdaptFormer,
early exits), and nothing can be downloaded offline. This module registers one with timm, so it is chosen
like any other timm backbone::

    model:
      backbone: dmpo_toy_vit_fmnist   # or dmpo_toy_vit_fmnist.fmnist_families
      pretrained: true

Architecture: the ``vit_tiny_patch16_224`` family scaled down to 28x28 grey images: 7x7 patches (16 tokens
plus the class token), width 96, 8 blocks, 3 heads (0.9 M parameters). Weights:
``models/assets/dmpo_toy_vit_fmnist.safetensors`` (fp16), made by ``benchmarks/make_toy_trunk.py``, which
pre-trains it on the 50,000 Fashion-MNIST training images that are *not* in the package's embedded subset,
with five coarse garment-family labels (tops, trousers, dresses, footwear, bags) instead of the ten fine
classes the quickstart tunes on; see ``models/assets/TOY_TRUNK_NOTICE.txt`` for the exact command, the
measured accuracy and the data licence (MIT).

The registered pretrained config carries the input size (1x28x28), no resize (``crop_pct`` 1) and the
Fashion-MNIST mean/std the weights were trained with, so the data module linked to ``backbone`` normalises
images as in pre-training. Loading reads the packaged file (timm's ``file`` source): no network, and a
module rebuilt from its own Lightning checkpoint does not read it at all
(:func:`dmpo_lightning.module.weights_from_checkpoint`).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

__all__ = [
    "TOY_TRUNK_ARCH",
    "TOY_TRUNK_ASSET",
    "TOY_TRUNK_COARSE_CLASSES",
    "TOY_TRUNK_COARSE_OF_FINE",
    "TOY_TRUNK_MEAN",
    "TOY_TRUNK_NAME",
    "TOY_TRUNK_STD",
    "TOY_TRUNK_TAG",
    "dmpo_toy_vit_fmnist",
    "toy_trunk_file",
]

TOY_TRUNK_NAME = "dmpo_toy_vit_fmnist"
"""The timm model name (architecture)."""

TOY_TRUNK_TAG = "fmnist_families"
"""The pretrained tag of the packaged weights (the default tag of :data:`TOY_TRUNK_NAME`)."""

TOY_TRUNK_ASSET = "assets/dmpo_toy_vit_fmnist.safetensors"
"""The weights file, relative to the ``dmpo_lightning.models`` package."""

TOY_TRUNK_ARCH: dict[str, Any] = {
    "img_size": 28,
    "in_chans": 1,
    "patch_size": 7,
    "embed_dim": 96,
    "depth": 8,
    "num_heads": 3,
}
"""timm ``VisionTransformer`` arguments of the architecture."""

TOY_TRUNK_MEAN = (0.2860,)
"""Mean of the Fashion-MNIST training images (pixel values in [0, 1]), used in pre-training."""

TOY_TRUNK_STD = (0.3530,)
"""Standard deviation of the Fashion-MNIST training images, used in pre-training."""

TOY_TRUNK_COARSE_CLASSES = ("tops", "trousers", "dresses", "footwear", "bags")
"""Pre-training labels: garment families."""

TOY_TRUNK_COARSE_OF_FINE = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)
"""Family of each fine Fashion-MNIST class: T-shirt/top, Pullover, Coat, Shirt -> tops; Trouser ->
trousers; Dress -> dresses; Sandal, Sneaker, Ankle boot -> footwear; Bag -> bags."""


def toy_trunk_file() -> str:
    """Path of the packaged weights file (it exists only once ``benchmarks/make_toy_trunk.py`` has run)."""
    return str(resources.files("dmpo_lightning.models").joinpath(TOY_TRUNK_ASSET))


default_cfgs = generate_default_cfgs(
    {
        f"{TOY_TRUNK_NAME}.{TOY_TRUNK_TAG}": {
            "file": toy_trunk_file(),
            "num_classes": 0,
            "input_size": (1, 28, 28),
            "pool_size": None,
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "fixed_input_size": False,
            "mean": TOY_TRUNK_MEAN,
            "std": TOY_TRUNK_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "mit",
            "description": "dmpo-lightning toy trunk: 50k Fashion-MNIST images, 5 garment families",
        }
    }
)


@register_model
def dmpo_toy_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The toy trunk (see the module docstring); ``pretrained=True`` loads the packaged weights.

    Args:
        pretrained: Load the packaged fp16 weights (no download).
        **kwargs: Further ``VisionTransformer`` arguments; they override :data:`TOY_TRUNK_ARCH`.

    Returns:
        The timm model.
    """
    return _create_vision_transformer(TOY_TRUNK_NAME, pretrained=pretrained, **{**TOY_TRUNK_ARCH, **kwargs})
