"""Colour coverage of training: ``colour.ColourJitter``, the procedural images, the training image set.

References: the stdlib's ``colorsys`` pixel by pixel for the jitter; hue histograms for coverage.
"""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest

from v2flow_rt import data, procedural
from v2flow_rt.colour import ColourJitter, rgb_to_hsv


def _sextants(img: np.ndarray, min_saturation: float = 0.3) -> np.ndarray:
    """Fraction of the saturated pixels of uint8 [..., 3] in each of the six hue sextants (R, Y, G, C, B, M)."""
    hsv = rgb_to_hsv(img.reshape(-1, 3) / 255.0)
    hues = hsv[hsv[:, 1] >= min_saturation, 0]
    return np.bincount((np.floor(hues * 6 + 0.5) % 6).astype(int), minlength=6) / max(1, len(hues))


def test_colour_jitter_equals_colorsys_with_the_drawn_values() -> None:
    """Each recoloured crop = colorsys HSV with the crop's drawn hue, saturation and value, then the colour
    temperature on R and B; the draws replayed from the same seed (the order the class documents)."""
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    jitter = ColourJitter(p=0.5, saturation=(0.5, 1.8), value=(0.8, 1.15), temperature=0.2)
    got = jitter(crops, np.random.default_rng(11)).astype(int)
    replay = np.random.default_rng(11)
    chosen = replay.random(6) < 0.5
    hue = replay.random(6)
    sat = np.exp(replay.uniform(np.log(0.5), np.log(1.8), 6))
    val = replay.uniform(0.8, 1.15, 6)
    temp = replay.uniform(-0.2, 0.2, 6)
    assert 0 < chosen.sum() < 6                                    # the seed exercises both branches
    want = crops.astype(int).copy()
    for k in np.flatnonzero(chosen):
        for idx in np.ndindex(crops.shape[1:3]):
            h, s, v = colorsys.rgb_to_hsv(*(crops[k][idx] / 255.0))
            r, g, b = colorsys.hsv_to_rgb((h + hue[k]) % 1.0, min(1.0, s * sat[k]), min(1.0, v * val[k]))
            rgb = np.clip([r * (1 + temp[k]), g, b * (1 - temp[k])], 0.0, 1.0)
            want[k][idx] = np.rint(rgb * 255.0)
    # the same maths in another order of float operations: a value on a .5 may round either way
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.05
    np.testing.assert_array_equal(got[~chosen], crops[~chosen])     # the others untouched
    # deterministic: the same rng state, the same crops
    np.testing.assert_array_equal(jitter(crops, np.random.default_rng(11)), got)


def test_colour_jitter_spreads_one_colour_over_the_whole_hue_circle() -> None:
    red = np.zeros((600, 2, 2, 3), np.uint8)
    red[..., 0] = 200
    out = ColourJitter(p=1.0)(red, np.random.default_rng(0))
    share = _sextants(out, min_saturation=0.2)
    assert share.min() > 0.12, share                      # uniform would be 1/6 each
    assert np.array_equal(ColourJitter(p=0.0)(red, np.random.default_rng(0)), red)


@pytest.mark.parametrize("bad", [{"p": 1.5}, {"saturation": (1.2, 0.8)}, {"value": (0.0, 1.0)},
                                 {"temperature": 1.0}])
def test_colour_jitter_refuses_bad_settings(bad: dict) -> None:
    with pytest.raises(ValueError, match="ColourJitter"):
        ColourJitter(**bad)


@pytest.mark.parametrize("name", sorted(procedural.IMAGES))
def test_procedural_images_are_fixed_and_cover_every_hue(name: str) -> None:
    img = data.load_photo(name)
    assert img.dtype == np.uint8 and img.shape == (512, 512, 3)
    np.testing.assert_array_equal(img, procedural.make(name))          # same name, same pixels
    share = _sextants(img)
    assert share.min() > 0.03, share                # saturated pixels in each of the six hue sextants
    assert img.std(axis=(0, 1)).min() > 20          # content, not a flat field


def test_training_images_are_the_photos_and_the_procedural_ones_never_the_held_out() -> None:
    assert set(data.TRAIN_IMAGES) == set(data.TRAIN_PHOTOS) | set(procedural.IMAGES)
    assert not set(data.TRAIN_IMAGES) & set(data.HELDOUT_PHOTOS)
    # the photos this issue added (scikit-image, PyWavelets) are in it
    assert {"cell", "clock", "coins", "moon", "ascent"} <= set(data.TRAIN_IMAGES)


def test_crop_sampler_recolours_only_through_its_jitter() -> None:
    img = np.zeros((80, 80, 3), np.uint8)
    img[..., 0] = 220                                                        # all red
    plain = data.CropSampler([img], 16, scales=(1.0,)).sample(64, np.random.default_rng(1))
    jittered = data.CropSampler([img], 16, scales=(1.0,), colour=ColourJitter(p=1.0)).sample(
        64, np.random.default_rng(1))
    assert np.array_equal(plain[:, 1:], np.full_like(plain[:, 1:], -1.0))     # no green, no blue
    share = _sextants(data.from_model_range(jittered), min_saturation=0.2)
    assert share.min() > 0.05, share


def test_training_with_colour_augmentation_records_it(tmp_path) -> None:
    from v2flow_rt.config import get_preset
    from v2flow_rt.errors import ConfigError
    from v2flow_rt.reference.train import TrainSettings, train

    cfg = get_preset("tiny", codebook_size=256, encoder_depth=1, decoder_depth=1, flow_depth=1)
    s = TrainSettings(steps=2, batch_size=2, warmup=1, colour_aug=0.5, save_every=100)
    final = train(cfg, tmp_path, s, photos=["coffee", "colour_clouds_1"], progress=False)
    extra = json.loads((final / "config.json").read_text())["extra"]
    assert extra["train_settings"]["colour_aug"] == 0.5
    assert extra["train_photos"] == ["coffee", "colour_clouds_1"]
    with pytest.raises(ConfigError, match="colour_aug"):
        train(cfg, tmp_path / "x", TrainSettings(steps=2, colour_aug=1.5), progress=False)
