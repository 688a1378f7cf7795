"""Colour transforms of uint8 RGB images (numpy only): hue rotation and saturation scaling in HSV.

Used by the colour evaluation suite (``evaluate.evaluate_colour``) to show a model photos whose palette
is unlike its training set's, and by training (``ColourJitter``) so that a model learns every hue. HSV as
in ``colorsys``: hue in turns [0, 1), value = max(R, G, B), saturation = (max − min) / max; a gray pixel
has no hue and stays gray under every rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in [0, 1], shape [..., 3] → HSV in [0, 1] (hue in turns), same shape, float64."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    c = v - rgb.min(axis=-1)                                     # chroma
    s = np.where(v > 0, c / np.where(v > 0, v, 1.0), 0.0)
    safe = np.where(c > 0, c, 1.0)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(c > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] (hue in turns), shape [..., 3] → float RGB in [0, 1], float64."""
    hsv = np.asarray(hsv, dtype=np.float64)
    h, s, v = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0   # [..., 3]: the R, G, B phase
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def recolour(images: np.ndarray, hue_deg: float = 0.0, saturation: float = 1.0) -> np.ndarray:
    """uint8 [..., 3] RGB images with the hue rotated by ``hue_deg`` degrees and the saturation scaled by
    ``saturation`` (clipped to 1); value (brightness of the strongest channel) is kept. → uint8, same shape.
    """
    if hue_deg % 360.0 == 0.0 and saturation == 1.0:
        return np.array(images, dtype=np.uint8, copy=True)
    hsv = rgb_to_hsv(np.asarray(images, dtype=np.float64) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + hue_deg / 360.0) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0.0, 1.0)
    return np.rint(hsv_to_rgb(hsv) * 255.0).clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- training augmentation

@dataclass(frozen=True)
class ColourJitter:
    """Random colour changes of training crops, so a model sees every hue whatever its photos' palette.

    Each crop is changed with probability ``p``; a changed crop gets all four, each drawn on its own:
    its hue rotated by a uniform angle over the whole circle, its saturation scaled log-uniformly in
    ``saturation`` (clipped to 1), its value (HSV V) scaled uniformly in ``value`` (clipped), and a
    colour temperature shift: red × (1 + t), blue × (1 − t) with t uniform in ±``temperature``, which
    also tints gray photos that hue rotation leaves gray.
    """

    p: float = 0.8
    saturation: tuple[float, float] = (0.5, 1.8)
    value: tuple[float, float] = (0.8, 1.15)
    temperature: float = 0.15

    def __post_init__(self) -> None:
        lo_s, hi_s = self.saturation
        lo_v, hi_v = self.value
        if not (0.0 <= self.p <= 1.0 and 0.0 < lo_s <= hi_s and 0.0 < lo_v <= hi_v
                and 0.0 <= self.temperature < 1.0):
            raise ValueError(f"ColourJitter: expected p in [0, 1], 0 < low <= high for saturation and value, "
                             f"temperature in [0, 1); got {self}")

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [n, H, W, 3] → uint8 [n, H, W, 3], the chosen crops recoloured (a new array).

        Draws a fixed number of values per crop from ``rng`` (changed or not), so the same rng state gives
        the same crops whatever ``p`` picks.
        """
        n = len(images)
        chosen = rng.random(n) < self.p
        hue = rng.random(n)                                                     # turns
        sat = np.exp(rng.uniform(np.log(self.saturation[0]), np.log(self.saturation[1]), n))
        val = rng.uniform(self.value[0], self.value[1], n)
        temp = rng.uniform(-self.temperature, self.temperature, n)
        out = np.array(images, dtype=np.uint8, copy=True)
        if not chosen.any():
            return out
        hsv = rgb_to_hsv(out[chosen] / 255.0)                                   # (k, H, W, 3)
        k = (slice(None), None, None)
        hsv[..., 0] = (hsv[..., 0] + hue[chosen][k]) % 1.0
        hsv[..., 1] = np.clip(hsv[..., 1] * sat[chosen][k], 0.0, 1.0)
        hsv[..., 2] = np.clip(hsv[..., 2] * val[chosen][k], 0.0, 1.0)
        rgb = hsv_to_rgb(hsv)
        rgb[..., 0] *= 1.0 + temp[chosen][k]
        rgb[..., 2] *= 1.0 - temp[chosen][k]
        out[chosen] = np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        return out
