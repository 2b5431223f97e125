"""Transforms: timm data config (read offline, no model built), overrides, the two regimes, channels."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dmpo_lightning.data import BenchmarkDataModule, build_transform, resolve_data_config, timm_data_config
from dmpo_lightning.data.transforms import ConvertMode, DataConfig


def names(transform: object) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]  # type: ignore[attr-defined]


def test_timm_config_is_read_without_building_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("timm.create_model must not be called")

    monkeypatch.setattr(timm, "create_model", forbidden)
    cfg = timm_data_config("vit_base_patch16_224.augreg_in21k")
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 0.9


def test_datamodule_takes_its_preprocessing_from_the_timm_model() -> None:
    dm = BenchmarkDataModule("synthetic", timm_model="vit_base_patch16_clip_224.openai", num_workers=0)
    cfg = dm.data_config
    assert cfg.image_size == 224 and cfg.interpolation == "bicubic" and cfg.crop_pct == 0.9
    assert cfg.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_explicit_values_override_the_timm_model() -> None:
    cfg = resolve_data_config(
        in_chans=3,
        default_image_size=32,
        timm_model="vit_small_patch16_224",
        image_size=96,
        mean=(0.1, 0.2, 0.3),
        std=(1.0,),
        interpolation="bilinear",
        crop_pct=0.5,
    )
    assert cfg == DataConfig(96, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0), "bilinear", 0.5)


def test_without_timm_the_dataset_default_size_and_imagenet_stats_apply() -> None:
    cfg = resolve_data_config(in_chans=3, default_image_size=32)
    assert cfg.image_size == 32 and cfg.mean == (0.485, 0.456, 0.406) and cfg.crop_pct == 0.875


def test_unknown_timm_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no pretrained config"):
        resolve_data_config(in_chans=3, default_image_size=32, timm_model="not_a_model_xyz")


def test_native_small_images_use_padded_random_crop_and_no_eval_resize() -> None:
    cfg = resolve_data_config(in_chans=3, default_image_size=32)
    train = build_transform(cfg, in_chans=3, train=True, native_size=32)
    evaluation = build_transform(cfg, in_chans=3, train=False, native_size=32)
    assert names(train) == ["ConvertMode", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert names(evaluation) == ["ConvertMode", "ToTensor", "Normalize"]
    image = Image.new("RGB", (32, 32), (10, 20, 30))
    assert train(image).shape == evaluation(image).shape == (3, 32, 32)


def test_resized_regime_uses_random_resized_crop_and_crop_pct() -> None:
    cfg = resolve_data_config(in_chans=3, default_image_size=32, image_size=64, crop_pct=0.8)
    train = build_transform(cfg, in_chans=3, train=True, native_size=32)
    evaluation = build_transform(cfg, in_chans=3, train=False, native_size=32)
    assert names(train) == [
        "ConvertMode",
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    assert names(evaluation) == ["ConvertMode", "Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert evaluation.transforms[1].size == 80  # type: ignore[attr-defined]  # floor(64 / 0.8)
    image = Image.new("L", (50, 40), 100)
    assert train(image).shape == evaluation(image).shape == (3, 64, 64)


def test_grey_to_rgb_and_rgb_to_grey() -> None:
    grey = Image.new("L", (4, 4), 200)
    assert ConvertMode("RGB")(grey).mode == "RGB"
    assert ConvertMode("L")(Image.new("RGB", (4, 4), (255, 0, 0))).mode == "L"
    cfg = resolve_data_config(in_chans=1, default_image_size=4, mean=(0.0,), std=(1.0,))
    out = build_transform(cfg, in_chans=1, train=False, native_size=4)(
        Image.new("RGB", (4, 4), (200, 200, 200))
    )
    assert out.shape == (1, 4, 4) and torch.allclose(out, torch.full((1, 4, 4), 200 / 255))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size must be a positive"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
        ({"interpolation": "lanczos"}, "interpolation must be one of"),
        ({"mean": (0.1, 0.2)}, "mean must have 1 or in_chans=3 values"),
        ({"std": (0.0,)}, "std values must be positive"),
        ({"in_chans": 2}, "in_chans must be 1 or 3"),
    ],
)
def test_bad_preprocessing_values(kwargs: dict[str, object], match: str) -> None:
    options: dict[str, object] = {"in_chans": 3, "default_image_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        resolve_data_config(**options)  # type: ignore[arg-type]
