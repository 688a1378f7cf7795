"""Tests of v2flow_rt.data: built-in photos, image reading/writing, model-range conversion, crops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from v2flow_rt import data
from v2flow_rt.errors import ImageError, ShapeError


def _position_image(h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3] whose pixel (y, x) is (y, x, 7): a crop's first pixel says where it came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, np.full_like(yy, 7)], axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------- module load

def test_modules_import_without_torch_or_skimage() -> None:
    code = ("import sys, v2flow_rt.data, v2flow_rt.metrics; "
            "bad = [m for m in ('torch', 'skimage', 'sklearn', 'matplotlib', 'scipy') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- photos

@pytest.mark.parametrize("name", sorted(data.PHOTOS))
def test_every_photo_loads_as_uint8_rgb(name: str) -> None:
    img = data.load_photo(name)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 256  # all built-in photos are at least 256 px on each side
    assert img.std() > 5  # a real photo, not a blank decode


def test_grayscale_photo_has_equal_channels() -> None:
    img = data.load_photo("camera")
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])


def test_heldout_and_train_split_the_registry() -> None:
    assert set(data.HELDOUT_PHOTOS) == {"chelsea", "grace_hopper"}
    assert not set(data.HELDOUT_PHOTOS) & set(data.TRAIN_PHOTOS)
    assert set(data.HELDOUT_PHOTOS) | set(data.TRAIN_PHOTOS) == set(data.PHOTOS)


def test_unknown_photo_names_the_known_ones() -> None:
    with pytest.raises(ImageError, match="astronaut"):
        data.load_photo("no_such_photo")


# ----------------------------------------------------------------------------- load_image

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        data.load_image(tmp_path / "missing.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory"):
        data.load_image(tmp_path)


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageError, match="not an image") as e:
        data.load_image(p)
    assert str(p) in str(e.value)


def test_truncated_png(tmp_path: Path) -> None:
    src = data._photo_path("skimage", "astronaut.png")
    raw = Path(src).read_bytes()
    p = tmp_path / "half.png"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as e:
        data.load_image(p)
    assert str(p) in str(e.value)


def test_min_size(tmp_path: Path) -> None:
    p = tmp_path / "small.png"
    Image.new("RGB", (30, 20)).save(p)
    assert data.load_image(p, min_size=20).shape == (20, 30, 3)
    with pytest.raises(ImageError, match="30x20.*>= 21"):
        data.load_image(p, min_size=21)


def test_rgba_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 40, 10)
    rgba[..., 3] = [[0, 255, 128, 51]] * 4
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = data.load_image(p)
    a = rgba[..., 3:].astype(np.float64) / 255.0
    expected = np.rint(rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)  # over white
    assert np.array_equal(out, expected)
    assert np.array_equal(out[0, 0], [255, 255, 255]) and np.array_equal(out[0, 1], [200, 40, 10])


def test_palette_with_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putdata([0, 1, 1])
    p = tmp_path / "p.png"
    pal.save(p, transparency=0)
    assert data.load_image(p).tolist() == [[[255, 255, 255], [40, 50, 60], [40, 50, 60]]]


def test_grayscale_and_la(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = data.load_image(tmp_path / "g.png")
    assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    la = np.stack([gray, np.full_like(gray, 255)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(data.load_image(tmp_path / "la.png"), out)


def test_16_bit_scaled_to_8_bit(tmp_path: Path) -> None:
    levels = np.arange(256).reshape(16, 16)
    Image.fromarray((levels * 257).astype(np.uint16)).save(tmp_path / "g16.png")  # mode I;16
    Image.fromarray((levels * 257).astype(np.int32)).save(tmp_path / "g32.tif")  # mode I
    for name in ("g16.png", "g32.tif"):
        out = data.load_image(tmp_path / name)
        assert np.array_equal(out, np.repeat(levels[..., None], 3, axis=2).astype(np.uint8)), name


def test_cmyk_and_exif_orientation(tmp_path: Path) -> None:
    rgb = np.zeros((16, 24, 3), dtype=np.uint8)
    rgb[:, :12] = (255, 0, 0)
    rgb[:, 12:] = (0, 0, 255)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    out = data.load_image(tmp_path / "c.jpg")
    # JPEG is lossy: compare away from the colour edge, within a few levels
    assert np.abs(out[:, :8].astype(int) - [255, 0, 0]).max() <= 8
    assert np.abs(out[:, 16:].astype(int) - [0, 0, 255]).max() <= 8
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "r.png", exif=exif)
    assert np.array_equal(data.load_image(tmp_path / "r.png"), np.rot90(rgb, k=-1))


# ----------------------------------------------------------------------------- model range

def test_model_range_round_trip_is_exact() -> None:
    values = np.arange(256, dtype=np.uint8)
    img = np.stack([values.reshape(16, 16)] * 3, axis=-1)[None]  # [1, 16, 16, 3]
    x = data.to_model_range(img)
    assert x.dtype == np.float32 and x.shape == (1, 3, 16, 16)
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(data.from_model_range(x), img)
    assert data.to_model_range(img[0]).shape == (1, 3, 16, 16)


def test_from_model_range_clips_and_rounds() -> None:
    x = np.array([-3.0, -1.0, 0.0, 1.0, 5.0, 2 * 100.4 / 255 - 1, 2 * 100.6 / 255 - 1])
    x = np.broadcast_to(x, (1, 3, 1, 7))
    assert data.from_model_range(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 100, 101]


def test_model_range_refuses_bad_input() -> None:
    with pytest.raises(ShapeError, match="uint8"):
        data.to_model_range(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"\[B, 3, H, W\]"):
        data.from_model_range(np.zeros((1, 4, 4, 3)))
    with pytest.raises(ImageError, match="non-finite"):
        data.from_model_range(np.full((1, 3, 2, 2), np.nan))


# ----------------------------------------------------------------------------- resize / crops

def _adm_center_crop_arr(img: np.ndarray, image_size: int) -> np.ndarray:
    """guided-diffusion's image_datasets.center_crop_arr, transcribed (2-tuples, Resampling enums)."""
    pil_image = Image.fromarray(img)
    while min(*pil_image.size) >= 2 * image_size:
        w, h = pil_image.size
        pil_image = pil_image.resize((w // 2, h // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    w, h = pil_image.size
    pil_image = pil_image.resize((round(w * scale), round(h * scale)),
                                 resample=Image.Resampling.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size", [64, 100, 150, 300])
def test_resize_center_crop_matches_adm(size: int) -> None:
    img = data.load_photo("chelsea")  # 451 x 300: size 64 and 100 take the BOX-halving path
    out = data.resize_center_crop(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert np.array_equal(out, _adm_center_crop_arr(img, size))


def test_resize_center_crop_without_resize_is_a_center_slice() -> None:
    img = _position_image(64, 100)
    assert np.array_equal(data.resize_center_crop(img, 64), img[:, 18:82])


def test_random_crops_shape_range_and_reproducibility() -> None:
    images = [data.load_photo("coffee"), data.load_photo("rocket")]
    a = data.random_crops(images, 32, 16, np.random.default_rng(5))
    b = data.random_crops(images, 32, 16, np.random.default_rng(5))
    c = data.random_crops(images, 32, 16, np.random.default_rng(6))
    assert a.shape == (16, 3, 32, 32) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_crops_are_windows_of_the_image_possibly_flipped() -> None:
    img = _position_image(120, 90)
    sampler = data.CropSampler([img], 16, scales=(1.0,), flip=True)
    crops = data.from_model_range(sampler.sample(64, np.random.default_rng(0)))
    flipped = 0
    for crop in crops:
        y = int(crop[0, 0, 0])
        x0, x1 = int(crop[0, 0, 1]), int(crop[0, -1, 1])
        if x0 > x1:  # mirrored: the first column holds the window's last column
            flipped += 1
            crop = crop[:, ::-1]
            x0 = x1
        assert np.array_equal(crop, img[y:y + 16, x0:x0 + 16])
    assert 0 < flipped < 64
    no_flip = data.CropSampler([img], 16, scales=(1.0,), flip=False)
    crops = data.from_model_range(no_flip.sample(32, np.random.default_rng(0)))
    assert all(c[0, 0, 1] < c[0, -1, 1] for c in crops)


def test_crop_sampler_skips_scales_too_small_and_refuses_tiny_images() -> None:
    sampler = data.CropSampler([_position_image(100, 100)], 64, scales=(1.0, 0.5))
    assert [lv.shape for lv in sampler.levels[0]] == [(100, 100, 3)]
    with pytest.raises(ImageError, match="every scale"):
        data.CropSampler([_position_image(40, 100)], 64)
    with pytest.raises(ShapeError, match="uint8"):
        data.CropSampler([np.zeros((100, 100, 3), dtype=np.float32)], 64)


def test_eval_crops_deterministic_grid() -> None:
    a = data.eval_crops(["chelsea"], 64, per_image=8, scale=0.5)
    assert a.shape == (8, 3, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a, data.eval_crops(["chelsea"], 64, per_image=8, scale=0.5))
    # chelsea at 0.5 is 226 x 150: a 2 x 4 grid with corners at the image's corners
    small = data._downscale(data.load_photo("chelsea"), 0.5)
    u8 = data.from_model_range(a)
    assert np.array_equal(u8[0], small[:64, :64])
    assert np.array_equal(u8[7], small[-64:, -64:])
    assert data.eval_crops(data.HELDOUT_PHOTOS, 32, per_image=3).shape == (6, 3, 32, 32)


# ----------------------------------------------------------------------------- writing

def test_save_image_round_trip_leaves_no_temp_file(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    p = tmp_path / "sub" / "x.png"
    data.save_image(p, img)
    assert np.array_equal(data.load_image(p), img)
    assert os.listdir(p.parent) == ["x.png"]
    with pytest.raises(ImageError, match="extension"):
        data.save_image(tmp_path / "x.notanimage", img)
    assert sorted(os.listdir(tmp_path)) == ["sub"]


def test_save_grid_layout(tmp_path: Path) -> None:
    red = np.zeros((10, 10, 3), dtype=np.uint8)
    red[..., 0] = 255
    blue = np.zeros((10, 10, 3), dtype=np.uint8)
    blue[..., 2] = 255
    data.save_grid(tmp_path / "g.png", [[red, blue], [blue, red]], pad=2)
    g = data.load_image(tmp_path / "g.png")
    assert g.shape == (2 + 10 + 2 + 10 + 2, 26, 3)
    assert np.array_equal(g[2:12, 2:12], red) and np.array_equal(g[2:12, 14:24], blue)
    assert np.array_equal(g[14:24, 2:12], blue) and np.array_equal(g[14:24, 14:24], red)
    assert (g[:2] == 255).all() and (g[12:14] == 255).all() and (g[:, 12:14] == 255).all()

    data.save_grid(tmp_path / "l.png", [[red], [blue]], pad=2, labels=["ref", "recon"])
    lab = data.load_image(tmp_path / "l.png")
    x0 = lab.shape[1] - 2 - 10  # the single image column ends one pad before the right edge
    assert x0 > 12 and lab.shape[0] == 26
    assert lab[:, :x0].min() < 128  # some text was drawn left of the images
    assert np.array_equal(lab[2:12, x0:x0 + 10], red) and np.array_equal(lab[14:24, x0:x0 + 10], blue)
    with pytest.raises(ShapeError, match="labels"):
        data.save_grid(tmp_path / "bad.png", [[red]], labels=["a", "b"])
