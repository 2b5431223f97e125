"""The one image decoder (``dmpo_lightning.images``): every mode to the training range, hostile files refused.

The decoder is checked alone, then on every surface that predicts image files (``support.surfaces``): a
16-bit or float image must give the row its 8-bit equivalent gives (scaled, not clipped), an image with NaN
or infinite pixels, a float image outside [0, 1] or an image over the pixel limit an ``error`` row with the
reason, and the training datasets decode files the same way.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.runs import make_run
from support.surfaces import MAX_PIXELS_OPTION, PREDICT_SURFACES, predict_with

from dmpo_lightning.data.datasets import load_image
from dmpo_lightning.data.errors import UnreadableImageError
from dmpo_lightning.deploy.export import export_artefact
from dmpo_lightning.deploy.predictor import EarlyExitPredictor
from dmpo_lightning.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, list_images
from dmpo_lightning.predictions import PREDICTION_COLUMNS

RNG = np.random.default_rng(0)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` 8-bit grey pixels, with no pixel data at all.

    Decoding it would fail; only a check of the header can refuse it for its size.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + end)
    return path


def _hostile_images(folder: Path) -> Path:
    """32 x 32 images for the synthetic model, each with its 8-bit equivalent where it has one."""
    folder.mkdir(parents=True, exist_ok=True)
    deep = RNG.integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    Image.fromarray(np.rint(deep / 257.0).astype(np.uint8)).save(folder / "deep16_as8.png")
    unit = RNG.random((32, 32), dtype=np.float32)
    Image.fromarray(unit).save(folder / "float01.tiff")
    Image.fromarray(np.rint(unit.astype(np.float64) * 255).astype(np.uint8)).save(folder / "float01_as8.png")
    broken = unit.copy()
    broken[3, 4], broken[10, 11] = np.nan, np.inf
    Image.fromarray(broken).save(folder / "nan.tiff")
    Image.fromarray(unit * 255).save(folder / "float255.tiff")
    png_header_only(folder / "huge.png", 10_000, 10_000)
    return folder


# ------------------------------------------------------------------------------------------ the decoder
def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    deep = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "a.png")
    Image.fromarray(deep).save(tmp_path / "a.tiff")
    for name in ("a.png", "a.tiff"):
        image, mode = decode_image(tmp_path / name)
        assert mode.startswith("I;16") and image.mode == "L"
        got = np.asarray(image)
        assert np.array_equal(got, np.rint(deep / 257.0).astype(np.uint8))
        assert (got == 255).mean() < 0.01  # PIL's own convert("L") saturates ~99.7 % of these pixels
    assert (np.asarray(Image.open(tmp_path / "a.png").convert("L")) == 255).mean() > 0.9


def test_32_bit_images_are_read_as_16_bit_or_refused(tmp_path):
    values = np.array([[0, 257, 65535, 1000]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i.tiff")
    assert np.asarray(decode_image(tmp_path / "i.tiff").image).tolist() == [[0, 1, 255, 4]]
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I").save(tmp_path / "big.tiff")
    with pytest.raises(ImageError, match="32-bit integer pixels from 0 to 70000"):
        decode_image(tmp_path / "big.tiff")


def test_float_images_in_the_unit_range_are_scaled_others_refused(tmp_path):
    unit = np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "u.tiff")
    image, mode = decode_image(tmp_path / "u.tiff")
    assert mode == "F" and np.asarray(image).tolist() == [[0, 128, 255, 64]]
    Image.fromarray(unit * 1000).save(tmp_path / "k.tiff")
    with pytest.raises(
        ImageError, match=r"float pixels from 0 to 1000; float images must hold values in \[0, 1\]"
    ):
        decode_image(tmp_path / "k.tiff")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_pixels_are_refused_with_their_count(tmp_path, bad):
    values = np.full((4, 4), 0.5, dtype=np.float32)
    values[1, 2] = bad
    Image.fromarray(values).save(tmp_path / "x.tiff")
    with pytest.raises(
        ImageError, match=r"has 1 of 16 pixels that are not finite numbers \(NaN or infinity\)"
    ):
        decode_image(tmp_path / "x.tiff")


def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    png_header_only(tmp_path / "huge.png", 10_000, 10_000)
    with pytest.raises(ImageError, match=r"10000x10000 px = 100,000,000 pixels, more than the limit of 67,1"):
        decode_image(tmp_path / "huge.png")
    assert DEFAULT_MAX_PIXELS == 8192 * 8192
    png_header_only(tmp_path / "ok.png", 100, 100)  # under the limit it is decoded, and fails as data
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(tmp_path / "ok.png")
    with pytest.raises(
        ImageError, match=r"more than the limit of 9,999 pixels; shrink it first or raise --m"
    ):
        decode_image(tmp_path / "ok.png", max_pixels=9_999, option="--max")
    png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # past PIL's own bomb limit: still one sentence
    with pytest.raises(ImageError, match=r"^the image is larger than PIL decodes \(Image size \(400000000"):
        decode_image(tmp_path / "bomb.png", max_pixels=10**9)
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        decode_image(tmp_path / "ok.png", max_pixels=0)


def test_other_modes_convert_as_training_images_do(tmp_path):
    rgba = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(rgba[..., 0] > 128).save(tmp_path / "b.png")  # mode "1"
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "c.png")
    assert decode_image(tmp_path / "a.png") == (decode_image(tmp_path / "a.png").image, "RGBA")
    for name, mode, reference in (
        ("a.png", "RGB", Image.open(tmp_path / "a.png").convert("RGB")),
        ("b.png", "L", Image.open(tmp_path / "b.png").convert("L")),
        ("c.png", "RGB", Image.open(tmp_path / "c.png").convert("RGB")),
    ):
        image = decode_image(tmp_path / name).image
        assert image.mode == mode and np.array_equal(np.asarray(image), np.asarray(reference))


def test_unreadable_files_get_one_sentence(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"^the file is not a readable image \(cannot identify image file"):
        decode_image(tmp_path / "x.png")
    with pytest.raises(ImageError, match="does not exist"):
        decode_image(tmp_path / "missing.png")


def test_the_training_datasets_use_the_same_decoder(tmp_path):
    folder = _hostile_images(tmp_path / "imgs")
    for name in ("deep16.png", "float01.tiff"):
        assert np.array_equal(
            np.asarray(load_image(str(folder / name))), np.asarray(decode_image(folder / name).image)
        )
    with pytest.raises(
        UnreadableImageError, match=r"cannot read image file .*nan\.tiff \(the image has 2 of 1024"
    ):
        load_image(str(folder / "nan.tiff"))


def test_listing_is_one_function_for_folders_files_and_lists(tmp_path):
    for name in ("b.JPEG", "a/c.webp", "a/.x/skip.png", "z.Gif", "d.txt", "a/e.tif", "f.pgm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("z.Gif\n# comment\n\nb.JPEG\n")
    got = list_images([tmp_path / "a", tmp_path / "list.txt", tmp_path / "f.pgm"])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in got] == [
        "a/c.webp",
        "a/e.tif",
        "z.Gif",
        "b.JPEG",
        "f.pgm",
    ]
    assert all(Path(p).is_absolute() for p in got)


# ------------------------------------------------------------------------------------- on every surface
@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    r = make_run(base)
    art = export_artefact(str(base / "art"), run=str(r["run"]))
    return {"base": base, "art": art, "images": _hostile_images(base / "images"), **r}


@pytest.fixture(scope="module", params=list(PREDICT_SURFACES))
def hostile_rows(request, hostile):
    name = request.param
    out = hostile["base"] / f"{list(PREDICT_SURFACES).index(name)}.csv"
    printed, rows = predict_with(name, hostile, hostile["images"], out)
    return name, printed, {Path(r.path).name: r for r in rows}


def _same_prediction(a, b) -> None:
    for column in PREDICTION_COLUMNS:
        x, y = getattr(a, column), getattr(b, column)
        assert x == pytest.approx(y, abs=1e-6) if isinstance(x, float) else x == y, column


def test_every_surface_scales_16_bit_and_float_images_like_their_8_bit_equivalents(hostile_rows):
    _, _, rows = hostile_rows
    assert rows["deep16.png"].error is None and rows["float01.tiff"].error is None
    _same_prediction(rows["deep16.png"], rows["deep16_as8.png"])
    _same_prediction(rows["float01.tiff"], rows["float01_as8.png"])


def test_every_surface_refuses_non_finite_and_out_of_range_pixels_per_image(hostile_rows):
    name, printed, rows = hostile_rows
    assert rows["nan.tiff"].error == (
        "the image has 2 of 1024 pixels that are not finite numbers (NaN or infinity); only finite pixel "
        "values can be predicted"
    )
    assert rows["nan.tiff"].class_index is None and rows["nan.tiff"].confidence is None
    assert rows["float255.tiff"].error.startswith("the image holds 32-bit float pixels from ")
    assert all(math.isfinite(r.confidence) for r in rows.values() if r.error is None)
    if name != "EarlyExitPredictor":  # the commands print the summary
        assert "3 not predicted (the reason is in the error column)" in printed


def test_every_surface_refuses_a_huge_image_from_its_header(hostile_rows):
    _, _, rows = hostile_rows
    assert rows["huge.png"].error.startswith(
        "the image is 10000x10000 px = 100,000,000 pixels, more than the limit of 67,108,864 pixels"
    )


@pytest.mark.parametrize("surface", list(PREDICT_SURFACES))
def test_every_surface_takes_a_pixel_limit_and_names_it(hostile, tmp_path, surface):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "a.png")
    _, rows = predict_with(surface, hostile, folder, tmp_path / "p.csv", max_pixels=1000)
    assert rows[0].error == (
        "the image is 32x32 px = 1,024 pixels, more than the limit of 1,000 pixels; shrink it first or raise "
        f"{MAX_PIXELS_OPTION[surface]}"
    )


def test_the_python_api_raises_for_non_finite_inputs(hostile):
    predictor = EarlyExitPredictor.load(hostile["art"], budget=0.5)
    x = torch.zeros(5, 3, 32, 32)
    x[1, 0, 2, 2], x[3, 2, 0, 0] = math.nan, -math.inf
    with pytest.raises(
        ValueError, match=r"2 of the 5 images in the batch \(index 1, 3\) hold NaN or infinite"
    ):
        predictor(x)
    with pytest.raises(ValueError, match=r"nan\.tiff: the image has 2 of 1024 pixels that are not finite"):
        list(predictor.predict_paths(hostile["images"] / "nan.tiff"))
